"""Benchmark: extract a rank-32 LoRA from an SD1.5-size fine-tune, loradex vs kohya's algorithm.

Models (built here, written to disk first so both sides read files): single-file LDM checkpoints
(fp16, ``model.diffusion_model.<SGM name>`` / ``cond_stage_model.transformer.*``) holding the
SD1.5 shapes of the UNet's transformer-block layers (attention q/k/v/out, cross-attention,
feed-forward, proj_in/proj_out: 192 modules, 267 M parameters) and of the CLIP-L text encoder's
attention/MLP layers (72 modules, 85 M parameters). The full UNet (859 M parameters: 6.9 GB for
both models in fp32 in the baseline's memory) does not fit a shared 2-core machine in minutes;
its resnets are convs that kohya extracts only with ``--conv_dim``. Base weights ~ N(0, 0.02^2);
tuned = base + a rank-32 delta (``||dW|| = 0.1 ||W||``) + dense noise (``--noise`` of ``||dW||``).
``--small``: only the first UNet level and two text-encoder layers (seconds).

* loradex: ``loradex.extract(base, tuned, rank=32)`` (lazy reader, one tensor pair in memory,
  fp32 difference, randomized SVD) and ``loradex.save(..., "kohya")``.
* baseline: kohya sd-scripts' published algorithm (``networks/extract_lora_from_models.py``):
  both models loaded whole (fp32), the difference of every module, ``torch.linalg.svd`` of it
  (default ``full_matrices=True``, as kohya calls it), ``U[:, :r] diag(S[:r])`` and ``Vh[:r]``
  clamped at the 0.99 quantile of their entries, alpha = rank, written with safetensors; its
  text-encoder rule (skip ALL text-encoder modules when max |dW| <= 0.01) is applied and reported.

Each side runs in its own subprocess (so they do not share the allocator); each reports its wall
time (imports excluded) and its peak RSS (``ru_maxrss``, imports included). Errors are
``||dW - dW_lora|| / ||dW||`` over all modules; the optimal (Eckart-Young) error comes from the
baseline's full spectra, measured outside its timed region.

    python bench/extract.py [--small] [--rank 32] [--noise 0.1] [--dir DIR [--reuse]] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RANK = 32
SEED = 0


def select_modules(small: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(canonical name, weight shape) of the benchmarked SD1.5 modules."""
    from loradex.core.archs import get_arch

    mods = get_arch("sd1").modules
    out = []
    for n, info in mods.items():
        unet = n.startswith("unet.") and (
            (".transformer_blocks." in n and info.type == "linear") or n.endswith((".proj_in", ".proj_out")))
        te = n.startswith("text_encoder.") and info.type == "linear" and ".encoder.layers." in n
        if small and unet and not n.startswith("unet.down_blocks.0."):
            unet = False
        if small and te and not n.startswith(("text_encoder.text_model.encoder.layers.0.",
                                              "text_encoder.text_model.encoder.layers.1.")):
            te = False
        if unet or te:
            out.append((n, info.shape))
    return out


def file_key(arch, name: str) -> str:
    if name.startswith("unet."):
        return f"model.diffusion_model.{arch.sgm_name(name)}.weight"
    return "cond_stage_model.transformer." + name[len("text_encoder."):] + ".weight"


def _tensors(i: int, shape: tuple[int, ...], rank: int, noise: float, tuned: bool) -> torch.Tensor:
    """Module ``i``'s base (or tuned) weight, regenerated from its seed (nothing is kept)."""
    g = torch.Generator().manual_seed(SEED * 100003 + i)
    m, n = shape[0], math.prod(shape[1:])
    w = torch.randn(m, n, generator=g) * 0.02
    if tuned:
        a, b = torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
        dw = a @ b
        dw *= 0.1 * float(torch.linalg.vector_norm(w)) / float(torch.linalg.vector_norm(dw))
        eps = torch.randn(m, n, generator=g)
        dw += eps * (noise * float(torch.linalg.vector_norm(dw)) / float(torch.linalg.vector_norm(eps)))
        w += dw
    return w.reshape(shape).half()


