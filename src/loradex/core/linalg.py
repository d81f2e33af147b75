"""Low-rank linear algebra: exact and randomized SVD, factor truncation, rank policies.

Conventions: a rank-``k`` factorisation of an ``(m, n)`` matrix is ``up @ down`` with ``up``
``(m, k)`` (the left singular vectors times the singular values) and ``down`` ``(k, n)``
(the right singular vectors), i.e. LoRA's ``lora_up`` / ``lora_down`` with scale 1. Every
function returns the relative Frobenius error ``||M - up @ down|| / ||M||`` of what it kept.

* :func:`svd` picks the exact ``torch.linalg.svd`` for small matrices or when the rank is a large
  share of ``min(m, n)``, and a seeded randomized range finder (Halko, Martinsson & Tropp 2011:
  Gaussian sketch with oversampling, power iterations re-orthonormalised by QR, exact SVD of the
  small projected matrix) otherwise. Exact SVDs of matrices up to ``EXACT_F64_MAX`` entries run in
  float64; larger ones, and the sketches, in float32 (float64 when the input is float64), with the
  small final SVD always in float64.
* :func:`truncate_factors` truncates an existing factorisation ``up @ down`` of rank ``r`` without
  forming the product: QR of ``up`` and of ``down^T``, SVD of the ``r x r`` core. The cost is
  ``O((m + n) r^2)``, independent of ``m * n``, and the result is the optimal rank-``k``
  approximation (Eckart-Young) of the product.
* :func:`subspace_svd` is the float32 workhorse for large dense matrices that are rebuilt for
  every call (sparsifying merges): a range finder started from a caller's guess of the column
  space, half-steps of subspace iteration in bfloat16 where that multiplies faster (measured once
  per process), orthonormalised through small Gram matrices instead of QR, stopped when the
  captured energy has converged, and one float32 projection at the end.
* :func:`rank_for` turns a spectrum into a rank under the fixed / fro / ratio / cumulative
  policies of kohya's resize_lora (without its off-by-one, see the function).
"""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: Largest matrix (in entries) whose exact SVD runs in float64.
EXACT_F64_MAX = 1 << 22
#: Below this ``min(m, n)`` the exact SVD is always used.
SMALL_DIM = 128
#: Use the exact SVD when ``rank + oversample`` reaches this share of ``min(m, n)``.
EXACT_SHARE = 0.4


def _work_dtype(mat: torch.Tensor) -> torch.dtype:
    return torch.float64 if mat.dtype == torch.float64 else torch.float32


