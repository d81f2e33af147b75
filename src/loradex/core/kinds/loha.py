"""LoHa (kind ``loha``): ``dW = gamma * (w1a @ w1b) * (w2a @ w2b)`` (Hadamard product).

On-disk suffixes (LyCORIS ``LohaModule``; PEFT's LoHa tuner uses the same names and layout):

* plain: ``hada_w1_a`` ``(out, r)``, ``hada_w1_b`` ``(r, in*kh*kw)``, same for ``hada_w2_*``.
  Conv factors are stored *flattened* in the conv weight's ``(in, kh, kw)`` order, so the file
  alone cannot tell a 3x3 conv from a Linear with ``in*9`` inputs: ``from_tensors`` takes the
  module's ``weight_shape`` (from the architecture table). Without it the patch (and its delta)
  has the 2-D shape ``(out, in*kh*kw)``, which ``delta(base_weight)`` reshapes to the base
  weight's shape.
* Tucker (LyCORIS ``use_tucker`` / PEFT ``use_effective_conv2d``): ``hada_t1``/``hada_t2``
  ``(r, r, kh, kw)``, and the ``_a`` factors are *transposed*: ``hada_w1_a`` ``(r, out)``,
  ``hada_w1_b`` ``(r, in)``. Each half is
  ``R_i[p, q, h, w] = sum_{a,b} t_i[a, b, h, w] * w_ia[a, p] * w_ib[b, q]``.
* ``alpha`` 0-dim; ``gamma = alpha / r`` with ``r = hada_w1_b.shape[0]`` (alpha 0/missing: 1);
  optional ``dora_scale`` (DoRA, see ``dora.py``).

The LyCORIS forward applies gamma once (``get_weight``); its ``get_diff_weight`` / ``merge_to``
multiply by the scale a second time (lycoris-lora 4.1.3): loradex follows the forward.
PEFT: ``scaling = lora_alpha / r`` from the config, same formula.

Exact LoRA form: a Hadamard product of two low-rank matrices is low rank (row-wise Khatri-Rao):
with ``dW_i = A_i B_i``, ``(A1 B1) * (A2 B2) = U D`` where ``U[:, i*r2 + j] = A1[:, i] * A2[:, j]``
and ``D[i*r2 + j] = B1[i] * B2[j]``: rank ``r1 * r2``, no approximation. A Tucker half is also a
low-rank matrix, ``A_i = w_ia^T`` ``(out, r)`` and ``B_i = einsum('a b h w, b q -> a q h w', t_i,
w_ib)`` flattened to ``(r, in*kh*kw)``, so Tucker LoHa converts exactly too (no dense delta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    Shape,
    alpha_scale,
    as_alpha,
    as_shape,
    check_fits,
    fields_from,
    register_kind,
    require,
)
from loradex.core.kinds.dora import AdditivePatch, dora_on_output
from loradex.core.kinds.lora import LoraPatch
from loradex.core.linalg import truncate_factors

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def _shp(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def khatri_rao_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: ``(m, r1), (m, r2) -> (m, r1*r2)``, column ``i*r2 + j`` is
    ``a1[:, i] * a2[:, j]``."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def hadamard_lora_factors(
    halves: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of ``(A1 @ B1) * (A2 @ B2)``: ``(khatri_rao_rows(A1, A2), khatri_rao_rows(B1^T,
    B2^T)^T)``."""
    (a1, b1), (a2, b2) = halves
    return khatri_rao_rows(a1, a2), khatri_rao_rows(b1.T, b2.T).T


