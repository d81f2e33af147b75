"""Benchmark: ``merge --method svd`` of two rank-32 LoRAs (weights 0.8 / 0.5) to rank 32 on SDXL
layer shapes, against kohya's svd_merge_lora algorithm, measured in the same run.

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

    python bench/merge.py [--modules 12] [--rank 32] [--to 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280), (1280, 5120)]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", type=int, default=12)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--to", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import loradex

    items = [(make_adapter(args.modules, args.rank, 0), 0.8), (make_adapter(args.modules, args.rank, 1), 0.5)]
    t0 = time.perf_counter()
    merged, report = loradex.merge(items, "svd", rank=args.to)
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
        "modules": args.modules, "rank": args.rank, "to": args.to, "threads": torch.get_num_threads(),
        "loradex_s": t_ours, "kohya_s": t_kohya, "speedup": t_kohya / t_ours,
        "loradex_error_vs_optimal": max(ratios_ours), "kohya_error_vs_optimal": max(ratios_kohya),
        "max_rel_error": report.max_error,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"merge svd: 2 x {args.modules} SDXL-size modules, rank {args.rank} + {args.rank} -> {args.to}, "
          f"{result['threads']} threads")
    print(f"  loradex (stacked factors: QR + core SVD): {t_ours:8.3f} s")
    print(f"  kohya svd_merge_lora (dense full SVD):    {t_kohya:8.3f} s   speed-up {result['speedup']:.1f}x")
    print(f"  error / optimal truncation: loradex {result['loradex_error_vs_optimal']:.4f}x, "
          f"kohya {result['kohya_error_vs_optimal']:.3f}x (worst module)")


if __name__ == "__main__":
    main()