def make_models(d: Path, small: bool, rank: int, noise: float) -> tuple[Path, Path, int]:
    """Write base.safetensors and tuned.safetensors (streamed, one tensor at a time)."""
    from loradex.converters.streaming import stream_safetensors
    from loradex.core.archs import get_arch

    arch = get_arch("sd1")
    mods = select_modules(small)
    paths = []
    for tuned in (False, True):
        p = d / ("tuned.safetensors" if tuned else "base.safetensors")
        entries = [(file_key(arch, n), "F16", tuple(s), (lambda i=i, s=s, t=tuned: _tensors(i, s, rank, noise, t)))
                   for i, (n, s) in enumerate(mods)]
        stream_safetensors(p, entries, {"modelspec.architecture": "stable-diffusion-v1"})
        paths.append(p)
    return paths[0], paths[1], sum(math.prod(s) for _, s in mods)


# ---- workers (each in its own process) ---------------------------------------------------------------
def worker_loradex(base: str, tuned: str, rank: int, out: str) -> dict:
    import loradex
    import loradex.core.archs

    t0, c0 = time.perf_counter(), time.process_time()
    adapter, report = loradex.extract(base, tuned, rank=rank, arch="sd1")
    loradex.save(adapter, out, "kohya", arch="sd1")
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    arch = loradex.core.archs.get_arch("sd1")
    mods = {file_key(arch, n)[: -len(".weight")]: {"error": m["error"], "dw2": m["dw2"], "method": m["method"]}
            for n, m in report.modules.items()}
    return {"seconds": sec, "cpu_seconds": cpu, "modules": mods}


def worker_kohya(base: str, tuned: str, rank: int, out: str) -> dict:
    """kohya's extract_lora_from_models algorithm (see the module docstring)."""
    from safetensors.torch import load_file, save_file

    clamp_quantile = 0.99
    t0, c0 = time.perf_counter(), time.process_time()
    sd_o = {k: v.float() for k, v in load_file(base).items()}  # both models whole, in fp32
    sd_t = {k: v.float() for k, v in load_file(tuned).items()}
    diffs = {k: sd_t[k] - sd_o[k] for k in sd_o}
    te_keys = [k for k in diffs if k.startswith("cond_stage_model.")]
    te_skipped = bool(te_keys) and max(float(diffs[k].abs().max()) for k in te_keys) <= 0.01
    if te_skipped:
        for k in te_keys:
            del diffs[k]
    measured = measured_cpu = 0.0
    lora, mods = {}, {}
    for k, mat in diffs.items():
        name = k[: -len(".weight")]
        mat = mat.squeeze() if mat.ndim == 4 else mat
        U, S, Vh = torch.linalg.svd(mat)
        U = U[:, :rank] @ torch.diag(S[:rank])
        Vh = Vh[:rank, :]
        dist = torch.cat([U.flatten(), Vh.flatten()])
        hi = torch.quantile(dist, clamp_quantile)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"] = U.contiguous(), Vh.contiguous()
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
        t1, c1 = time.perf_counter(), time.process_time()  # error measurement: not part of the algorithm
        s2 = S.double() ** 2
        dw2 = float(s2.sum())
        err = float(torch.linalg.vector_norm(mat.double() - U.double() @ Vh.double())) ** 2 / dw2
        mods[name] = {"error": math.sqrt(err), "optimal": math.sqrt(float(s2[rank:].sum()) / dw2), "dw2": dw2}
        measured += time.perf_counter() - t1
        measured_cpu += time.process_time() - c1
    save_file(lora, out)
    sec, cpu = time.perf_counter() - t0 - measured, time.process_time() - c0 - measured_cpu
    return {"seconds": sec, "cpu_seconds": cpu, "modules": mods, "te_skipped": te_skipped}


def run_worker(which: str, base: Path, tuned: Path, rank: int, d: Path) -> dict:
    res = d / f"{which}.json"
    cmd = [sys.executable, __file__, "--worker", which, "--base", str(base), "--tuned", str(tuned),
           "--rank", str(rank), "--result", str(res), "--out", str(d / f"{which}_lora.safetensors")]
    subprocess.run(cmd, check=True)
    return json.loads(res.read_text())


