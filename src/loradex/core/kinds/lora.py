"""LoRA / LoCon (kind ``lora``): ``dW = gamma * up @ down``, optionally Tucker, bias and DoRA.

On-disk suffixes (kohya sd-scripts, LyCORIS ``LoConModule``; the diffusers/PEFT name in brackets):

* ``lora_up.weight`` ``(out, r)``, conv ``(out, r, 1, 1)`` [``lora_B.weight``];
* ``lora_down.weight`` ``(r, in)``, conv ``(r, in, kh, kw)``, Tucker ``(r, in, 1, 1)``
  [``lora_A.weight``];
* ``lora_mid.weight`` ``(r, r, kh, kw)``: LyCORIS Tucker core (no PEFT equivalent);
* ``alpha`` 0-dim [``lora_alpha`` in the adapter config / ``lora_adapter_metadata``];
* ``lora_up.bias`` ``(out,)`` [``lora_B.bias``, PEFT ``lora_bias=True``]; loradex's name for it,
  kohya-style formats have none;
* ``dora_scale`` ``(out, 1, ...)`` or ``(1, in, 1, ...)`` [``lora_magnitude_vector``, reshaped:
  see ``dora.py``];
* ``bias_indices`` / ``bias_values`` / ``bias_size``: LyCORIS' sparse residual of the weight
  (written by lycoris-lora's extractor with ``use_bias=True``; a *weight* residual despite the
  name, see ``sparse.py``) [no diffusers/PEFT equivalent: folded into the factors exactly].

Math: ``gamma = alpha / r`` (alpha missing or 0: ``gamma = 1``; ``r = down.shape[0]``).
``dW = gamma * up @ down`` with conv factors flattened (``down`` to ``(r, in*kh*kw)`` in the conv
weight's ``(in, kh, kw)`` order). Tucker: ``dW[o, i, h, w] = gamma * sum_{m,n} up[o, m] *
mid[m, n, h, w] * down[n, i]`` (LyCORIS ``einsum('m n ..., i m, n j -> i j ...', mid, up, down)``),
which is a plain LoRA whose ``down`` is ``einsum('m n h w, n i -> m i h w', mid, down)``.
Bias: the module bias changes by ``m * gamma * bias`` (PEFT adds ``lora_B(lora_A(x)) * scaling``,
lora_B's bias included). Sparse residual ``S``: ``dW = gamma * (up @ down + S)`` (the LyCORIS A1111
extension's order: added before the scale). DoRA: see ``dora.py``. ``delta(multiplier=m)`` is
``m * dW`` without DoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    Shape,
    alpha_scale,
    as_alpha,
    check_fits,
    compute_dtype,
    fields_from,
    register_kind,
    require,
)
from loradex.core.kinds.dora import AdditivePatch, dora_on_output
from loradex.core.kinds.sparse import SPARSE_SUFFIXES, check_sparse, dense_residual, residual_factors
from loradex.core.linalg import svd_truncate, truncate_factors

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


@register_kind
@dataclass(eq=False)
class LoraPatch(AdditivePatch):
    """A (Lo)Con LoRA. Fields hold the on-disk tensors as they are (any float dtype).

    ``up`` ``(out, r[, 1, 1])``, ``down`` ``(r, in[, kh, kw])`` (Tucker: ``(r, in, 1, 1)``),
    ``alpha`` 0-dim tensor or None, ``mid`` ``(r, r, kh, kw)`` or None, ``bias`` ``(out,)`` or
    None, ``dora_scale`` or None, and LyCORIS' sparse weight residual as stored
    (``residual_indices`` ``(2, nnz)``, ``residual_values`` ``(nnz,)``, ``residual_size`` ``(2,)``,
    all three or none; see ``sparse.py``). Numbers given for ``alpha`` become tensors.
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    residual_indices: torch.Tensor | None = None
    residual_values: torch.Tensor | None = None
    residual_size: torch.Tensor | None = None

    kind = "lora"
    MARKERS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_up.bias")
    FACTOR_ROLES = {"lora_down.weight": "in", "lora_up.weight": "out"}
    #: diffusers/PEFT (``lora_A``/``lora_B``), old diffusers attention processors
    #: (``lora.down``, ``lora_linear_layer.down``) and bare ``down``/``up`` spellings
    SPELLINGS = {
        "lora_A.weight": "lora_down.weight", "lora.down.weight": "lora_down.weight",
        "lora_linear_layer.down.weight": "lora_down.weight", "down.weight": "lora_down.weight",
        "lora_B.weight": "lora_up.weight", "lora.up.weight": "lora_up.weight",
        "lora_linear_layer.up.weight": "lora_up.weight", "up.weight": "lora_up.weight",
    }
    SUFFIXES = {
        "lora_up.weight": "up",
        "lora_down.weight": "down",
        "lora_mid.weight": "mid",
        "alpha": "alpha",
        "lora_up.bias": "bias",
        "dora_scale": "dora_scale",
        "bias_indices": "residual_indices",
        "bias_values": "residual_values",
        "bias_size": "residual_size",
    }

    def __post_init__(self) -> None:
        self.alpha = as_alpha(self.alpha)
        up, down, mid = self.up, self.down, self.mid
        require(up.ndim >= 2 and down.ndim >= 2, f"lora: up {tuple(up.shape)} / down {tuple(down.shape)} must be at least 2-D")
        require(up.ndim == down.ndim, f"lora: up {tuple(up.shape)} and down {tuple(down.shape)} differ in rank of tensor")
        require(all(s == 1 for s in up.shape[2:]), f"lora: conv up must be 1x1, got {tuple(up.shape)}")
        r = down.shape[0]
        require(up.shape[1] == r and r > 0, f"lora: up {tuple(up.shape)} does not chain with down {tuple(down.shape)}")
        if mid is not None:
            require(
                mid.ndim == down.ndim and tuple(mid.shape[:2]) == (r, r),
                f"lora: lora_mid {tuple(mid.shape)} does not fit rank {r} and down {tuple(down.shape)}",
            )
            require(all(s == 1 for s in down.shape[2:]), f"lora: Tucker down must be 1x1, got {tuple(down.shape)}")
        if self.bias is not None:
            require(
                self.bias.numel() == up.shape[0] and self.bias.ndim == 1,
                f"lora: bias {tuple(self.bias.shape)} does not fit {up.shape[0]} output rows",
            )
        if self.dora_scale is not None:
            dora_on_output(self.dora_scale, self.shape)
        check_sparse(self.residual_indices, self.residual_values, self.residual_size, self.shape)

    # ---- contract --------------------------------------------------------------------------
    @property
    def shape(self) -> Shape:
        out = self.up.shape[0]
        if self.mid is not None:
            return (out, self.down.shape[1], *self.mid.shape[2:])
        return (out, *self.down.shape[1:])

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``gamma = alpha / rank`` (1 when alpha is missing or 0)."""
        return alpha_scale(self.alpha, self.rank)

    @property
    def has_residual(self) -> bool:
        """True when the patch carries LyCORIS' sparse weight residual (``bias_*`` keys)."""
        return self.residual_values is not None

    def residual(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The sparse residual ``S`` densified to the weight's shape (without gamma), or None."""
        if not self.has_residual:
            return None
        dt = dtype or compute_dtype(self.up, self.down, self.residual_values)
        return dense_residual(self.residual_indices, self.residual_values, self.residual_size, self.shape, dt)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` as 2-D matrices ``(out, k)`` and ``(k, in*kh*kw)`` with the Tucker ``mid``
        folded into ``down`` and without gamma, so that ``dW = scale * up @ down``; in ``dtype``
        (default: the compute dtype). ``k`` is the rank, plus, for a patch with a sparse residual,
        the residual's non-zero rows or columns (its exact factors, :func:`residual_factors`): every
        consumer of the factors (merges, resizes, slots) then sees the whole update."""
        dt = dtype or compute_dtype(self.up, self.down, self.mid)
        up = self.up.reshape(self.up.shape[0], self.rank).to(dt)
        down = self._full_down(dt).reshape(self.rank, -1)
        if self.has_residual:
            ru, rd = residual_factors(self.residual(dt).reshape(up.shape[0], -1))
            up, down = torch.cat([up, ru], 1), torch.cat([down, rd], 0)
        return up, down

    def _full_down(self, dt: torch.dtype) -> torch.Tensor:
        """``down`` with ``mid`` folded in: ``(r, in, kh, kw)`` (or ``down`` itself)."""
        if self.mid is None:
            return self.down.to(dt)
        d = self.down.reshape(self.rank, -1).to(dt)
        return torch.einsum("mn...,ni->mi...", self.mid.to(dt), d)

    def _dense(self, dt: torch.dtype) -> torch.Tensor:
        up = self.up.reshape(self.up.shape[0], self.rank).to(dt)
        dense = ((up * self.scale) @ self._full_down(dt).reshape(self.rank, -1)).reshape(self.shape)
        if self.has_residual:
            dense = dense + self.residual(dt) * self.scale
        return dense

    def _dtype_sources(self):
        return (self.up, self.down, self.mid, self.residual_values)

    def bias_delta(self, base_bias: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return (self.bias.to(compute_dtype(self.bias)) * (self.scale * multiplier)).float()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> LoraPatch:
        vals = fields_from("lora", tensors, cls.SUFFIXES, ("lora_up.weight", "lora_down.weight"), SPARSE_SUFFIXES)
        patch = cls(**vals)
        check_fits("lora", patch.shape, weight_shape)
        return patch

    # ---- conversions -----------------------------------------------------------------------
    def _exact_lora(self, rank: int | None = None) -> tuple[LoraPatch, float]:
        """Exact identity when ``rank`` is None or >= the current rank (a Tucker ``mid`` is folded
        into a plain ``kh x kw`` down, exactly); below it, the optimal truncation of ``up @ down``
        computed from the factors (:func:`truncate_factors`), gamma and the bias scale folded
        (alpha None). A sparse residual is folded into the factors (:meth:`factors`: rank grows by
        its non-zero rows or columns, exact) and then truncated like the rest when ``rank`` is
        smaller. DoRA: see ``AdditivePatch.to_lora``."""
        dtype = self.up.dtype
        if self.has_residual:
            up, down = self.factors(torch.float64)
            up = up * self.scale
            err = 0.0
            if rank is not None and rank < up.shape[1]:
                up, down, err = truncate_factors(up, down, rank)
            return self._from_2d(up, down, self.shape, dtype, self._scaled_bias()), err
        plain = self
        if self.mid is not None:
            plain = LoraPatch(
                up=self.up,
                down=self._full_down(torch.float64).to(self.down.dtype),
                alpha=self.alpha,
                bias=self.bias,
            )
        if rank is None or rank >= self.rank:
            return plain, 0.0
        up, down = self.factors(torch.float64)
        new_up, new_down, err = truncate_factors(up * self.scale, down, rank)
        return self._from_2d(new_up, new_down, self.shape, dtype, self._scaled_bias()), err

    @property
    def exact_lora_rank(self) -> int:
        """Rank of the exact plain-LoRA form: the rank, plus the sparse residual's share."""
        if not self.has_residual:
            return self.rank
        return int(self.factors(torch.float32)[0].shape[1])

    def scaled_residual_fields(self, factor: float) -> dict[str, torch.Tensor | None]:
        """The residual fields with the values times ``factor`` (at least float32, so that scaling
        fp16 values stays exact to float32 rounding)."""
        if not self.has_residual:
            return {}
        v = self.residual_values
        dt = torch.promote_types(v.dtype, torch.float32)
        return {
            "residual_indices": self.residual_indices,
            "residual_values": (v.double() * factor).to(dt),
            "residual_size": self.residual_size,
        }

    def _scaled_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return (self.bias.double() * self.scale).to(self.bias.dtype)

    @staticmethod
    def _from_2d(
        up: torch.Tensor,
        down: torch.Tensor,
        shape: Shape,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
        alpha: torch.Tensor | None = None,
    ) -> LoraPatch:
        """A LoraPatch from 2-D factors of a weight of ``shape`` (conv: up ``(out, k, 1, 1)``,
        down ``(k, in, kh, kw)``)."""
        k = up.shape[1]
        tail = shape[2:]
        return LoraPatch(
            up=up.reshape(shape[0], k, *([1] * len(tail))).to(dtype),
            down=down.reshape(k, *shape[1:]).to(dtype),
            alpha=alpha,
            bias=bias,
        )

    @classmethod
    def from_dense(cls, dW: torch.Tensor, rank: int, **svd_options) -> tuple[LoraPatch, float]:
        """Best rank-``rank`` LoRA of a dense update (truncated SVD, :func:`svd_truncate`):
        ``up = U S``, ``down = V^T``, alpha None (scale 1). Conv updates are flattened to
        ``(out, in*kh*kw)``; ``down`` comes back as ``(r, in, kh, kw)`` and ``up`` as
        ``(out, r, 1, 1)``. The rank is clamped to ``min(out, in*kh*kw)``. Factors are float32
        (float64/float16/bfloat16 inputs keep their dtype). Returns ``(patch, relative_error)``."""
        if dW.ndim < 2:
            raise ValueError(f"a {dW.ndim}-D update (shape {tuple(dW.shape)}) has no LoRA form")
        if rank is None or rank < 1:
            raise ValueError(f"a LoRA rank >= 1 is needed, got {rank}")
        dtype = dW.dtype if dW.is_floating_point() else torch.float32
        mat = dW.reshape(dW.shape[0], -1)
        if mat.dtype != torch.float64:
            mat = mat.float()
        up, down, err = svd_truncate(mat, rank, **svd_options)
        return cls._from_2d(up, down, tuple(dW.shape), dtype), err

    def fold_alpha(self, mode: str = "sqrt") -> LoraPatch:
        """The same update with ``alpha = rank`` (scale 1), the form writers need when a format
        cannot carry per-module alphas. ``mode="sqrt"`` multiplies ``up`` and ``down`` by
        ``sqrt(|gamma|)`` (the sign goes to ``up``), ``"up"`` multiplies ``up`` by ``gamma``.
        The bias and a sparse residual are rescaled too; ``mid`` and ``dora_scale`` are kept (DoRA
        sees the same dW)."""
        g = self.scale
        if mode == "sqrt":
            fu, fd = math.copysign(math.sqrt(abs(g)), g), math.sqrt(abs(g))
        elif mode == "up":
            fu, fd = g, 1.0
        else:
            raise ValueError(f"unknown fold mode {mode!r} (sqrt or up)")
        alpha = torch.tensor(float(self.rank), dtype=self.alpha.dtype if self.alpha is not None else self.up.dtype)
        return LoraPatch(
            up=(self.up.double() * fu).to(self.up.dtype),
            down=(self.down.double() * fd).to(self.down.dtype),
            alpha=alpha,
            mid=self.mid,
            bias=self._scaled_bias(),
            dora_scale=self.dora_scale,
            **self.scaled_residual_fields(g),
        )

    def _scaled(self, factor: float) -> LoraPatch:
        """``factor`` times the update (``up``, the bias and a sparse residual scaled). Not for DoRA
        patches."""
        return LoraPatch(
            up=(self.up.double() * factor).to(self.up.dtype),
            down=self.down,
            alpha=self.alpha,
            mid=self.mid,
            bias=None if self.bias is None else (self.bias.double() * factor).to(self.bias.dtype),
            **self.scaled_residual_fields(factor),
        )
