"""LoKr (kind ``lokr``): ``dW = gamma * kron(w1, w2)`` reshaped to the weight.

On-disk layouts (LyCORIS ``LokrModule``; PEFT's LoKr tuner uses the same names and layouts). The
weight ``(out, in[, kh, kw])`` is factored as ``out = a*b``, ``in = c*d``:

* first half: ``lokr_w1`` ``(a, c)`` full, or ``lokr_w1_a`` ``(a, r)`` + ``lokr_w1_b`` ``(r, c)``
  (LyCORIS ``decompose_both``);
* second half: ``lokr_w2`` ``(b, d)`` or conv ``(b, d, kh, kw)`` full; or ``lokr_w2_a`` ``(b, r)`` +
  ``lokr_w2_b`` ``(r, d*kh*kw)`` (conv factor flattened in ``(d, kh, kw)`` order; the functional
  API may also store it ``(r, d, kh, kw)``); or Tucker (conv): ``lokr_t2`` ``(r, r, kh, kw)`` with
  the *transposed* ``lokr_w2_a`` ``(r, b)`` and ``lokr_w2_b`` ``(r, d)``, rebuilt as
  ``w2[p, q, h, w] = sum_{i,j} t2[i, j, h, w] * w2_a[i, p] * w2_b[j, q]``;
* ``alpha`` 0-dim; optional ``dora_scale`` (DoRA, see ``dora.py``).

Scale (checked against LyCORIS' forward): ``gamma = alpha / r`` with ``r`` the rank of the
decomposed half(s) (``lokr_w1_a.shape[1]``, else ``lokr_t2.shape[0]`` / ``lokr_w2_a.shape[1]``);
``gamma = 1`` when *both* halves are full (LyCORIS then forces ``alpha = lora_dim`` and writes that
alpha; ComfyUI and A1111 also use 1). PEFT differs there: its ``scaling = lora_alpha / r`` from
the config applies to full halves too, so a reader of PEFT LoKr files with both halves full must
fold ``alpha / r`` into the factors (``LokrPatch.scaled``). LyCORIS 4.1.3's ``get_diff_weight`` /
``merge_to`` apply gamma twice; loradex follows the forward pass.

``kron(w1, w2)`` for a conv: ``w1`` is broadcast as ``(a, c, 1, 1)``, so ``dW[i*b + p, j*d + q, h,
w] = gamma * w1[i, j] * w2[p, q, h, w]``. Flattened to ``(out, in*kh*kw)`` this is the 2-D
``kron(w1, w2_flat)`` with ``w2_flat`` ``(b, d*kh*kw)``.

Exact LoRA form (mixed-product property): with ``w1 = A1 B1`` and ``w2_flat = A2 B2``,
``kron(A1 B1, A2 B2) = kron(A1, A2) @ kron(B1, B2)``: ``up = gamma * kron(A1, A2)`` ``(a*b, r1*r2)``
and ``down = kron(B1, B2)`` ``(r1*r2, c*d*kh*kw)``, whose columns are already in the conv weight's
``(in, kh, kw)`` order. A full half of shape ``(p, q)`` is written ``I_p @ w`` when ``p <= q``, else
``w @ I_q``: rank ``min(p, q)``. A Tucker ``w2`` is ``A2 = w2_a^T``, ``B2 = einsum('i j h w, j q ->
i q h w', t2, w2_b)`` flattened. The LoRA rank is the product of the two halves' ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    Shape,
    as_alpha,
    as_shape,
    check_fits,
    fields_from,
    register_kind,
    require,
    scalar,
)
from loradex.core.kinds.dora import AdditivePatch, dora_on_output
from loradex.core.kinds.lora import LoraPatch
from loradex.core.linalg import truncate_factors

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


def _shp(t: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _full_as_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full ``(p, q)`` matrix as ``(A, B)`` of rank ``min(p, q)`` (one side the identity)."""
    p, q = w.shape
    if p <= q:
        return torch.eye(p, dtype=w.dtype, device=w.device), w
    return w, torch.eye(q, dtype=w.dtype, device=w.device)


