"""DoRA (weight-decomposed low-rank adaptation): pure functions shared by LoRA, LoHa and LoKr.

A DoRA patch is a LoRA/LoHa/LoKr whose file also holds ``dora_scale``, the trained magnitude
``s``. With ``dW`` the kind's own dense update *at full strength* (``gamma = alpha / r`` applied,
the multiplier ``m`` not applied), lycoris-lora 4.1.3's forward pass (``weight_decompose`` in
``lycoris/functional/general.py``, checked against the modules' real forward) computes::

    V   = W + dW
    n   = ||V|| + eps                 # eps = torch.finfo(float32).eps, added to every norm
    W'  = V * (m * (s / n - 1) + 1)   # = V * s / n at m = 1

so the multiplier interpolates the *scale*, and ``m = 0`` gives ``W + dW``, not ``W``. The norm is
taken per output row (``dora_scale`` shaped ``(out, 1, ...)``, lycoris' default
``wd_on_output=True``) or per input column over the output rows and kernel window
(``(1, in, 1, ...)``, ``wd_on_output=False``); :func:`dora_on_output` tells them apart by shape.

Other tools differ at ``m != 1`` (all agree at ``m = 1``, up to ``eps``):

* PEFT (``use_dora=True``) puts its scale inside the norm: ``W' = s * (W + m dW) / ||W + m dW||``
  with no ``eps``; its ``lora_magnitude_vector`` is the per-output-row magnitude, shaped ``(out,)``
  for Linear and ``(1, out, 1, 1)`` for Conv2d: use :func:`dora_scale_from_magnitude` /
  :func:`magnitude_from_dora_scale` to map it to and from ``dora_scale``.
* ComfyUI interpolates the result: ``W' = W + m * (V * s / n - W)``.

loradex's ``delta(multiplier=m)`` follows lycoris (the format that defines ``dora_scale``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loradex.core.kinds.base import KINDS, Patch, Shape, compute_dtype, fit_to, require
from loradex.errors import FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: The eps lycoris adds to every norm (its dora_scale parameters are float32).
DORA_EPS = 2.0**-23  # float(torch.finfo(torch.float32).eps)


def dora_on_output(dora_scale: torch.Tensor, weight_shape: Shape) -> bool:
    """True when ``dora_scale`` holds one magnitude per output row, False when per input column.

    Per output: ``shape[0] == out`` and every other axis 1 (a flat ``(out,)`` is accepted).
    Per input: ``(1, in, 1, ...)``. Raises FormatError when it is neither.
    """
    out = weight_shape[0]
    inn = weight_shape[1] if len(weight_shape) > 1 else None
    shp = tuple(dora_scale.shape)
    if len(shp) >= 1 and shp[0] == out and math.prod(shp) == out:
        return True
    if inn is not None and len(shp) >= 2 and shp[0] == 1 and shp[1] == inn and math.prod(shp) == inn:
        return False
    raise FormatError(
        f"dora_scale of shape {shp} fits neither the rows nor the columns of a weight {tuple(weight_shape)}"
        " (LoHa/LoKr conv factors are flattened: pass the module's weight_shape)"
    )


def weight_norms(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """Norms broadcastable against ``weight``: per output row ``(out, 1, ...)`` or per input column
    ``(1, in, 1, ...)`` (the latter over the output rows and the kernel window)."""
    if on_output:
        return torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1).reshape(
            weight.shape[0], *([1] * (weight.ndim - 1))
        )
    cols = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return torch.linalg.vector_norm(cols, dim=1).reshape(1, weight.shape[1], *([1] * (weight.ndim - 2)))


def dora_weight(
    merged: torch.Tensor, dora_scale: torch.Tensor, multiplier: float = 1.0, eps: float = DORA_EPS
) -> torch.Tensor:
    """lycoris' DoRA epilogue: ``V * (m * (s / (||V|| + eps) - 1) + 1)`` for ``V = W + dW``
    (computed in the dtype of ``merged``)."""
    on_out = dora_on_output(dora_scale, tuple(merged.shape))
    norms = weight_norms(merged, on_out) + eps
    s = dora_scale.to(merged.dtype).reshape(norms.shape)
    return merged * (multiplier * (s / norms - 1) + 1)


def dora_delta(
    base_weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, multiplier: float = 1.0
) -> torch.Tensor:
    """``W' - W`` for a DoRA patch whose full-strength update is ``delta``, in float64 and shaped
    like ``delta`` (the base weight may be given in any shape with the same entries)."""
    if base_weight.numel() != delta.numel():
        raise ValueError(f"base weight {tuple(base_weight.shape)} does not fit a patch of shape {tuple(delta.shape)}")
    w = base_weight.double().reshape(delta.shape)
    return dora_weight(w + delta.double(), dora_scale.double(), multiplier) - w


def dora_scale_from_magnitude(magnitude: torch.Tensor, weight_shape: Shape) -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` (``(out,)`` or ``(1, out, 1, 1)``) -> lycoris
    ``dora_scale`` ``(out, 1, ...)`` (per output row, same values)."""
    out = weight_shape[0]
    require(magnitude.numel() == out, f"DoRA magnitude has {magnitude.numel()} values for {out} output rows")
    return magnitude.reshape(out, *([1] * (len(weight_shape) - 1)))


