"""``merge(..., method="ties" | "dare" | "dare_ties" | "magnitude")``: sparsifying merges of the
inputs' dense updates per module, then the rank reduction of the ``svd`` merge.

The definitions follow peft's ``add_weighted_adapter`` with the ``*_svd`` combination types (which
act on the dense deltas ``get_delta_weight``, i.e. with each adapter's ``alpha / r`` applied, and
take the user weights separately), so a result can be compared with peft's
``peft.utils.merge_utils`` functions numerically. ``d_i`` is input ``i``'s dense update, ``w_i``
its weight, ``density`` the kept fraction ``(0, 1]``:

* ``magnitude`` (peft ``magnitude_prune``): keep the ``int(density * numel)`` largest ``|d_i|`` of
  each input (``density = 1``: keep all), then ``sum_i w_i d_i'``.
* ``ties`` (Yadav et al. 2023, "TIES-Merging"; peft ``ties`` with ``majority_sign_method="total"``):
  trim each ``d_i`` as ``magnitude`` does; elect a sign per element, ``+1`` where
  ``sum_i d_i' >= 0`` else ``-1`` (the sign of the summed trimmed mass, of the *unweighted* trimmed
  deltas as in peft); disjoint mean: ``sum_i w_i d_i' [sign(d_i') = elected] / max(1, #agreeing)``.
  Note it is a mean: two agreeing inputs at weight 1 give their average, not their sum.
* ``dare`` (Yu et al. 2023, "Language Models are Super Mario"; peft ``dare_linear``): drop each
  element with probability ``p = 1 - density`` (Bernoulli keep mask), rescale the kept by
  ``1 / density``, then ``sum_i w_i d_i'``.
* ``dare_ties`` (peft ``dare_ties``): DARE's drop-and-rescale, then TIES' election and disjoint mean.

DARE is seeded: module ``name`` draws its masks (input by input, in input order, one
``torch.bernoulli`` each) from a CPU generator seeded with :func:`module_seed` ``(seed, name)``, so
the result is the same across runs and does not depend on which other modules exist. (peft draws
from the global RNG: ``torch.manual_seed(module_seed(seed, name))`` before its ``dare_linear``
reproduces the masks.)

Biases are summed with the weights (no sparsification); 1-D updates (norm layers) get the same
method and stay 1-D. The combined dense update is then reduced to the rank policy exactly as the
``svd`` merge's dense path does (:func:`loradex.merge.svd.reduce_dense`), and the error of that
step is reported.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from loradex.errors import LoradexError
from loradex.merge.svd import (
    bias_sum,
    check_additive,
    lora_from_factors,
    module_shape,
    out_dtype,
    reduce_dense,
    sum_1d,
)

SPARSE_METHODS = ("ties", "dare", "dare_ties", "magnitude")


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's DARE masks: the first 8 bytes of ``sha256("<seed>:<name>")``
    (63 bits), stable across runs and platforms."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_density(density) -> float:
    if density is None:
        raise LoradexError("this merge method needs a density in (0, 1] (--density D: the kept fraction)")
    d = float(density)
    if math.isnan(d) or not 0 < d <= 1:
        raise LoradexError(f"density must be in (0, 1], got {density}")
    return d


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes (``torch.topk`` order), zero the rest;
    ``density >= 1``: unchanged."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each element with probability ``density`` and divide the kept by ``density``;
    ``density >= 1``: unchanged (no draw)."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def elect_and_mean(trimmed: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES' sign election (sign of ``sum_i d_i``, ties to +1) and disjoint mean of the weighted
    agreeing values."""
    stack = torch.stack(list(trimmed), 0)
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = stack.sign() == elected
    w = torch.tensor([float(x) for x in weights], dtype=stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
    total = (stack * w * agree).sum(0)
    return total / agree.sum(0).clamp(min=1).to(stack.dtype)


def combine(method: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """The dense result of ``method`` on the per-input updates ``deltas`` (see the module docstring)."""
    if method not in SPARSE_METHODS:
        raise LoradexError(f"unknown sparse merge method {method!r} ({', '.join(SPARSE_METHODS)})")
    if method in ("ties", "magnitude"):
        sparse = [trim(d, density) for d in deltas]
    else:
        if generator is None:
            raise ValueError("dare needs a generator (seeded per module)")
        sparse = [drop(d, density, generator) for d in deltas]
    if method in ("ties", "dare_ties"):
        return elect_and_mean(sparse, weights)
    return sum(d * float(w) for d, w in zip(sparse, weights))


def sparse_module(name: str, parts, method: str, policy: dict, density: float, seed: int = 0) -> tuple[object, dict]:
    """One module: dense updates (float64) -> ``combine`` -> rank reduction."""
    for i, p, _ in parts:
        check_additive(name, i, p, method)
    shape = module_shape(name, parts)
    weights = [w for _, _, w in parts]
    gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, name)) if method.startswith("dare") else None

    def comb(deltas, ws):
        return combine(method, deltas, ws, density, gen)

    if len(shape) == 1:
        return sum_1d(name, parts, comb)
    deltas = [p.delta().double().reshape(shape[0], -1) for _, p, _ in parts]
    mat = comb(deltas, weights)
    up, down, k, energy, error, how = reduce_dense(mat, policy, seed)
    patch = lora_from_factors(up, down, shape, out_dtype(parts), bias_sum(parts))
    info = {"inputs": [i for i, _, _ in parts], "kinds": [p.kind for _, p, _ in parts], "rank": k,
            "energy": energy, "error": error, "exact": error <= 1e-12, "how": f"{method}, {how}"}
    return patch, info


def merge_sparse(by_module: dict, method: str, policy: dict, density: float, seed: int = 0,
                 progress=None) -> tuple[dict, dict]:
    """``by_module``: name -> parts. Returns ``(patches, module infos)``."""
    patches, infos = {}, {}
    for name, parts in by_module.items():
        patches[name], infos[name] = sparse_module(name, parts, method, policy, density, seed)
        if progress is not None:
            progress.update(1)
    return patches, infos
