"""LyCORIS' sparse residual (``bias_indices`` / ``bias_values`` / ``bias_size``): pure functions
used by the LoRA kind (``lora.py``).

**Who writes it, and what it is.** lycoris-lora 4.1.3 writes these keys in exactly one place:
``lycoris.utils.extract_diff(..., use_bias=True, sparsity=0.98)`` (its checkpoint -> LoCon
extractor), for the modules it factors as LoCon (Linear and Conv2d; never for the ``diff``/
``w_norm`` modules of ``mode="full"``). With ``D`` the module's weight difference flattened to
``(out, in*kh*kw)`` and ``up @ down`` its truncated SVD (alpha = rank, so gamma = 1), the file holds
the largest ``(1 - sparsity)`` share of the entries of ``D - up @ down`` in COO form::

    bias_indices  int16  (2, nnz)   row/column of each kept entry, in the (out, in*kh*kw) layout
    bias_values   fp16   (nnz,)
    bias_size     int16  (2,)       (out, in*kh*kw)

so despite the name it is a residual of the **weight**, not a bias change. (Its 3x3-conv branch
with ``small_conv=True`` computes the residual from the tuned weight instead of the difference, a
lycoris bug; the layout is the same.)

**Who applies it, and how.** The LyCORIS author's A1111 extension (KohakuBlueleaf/
a1111-sd-webui-lycoris, ``lycoris.py`` ``rebuild_weight`` / ``lyco_calc_updown``) builds
``torch.sparse_coo_tensor(indices, values, size)``, reshapes the dense update to that size, adds
it, and only then multiplies by ``alpha / rank`` and the multiplier::

    dW = m * gamma * (up @ down + S)

which is what loradex computes (``S`` densified, duplicates summed as ``to_dense`` does). Two
readers differ: lycoris-lora's own modules never read the keys (``LoConModule.weight_list`` has
no ``bias_*``), so ``create_lycoris_from_weights`` silently applies ``up @ down`` alone; and
InvokeAI (``invokeai/backend/patches/layers/lora_layer_base.py``, 6.14 development tree) adds
``m * gamma * S`` to the module's *bias*, reshaped to the bias, which cannot fit the
``(out, in*kh*kw)`` size lycoris writes. loradex reads only that size (``size[0] == out`` and
``prod(size) == out * in * kh * kw``); any other is a malformed patch.

int16 indices wrap for dimensions >= 32768 (SD-sized weights stay below; bigger ones do not): a
negative int16 index or size is read as its unsigned value (``% 65536``), which restores every
dimension below 65536.

Checks that need values (the size, the index ranges) are skipped on meta tensors, so
architecture detection can build the patch from shapes alone (``core.archs.detect``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from loradex.core.kinds.base import Shape, require

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: on-disk suffixes, in the order a file lists them
SPARSE_SUFFIXES = ("bias_indices", "bias_values", "bias_size")


def _unsigned(t: torch.Tensor) -> torch.Tensor:
    """Integer tensor as int64, int16 read as unsigned (undoes lycoris' int16 wrap-around)."""
    t64 = t.to(torch.int64)
    if t.dtype == torch.int16:
        t64 = t64 % 65536
    return t64


def check_sparse(
    indices: torch.Tensor | None,
    values: torch.Tensor | None,
    size: torch.Tensor | None,
    weight_shape: Shape | None,
) -> None:
    """FormatError unless the three tensors form a COO residual of a weight of ``weight_shape``.
    Shape checks first; the value checks (size fits the weight, indices in range) only when the
    tensors hold values (not on the meta device)."""
    given = [t is not None for t in (indices, values, size)]
    if not any(given):
        return
    require(all(given), "lora: bias_indices, bias_values and bias_size come together (LyCORIS sparse residual)")
    require(
        not indices.is_floating_point() and not size.is_floating_point(),
        "lora: bias_indices and bias_size must be integer tensors",
    )
    require(values.is_floating_point(), f"lora: bias_values has non-float dtype {values.dtype}")
    require(
        indices.ndim == 2 and values.ndim == 1 and size.ndim == 1,
        f"lora: sparse residual needs bias_indices (d, nnz), bias_values (nnz,), bias_size (d,); got "
        f"{tuple(indices.shape)}, {tuple(values.shape)}, {tuple(size.shape)}",
    )
    require(
        indices.shape[1] == values.shape[0] and indices.shape[0] == size.shape[0] and size.shape[0] >= 1,
        f"lora: bias_indices {tuple(indices.shape)}, bias_values {tuple(values.shape)} and bias_size "
        f"{tuple(size.shape)} do not agree",
    )
    if any(t.is_meta for t in (indices, values, size)):
        return  # the values are unknown: the size and ranges cannot be checked
    dims = [int(x) for x in _unsigned(size)]
    if weight_shape is not None:
        require(
            dims[0] == weight_shape[0] and math.prod(dims) == math.prod(weight_shape),
            f"lora: sparse residual bias_size {tuple(dims)} is not the (out, in*kh*kw) layout of a weight "
            f"{tuple(weight_shape)} (LyCORIS writes a weight residual there)",
        )
    if indices.numel():
        idx = _unsigned(indices)
        lo = int(idx.min())
        hi = idx.max(dim=1).values
        require(
            lo >= 0 and all(int(h) < d for h, d in zip(hi, dims)),
            f"lora: bias_indices fall outside bias_size {tuple(dims)}",
        )


def dense_residual(
    indices: torch.Tensor, values: torch.Tensor, size: torch.Tensor, shape: Shape, dtype: torch.dtype
) -> torch.Tensor:
    """The residual ``S`` as a dense tensor of the weight's ``shape`` in ``dtype`` (entries at
    repeated indices are summed, like ``sparse_coo_tensor(...).to_dense()``)."""
    dims = tuple(int(x) for x in _unsigned(size))
    out = torch.zeros(dims, dtype=dtype, device=values.device)
    if values.numel():
        idx = tuple(_unsigned(indices).to(values.device))
        out.index_put_(idx, values.to(dtype), accumulate=True)
    return out.reshape(shape)


def residual_factors(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact factorisation ``S = A @ B`` of a sparse 2-D residual using its non-zero rows or
    columns (whichever are fewer): ``A = I[:, rows]``, ``B = S[rows]``, or ``A = S[:, cols]``,
    ``B = I[cols]``. Rank = that count (0 for an all-zero residual)."""
    rows = torch.nonzero(s.abs().sum(1)).flatten()
    cols = torch.nonzero(s.abs().sum(0)).flatten()
    if rows.numel() <= cols.numel():
        eye = torch.zeros(s.shape[0], rows.numel(), dtype=s.dtype, device=s.device)
        eye[rows, torch.arange(rows.numel(), device=s.device)] = 1
        return eye, s[rows]
    eye = torch.zeros(cols.numel(), s.shape[1], dtype=s.dtype, device=s.device)
    eye[torch.arange(cols.numel(), device=s.device), cols] = 1
    return s[:, cols], eye