def magnitude_from_dora_scale(dora_scale: torch.Tensor, weight_shape: Shape) -> torch.Tensor:
    """lycoris ``dora_scale`` -> PEFT's ``lora_magnitude_vector``: ``(out,)`` for a 2-D weight,
    ``(1, out, 1, ...)`` for a conv. PEFT only has per-output-row magnitudes: a per-input-column
    ``dora_scale`` (lycoris ``wd_on_output=False``) raises FormatError."""
    require(dora_on_output(dora_scale, weight_shape), "PEFT DoRA has no per-input-column magnitude")
    out = weight_shape[0]
    if len(weight_shape) <= 2:
        return dora_scale.reshape(out)
    return dora_scale.reshape(1, out, *([1] * (len(weight_shape) - 2)))



class AdditivePatch(Patch):
    """The additive kinds (LoRA, LoHa, LoKr): a full-strength update ``self._dense(dtype)``, scaled
    linearly by the multiplier, optionally with DoRA's ``dora_scale`` on top (then the base weight
    is required and the epilogue runs in float64). The DoRA rules live here once: a DoRA patch has
    no exact plain-LoRA form (its update depends non-linearly on the base weight) and cannot be
    scaled linearly; the kinds implement ``_exact_lora`` and ``_scaled`` for the rest."""

    exact_lora = True
    dora = True

    def _dtype_sources(self):
        """The tensors whose widest dtype the update is computed in."""
        return self.tensors().values()

    @property
    def dora_on_output(self) -> bool | None:
        """DoRA norm axis: True per output row, False per input column, None without DoRA."""
        return None if self.dora_scale is None else dora_on_output(self.dora_scale, self.shape)

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        if self.dora_scale is not None:
            if base_weight is None:
                raise ValueError("a DoRA patch (dora_scale) needs the base weight")
            d = dora_delta(base_weight, self._dense(torch.float64), self.dora_scale, multiplier)
            return fit_to(d.float(), base_weight)
        dt = compute_dtype(*self._dtype_sources(), base_weight)
        return fit_to((self._dense(dt) * multiplier).float(), base_weight)

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        """``(LoraPatch, relative_error)``: the kind's exact plain-LoRA form (``_exact_lora``), the
        optimal truncation of it when ``rank`` is smaller. DoRA: needs ``base_weight`` and a rank
        (truncated SVD of the dense ``W' - W``)."""
        if self.dora_scale is not None:
            if base_weight is None:
                raise ValueError("a DoRA patch (dora_scale) needs the base weight to become a plain LoRA")
            if rank is None:
                raise ValueError("a DoRA patch has no exact plain-LoRA form: a rank is needed")
            return KINDS["lora"].from_dense(self.delta(base_weight), rank)
        return self._exact_lora(rank)

    def _exact_lora(self, rank: int | None):  # pragma: no cover - interface
        raise NotImplementedError

    def scaled(self, factor: float):
        """``factor`` times the update (``_scaled`` of the kind). Not for DoRA patches."""
        if self.dora_scale is not None:
            raise ValueError("a DoRA patch cannot be scaled linearly")
        return self._scaled(factor)

    def _scaled(self, factor: float):  # pragma: no cover - interface
        raise NotImplementedError
