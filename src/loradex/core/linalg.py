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
* :func:`rank_for` turns a spectrum into a rank under the fixed / fro / ratio / cumulative
  policies of kohya's resize_lora (without its off-by-one, see the function).
"""

from __future__ import annotations

import math

import torch

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
