"""Benchmarks of ``loradex merge``, each against a baseline measured in the same run.

**svd** (``--only svd``): ``merge --method svd`` of two rank-32 LoRAs (weights 0.8 / 0.5) to rank
32 on SDXL layer shapes, against kohya's svd_merge_lora algorithm.

* loradex: ``loradex.merge(items, "svd", rank=32)``: the stacked factors ``[0.8 g1 up1 | 0.5 g2 up2]``
  and ``[down1; down2]`` (rank 64), QR of both, SVD of the 64 x 64 core (cost independent of the
  layer size), balanced factors, no clamp.
* baseline: kohya sd-scripts' published algorithm (networks/svd_merge_lora.py): dense
  ``sum_i ratio_i * scale_i * up_i @ down_i`` in float32, ``torch.linalg.svd`` (full_matrices, as
  kohya calls it), keep ``U[:, :k] diag(S[:k])`` and ``Vh[:k]``, clamp both at the 0.99 quantile of
  their entries, alpha = rank.

Printed: wall time of each, the speed-up, and each one's relative Frobenius error of the merged
update against the optimal rank-32 truncation (a full SVD in float64, computed here outside the
timings): loradex is the optimum; kohya's clamp costs accuracy.

**ties** (``--only ties``, issue 14): ``merge --method ties --density 0.2 --rank 64`` of 2 and of
10 SD1.5-size LoRAs: random rank-64 factors (fp16, alpha 32, a decaying spectrum like trained
LoRAs', weight 1 each) at the real SD1.5 module shapes from ``loradex.core.archs`` (``get_arch("sd1")``):
``--modules all`` (default) every linear and conv layer of the UNet and the text encoder (354
modules, 944 M weights: a LoCon), ``--modules lora`` kohya's default LoRA targets (transformer
blocks and text-encoder attention/MLP: 264 modules, 352 M).

* loradex: ``merge(items, "ties", rank=64, density=0.2)`` on every module, timed whole, twice:
  with the process's default torch threads (its thread pool over modules) and with 1 thread
  (float32 updates, exact top-k threshold from a sampled bracket, chunked election, range finder
  from the inputs' ``up`` factors: see ``loradex.merge.ties``).
* baseline: the path loradex had before (the same code: ``ties.combine`` on float64 dense
  updates, ``torch.topk`` trimming, ``svd.reduce_dense`` = float64 randomized SVD with 4 power
  iterations and an explicit float64 residual), also at the default threads and at 1 thread. It
  takes ~18 minutes on the full set, so it runs on one module of each distinct shape with at
  most ``--old-cap / N`` weights (N inputs; default 16 M for 2 inputs, 3.2 M for 10) and is
  extrapolated per module: a measured shape counts its measured time for each of its modules, a
  larger shape the per-weight time of the largest measured shape. The baseline's per-weight cost
  grows with the layer (``topk``; measured: 340 ns at 640x5760, 490 ns at 1280x11520 for 2
  inputs, 1 thread), so the extrapolation understates it: the printed speed-ups are lower bounds.
* error: on those measured modules (but the 2 with fewer than 64 rows or columns, kept whole by
  both), each path's ``||M - M_k|| / ||M||`` for its own merged update ``M`` (loradex: float32,
  the baseline: float64; the two agree to ~1e-8), divided by the optimal rank-64 truncation error
  of ``M`` (``torch.linalg.svdvals`` in float64, outside the timings): the worst module is printed.

Two speed-ups are printed, each next to the goal: at the default threads (as run; on a machine
shared with other busy processes the baseline's 2 OpenMP threads can stall each other, measured
up to 5x slower than 1 thread, which inflates this one) and at 1 thread each (the algorithms
alone). The load average is printed first.

    python bench/merge.py [--only svd|ties] [--modules all|lora] [--inputs 2,10] [--old-cap N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

SHAPES = [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280), (1280, 5120)]
GOAL_SPEEDUP = 20.0
GOAL_ERROR = 1.01


# ---- svd -------------------------------------------------------------------------------------------
def make_adapter(n: int, rank: int, seed: int):
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    g = torch.Generator().manual_seed(seed)
    patches = {}
    for i in range(n):
        out, inp = SHAPES[i % len(SHAPES)]
        decay = torch.logspace(0, -2, rank).sqrt()  # a decaying spectrum, like trained LoRAs
        up = torch.randn(out, rank, generator=g) * decay * 0.05
        down = torch.randn(rank, inp, generator=g) * 0.05
        patches[f"unet.m{i}"] = LoraPatch(up=up, down=down, alpha=torch.tensor(rank / 2.0))
    return Adapter(patches=patches)


def kohya_svd_merge(items, new_rank: int, clamp: float = 0.99) -> dict[str, torch.Tensor]:
    """kohya's svd_merge_lora per module; returns the merged dense update (for the error)."""
    out = {}
    for name in items[0][0].patches:
        weight = None
        for a, ratio in items:
            p = a.patches[name]
            d = p.up.float() @ p.down.float() * (p.scale * ratio)
            weight = d if weight is None else weight + d
        U, S, Vh = torch.linalg.svd(weight)
        U = U[:, :new_rank] @ torch.diag(S[:new_rank])
        Vh = Vh[:new_rank, :]
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi = torch.quantile(dist, clamp) if dist.numel() <= 16_000_000 else dist.abs().max()
        out[name] = (U.clamp(-hi, hi) @ Vh.clamp(-hi, hi)).double()
    return out