@register_kind
@dataclass(eq=False)
class LohaPatch(AdditivePatch):
    """A LoHa. Fields are the on-disk tensors (see the module docstring for layouts);
    ``weight_shape`` (not stored in files) is the module weight's shape when known."""

    hada_w1_a: torch.Tensor
    hada_w1_b: torch.Tensor
    hada_w2_a: torch.Tensor
    hada_w2_b: torch.Tensor
    alpha: torch.Tensor | None = None
    hada_t1: torch.Tensor | None = None
    hada_t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    weight_shape: Shape | None = None

    kind = "loha"
    MARKERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    #: the factors every LoHa has (Tucker cores are optional)
    REQUIRED = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    #: ``w_a`` ``(out, r)`` (Tucker: ``(r, out)``, hence "out*") and ``w_b`` ``(r, in*kh*kw)``, flattened or not
    FACTOR_ROLES = {"hada_w1_b": "in", "hada_w2_b": "in", "hada_w1_a": "out*", "hada_w2_a": "out*"}
    SUFFIXES = {
        "hada_w1_a": "hada_w1_a",
        "hada_w1_b": "hada_w1_b",
        "hada_w2_a": "hada_w2_a",
        "hada_w2_b": "hada_w2_b",
        "hada_t1": "hada_t1",
        "hada_t2": "hada_t2",
        "alpha": "alpha",
        "dora_scale": "dora_scale",
    }

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        self.weight_shape = as_shape(self.weight_shape)
        w1a, w1b, w2a, w2b = self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b
        require((self.hada_t1 is None) == (self.hada_t2 is None), "loha: hada_t1 and hada_t2 come together")
        require(all(t.ndim >= 2 for t in (w1a, w1b, w2a, w2b)), "loha: hada factors must be at least 2-D")
        if self.tucker:
            t1, t2 = self.hada_t1, self.hada_t2
            require(
                w1a.ndim == w1b.ndim == w2a.ndim == w2b.ndim == 2,
                "loha: Tucker hada factors must be 2-D",
            )
            require(
                t1.ndim >= 3 and _shp(t1) == _shp(t2),
                f"loha: hada_t1 {_shp(t1)} and hada_t2 {_shp(t2)} must match and be at least 3-D",
            )
            r = t1.shape[0]
            require(
                _shp(t1)[:2] == (r, r) and w1a.shape[0] == w1b.shape[0] == w2a.shape[0] == w2b.shape[0] == r,
                f"loha: Tucker factors w1_a {_shp(w1a)}, w1_b {_shp(w1b)}, t {_shp(t1)} do not chain",
            )
            require(
                w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1],
                "loha: the two Tucker halves disagree on the weight shape",
            )
        else:
            require(
                w1a.ndim == w2a.ndim == 2,
                f"loha: hada_w1_a {_shp(w1a)} / hada_w2_a {_shp(w2a)} must be 2-D",
            )
            require(
                w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0] and w1b.shape[0] > 0,
                f"loha: w1_a {_shp(w1a)} @ w1_b {_shp(w1b)} or w2_a {_shp(w2a)} @ w2_b {_shp(w2b)} do not chain",
            )
            require(
                w1a.shape[0] == w2a.shape[0] and _shp(w1b)[1:] == _shp(w2b)[1:],
                "loha: the two halves disagree on the weight shape",
            )
        check_fits("loha", self._stored_shape(), self.weight_shape)
        if self.dora_scale is not None:
            dora_on_output(self.dora_scale, self.shape)

    @property
    def tucker(self) -> bool:
        """True for the Tucker layout (``hada_t1``/``hada_t2`` present, ``_a`` factors transposed)."""
        return self.hada_t1 is not None

    def _stored_shape(self) -> Shape:
        if self.tucker:
            return (self.hada_w1_a.shape[1], self.hada_w1_b.shape[1], *self.hada_t1.shape[2:])
        return (self.hada_w1_a.shape[0], *self.hada_w1_b.shape[1:])

    @property
    def shape(self) -> Shape:
        return self.weight_shape if self.weight_shape is not None else self._stored_shape()

    @property
    def rank(self) -> int:
        """LyCORIS' ``lora_dim``: ``hada_w1_b.shape[0]`` (both halves share it in every tool)."""
        return int(self.hada_w1_b.shape[0])

    @property
    def scale(self) -> float:
        """``gamma = alpha / rank``, applied once (as LyCORIS' forward does); 1 when alpha is
        missing or 0."""
        return alpha_scale(self.alpha, self.rank)

    def halves(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A1, B1), (A2, B2)]``: 2-D factors ``(out, r_i)``, ``(r_i, in*kh*kw)`` of each half
        (Tucker cores folded into ``B``), without gamma."""
        out = []
        for a, b, t in (
            (self.hada_w1_a, self.hada_w1_b, self.hada_t1),
            (self.hada_w2_a, self.hada_w2_b, self.hada_t2),
        ):
            if t is None:
                out.append((a.to(dtype), b.to(dtype).reshape(b.shape[0], -1)))
            else:
                core = torch.einsum("ab...,bq->aq...", t.to(dtype), b.to(dtype))
                out.append((a.to(dtype).T.contiguous(), core.reshape(core.shape[0], -1)))
        return out

    def _dense(self, dt: torch.dtype) -> torch.Tensor:
        (a1, b1), (a2, b2) = self.halves(dt)
        return ((a1 @ b1) * (a2 @ b2) * self.scale).reshape(self.shape)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> LohaPatch:
        """``weight_shape`` is needed to get a conv's 4-D shape from flattened factors (without it
        the patch is 2-D ``(out, in*kh*kw)``); a ``weight_shape`` the factors cannot fill raises
        FormatError."""
        vals = fields_from("loha", tensors, cls.SUFFIXES, cls.REQUIRED)
        return cls(**vals, weight_shape=weight_shape)

    # ---- conversions -----------------------------------------------------------------------
    def _exact_lora(self, rank: int | None = None) -> tuple[LoraPatch, float]:
        """Exact plain LoRA of rank ``r1 * r2`` (row-wise Khatri-Rao, gamma folded into ``up``,
        alpha None), plain and Tucker alike. With a smaller ``rank``: the optimal truncation of
        those exact factors (QR + core SVD, never the dense delta).
        DoRA: see ``AdditivePatch.to_lora``."""
        up, down = hadamard_lora_factors(self.halves(torch.float64))
        up = up * self.scale
        err = 0.0
        if rank is not None and rank < up.shape[1]:
            up, down, err = truncate_factors(up, down, rank)
        return LoraPatch._from_2d(up, down, self.shape, self.hada_w1_a.dtype), err

    def _scaled(self, factor: float) -> LohaPatch:
        """``factor`` times the update (``hada_w1_a`` scaled). Not for DoRA patches."""
        vals = dict(self.tensors())
        vals["hada_w1_a"] = (self.hada_w1_a.double() * factor).to(self.hada_w1_a.dtype)
        return LohaPatch(**vals, weight_shape=self.weight_shape)

    @property
    def exact_lora_rank(self) -> int:
        """Rank of the exact plain-LoRA form: ``r1 * r2``."""
        return int(self.hada_w1_b.shape[0] * self.hada_w2_b.shape[0])
