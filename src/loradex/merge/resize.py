"""``resize``: truncate every LoRA-convertible module to a fixed or dynamic rank.

The SVD is computed from the factors (:func:`loradex.core.linalg.factors_svd`: QR of ``up`` and
``down^T``, SVD of the ``r x r`` core), so the cost does not depend on the layer size, and the
result is the optimal (Eckart-Young) truncation of ``gamma * up @ down``. kohya's resize_lora
computes a full SVD of the dense product instead, and adds one to every dynamic rank.

Per module:

* LoRA / LoCon: the Tucker ``mid`` is folded into ``down`` first (exact); conv factors are
  flattened to ``(out, r)`` / ``(r, in*kh*kw)`` and reshaped back to ``(out, k, 1, 1)`` /
  ``(k, in, kh, kw)``.
* LoHa / LoKr: their exact LoRA form (``to_lora()``: rank ``r1*r2`` resp. ``rank(w1)*rank(w2)``,
  gamma folded) is truncated.
* The scale is preserved: ``new alpha = gamma * new rank`` (LoRA without alpha, LoHa/LoKr:
  gamma 1, so alpha = new rank). The singular values are split evenly, ``up = U sqrt(S)``,
  ``down = sqrt(S) Vh`` (balanced factors, friendlier to fp16). A LoRA bias is kept as is.
* When the policy keeps the whole spectrum (new rank >= current rank), the patch is kept as is
  (bit-identical, same kind).
* Kinds without an exact LoRA form (full, norm, (IA)^3, OFT, BOFT, GLoRA) and DoRA patches are kept
  as they are and reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loradex.core.adapter import Adapter
from loradex.core.kinds.lora import LoraPatch
from loradex.core.linalg import factors_svd, rank_for
from loradex.errors import LoradexError


@dataclass
class ResizeReport:
    """``modules``: name -> ``{kind, old_rank, new_rank, energy, error}`` where ``old_rank`` is the
    rank of the (exact) LoRA form, ``energy`` = sum of the kept ``S^2`` / total, ``error`` = the
    relative Frobenius error of the dense update. ``kept``: name -> why it was left alone."""

    policy: dict = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        """Largest relative Frobenius error over the resized modules (0 when none was resized)."""
        return max((m["error"] for m in self.modules.values()), default=0.0)

    def to_dict(self) -> dict:
        """Every field plus ``max_error``, JSON-ready (``loradex resize --json``)."""
        return {"policy": self.policy, "modules": self.modules, "kept": self.kept,
                "max_error": self.max_error, "notes": self.notes}

    def summary(self) -> str:
        """One line: modules resized, total rank before -> after, max error, modules kept."""
        total = len(self.modules) + len(self.kept)
        within = sum(1 for why in self.kept.values() if "within the policy" in why)
        kept = (f"{len(self.kept)} kept as is ({within} already within the policy, "
                f"{len(self.kept) - within} with no exact LoRA form)") if self.kept else "none kept as is"
        if not self.modules:
            return f"nothing resized of {total} modules: {kept}"
        old = sum(m["old_rank"] for m in self.modules.values())
        new = sum(m["new_rank"] for m in self.modules.values())
        return (f"{len(self.modules)} of {total} modules resized (their total rank {old} -> {new}, "
                f"max rel. error {self.max_error:.3g}); {kept}")


def _check_policy(rank, fro, ratio, cumulative) -> dict:
    dynamic = {k: v for k, v in (("fro", fro), ("ratio", ratio), ("cumulative", cumulative)) if v is not None}
    if rank is None and not dynamic:
        raise LoradexError("resize needs a policy: rank, fro, ratio or cumulative")
    if len(dynamic) > 1:
        raise LoradexError(f"give at most one of fro, ratio, cumulative (got {', '.join(dynamic)})")
    if rank is not None and int(rank) < 1:
        raise LoradexError(f"rank must be a positive integer, got {rank}")
    for k, v in dynamic.items():
        v = float(v)
        if math.isnan(v) or (k == "ratio" and v <= 0) or (k != "ratio" and not 0 < v <= 1):
            raise LoradexError(f"{k} must be {'> 0' if k == 'ratio' else 'in (0, 1]'}, got {v}")
    return {**({"rank": int(rank)} if rank is not None else {}), **{k: float(v) for k, v in dynamic.items()}}


def resize_patch(patch, rank=None, fro=None, ratio=None, cumulative=None) -> tuple[LoraPatch | None, dict]:
    """Resize one patch. Returns ``(new_patch or None when kept as is, info)``; ``info`` holds
    ``old_rank``, ``new_rank``, ``energy``, ``error`` (or ``why`` when there is nothing to do)."""
    if not type(patch).exact_lora:
        return None, {"why": f"{patch.kind}: no exact LoRA form"}
    if not patch.has_exact_lora:
        return None, {"why": f"{patch.kind} with DoRA: no exact LoRA form (the update depends on the base weight)"}
    lora = patch if patch.kind == "lora" else patch.to_lora()[0]
    dtype = lora.up.dtype
    up, down = lora.factors(torch.float64)
    u, s, vh = factors_svd(up, down)
    k = rank_for(s, fixed=rank, fro=fro, ratio=ratio, cumulative=cumulative)
    old = up.shape[1]  # the exact rank: a sparse residual's rows or columns count (LoraPatch.factors)
    s2 = s * s
    total = float(s2.sum())
    energy = float(s2[:k].sum()) / total if total > 0 else 1.0
    error = math.sqrt(max(0.0, float(s2[k:].sum())) / total) if total > 0 else 0.0
    info = {"kind": patch.kind, "old_rank": old, "new_rank": min(k, old), "energy": energy, "error": error}
    if k >= old:
        info.update(new_rank=old, energy=1.0, error=0.0)
        return None, {**info, "why": f"rank {old} already within the policy"}
    root = s[:k].sqrt()
    gamma = lora.scale
    alpha_dt = lora.alpha.dtype if lora.alpha is not None else torch.float32
    new = LoraPatch._from_2d(
        u[:, :k] * root, root[:, None] * vh[:k], lora.shape, dtype,
        bias=lora.bias, alpha=torch.tensor(gamma * k, dtype=alpha_dt),
    )
    return new, info


def resize(
    adapter: Adapter, rank: int | None = None, fro: float | None = None, ratio: float | None = None,
    cumulative: float | None = None,
) -> tuple[Adapter, ResizeReport]:
    """Truncate every LoRA-convertible module of ``adapter``: to ``rank`` (fixed), or per module to
    the smallest rank meeting ``fro`` (kept Frobenius-norm fraction), ``ratio`` (``S_i > S_0 /
    ratio``) or ``cumulative`` (``sum S[:k] / sum S``), see :func:`loradex.core.linalg.rank_for`;
    ``rank`` together with a dynamic policy caps it. Returns ``(new adapter, report)``;
    embeddings and metadata are carried over."""
    report = ResizeReport(policy=_check_policy(rank, fro, ratio, cumulative))
    patches = {}
    for name, p in adapter.patches.items():
        new, info = resize_patch(p, rank, fro, ratio, cumulative)
        if new is None:
            patches[name] = p
            report.kept[name] = info.pop("why")
            if "old_rank" in info and p.kind != "lora":
                report.notes.append(f"{name}: {p.kind} kept as is (its exact LoRA rank {info['old_rank']} fits)")
        else:
            patches[name] = new
            report.modules[name] = info
    out = Adapter(
        patches=patches, embeddings=dict(adapter.embeddings), metadata=dict(adapter.metadata),
        arch=adapter.arch, source_format=adapter.source_format, notes=list(adapter.notes),
        unexplained=dict(adapter.unexplained),
    )
    if report.modules:
        out.metadata.pop("ss_network_dim", None)
        out.metadata.pop("ss_network_alpha", None)
    return out, report
