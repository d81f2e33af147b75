"""``merge(..., method="svd")``: the weighted sum of the inputs' updates per module, reduced to a
rank (fixed ``rank``, or per module ``fro`` / ``ratio`` / ``cumulative``, see
:func:`loradex.core.linalg.rank_for`) by the optimal (Eckart-Young) truncation.

Per module, ``dW = sum_i w_i dW_i``:

* inputs with an exact LoRA form (LoRA / LoCon / Tucker, LoHa, LoKr; no DoRA) enter as factors:
  ``U = [w_1 g_1 up_1 | ... ]`` (columns), ``D = [down_1; ...]`` (rows), so ``U @ D`` is the sum
  exactly. Its SVD comes from the factors (:func:`loradex.core.linalg.factors_svd`: QR of ``U``
  and ``D^T``, SVD of the ``R x R`` core, ``R = sum of the ranks``): the cost does not depend on the
  layer size and the spectrum is exact, so a module whose sum already has rank <= the target
  (e.g. a single input) stays exact (error 0);
* other additive kinds that do not need the base weight (``full``) enter as their dense delta; a
  module with such an input (or with ``R >= min(out, in)``) is decomposed densely: exact SVD when
  a dynamic policy needs the whole spectrum or the rank is a large share of the matrix, else the
  seeded randomized SVD of :func:`loradex.core.linalg.svd` (oversampling + power iterations);
* 1-D updates (norm layers; ``full`` on a norm) are summed exactly and kept 1-D (``norm`` kind
  when every input is a norm patch, else ``full``);
* kinds whose update depends on the base weight ((IA)^3, GLoRA, OFT, BOFT, DoRA): LoradexError.

The result is a LoRA with ``alpha = rank`` (scale 1) and balanced factors ``up = U_k sqrt(S_k)``,
``down = sqrt(S_k) Vh_k`` (no quantile clamp, unlike kohya's svd_merge_lora, which cuts the
larger factor hard). Biases (LoRA ``lora_up.bias``, ``full``'s ``diff_b``) are summed exactly.
The report gives each module's rank, kept energy and relative Frobenius error
``||dW - dW_k|| / ||dW||``.
"""

from __future__ import annotations

import math

import torch

from loradex.core.kinds import KINDS
from loradex.core.kinds.full import FullPatch
from loradex.core.kinds.lora import LoraPatch
from loradex.core.kinds.norm import NormPatch
from loradex.core.linalg import EXACT_SHARE, SMALL_DIM, factors_svd, rank_for, svd
from loradex.errors import LoradexError

#: Singular values below this share of the largest are numerically zero (not kept).
ZERO_SHARE = 1e-13


def check_policy(method: str, rank=None, fro=None, ratio=None, cumulative=None) -> dict:
    """The rank policy as a dict, or LoradexError when it is missing or malformed."""
    from loradex.merge.resize import _check_policy

    if rank is None and fro is None and ratio is None and cumulative is None:
        raise LoradexError(f"merge method {method} needs a rank policy: rank (--rank N), fro, ratio or cumulative")
    return _check_policy(rank, fro, ratio, cumulative)


def module_shape(name: str, parts) -> tuple[int, ...]:
    """The weight shape shared by the inputs' patches of one module (conv factors may be stored
    flattened: same output rows and entry count is the same module); LoradexError otherwise."""
    shape = None
    for _, p, _ in parts:
        s = tuple(p.shape)
        if shape is not None and (s[0] != shape[0] or math.prod(s) != math.prod(shape)):
            raise LoradexError(f"{name}: inputs disagree on the module's shape ({shape} vs {s})")
        if shape is None or len(s) > len(shape):
            shape = s
    return shape


def check_additive(name: str, i: int, patch, method: str) -> None:
    """LoradexError for patches whose update depends on the base weight."""
    if getattr(patch, "dora_scale", None) is not None:
        raise LoradexError(
            f"input {i + 1}, {name}: a DoRA patch cannot be merged by {method} (its update depends "
            "non-linearly on the base weight); bake it or convert it first"
        )
    if patch.needs_base:
        raise LoradexError(
            f"input {i + 1}, {name}: a {patch.kind} patch's update depends on the base weight; "
            f"{method} merges additive kinds ({', '.join(k for k, c in KINDS.items() if not c.always_needs_base)})"
        )


def out_dtype(parts) -> torch.dtype:
    """The dtype a merged patch is stored in: the promotion of the inputs' :attr:`Patch.dtype`
    (fp16 + fp16 -> fp16, fp16 + bf16 -> float32); float32 when there are no inputs."""
    dt = None
    for _, p, _ in parts:
        dt = p.dtype if dt is None else torch.promote_types(dt, p.dtype)
    return dt or torch.float32


def bias_sum(parts) -> torch.Tensor | None:
    """``sum_i w_i db_i`` in float64 (None when no input changes the bias)."""
    total = None
    for _, p, w in parts:
        b = p.bias_delta()
        if b is not None:
            b = b.double() * w
            total = b if total is None else total + b
    return total


def sum_1d(name: str, parts, combine=None) -> tuple[object, dict]:
    """1-D modules (norm layers): ``combine([d_i], [w_i])`` (default: the weighted sum), exact."""
    deltas = [p.delta().double().reshape(-1) for _, p, _ in parts]
    weights = [w for _, _, w in parts]
    total = combine(deltas, weights) if combine else sum(d * w for d, w in zip(deltas, weights))
    b = bias_sum(parts)
    dt = out_dtype(parts)
    if all(p.kind == "norm" for _, p, _ in parts):
        patch = NormPatch(w_norm=total.to(dt), b_norm=None if b is None else b.to(dt))
    else:
        patch = FullPatch(diff=total.to(dt), diff_b=None if b is None else b.to(dt))
    return patch, {"inputs": [i for i, _, _ in parts], "kinds": [p.kind for _, p, _ in parts],
                   "rank": None, "energy": 1.0, "error": 0.0, "exact": True, "how": "1-D sum"}


def balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``k`` factors ``(U_k sqrt(S_k), sqrt(S_k) Vh_k)`` in float64 (friendlier to
    fp16 than ``U_k S_k`` and ``Vh_k``)."""
    root = s[:k].double().sqrt()
    return u[:, :k].double() * root, root[:, None] * vh[:k].double()


def lora_from_factors(up: torch.Tensor, down: torch.Tensor, shape, dtype, bias) -> LoraPatch:
    """A LoRA ``up @ down`` (2-D factors) for a weight of ``shape`` with alpha = rank (scale 1)."""
    return LoraPatch._from_2d(up, down, shape, dtype, bias=None if bias is None else bias.to(dtype),
                              alpha=torch.tensor(float(up.shape[1])))


def _keep(s: torch.Tensor, policy: dict) -> int:
    k = rank_for(s, fixed=policy.get("rank"), fro=policy.get("fro"), ratio=policy.get("ratio"),
                 cumulative=policy.get("cumulative"))
    if s.numel() and float(s[0]) > 0:
        k = min(k, max(1, int((s > s[0] * ZERO_SHARE).sum())))
    return k


def _stats(s: torch.Tensor, k: int) -> tuple[float, float]:
    s2 = s.double() ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1.0, 0.0
    lost = float(s2[k:].sum())
    return 1.0 - lost / total, math.sqrt(max(lost, 0.0) / total)


def reduce_dense(mat: torch.Tensor, policy: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, float, float, str]:
    """Rank-reduce a dense 2-D float64 matrix under ``policy``: ``(up, down, k, energy, error, how)``.

    * A fixed rank >= ``min(m, n)`` keeps everything: the exact factorisation ``M @ I`` (or
      ``I @ M``), no decomposition needed.
    * A smaller fixed rank uses :func:`loradex.core.linalg.svd` (seeded randomized where the rank is
      a small share, exact otherwise); the error is measured directly, ``||M - M_k|| / ||M||``.
    * Dynamic policies need the whole spectrum: exact SVD."""
    m, n = mat.shape
    small = min(m, n)
    total = float(torch.linalg.vector_norm(mat))
    dynamic = any(k in policy for k in ("fro", "ratio", "cumulative"))
    if not dynamic and policy["rank"] >= small:
        eye = torch.eye(small, dtype=mat.dtype, device=mat.device)
        up, down = (mat, eye) if n <= m else (eye, mat)
        return up, down, small, 1.0, 0.0, "kept whole"
    if dynamic:
        u, s, vh = svd(mat, None)
        k = _keep(s, policy)
        energy, error = _stats(s, k)
        return *balanced(u, s, vh, k), k, energy, error, "exact svd"
    u, s, vh = svd(mat, policy["rank"], seed=seed)
    k = _keep(s, policy)
    up, down = balanced(u, s, vh, k)
    if total == 0:
        return up, down, k, 1.0, 0.0, "zero"
    error = float(torch.linalg.vector_norm(mat - up @ down)) / total
    r = policy["rank"]
    exact_path = small <= SMALL_DIM or (r + max(16, r // 4)) >= EXACT_SHARE * small  # linalg.svd's choice
    return up, down, k, 1.0 - error * error, error, "exact svd" if exact_path else "randomized svd"


def svd_module(name: str, parts, policy: dict, seed: int = 0) -> tuple[object, dict]:
    """One module of the ``svd`` merge: ``parts`` = ``[(input index, patch, weight), ...]``."""
    for i, p, _ in parts:
        check_additive(name, i, p, "svd")
    shape = module_shape(name, parts)
    if len(shape) == 1:
        return sum_1d(name, parts)
    dtype = out_dtype(parts)
    bias = bias_sum(parts)
    ups, downs, dense = [], [], None
    for _, p, w in parts:
        if p.has_exact_lora:
            lora = p if p.kind == "lora" else p.to_lora()[0]
            up, down = lora.factors(torch.float64)
            ups.append(up * (lora.scale * w))
            downs.append(down)
        else:
            d = p.delta().double().reshape(shape[0], -1) * w
            dense = d if dense is None else dense + d
    info = {"inputs": [i for i, _, _ in parts], "kinds": [p.kind for _, p, _ in parts]}
    m = shape[0]
    n = math.prod(shape[1:])
    r = sum(u.shape[1] for u in ups)
    if dense is None and r < min(m, n):
        u, s, vh = factors_svd(torch.cat(ups, 1), torch.cat(downs, 0))
        k = _keep(s, policy)
        energy, error = _stats(s, k)
        up, down = balanced(u, s, vh, k)
        how = f"from factors (rank {r})"
    else:
        mat = dense if dense is not None else torch.zeros(m, n, dtype=torch.float64)
        if ups:
            mat = mat + torch.cat(ups, 1) @ torch.cat(downs, 0)
        up, down, k, energy, error, how = reduce_dense(mat, policy, seed)
    patch = lora_from_factors(up, down, shape, dtype, bias)
    info.update(rank=k, energy=energy, error=error, exact=error <= 1e-12, how=how)
    return patch, info


def merge_svd(by_module: dict, policy: dict, seed: int = 0, progress=None) -> tuple[dict, dict]:
    """``by_module``: name -> parts. Returns ``(patches, module infos)``."""
    patches, infos = {}, {}
    for name, parts in by_module.items():
        patches[name], infos[name] = svd_module(name, parts, policy, seed)
        if progress is not None:
            progress.update(1)
    return patches, infos
