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
method (float64, :func:`combine`) and stay 1-D.

**How a 2-D module is computed** (issue 14: the float64 path, dense updates stacked, ``topk`` and
a float64 randomized SVD per module, took ~18 minutes for two SD1.5 LoRAs at rank 64):

1. each input's dense update ``d_i`` in float32 -- what ``Patch.delta`` returns, a LoRA's as one
   GEMM into a reused buffer (:func:`dense_updates`);
2. sparsify and combine in place with :mod:`loradex.core.sparsify`: the exact top-``k`` threshold
   from a sampled bracket instead of ``topk``, DARE's masks drawn as before, TIES' election and
   disjoint mean in cache-sized chunks. The merged update equals peft's ``merge_utils`` on the same
   float32 updates bit for bit (:func:`merged_update`; trim ties at the cut aside, see
   :func:`loradex.core.sparsify.magnitude_cut`);
3. a fixed rank below ``min(m, n)`` is reached by :func:`loradex.core.linalg.subspace_svd` on
   the float32 matrix: a range finder started from the inputs' ``up`` factors mixed by a seeded
   Gaussian (the merged update's column space is mostly theirs: that saves the sketch product and
   iterations), half-steps in bfloat16 where that multiplies faster, stopped when the captured
   energy has converged (:data:`SVD_TOL`), a float32 projection at the end. Measured on TIES
   merges of 2 and 10 random SD1.5-shaped LoRAs (``python bench/merge.py --only ties``): within
   0.5% of the optimal truncation's error. The error reported is ``sqrt(||M||^2 - sum_k s_k^2) /
   ||M||`` (the result is a projection of ``M``), measured directly when under
   :data:`DIRECT_ERROR_BELOW`. Dynamic policies, small matrices and ``rank >= min(m, n)`` go
   through :func:`loradex.merge.svd.reduce_dense` (float64) as in the ``svd`` merge;
4. modules run in a thread pool (torch releases the GIL in its kernels): ``workers`` threads of
   ``torch.get_num_threads() // workers`` intra-op threads each, the largest modules first, each
   worker reusing its buffers (:class:`~loradex.core.sparsify.Workspace`); the count is capped so
   the buffers (``N + 3`` float32 copies of the largest module) take at most half the free
   memory. Results do not depend on the thread count. (On a machine shared with other busy
   processes, one intra-op thread per worker also avoids OpenMP threads spinning against each
   other, which made the float64 path several times slower with 2 threads than with 1.)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from loradex.core import sparsify
from loradex.core.linalg import EXACT_SHARE, SMALL_DIM, subspace_svd
from loradex.errors import LoradexError
from loradex.merge.svd import (
    ZERO_SHARE,
    balanced,
    bias_sum,
    check_additive,
    lora_from_factors,
    module_shape,
    out_dtype,
    reduce_dense,
    sum_1d,
)

log = logging.getLogger(__name__)

#: Adaptive stop of the range finder (``subspace_svd(tol=...)``): stop once the energy still to
#: come is estimated at most this share of the residual energy, i.e. the error within ~0.5% of
#: what more iterations would reach. Measured on TIES merges of 2 and 10 random SD1.5-shaped
#: LoRAs at rank 64: within 1.005x of the optimal truncation's error.
SVD_TOL = 0.01
#: Most power iterations (pairs of half-steps) the range finder may run.
SVD_MAX_ITERS = 6
#: Extra columns of the range finder over the rank (width = rank + this, at least rank // 2
#: more): 96 for rank 64, which converges in fewer half-steps than 80 for about the same time.
SVD_OVERSAMPLE = 32
#: Below this relative error the error is measured directly (``||M||^2 - sum s^2`` cancels).
DIRECT_ERROR_BELOW = 0.03

SPARSE_METHODS = ("ties", "dare", "dare_ties", "magnitude")


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's DARE masks: the first 8 bytes of ``sha256("<seed>:<name>")``
    (63 bits), stable across runs and platforms."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_density(density) -> float:
    """``density`` (the kept fraction of each input's entries) as a float in (0, 1], or LoradexError."""
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


