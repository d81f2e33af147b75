"""Row-wise split and fuse of patches, for fused projections (FLUX's ``img_attn_qkv`` and
``linear1`` hold to_q/to_k/to_v(/proj_mlp) stacked along the output rows; diffusers keeps them as
separate Linears). Both directions are exact:

* split: a LoRA's output rows are ``scale * up[rows] @ down``, so each part keeps the shared
  ``down`` and alpha and takes its slice of ``up`` (no rescaling: kohya's split_qkv mode forgets
  that the rank stays the same and so must alpha — sd-scripts issue #2204).
* fuse: parts that still share one ``down`` (and alpha) fuse back to the original rank,
  bit-identically; otherwise the downs are stacked and the ups placed block-diagonally (rank =
  sum of ranks, each part's scale folded into its up, alpha = rank). Missing parts are zero rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loradex.core.kinds.base import Patch, alpha_scale
from loradex.core.kinds.full import FullPatch
from loradex.core.kinds.lora import LoraPatch

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def split_rows(patch: Patch, groups: list[list[tuple[int, int]]], rank: int | None = None) -> tuple[list[Patch], float]:
    """Split a patch on a fused weight into one patch per group of row ranges (a part's rows are
    the concatenation of its ranges, in order). Returns the parts and the relative error of any
    approximation made on the way (0.0 when exact)."""
    err = 0.0

    def rows(t: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
        return t[ranges[0][0] : ranges[0][1]] if len(ranges) == 1 else torch.cat([t[s:e] for s, e in ranges])

    if isinstance(patch, FullPatch):
        return [
            FullPatch(diff=rows(patch.diff, g), diff_b=None if patch.diff_b is None else rows(patch.diff_b, g))
            for g in groups
        ], 0.0
    if not isinstance(patch, LoraPatch) or patch.mid is not None or patch.has_residual:
        # a Tucker mid or a sparse residual spans every row: fold it into plain factors first
        # (exact, LoraPatch.to_lora), so that each part keeps its rows of it
        patch, err = patch.to_lora(rank)
    if patch.dora_scale is not None:
        raise ValueError("DoRA patches cannot be split across fused projections")
    return [
        LoraPatch(
            up=rows(patch.up, g),
            down=patch.down,
            alpha=patch.alpha,
            bias=None if patch.bias is None else rows(patch.bias, g),
        )
        for g in groups
    ], err


def fuse_rows(parts: list[tuple[LoraPatch | None, tuple[int, int]]], out_rows: int) -> LoraPatch:
    """Fuse LoRA pieces (None = absent) placed at ``rows`` of a fused weight with ``out_rows``
    rows. Pieces that share one ``down`` and alpha and cover every row fuse at the same rank,
    bit-identically; otherwise block-diagonal ups over stacked downs (scales folded)."""
    present = [(p, r) for p, r in parts if p is not None]
    if not present:
        raise ValueError("nothing to fuse")
    first = present[0][0]
    covered = sum(e - s for _, (s, e) in present) == out_rows
    shared = covered and all(
        p.mid is None
        and p.dora_scale is None
        and p.down.shape == first.down.shape
        and p.down.dtype == first.down.dtype
        and torch.equal(p.down, first.down)
        and _same_alpha(p.alpha, first.alpha)
        for p, _ in present
    )
    if shared:
        up = first.up.new_empty((out_rows, *first.up.shape[1:]))
        has_bias = any(p.bias is not None for p, _ in present)
        bias = first.up.new_zeros(out_rows) if has_bias else None
        for p, (s, e) in present:
            up[s:e] = p.up
            if bias is not None and p.bias is not None:
                bias[s:e] = p.bias
        return LoraPatch(up=up, down=first.down, alpha=first.alpha, bias=bias)
    # general case: block-diagonal ups over stacked downs, scales folded into the ups
    plain = []
    for p, r in present:
        if p.mid is not None or p.dora_scale is not None:
            p, _ = p.to_lora()
        plain.append((p, r))
    dtype = plain[0][0].up.dtype
    total_rank = sum(p.rank for p, _ in plain)
    tail = plain[0][0].up.shape[2:]
    up = torch.zeros((out_rows, total_rank, *tail), dtype=dtype)
    downs = []
    bias = None
    col = 0
    for p, (s, e) in plain:
        scale = alpha_scale(p.alpha, p.rank)
        up[s:e, col : col + p.rank] = (p.up.float() * scale).to(dtype)
        downs.append(p.down)
        if p.bias is not None:
            if bias is None:
                bias = torch.zeros(out_rows, dtype=dtype)
            bias[s:e] = (p.bias.float() * scale).to(dtype)
        col += p.rank
    return LoraPatch(up=up, down=torch.cat(downs), alpha=None, bias=bias)


def _same_alpha(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