def bench_svd(args) -> dict:
    from loradex.merge import merge

    items = [(make_adapter(args.modules_svd, args.rank, 0), 0.8), (make_adapter(args.modules_svd, args.rank, 1), 0.5)]
    t0 = time.perf_counter()
    merged, report = merge(items, "svd", rank=args.to)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = kohya_svd_merge(items, args.to)
    t_kohya = time.perf_counter() - t0

    ratios_ours, ratios_kohya = [], []
    for name, got in ref.items():
        dense = sum(a.patches[name].delta().double() * w for a, w in items)
        s = torch.linalg.svdvals(dense)
        optimal = float((s[args.to:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        norm = float(torch.linalg.vector_norm(dense))
        ratios_ours.append(float(torch.linalg.vector_norm(merged.patches[name].delta().double() - dense)) / norm / optimal)
        ratios_kohya.append(float(torch.linalg.vector_norm(got - dense)) / norm / optimal)
    result = {
        "modules": args.modules_svd, "rank": args.rank, "to": args.to, "threads": torch.get_num_threads(),
        "loradex_s": t_ours, "kohya_s": t_kohya, "speedup": t_kohya / t_ours,
        "loradex_error_vs_optimal": max(ratios_ours), "kohya_error_vs_optimal": max(ratios_kohya),
        "max_rel_error": report.max_error,
    }
    if not args.json:
        print(f"merge svd: 2 x {args.modules_svd} SDXL-size modules, rank {args.rank} + {args.rank} -> {args.to}, "
              f"{result['threads']} threads")
        print(f"  loradex (stacked factors: QR + core SVD): {t_ours:8.3f} s")
        print(f"  kohya svd_merge_lora (dense full SVD):    {t_kohya:8.3f} s   speed-up {result['speedup']:.1f}x")
        print(f"  error / optimal truncation: loradex {result['loradex_error_vs_optimal']:.4f}x, "
              f"kohya {result['kohya_error_vs_optimal']:.3f}x (worst module)")
    return result


# ---- ties --------------------------------------------------------------------------------------------
def sd1_modules(which: str) -> dict[str, tuple[int, ...]]:
    """name -> weight shape of the SD1.5 linear and conv layers (UNet + text encoder)."""
    from loradex.core.archs import get_arch

    out = {}
    for name, info in get_arch("sd1").modules.items():
        if info.type not in ("linear", "conv") or len(info.shape) not in (2, 4):
            continue
        if which == "lora" and not ("attentions" in name or name.startswith("text_encoder")):
            continue
        out[name] = tuple(info.shape)
    return out


def make_sd1_lora(modules: dict, rank: int, seed: int):
    """A LoRA/LoCon with random fp16 factors on every module (conv: ``down`` (r, in, kh, kw))."""
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, rank).sqrt()
    patches = {}
    for name, shape in modules.items():
        out, rest = shape[0], shape[1:]
        up = (torch.randn(out, rank, generator=g) * decay * 0.05).half()
        down = (torch.randn(rank, math.prod(rest), generator=g) * 0.05).half().reshape(rank, *rest)
        if len(shape) == 4:
            up = up.reshape(out, rank, 1, 1)
        patches[name] = LoraPatch(up=up, down=down, alpha=torch.tensor(rank / 2.0))
    return Adapter(patches=patches, arch="sd1")


def old_path_module(name: str, parts, policy: dict, density: float, seed: int = 0):
    """The float64 path loradex had before (its code, unchanged): ``(seconds, merged, error)``."""
    from loradex.merge.svd import bias_sum, lora_from_factors, module_shape, out_dtype, reduce_dense
    from loradex.merge.ties import combine

    t0 = time.perf_counter()
    shape = module_shape(name, parts)
    deltas = [p.delta().double().reshape(shape[0], -1) for _, p, _ in parts]
    mat = combine("ties", deltas, [w for _, _, w in parts], density, None)
    up, down, _, _, error, _ = reduce_dense(mat, policy, seed)
    lora_from_factors(up, down, shape, out_dtype(parts), bias_sum(parts))
    return time.perf_counter() - t0, mat, error


def optimal_error(mat: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(mat.double())
    return float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


def extrapolate(modules: dict, measured: dict) -> tuple[float, int, str]:
    """The old path's time on every module from its times on ``measured`` (name -> s): a measured
    shape counts its time for each module of that shape, a larger one the per-weight time of the
    largest measured shape. Returns ``(seconds, modules extrapolated, that shape)``."""
    entries = {name: math.prod(shape) for name, shape in modules.items()}
    by_shape = {modules[name]: t for name, t in measured.items()}
    largest = max(measured, key=lambda nm: entries[nm])
    rate = measured[largest] / entries[largest]
    total, extra = 0.0, 0
    for name, shape in modules.items():
        if shape in by_shape:
            total += by_shape[shape]
        else:
            total += rate * entries[name]
            extra += 1
    return total, extra, "x".join(map(str, modules[largest]))


def bench_ties(args, n_inputs: int, modules: dict, subset: list[str]) -> dict:
    from loradex.merge import merge
    from loradex.merge.ties import merged_update

    rank, density = 64, 0.2
    threads = torch.get_num_threads()
    items = [(make_sd1_lora(modules, rank, seed), 1.0) for seed in range(n_inputs)]
    entries = sum(math.prod(s) for s in modules.values())

    def run_new(n_threads: int):
        torch.set_num_threads(n_threads)
        try:
            t0 = time.perf_counter()
            merged, report = merge(items, "ties", rank=rank, density=density)
            return time.perf_counter() - t0, merged, report
        finally:
            torch.set_num_threads(threads)

    t_new, merged, report = run_new(threads)
    t_new_1 = run_new(1)[0] if threads > 1 else t_new

    old = {threads: {}, 1: {}}
    ratios_new, ratios_old = [], []
    for name in subset:
        parts = [(i, a.patches[name], w) for i, (a, w) in enumerate(items)]
        for n_threads in sorted(old, reverse=True):
            torch.set_num_threads(n_threads)
            try:
                seconds, mat_old, err_old = old_path_module(name, parts, {"rank": rank}, density)
            finally:
                torch.set_num_threads(threads)
            old[n_threads][name] = seconds
        mat = merged_update(name, parts, "ties", density).double()
        if min(mat.shape) > rank:  # else both keep it whole (error 0)
            got = merged.patches[name].delta().double().reshape(mat.shape)
            ratios_new.append(float(torch.linalg.vector_norm(got - mat) / torch.linalg.vector_norm(mat))
                              / optimal_error(mat, rank))
            ratios_old.append(err_old / optimal_error(mat_old, rank))
        del mat_old, mat
    t_old, n_extra, largest = extrapolate(modules, old[threads])
    t_old_1 = extrapolate(modules, old[1])[0]
    result = {
        "inputs": n_inputs, "modules": len(modules), "entries": entries, "threads": threads,
        "loradex_s": t_new, "old_s_extrapolated": t_old, "speedup": t_old / t_new,
        "loradex_1thread_s": t_new_1, "old_1thread_s_extrapolated": t_old_1, "speedup_1thread": t_old_1 / t_new_1,
        "old_measured_modules": len(subset), "old_measured_s": sum(old[threads].values()),
        "old_measured_1thread_s": sum(old[1].values()), "old_modules_at_rate": n_extra, "rate_shape": largest,
        "loradex_error_vs_optimal": max(ratios_new), "old_error_vs_optimal": max(ratios_old),
        "max_rel_error": report.max_error,
    }
    if not args.json:
        def verdict(ok: bool) -> str:
            return "ok" if ok else "MISSED"

        print(f"merge ties --density {density} --rank {rank}: {n_inputs} SD1.5-size LoRAs (--modules {args.modules}: "
              f"{len(modules)} modules, {entries / 1e6:.0f} M weights each)")
        print(f"  old path EXTRAPOLATED from {len(subset)} modules measured here (one per shape up to "
              f"{args.old_cap / n_inputs / 1e6:g} M weights: {result['old_measured_s']:.1f} s at {threads} threads, "
              f"{result['old_measured_1thread_s']:.1f} s at 1); the other {n_extra} modules at the per-weight time of "
              f"{largest} (a lower bound: its per-weight time grows with the layer)")
        for label, new_s, old_s, ratio in (
                (f"{threads} threads (default)", t_new, t_old, result["speedup"]),
                ("1 thread each", t_new_1, t_old_1, result["speedup_1thread"])):
            print(f"  {label:20s} loradex {new_s:7.1f} s (all modules, measured)   old {old_s:8.1f} s   "
                  f"speed-up {ratio:6.1f}x   goal >= {GOAL_SPEEDUP:g}x   {verdict(ratio >= GOAL_SPEEDUP)}")
        print(f"  error / optimal truncation, worst of the {len(subset)} measured modules: loradex "
              f"{result['loradex_error_vs_optimal']:.4f}x   goal <= {GOAL_ERROR}x   "
              f"{verdict(result['loradex_error_vs_optimal'] <= GOAL_ERROR)}   (old path {result['old_error_vs_optimal']:.4f}x)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("svd", "ties"), default=None)
    ap.add_argument("--modules-svd", type=int, default=12, help="svd: SDXL-shaped modules")
    ap.add_argument("--rank", type=int, default=32, help="svd: input rank")
    ap.add_argument("--to", type=int, default=32, help="svd: output rank")
    ap.add_argument("--modules", choices=("all", "lora"), default="all", help="ties: which SD1.5 layers")
    ap.add_argument("--inputs", default="2,10", help="ties: input counts, comma-separated")
    ap.add_argument("--old-cap", type=float, default=32e6,
                    help="ties: the old path runs on one module per shape of at most this many weights "
                         "times inputs (default 32 M: up to 16 M weights for 2 inputs, 3.2 M for 10)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out: dict = {"load_average": load, "cpus": os.cpu_count()}
    if not args.json:
        print(f"(load average {load:.1f} on {os.cpu_count()} CPUs)")
    if args.only in (None, "svd"):
        out["svd"] = bench_svd(args)
    if args.only in (None, "ties"):
        modules = sd1_modules(args.modules)
        out["ties"] = []
        for n in map(int, args.inputs.split(",")):
            first: dict = {}
            for name, shape in modules.items():
                if math.prod(shape) * n <= args.old_cap:
                    first.setdefault(shape, name)
            out["ties"].append(bench_ties(args, n, modules, list(first.values())))
    out["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"(load average {out['load_average_end']:.1f} at the end)")


if __name__ == "__main__":
    main()