def dense_updates(parts, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inputs' dense updates ``d_i`` (unweighted) as the rows of an ``(N, m * n)`` float32
    tensor (``out`` when given): ``Patch.delta`` reshaped to ``(m, n)``, and for a plain float32
    LoRA (no residual) the same product ``(gamma * up) @ down`` written straight into the row."""
    rows = out
    for i, (_, p, _) in enumerate(parts):
        if rows is None:
            n = math.prod(p.shape) // m
            rows = torch.empty(len(parts), m * n, dtype=torch.float32)
        target = rows[i].view(m, -1)
        if p.kind == "lora" and not p.has_residual and p.up.dtype != torch.float64 and p.down.dtype != torch.float64 \
                and (p.mid is None or p.mid.dtype != torch.float64):
            up, down = p.factors(torch.float32)
            torch.matmul(up * p.scale, down, out=target)
        else:
            target.copy_(p.delta().reshape(m, -1))
    return rows


def merged_update(name: str, parts, method: str, density: float, seed: int = 0,
                  workspace: sparsify.Workspace | None = None) -> torch.Tensor:
    """The merged dense update of one 2-D module before any rank reduction, float32 ``(m, n)``
    (a view of ``workspace`` memory when one is given): :func:`dense_updates`, then
    :func:`loradex.core.sparsify.prepare_rows` (DARE masks from :func:`module_seed`) and
    :func:`~loradex.core.sparsify.combine_rows`."""
    ws = workspace or sparsify.Workspace()
    shape = module_shape(name, parts)
    m = shape[0]
    n = math.prod(shape[1:])
    rows = dense_updates(parts, m, ws.get("rows", (len(parts), m * n)))
    gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, name)) if method.startswith("dare") else None
    cuts = sparsify.prepare_rows(method, rows, density, gen, workspace=ws)
    out = ws.get("merged", (m, n)) if workspace is not None else torch.empty(m, n)
    sparsify.combine_rows(method, rows, [w for _, _, w in parts], cuts=cuts, out=out, workspace=ws)
    return out


def _range_start(parts, m: int, width: int, seed: int) -> torch.Tensor | None:
    """``(m, width)`` start of the range finder: the LoRA inputs' ``w_i gamma_i up_i`` side by side
    times a seeded Gaussian (all of them when they have ``<= width`` columns, topped up with
    Gaussian columns); None when no input is a LoRA."""
    ups = []
    for _, p, w in parts:
        if p.kind == "lora":
            up, _ = p.factors(torch.float32)
            ups.append(up * (p.scale * w))
    if not ups:
        return None
    u = torch.cat(ups, 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if u.shape[1] > width:
        return u @ torch.randn(u.shape[1], width, generator=gen)
    return torch.cat([u, torch.randn(m, width - u.shape[1], generator=gen)], 1)


def _fast_truncation(mat: torch.Tensor, parts, rank: int, seed: int, workspace: sparsify.Workspace):
    """Randomized rank-``rank`` truncation of the float32 ``mat``: ``(up, down, k, energy, error,
    how)`` like :func:`reduce_dense` (see the module docstring, step 3)."""
    m, n = mat.shape
    total = float(torch.linalg.vector_norm(mat)) ** 2  # float32 sum: relative error ~1e-7
    width = min(m, n, rank + max(SVD_OVERSAMPLE, rank // 2))
    start = _range_start(parts, m, width, seed)
    info: dict = {}
    u, s, vh = subspace_svd(mat, rank, start=start, width=width, tol=SVD_TOL, max_iters=SVD_MAX_ITERS,
                            total=total, seed=seed, lowp_buffer=workspace.get("lowp", (m * n,), torch.bfloat16),
                            info=info)
    s64 = s.double()
    k = min(rank, s64.numel())
    if s64.numel() and float(s64[0]) > 0:
        k = min(k, max(1, int((s64 > s64[0] * ZERO_SHARE).sum())))
    up, down = balanced(u, s64, vh, k)
    how = (f"randomized svd (float32, width {info['width']}, {info['half_steps']} half-steps"
           f"{' in bfloat16' if info['lowp'] else ''})")
    if total == 0:
        return up, down, k, 1.0, 0.0, how
    lost = max(total - float((s64[:k] ** 2).sum()), 0.0) / total
    error = math.sqrt(lost)
    if error < DIRECT_ERROR_BELOW:
        resid = torch.addmm(mat, up.float(), down.float(), alpha=-1, out=workspace.get("resid", (m, n)))
        error = float(torch.linalg.vector_norm(resid, dtype=torch.float64)) / math.sqrt(total)
        lost = error * error
    return up, down, k, 1.0 - lost, error, how


def _randomized_eligible(m: int, n: int, policy: dict) -> bool:
    """Whether :func:`reduce_dense` would take the randomized path (fixed rank, a small share)."""
    if any(k in policy for k in ("fro", "ratio", "cumulative")):
        return False
    r = policy["rank"]
    small = min(m, n)
    return r < small and small > SMALL_DIM and (r + max(16, r // 4)) < EXACT_SHARE * small


def sparse_module(name: str, parts, method: str, policy: dict, density: float, seed: int = 0,
                  workspace: sparsify.Workspace | None = None) -> tuple[object, dict]:
    """One module: :func:`merged_update` (float32) -> rank reduction (module docstring)."""
    for i, p, _ in parts:
        check_additive(name, i, p, method)
    shape = module_shape(name, parts)
    if len(shape) == 1:
        gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, name)) if method.startswith("dare") else None
        return sum_1d(name, parts, lambda deltas, ws: combine(method, deltas, ws, density, gen))
    ws = workspace or sparsify.Workspace()
    mat = merged_update(name, parts, method, density, seed, ws)
    m, n = mat.shape
    if _randomized_eligible(m, n, policy):
        up, down, k, energy, error, how = _fast_truncation(mat, parts, policy["rank"], seed, ws)
    else:
        up, down, k, energy, error, how = reduce_dense(mat.double(), policy, seed)
    patch = lora_from_factors(up, down, shape, out_dtype(parts), bias_sum(parts))
    info = {"inputs": [i for i, _, _ in parts], "kinds": [p.kind for _, p, _ in parts], "rank": k,
            "energy": energy, "error": error, "exact": error <= 1e-12, "how": f"{method}, {how}"}
    return patch, info


def _module_entries(name: str, parts) -> int:
    shape = module_shape(name, parts)
    return math.prod(shape) if len(shape) > 1 else 0


def _available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_workers(by_module: dict, workers: int | None = None) -> tuple[int, int]:
    """``(workers, threads per worker)`` for a sparse merge: ``workers`` (default: the caller's
    ``torch.get_num_threads()``) capped by the number of 2-D modules and by memory (each worker
    holds ``N + 3`` float32 copies of the largest module, N its inputs; all of them together at
    most half the free memory); the intra-op threads are shared out among the workers."""
    threads = max(1, torch.get_num_threads())
    want = threads if workers is None else max(1, int(workers))
    sizes = [(_module_entries(nm, parts), len(parts)) for nm, parts in by_module.items()]
    two_d = sum(1 for e, _ in sizes if e)
    want = max(1, min(want, two_d or 1))
    per_worker = max((e * (cnt + 3) * 4 for e, cnt in sizes), default=0)
    free = _available_bytes()
    if free and per_worker:
        want = max(1, min(want, int(free // 2 // per_worker)))
    return want, max(1, threads // want)


def merge_sparse(by_module: dict, method: str, policy: dict, density: float, seed: int = 0,
                 progress=None, workers: int | None = None) -> tuple[dict, dict]:
    """``by_module``: name -> parts. Returns ``(patches, module infos)`` in ``by_module``'s order.

    Inputs are validated first (the first bad module in order raises), then the modules run on
    :func:`plan_workers` threads, largest first."""
    for name, parts in by_module.items():
        for i, p, _ in parts:
            check_additive(name, i, p, method)
        module_shape(name, parts)
    n_workers, per_worker = plan_workers(by_module, workers)
    order = sorted(by_module, key=lambda nm: -_module_entries(nm, by_module[nm]))
    results: dict = {}
    if n_workers == 1:
        ws = sparsify.Workspace()
        for name in order:
            results[name] = sparse_module(name, by_module[name], method, policy, density, seed, ws)
            if progress is not None:
                progress.update(1)
    else:
        import threading

        local = threading.local()
        caller_threads = torch.get_num_threads()

        def run(name):
            if not hasattr(local, "ws"):
                torch.set_num_threads(per_worker)
                local.ws = sparsify.Workspace()
            return name, sparse_module(name, by_module[name], method, policy, density, seed, local.ws)

        log.debug("sparse merge: %d modules on %d workers x %d threads", len(order), n_workers, per_worker)
        try:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="loradex-merge") as pool:
                for name, res in pool.map(run, order):
                    results[name] = res
                    if progress is not None:
                        progress.update(1)
        finally:
            torch.set_num_threads(caller_threads)
    patches = {name: results[name][0] for name in by_module}
    infos = {name: results[name][1] for name in by_module}
    return patches, infos