def svd(
    mat: torch.Tensor,
    rank: int | None = None,
    *,
    oversample: int | None = None,
    power_iters: int = 4,
    seed: int = 0,
    exact: bool | None = None,
    tol: float | None = None,
    total: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``(U, S, Vh)`` of a 2-D matrix (all of it when ``rank`` is None).

    ``exact=None`` chooses (see the module docstring); True/False force the method. The
    randomized path (``oversample`` extra columns, default ``max(16, rank // 4)``, and
    ``power_iters`` power iterations) is deterministic for a given ``seed``. Results are float32, or float64 when
    ``mat`` is float64 or the exact float64 path was taken.

    ``tol`` makes the power iterations adaptive (``power_iters`` is then their maximum): after
    each one the energy the top ``rank`` directions capture, ``E = sum S_k^2``, is compared with
    the previous iteration's, and iterating stops once ``E`` grew by at most ``tol`` times the
    residual ``||M||^2 - E`` (``total``: ``||M||_F^2`` when the caller has it), i.e. once the
    truncation error moves by less than about ``tol / 2`` of itself, or once the gain still to
    come, extrapolated from the last gain and the spectral gap (the captured energy converges
    geometrically, by ``(S_width / S_k)^4`` per iteration), is that small. Each check is free of extra
    products: ``B = Q^T M`` is the transpose of the ``M^T Q`` the next iteration needs anyway.
    Matrices with a spectral gap at ``rank`` (a low-rank fine-tune plus noise) stop after one
    iteration; slowly decaying spectra take more.
    """
    if mat.ndim != 2:
        raise ValueError(f"svd needs a 2-D matrix, got shape {tuple(mat.shape)}")
    m, n = mat.shape
    small = min(m, n)
    k = small if rank is None else max(0, min(int(rank), small))
    if oversample is None:
        oversample = max(16, k // 4)
    if exact is None:
        exact = small <= SMALL_DIM or rank is None or (k + oversample) >= EXACT_SHARE * small
    if exact:
        dt = torch.float64 if (m * n <= EXACT_F64_MAX or mat.dtype == torch.float64) else torch.float32
        u, s, vh = torch.linalg.svd(mat.to(dt), full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    dt = _work_dtype(mat)
    a = mat.to(dt)
    width = min(small, k + oversample)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(n, width, generator=gen, dtype=dt).to(a.device)
    q, _ = torch.linalg.qr(a @ sketch)
    if tol is not None and total is None:
        total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
    captured = None
    it = 0
    while True:
        bt = a.T @ q  # (n, width) = B^T with B = Q^T M
        if it >= power_iters:
            break
        if tol is not None:
            b64 = bt.double()
            ev = torch.linalg.eigvalsh(b64.T @ b64).clamp_min(0)  # S^2 of B, ascending: width x width
            now = float(ev[-k:].sum()) if k else 0.0
            if captured is not None:
                gain, resid = now - captured, max(total - now, 0.0)
                # the missing energy shrinks geometrically, by ~(s_width / s_k)^4 per iteration
                # (the error of q iterations goes as (s_width / s_k)^(4q+2)): what is left to
                # gain is about gain * f / (1 - f) with f that factor
                f = (float(ev[0]) / float(ev[-k])) ** 2 if k and float(ev[-k]) > 0 else 1.0
                if gain <= tol * resid or (f < 1 and gain * f / (1 - f) <= tol * resid):
                    break
            captured = now
        z, _ = torch.linalg.qr(bt)
        q, _ = torch.linalg.qr(a @ z)
        it += 1
    ub, s, vh = torch.linalg.svd(bt.T.double(), full_matrices=False)
    u = q.double() @ ub[:, :k]
    return u.to(dt), s[:k].to(dt), vh[:k].to(dt)


@functools.lru_cache(maxsize=1)
def lowp_matmul_faster() -> bool:
    """Whether a bfloat16 matmul beats a float32 one on this CPU (AVX512-BF16 / AMX: ~3-4x
    measured on an AMD EPYC; without them bfloat16 is emulated and slower). Timed once per
    process on a ``(1024, 2048) @ (2048, 96)`` product, best of three."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(1024, 2048, generator=g)
    b = torch.randn(2048, 96, generator=g)
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        x @ y  # warm-up (kernel selection)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        best[dt] = min(times)
    return best[torch.bfloat16] * 1.3 < best[torch.float32]


#: Eigenvalues of a Gram matrix below this share of the largest are treated as noise.
_GRAM_FLOOR = 1e-7
#: :func:`subspace_svd` adds a float32 half-step after bfloat16 ones when the residual energy is
#: below this share (the error below ~10%): there the bfloat16 subspace's ~1e-3 error would show.
_REFINE_BELOW = 1e-2
#: The final float32 projection uses the newest basis' ``rank + _FINAL_EXTRA`` leading directions
#: (they come sorted by energy): the rest hold the tail (measured: no change in the error to 1e-4).
_FINAL_EXTRA = 16
#: :func:`subspace_svd` finishes with an exact SVD when the kept spectrum spans more than this
#: ratio of squared singular values (a float32 Gram cannot resolve it).
_GRAM_RANGE = 1e-4


def _gram_orth(y: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """``(basis, energy)``: an orthonormal float32 basis of the columns of ``y`` (``(r, w)``) from
    its float32 Gram matrix (``y^T y = V diag(lam) V^T``, ``basis = y V lam^-1/2``: one ``r x w x
    w`` product instead of a Householder QR, ~5x slower on these shapes) and the sum of the ``k``
    largest ``lam`` (the energy ``y`` holds in its top ``k`` directions). Directions below
    ``_GRAM_FLOOR`` of the largest are scaled as if at the floor: noise, kept bounded (the next
    half-step's product washes them out)."""
    y = y.float()
    lam, v = torch.linalg.eigh(y.T @ y)  # float32: the Gram is no more precise than that
    lam = lam.flip(0)
    v = v.flip(1)
    top = float(lam[0]) if lam.numel() else 0.0
    energy = float(lam[:k].double().clamp_min(0).sum())
    if top <= 0:
        return y, 0.0
    return y @ (v * lam.clamp_min(top * _GRAM_FLOOR).rsqrt()), energy


def subspace_svd(
    mat: torch.Tensor,
    rank: int,
    *,
    start: torch.Tensor | None = None,
    width: int | None = None,
    tol: float = 0.01,
    max_iters: int = 6,
    total: float | None = None,
    seed: int = 0,
    lowp: bool | None = None,
    lowp_buffer: torch.Tensor | None = None,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``(U, S, Vh)`` (float32) of a large float32 matrix by a randomized range
    finder (Halko, Martinsson & Tropp 2011, subspace iteration) tuned for matrices that are formed
    once and truncated once, like the merged update of a TIES / DARE merge.

    * start: the ``(m, w)`` columns ``start`` (a guess of the dominant column space, e.g. the merged
      adapters' ``up`` factors mixed by a Gaussian) or else ``M @ Omega``, Gaussian ``Omega`` of
      ``width`` (default ``rank + max(16, rank // 4)``) columns, seeded;
    * half-steps ``Z = orth(M^T Q)``, ``Q = orth(M Z)``: the products in bfloat16 when ``lowp``
      (default: :func:`lowp_matmul_faster`) -- rounding the matrix to bfloat16 perturbs it by
      ~0.2% of its norm, which moves the subspace found by ~1e-3, not the result's precision (the
      final projection below is float32, so the reported spectrum is that of ``M`` itself); when
      the residual is under ~10% of ``M`` (a nearly exact truncation, where 1e-3 would show) one
      float32 half-step follows. Each basis is orthonormalised through its ``w x w`` Gram matrix
      (:func:`_gram_orth`);
    * stop: each half-step yields the energy the previous basis captures, ``e_j = sum_{i<=rank}
      s_i^2`` (free: the Gram's eigenvalues), nondecreasing in ``j``. With the last three gains
      ``g1, g2, g3`` and ``f = max(g2 / g1, g3 / g2)`` the energy still to come is about ``g3 f /
      (1 - f)`` (a geometric tail; the larger ratio because the first half-steps gain fast and
      the rate then slows down and settles -- measured on TIES merges: ratios 0.15, 0.47, 0.52,
      0.55, ...; Aitken's estimate from the first two stopped at 1.015x the optimal error);
      iterating stops once that is at most ``tol`` times the residual energy ``total - e_j``
      (``total``: ``||M||_F^2``, computed when not given) -- i.e. once the truncation error is
      within about ``tol / 2`` of what more iterations would reach -- or when a gain is not
      positive, or after ``max_iters`` full iterations (``2 * max_iters`` half-steps);
    * finish: the float32 product of ``M`` with the newest basis' leading ``rank + 16``
      directions (the basis spans the last product, so it captures at least the last ``e_j``),
      decomposed through its Gram matrix (exact SVD instead when the kept spectrum spans more than
      ``1/_GRAM_RANGE`` in squared singular values, where a float32 Gram loses the small ones).
      The result is a projection of ``M``, so ``||M - U S Vh||_F^2 = ||M||_F^2 - sum S^2``.

    ``lowp_buffer``: contiguous bfloat16 storage of at least ``m * n`` entries for the bfloat16 copy
    (a caller that truncates many matrices saves the page faults of a fresh one each time).
    ``info`` receives ``width``, ``half_steps`` and ``lowp``. For float64 matrices, small ones or
    a rank that is a large share of ``min(m, n)`` use :func:`svd`."""
    if mat.ndim != 2:
        raise ValueError(f"subspace_svd needs a 2-D matrix, got shape {tuple(mat.shape)}")
    m, n = mat.shape
    small = min(m, n)
    k = max(1, min(int(rank), small))
    a = mat.float()
    if start is not None:
        if start.ndim != 2 or start.shape[0] != m:
            raise ValueError(f"start must have {m} rows, got {tuple(start.shape)}")
        w = min(small, start.shape[1])
    else:
        w = min(small, width if width is not None else k + max(16, k // 4))
    if w < k:
        raise ValueError(f"the range finder's width ({w}) must be at least the rank ({k})")
    use_lowp = lowp_matmul_faster() if lowp is None else bool(lowp)
    if not use_lowp:
        low = a
    elif lowp_buffer is not None and lowp_buffer.dtype == torch.bfloat16 and lowp_buffer.numel() >= m * n:
        low = lowp_buffer.reshape(-1)[: m * n].view(m, n).copy_(a)
    else:
        low = a.to(torch.bfloat16)
    if total is None:
        total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
    if start is not None:
        q, _ = _gram_orth(start[:, :w], k)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q, _ = _gram_orth(a @ torch.randn(n, w, generator=gen), k)
    basis, side = q, "left"
    energies: list[float] = []
    steps = 0
    while True:
        if side == "left":
            basis, e = _gram_orth(low.T @ basis.to(low.dtype), k)  # e: captured by Q; new basis Z
        else:
            basis, e = _gram_orth(low @ basis.to(low.dtype), k)  # e: captured by Z; new basis Q
        side = "right" if side == "left" else "left"
        steps += 1
        energies.append(e)
        if steps >= 2 * max_iters:
            break
        if len(energies) >= 2:
            last = energies[-4:]
            gains = [b - a for a, b in zip(last, last[1:])]
            if gains[-1] <= 0:
                break
            if len(gains) == 3:  # the first gains are fast; the rate slows down, then settles
                f = max(g1 / g0 if g0 > 0 else 1.0 for g0, g1 in zip(gains, gains[1:]))
                if f < 1 and gains[-1] * f / (1 - f) <= tol * max(total - energies[-1], 0.0):
                    break
    # the newest basis spans the last product: it captures at least energies[-1]
    if use_lowp and total > 0 and max(total - energies[-1], 0.0) < _REFINE_BELOW * total:
        # nearly exact (error < ~10%): a bfloat16 subspace is off by ~1e-3 of M, which would show;
        # one float32 half-step brings it to float32 accuracy
        basis, _ = _gram_orth(a.T @ basis if side == "left" else a @ basis, k)
        side = "right" if side == "left" else "left"
        steps += 1
    basis = basis[:, :min(basis.shape[1], k + _FINAL_EXTRA)]
    proj = a.T @ basis if side == "left" else a @ basis  # float32: (n, w) = M^T Q, or (m, w) = M Z
    lam, v = torch.linalg.eigh((proj.T @ proj).double())
    lam, v = lam.flip(0).clamp_min(0), v.flip(1)
    if float(lam[0]) > 0 and float(lam[k - 1]) < _GRAM_RANGE * float(lam[0]):
        x, s, wh = torch.linalg.svd(proj.double(), full_matrices=False)
        x, s, v = x.float(), s.float(), wh.T.float()
    else:
        s = lam.sqrt().float()
        v = v.float()
        x = (proj @ v) / s.clamp_min(torch.finfo(torch.float32).tiny)
    # proj = X S V^T.  left: M^T Q = X S V^T  =>  Q^T M = V S X^T: U = Q V, Vh = X^T
    #                  right: M Z = X S V^T   =>  M Z Z^T = X S (Z V)^T: U = X, Vh = (Z V)^T
    if side == "left":
        u, vh = basis @ v[:, :k], x[:, :k].T
    else:
        u, vh = x[:, :k], (basis @ v[:, :k]).T
    if info is not None:
        info.update(width=w, half_steps=steps, lowp=use_lowp)
    return u, s[:k], vh


def svd_truncate(
    mat: torch.Tensor, rank: int, **svd_options
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factorisation ``(up, down, rel_err)`` of a 2-D matrix: ``up = U * S``
    ``(m, k)``, ``down = Vh`` ``(k, n)``, float32 (float64 for a float64 input); ``k`` is ``rank``
    clamped to ``min(m, n)``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vh = svd(mat, rank, **svd_options)
    out_dt = _work_dtype(mat)
    up = (u * s.to(u.dtype)).to(out_dt)
    down = vh.to(out_dt)
    total = torch.linalg.vector_norm(mat.double())
    if total == 0:
        return up, down, 0.0
    if u.shape[1] == min(mat.shape):
        return up, down, 0.0
    # The residual, measured directly in float64 (same cost as the sketch; no cancellation).
    resid = torch.linalg.vector_norm(mat.double() - up.double() @ down.double())
    return up, down, float(resid / total)


def factors_svd(
    up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of the product ``up @ down`` (``up`` ``(m, r)``, ``down`` ``(r, n)``)
    computed from the factors: ``up = Qu Ru``, ``down^T = Qd Rd``, SVD of the small core
    ``Ru Rd^T = Uc S Vc^T``, then ``U = Qu Uc`` and ``Vh = Vc^T Qd^T``. ``O((m + n) r^2)``, never
    forms the ``m x n`` product. float64 in and out; ``S`` has ``min(r, m, n)`` values."""
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"factors do not chain: {tuple(up.shape)} @ {tuple(down.shape)}")
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ uc, s, vch @ qd.T


def truncate_factors(
    up: torch.Tensor, down: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Optimal rank-``rank`` truncation of the product ``up @ down`` (``up`` ``(m, r)``, ``down``
    ``(r, n)``) computed from the factors (:func:`factors_svd`); the result is
    ``(U_k S_k, Vh_k)`` and the relative error ``sqrt(sum_{i>k} S_i^2 / sum_i S_i^2)``, exact
    because ``Qu`` and ``Qd`` are orthonormal. Runs in float64 and returns float64 factors
    (callers cast)."""
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"factors do not chain: {tuple(up.shape)} @ {tuple(down.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, s, vh = factors_svd(up, down)
    k = min(rank, s.numel())
    new_up = u[:, :k] * s[:k]
    new_down = vh[:k]
    energy = float((s * s).sum())
    if energy == 0.0:
        return new_up, new_down, 0.0
    lost = float((s[k:] * s[k:]).sum())
    return new_up, new_down, math.sqrt(max(lost, 0.0) / energy)


def rank_for(
    S: torch.Tensor,
    fixed: int | None = None,
    fro: float | None = None,
    ratio: float | None = None,
    cumulative: float | None = None,
) -> int:
    """The rank to keep for singular values ``S`` (descending) under one policy:

    * ``fixed=N``: ``N`` (clamped to ``len(S)``);
    * ``fro=p``: the smallest ``k`` with ``sum(S[:k]^2) / sum(S^2) >= p^2`` (keeps a fraction ``p``
      of the Frobenius norm, i.e. ``||M_k|| >= p ||M||``);
    * ``ratio=p``: the number of singular values with ``S_i > S_0 / p``;
    * ``cumulative=p``: the smallest ``k`` with ``sum(S[:k]) / sum(S) >= p``.

    kohya's resize_lora adds one to these (its minimum rank is 2); here the rank is exactly the
    smallest one that meets the threshold. ``fixed`` may be combined with one dynamic policy and
    then caps it. The result is at least 1 (also for an all-zero spectrum) and at most
    ``len(S)``. Sums run in float64.
    """
    dynamic = [(n, v) for n, v in (("fro", fro), ("ratio", ratio), ("cumulative", cumulative)) if v is not None]
    if len(dynamic) > 1:
        raise ValueError("give at most one of fro, ratio, cumulative")
    s = S.detach().double().flatten()
    n = s.numel()
    if n == 0:
        raise ValueError("empty spectrum")
    if fixed is not None and int(fixed) < 1:
        raise ValueError(f"rank must be >= 1, got {fixed}")
    cap = n if fixed is None else min(n, int(fixed))
    if not dynamic:
        return cap
    name, p = dynamic[0]
    p = float(p)
    if name == "ratio":
        if p <= 0:
            raise ValueError("ratio must be > 0")
        k = int((s > s[0] / p).sum())
    else:
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must be in [0, 1]")
        vals = s * s if name == "fro" else s
        target = p * p if name == "fro" else p
        total = float(vals.sum())
        if total <= 0:
            k = 1
        else:
            frac = torch.cumsum(vals, 0) / total
            # Accept values within a few ulps of the target (cumsum rounding at p = 1 exactly).
            k = int(torch.searchsorted(frac, torch.tensor([target - 1e-12], dtype=frac.dtype)).item()) + 1
    return max(1, min(k, cap))