def total_error(mods: dict, key: str = "error") -> float:
    num = sum(m[key] ** 2 * m["dw2"] for m in mods.values())
    return math.sqrt(num / sum(m["dw2"] for m in mods.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="first UNet level + 2 text-encoder layers only")
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--noise", type=float, default=0.1, help="dense noise, as a fraction of ||dW||")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    ap.add_argument("--reuse", action="store_true", help="reuse base/tuned files already in --dir (same options)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=["loradex", "kohya"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--tuned", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = worker_loradex if args.worker == "loradex" else worker_kohya
        res = fn(args.base, args.tuned, args.rank, args.out)
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(args.result).write_text(json.dumps(res))
        return

    tmp = None
    if args.dir:
        d = Path(args.dir)
        d.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="loradex-bench-extract-")
        d = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        if args.reuse and (d / "base.safetensors").is_file() and (d / "tuned.safetensors").is_file():
            base, tuned = d / "base.safetensors", d / "tuned.safetensors"
            nparams = sum(math.prod(s) for _, s in select_modules(args.small))
        else:
            base, tuned, nparams = make_models(d, args.small, args.rank, args.noise)
        made = time.perf_counter() - t0
        ours = run_worker("loradex", base, tuned, args.rank, d)
        kohya = run_worker("kohya", base, tuned, args.rank, d)
    finally:
        if tmp is not None:
            tmp.cleanup()
    opt = total_error(kohya["modules"], "optimal")
    ours_err, kohya_err = total_error(ours["modules"]), total_error(kohya["modules"])
    ratio_per_module = max(ours["modules"][n]["error"] / kohya["modules"][n]["optimal"] for n in kohya["modules"])
    out = {
        "modules": len(ours["modules"]), "parameters_per_model": nparams, "rank": args.rank, "noise": args.noise,
        "scope": "small" if args.small else "transformer-block layers + text encoder (no resnets)",
        "models_written_s": made,
        "loradex": {"seconds": ours["seconds"], "cpu_seconds": ours["cpu_seconds"], "peak_rss_gib": ours["peak_rss_bytes"] / 2**30, "error": ours_err,
                    "randomized": sum(m["method"] == "randomized" for m in ours["modules"].values())},
        "kohya": {"seconds": kohya["seconds"], "cpu_seconds": kohya["cpu_seconds"], "peak_rss_gib": kohya["peak_rss_bytes"] / 2**30, "error": kohya_err,
                  "text_encoder_skipped": kohya["te_skipped"]},
        "optimal_error": opt,
        "speedup": kohya["seconds"] / ours["seconds"],
        "cpu_speedup": kohya["cpu_seconds"] / ours["cpu_seconds"],
        "memory_ratio": ours["peak_rss_bytes"] / kohya["peak_rss_bytes"],
        "error_vs_optimal": ours_err / opt, "worst_module_error_vs_optimal": ratio_per_module,
        "kohya_error_vs_optimal": kohya_err / opt,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"extract bench: {out['modules']} modules ({out['scope']}), {nparams / 1e6:.0f} M parameters per model, "
          f"fp16 single files, rank {args.rank}, noise {args.noise:g} of ||dW||; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print(f"  loradex : {ours['seconds']:7.1f} s ({ours['cpu_seconds']:.1f} CPU-s), peak RSS {out['loradex']['peak_rss_gib']:.2f} GiB, "
          f"error {ours_err:.5f} ({out['loradex']['randomized']} randomized SVDs)")
    print(f"  kohya   : {kohya['seconds']:7.1f} s ({kohya['cpu_seconds']:.1f} CPU-s), peak RSS {out['kohya']['peak_rss_gib']:.2f} GiB, error {kohya_err:.5f}"
          + (" (text encoder skipped by its max|dW| <= 0.01 rule)" if kohya["te_skipped"] else ""))
    print(f"  optimal : error {opt:.5f} (full SVD truncation)")
    print(f"extract: {out['speedup']:.1f}x faster than the kohya baseline (goal >= 20x); "
          f"{out['cpu_speedup']:.1f}x less CPU time (the wall-clock ratio depends on the machine's other load)")
    print(f"extract: {out['memory_ratio']:.3f}x the baseline's peak memory (goal <= 0.2x)")
    print(f"extract: error {out['error_vs_optimal']:.4f}x the optimal truncation (worst module "
          f"{ratio_per_module:.4f}x; goal <= 1.01x); kohya's clamp: {out['kohya_error_vs_optimal']:.1f}x")


if __name__ == "__main__":
    main()