@register_kind
@dataclass(eq=False)
class LokrPatch(AdditivePatch):
    """A LoKr. Every tensor field is optional; exactly one layout per half must be present (see
    the module docstring). ``weight_shape`` (not stored in files) is the module weight's shape
    when known (needed for a conv whose ``lokr_w2_b`` is flattened)."""

    lokr_w1: torch.Tensor | None = None
    lokr_w1_a: torch.Tensor | None = None
    lokr_w1_b: torch.Tensor | None = None
    lokr_w2: torch.Tensor | None = None
    lokr_w2_a: torch.Tensor | None = None
    lokr_w2_b: torch.Tensor | None = None
    lokr_t2: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    weight_shape: Shape | None = None

    kind = "lokr"
    MARKERS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    SUFFIXES = {s: s for s in (*MARKERS, "alpha", "dora_scale")}

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        self.weight_shape = as_shape(self.weight_shape)
        w1, w1a, w1b = self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b
        w2, w2a, w2b, t2 = self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2
        # first half
        if w1 is not None:
            require(w1a is None and w1b is None, "lokr: lokr_w1 and lokr_w1_a/_b are exclusive")
            require(w1.ndim == 2, f"lokr: lokr_w1 must be 2-D, got {_shp(w1)}")
        else:
            require(w1a is not None and w1b is not None, "lokr: needs lokr_w1, or lokr_w1_a and lokr_w1_b")
            require(
                w1a.ndim == 2 and w1b.ndim == 2 and w1a.shape[1] == w1b.shape[0],
                f"lokr: lokr_w1_a {_shp(w1a)} @ lokr_w1_b {_shp(w1b)} do not chain",
            )
        # second half
        if w2 is not None:
            require(w2a is None and w2b is None and t2 is None, "lokr: lokr_w2 and lokr_w2_a/_b/t2 are exclusive")
            require(w2.ndim >= 2, f"lokr: lokr_w2 must be at least 2-D, got {_shp(w2)}")
        else:
            require(w2a is not None and w2b is not None, "lokr: needs lokr_w2, or lokr_w2_a and lokr_w2_b")
            require(w2a.ndim == 2 and w2b.ndim >= 2, f"lokr: lokr_w2_a {_shp(w2a)} / lokr_w2_b {_shp(w2b)} bad rank of tensor")
            if t2 is not None:
                r = t2.shape[0]
                require(
                    t2.ndim >= 3 and t2.shape[1] == r and w2a.shape[0] == r and w2b.shape[0] == r and w2b.ndim == 2,
                    f"lokr: Tucker lokr_t2 {_shp(t2)} with lokr_w2_a {_shp(w2a)}, lokr_w2_b {_shp(w2b)} do not chain",
                )
            else:
                require(
                    w2a.shape[1] == w2b.shape[0],
                    f"lokr: lokr_w2_a {_shp(w2a)} @ lokr_w2_b {_shp(w2b)} do not chain",
                )
        # same rows and entries; a 4-D (b, d, 1, 1) half may serve a 2-D weight and vice versa
        check_fits("lokr", self._stored_shape(), self.weight_shape)
        if self.dora_scale is not None:
            dora_on_output(self.dora_scale, self.shape)

    # ---- shapes and scale --------------------------------------------------------------------
    def _w1_shape(self) -> tuple[int, int]:
        if self.lokr_w1 is not None:
            return tuple(self.lokr_w1.shape)
        return (self.lokr_w1_a.shape[0], self.lokr_w1_b.shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        """``(b, d, kh, kw)``, ``(b, d)`` or, for a flattened ``lokr_w2_b``, ``(b, d*kh*kw)``."""
        if self.lokr_w2 is not None:
            return tuple(self.lokr_w2.shape)
        if self.lokr_t2 is not None:
            return (self.lokr_w2_a.shape[1], self.lokr_w2_b.shape[1], *self.lokr_t2.shape[2:])
        return (self.lokr_w2_a.shape[0], *self.lokr_w2_b.shape[1:])

    def _stored_shape(self) -> Shape:
        a, c = self._w1_shape()
        b, d, *k = self._w2_shape()
        return (a * b, c * d, *k)

    @property
    def shape(self) -> Shape:
        return self.weight_shape if self.weight_shape is not None else self._stored_shape()

    @property
    def tucker(self) -> bool:
        """True when the second half is Tucker (``lokr_t2`` with transposed ``lokr_w2_a``)."""
        return self.lokr_t2 is not None

    @property
    def rank(self) -> int | None:
        """LyCORIS' ``lora_dim``: the rank of the decomposed half(s); None when both are full."""
        if self.lokr_w1_a is not None:
            return int(self.lokr_w1_a.shape[1])
        if self.lokr_t2 is not None:
            return int(self.lokr_t2.shape[0])
        if self.lokr_w2_a is not None:
            return int(self.lokr_w2_a.shape[1])
        return None

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 when both halves are full or alpha is missing/0."""
        r = self.rank
        a = scalar(self.alpha)
        if r is None or a is None or a == 0 or a != a:
            return 1.0
        return a / r

    # ---- math ----------------------------------------------------------------------------------
    def halves(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A1, B1), (A2, B2)]`` with ``w1 = A1 @ B1`` ``(a, c)`` and ``w2_flat = A2 @ B2``
        ``(b, d*kh*kw)`` (full halves written with an identity factor), without gamma."""
        if self.lokr_w1 is not None:
            h1 = _full_as_factors(self.lokr_w1.to(dtype))
        else:
            h1 = (self.lokr_w1_a.to(dtype), self.lokr_w1_b.to(dtype))
        if self.lokr_w2 is not None:
            h2 = _full_as_factors(self.lokr_w2.to(dtype).reshape(self.lokr_w2.shape[0], -1))
        elif self.lokr_t2 is not None:
            core = torch.einsum("ij...,jq->iq...", self.lokr_t2.to(dtype), self.lokr_w2_b.to(dtype))
            h2 = (self.lokr_w2_a.to(dtype).T.contiguous(), core.reshape(core.shape[0], -1))
        else:
            h2 = (self.lokr_w2_a.to(dtype), self.lokr_w2_b.to(dtype).reshape(self.lokr_w2_b.shape[0], -1))
        return [h1, h2]

    def w1(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The first half ``(a, c)`` (float32 unless ``dtype`` says otherwise)."""
        dtype = dtype or torch.float32
        if self.lokr_w1 is not None:
            return self.lokr_w1.to(dtype)
        return self.lokr_w1_a.to(dtype) @ self.lokr_w1_b.to(dtype)

    def w2(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The second half, flattened to ``(b, d*kh*kw)`` (float32 unless ``dtype`` says otherwise)."""
        dtype = dtype or torch.float32
        if self.lokr_w2 is not None:
            return self.lokr_w2.to(dtype).reshape(self.lokr_w2.shape[0], -1)
        a2, b2 = self.halves(dtype)[1]
        return a2 @ b2

    def _dense(self, dt: torch.dtype) -> torch.Tensor:
        return (torch.kron(self.w1(dt), self.w2(dt)) * self.scale).reshape(self.shape)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> LokrPatch:
        """``weight_shape`` gives a conv with a flattened ``lokr_w2_b`` its 4-D shape (without it the
        patch is 2-D ``(out, in*kh*kw)``); a ``weight_shape`` the factors cannot fill raises
        FormatError."""
        vals = fields_from("lokr", tensors, cls.SUFFIXES, ())
        return cls(**vals, weight_shape=weight_shape)

    # ---- conversions -------------------------------------------------------------------------
    @property
    def exact_lora_rank(self) -> int:
        """``rank(w1) * rank(w2)`` of the factored halves (a full ``(p, q)`` half counts
        ``min(p, q)``)."""
        (a1, _), (a2, _) = self.halves(torch.float32)
        return int(a1.shape[1] * a2.shape[1])

    def _exact_lora(self, rank: int | None = None) -> tuple[LoraPatch, float]:
        """Exact plain LoRA of rank ``rank(w1) * rank(w2)`` (Kronecker product of the factors,
        gamma folded into ``up``, alpha None), every layout; with a smaller ``rank`` the optimal
        truncation of those factors (QR + core SVD). DoRA: see ``AdditivePatch.to_lora``."""
        (a1, b1), (a2, b2) = self.halves(torch.float64)
        up = torch.kron(a1, a2) * self.scale
        down = torch.kron(b1, b2)
        err = 0.0
        if rank is not None and rank < up.shape[1]:
            up, down, err = truncate_factors(up, down, rank)
        dtype = next(iter(self.tensors().values())).dtype
        return LoraPatch._from_2d(up, down, self.shape, dtype), err

    def _scaled(self, factor: float) -> LokrPatch:
        """``factor`` times the update (folded into ``lokr_w1`` or ``lokr_w1_a``). Not for DoRA.
        Use it to read PEFT LoKr files whose halves are both full: ``scaled(alpha / r)``."""
        vals = dict(self.tensors())
        key = "lokr_w1" if self.lokr_w1 is not None else "lokr_w1_a"
        vals[key] = (vals[key].double() * factor).to(vals[key].dtype)
        return LokrPatch(**vals, weight_shape=self.weight_shape)
