"""Benchmark: resize a synthetic SDXL-size LoRA from rank 128 to 32.

50 Linear modules with SDXL UNet shapes (``(out, in)``: attention projections (640, 640) and
(1280, 1280), cross-attention to_k/to_v (640|1280, 2048), feed-forward (5120, 1280) and
(1280, 5120)), rank 128, alpha 64, float32 factors.

* loradex: ``loradex.resize(adapter, rank=32)`` (QR of the factors + SVD of the 128 x 128 core;
  cost independent of the layer size).
* baseline: kohya sd-scripts' published algorithm (networks/resize_lora.py, ``extract_linear``):
  dense ``up @ down`` in float32, ``torch.linalg.svd`` of it (default ``full_matrices=True``, as
  kohya calls it), keep ``U[:, :k] diag(S[:k])`` and ``Vh[:k]``, alpha = scale * k. ``--thin``
  also times the same with ``full_matrices=False`` (a fairer, faster dense baseline).

Printed: wall time of each (median of ``--repeat`` for loradex, one run for the baseline), the
speed-up, and the max relative difference of the kept singular values (loradex's are read back
from its factors).

    python bench/resize.py [--modules 50] [--rank 128] [--to 32] [--repeat 3] [--thin] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = [(640, 640)] * 14 + [(1280, 1280)] * 14 + [(640, 2048)] * 5 + [(1280, 2048)] * 5 \
    + [(5120, 1280)] * 6 + [(1280, 5120)] * 6


def make_adapter(n: int, rank: int):
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    g = torch.Generator().manual_seed(0)
    patches = {}
    for i in range(n):
        out, inp = SHAPES[i % len(SHAPES)]
        # a decaying spectrum, like trained LoRAs
        decay = torch.logspace(0, -2, rank).sqrt()
        up = torch.randn(out, rank, generator=g) * decay * 0.05
        down = torch.randn(rank, inp, generator=g) * 0.05
        patches[f"unet.m{i}"] = LoraPatch(up=up, down=down, alpha=torch.tensor(rank / 2.0))
    return Adapter(patches=patches)


def kohya_resize(adapter, new_rank: int, full_matrices: bool = True) -> dict[str, torch.Tensor]:
    """kohya's resize_lora on every module (fixed rank); returns the kept singular values of the
    scaled update (kohya keeps the scale in alpha; multiplied here to compare)."""
    out = {}
    for name, p in adapter.patches.items():
        scale = p.scale
        weight = p.up.float() @ p.down.float()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=full_matrices)
        k = new_rank
        lora_up = U[:, :k] @ torch.diag(S[:k])
        lora_down = Vh[:k, :]
        new_alpha = scale * k
        del lora_up, lora_down, new_alpha
        out[name] = S[:k].double() * scale
    return out


def loradex_sv(resized) -> dict[str, torch.Tensor]:
    """Singular values of loradex's result: U and Vh are orthonormal, so S_i = |up_i| |down_i| * scale."""
    out = {}
    for name, p in resized.patches.items():
        up, down = p.factors(torch.float64)
        out[name] = torch.linalg.vector_norm(up, dim=0) * torch.linalg.vector_norm(down, dim=1) * p.scale
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modules", type=int, default=50)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--to", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--thin", action="store_true", help="also time the dense baseline with full_matrices=False")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import loradex

    a = make_adapter(args.modules, args.rank)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        resized, report = loradex.resize(a, rank=args.to)
        times.append(time.perf_counter() - t0)
    t_ours = statistics.median(times)
    t0 = time.perf_counter()
    ref = kohya_resize(a, args.to)
    t_kohya = time.perf_counter() - t0
    result = {
        "modules": args.modules, "rank": args.rank, "to": args.to, "threads": torch.get_num_threads(),
        "loradex_s": t_ours, "kohya_s": t_kohya, "speedup": t_kohya / t_ours,
    }
    if args.thin:
        t0 = time.perf_counter()
        kohya_resize(a, args.to, full_matrices=False)
        result["kohya_thin_s"] = time.perf_counter() - t0
        result["speedup_thin"] = result["kohya_thin_s"] / t_ours
    ours = loradex_sv(resized)
    result["max_sv_rel_diff"] = max(float(((ours[n] - ref[n]).abs() / ref[n][0]).max()) for n in ref)
    result["max_rel_error"] = report.max_error
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"resize {args.modules} SDXL-size modules, rank {args.rank} -> {args.to}, {result['threads']} threads")
    print(f"  loradex (factors: QR + core SVD): {t_ours:8.3f} s (median of {args.repeat})")
    print(f"  kohya (dense SVD, full_matrices): {t_kohya:8.3f} s   speed-up {result['speedup']:.1f}x")
    if args.thin:
        print(f"  dense SVD, full_matrices=False:   {result['kohya_thin_s']:8.3f} s   "
              f"speed-up {result['speedup_thin']:.1f}x")
    print(f"  max |S_loradex - S_kohya| / S_0:  {result['max_sv_rel_diff']:.2e}")
    print(f"  max rel. error of a truncated module: {result['max_rel_error']:.3g}")


if __name__ == "__main__":
    main()
