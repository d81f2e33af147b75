"""Sketches, exact inner products and spectra of adapter updates, computed from the factors.

Pure math (no file I/O): the registry stores what :func:`sketch_adapter` returns
(``loradex.registry.sketches``), ``loradex similar`` compares sketches, ``loradex conflicts`` and
``inspect --quality`` use the exact functions.

**The matrix of a module.** Each module's full-strength update (multiplier 1, alpha folded) is the
``(out, n + 1)`` matrix ``M = [dW | db]``: the weight update flattened to ``(out, in*kh*kw)``
(``(C, 1)`` for a norm layer) and the bias update as one more column (zero when the patch leaves
the bias alone). Cosines, norms and inner products in this module are those of ``M``; the spectrum
(:func:`singular_values`) is that of ``dW`` alone. :class:`UpdateForm` holds ``dW`` exactly, in
the cheapest of three forms:

* ``factors``: ``dW = scale * up @ down``, ``up`` ``(out, k)``, ``down`` ``(k, n)`` -- LoRA/LoCon
  (``LoraPatch.factors``: Tucker ``mid`` folded, sparse residual included; ``scale`` = gamma, kept
  apart so the factors are used as the file holds them) and LoHa through its exact LoRA form
  (row-wise Khatri-Rao, ``k = r1*r2``);
* ``kron``: ``dW = kron(w1, w2)`` -- LoKr with its two halves made dense (each is at most
  ``1/(a*c)`` of the layer), never the Kronecker product itself;
* ``dense``: the matrix itself -- full diffs, norm layers, and LoHa when ``r1*r2 >= min(out, n)``
  (then the Khatri-Rao factors are larger than the layer and the dense product is the cheaper
  exact route).

**Base-dependent kinds** (decided here, reported by name everywhere): (IA)^3, Diag-OFT and BOFT
change the weight by ``W * w`` / ``(R - I) W``: without the base weight there is nothing to
sketch, so those modules are *skipped* with the reason. GLoRA's ``gamma * (W a1 a2 + b1 b2)`` has a
base-free part, ``gamma * b1 b2`` (its ``delta`` at ``W = 0``), and DoRA's ``W' = (W + dW) s / ||W
+ dW||`` has one, ``dW``, the low-rank update before the magnitude rescale: those modules are
sketched through that part and listed as *partial*. Given the base weight (``base_weights``), every
kind gets its exact dense update ``Patch.delta(W)`` instead.

**The sketch** of a module is ``S = H^T M G`` with fixed random projections ``H`` ``(out, q)`` and
``G`` ``(n + 1, p)`` (``q = 8``, ``p = 4``): Rademacher entries ``+-1/sqrt(q)`` / ``+-1/sqrt(p)`` drawn
from a counter-based hash (splitmix64) of (family, module shape, seed, side), so the same module
of the same family gets the same projections in every file, format and process, on every machine
and every version of numpy/torch (a side of at most ``q`` resp. ``p`` entries is kept as is: the
identity, zero-padded). ``E[<H^T A G, H^T B G>] = <A, B>`` (``E[H H^T] = I``, ``E[G G^T] = I``),
and ``S`` is computed from the factors: ``(H^T up) (down G)`` costs ``O(k (q out + p n))``; LoKr's
``kron(w1, w2) G`` is ``w1 X w2^T`` per column (``X`` the column reshaped ``(c, d)``); a dense
update costs one pass. The stored record per module is its exact norm ``||M||_F`` (from the small
Gram matrices: ``||up @ down||_F^2 = sum((up^T up) * (down down^T))``, ``||kron(w1, w2)|| =
||w1|| ||w2||``) and the *unit* sketch ``S / ||S||``. Two-sided, because a one-sided ``dW G``
keeps ``out x p`` numbers a module (~10 KB for an SDXL layer, ~10 MB an adapter): ``H^T M G``
keeps ``q p = 32`` whatever the layer's size, and its noise shrinks with the number of modules.

**The estimator.** ``cos(A, B) = sum_m <A_m, B_m> / (||A|| ||B||)`` over the modules both have
(a module one adapter lacks contributes 0; ``||A||^2 = sum_m ||A_m||^2`` over all of A's modules).
Each ``<A_m, B_m>`` is estimated as ``||A_m|| ||B_m|| <S_Am/||S_Am||, S_Bm/||S_Bm||>``: exact norms
times the sketches' cosine. That ratio estimator, rather than the raw JL product ``<S_Am, S_Bm>``,
is what makes copies score ~1: its error shrinks like ``(1 - c^2)`` as the true cosine ``c`` goes to
+-1 (an fp16 copy or a re-saved file scores > 0.999), while for unrelated updates it is centred on
0 with a standard deviation of about ``1 / sqrt(q p M_eff)`` (``M_eff``: the number of modules
that carry the energy; ~0.02 for a tiny 80-module LoRA, less for real ones with hundreds).

**The signature** (for scanning thousands of adapters): one ``SIGNATURE_DIM``-vector per adapter,
``v = sum_m (||A_m|| / ||A||) E_m(S_m / ||S_m||)`` normalised, where ``E_m`` hashes each sketch
entry of module ``m`` (keyed by its name and shape) to a signed bucket (feature hashing). ``<v_A,
v_B>`` estimates the same cosine with extra cross-module noise of ~``1/sqrt(SIGNATURE_DIM)``; it
only picks the candidates that the per-module estimator then ranks.

**Exact inner products** (:func:`inner`): ``<up_a down_a, up_b down_b> = sum((up_a^T up_b) *
(down_a down_b^T))``, ``<X, up down> = sum(up * (X down^T))``, ``<kron(a1, a2), kron(b1, b2)> =
<a1, b1> <a2, b2>`` when the halves have the same shapes; otherwise both sides are made dense (only
for full diffs and mismatched LoKr halves). No dense ``dW`` is formed for LoRA, LoHa or matching
LoKr pairs.

**Spectra** (:func:`singular_values`): QR of the factors + SVD of the small core
(``linalg.factors_svd``); ``sigma(kron(w1, w2)) = sigma(w1) x sigma(w2)`` (all products);
``svdvals`` of a dense update.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from loradex.core.kinds.base import Patch

log = logging.getLogger(__name__)

#: Output-side (``q``) and input-side (``p``) sketch sizes: ``q * p`` numbers per module.
SKETCH_ROWS = 8
SKETCH_COLS = 4
#: Length of the per-adapter signature used to pick candidates.
SIGNATURE_DIM = 256
#: The default seed of the projections (stored with every sketch through ``ALGO``).
SKETCH_SEED = 0
#: Everything a stored sketch depends on: a sketch made under another ``ALGO`` is recomputed.
ALGO = f"rad2-v1-q{SKETCH_ROWS}p{SKETCH_COLS}-d{SIGNATURE_DIM}-s{SKETCH_SEED}"

_MASK = (1 << 64) - 1


# ---- deterministic randomness ----------------------------------------------------------------------
def _u64(*parts) -> int:
    """A 64-bit integer from the sha256 of ``parts`` joined by ``|`` (stable everywhere)."""
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _rademacher(seed64: int, rows: int, cols: int) -> np.ndarray:
    """``(rows, cols)`` of +-1 from the top bit of splitmix64(seed + i)."""
    with np.errstate(over="ignore"):
        idx = np.arange(rows * cols, dtype=np.uint64) + np.uint64(seed64)
    bits = _splitmix(idx) >> np.uint64(63)
    return (1.0 - 2.0 * bits.astype(np.float32)).reshape(rows, cols)


def _side(seed64: int, dim: int, size: int) -> np.ndarray:
    """The projection of one side: ``(dim, size)``, the zero-padded identity when ``dim <= size``
    (exact), else Rademacher / sqrt(size) (``E[P P^T] = I``)."""
    if dim <= size:
        return np.eye(dim, size, dtype=np.float32)
    return _rademacher(seed64, dim, size) / np.float32(math.sqrt(size))


@functools.lru_cache(maxsize=1024)
def projections(family: str | None, out: int, cols: int, seed: int = SKETCH_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, G)`` for a module of ``family`` whose weight update is ``(out, cols)``: ``H`` ``(out,
    SKETCH_ROWS)``, ``G`` ``(cols + 1, SKETCH_COLS)`` (the last row multiplies the bias column).
    They depend only on (family, shape, seed): every adapter of a family shares them."""
    h = _side(_u64("H", family, out, cols, seed), out, SKETCH_ROWS)
    g = _side(_u64("G", family, out, cols, seed), cols + 1, SKETCH_COLS)
    return torch.from_numpy(h), torch.from_numpy(g)


def module_key(name: str, out: int, cols: int) -> int:
    """A signed 64-bit identity of a module: its canonical name and update shape (a module of the
    same name but another shape -- another size of the family -- never matches)."""
    return int.from_bytes(hashlib.sha256(f"{name}|{out}x{cols}".encode()).digest()[:8], "little", signed=True)


# ---- one module's update, exactly ---------------------------------------------------------------------
@dataclass(eq=False)
class UpdateForm:
    """One module's full-strength update ``dW`` ``(out, cols)`` plus its bias change, exactly, in
    one of three forms (see the module docstring): ``scale * up @ down``, ``kron(w1, w2)`` or
    ``dense``. float32 tensors (the factors as the patch holds them: the scale is kept apart, not
    multiplied into a copy); ``partial`` says what part of the update it is when not the whole
    (DoRA, GLoRA without the base weight)."""

    out: int
    cols: int
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    partial: str | None = None
    scale: float = 1.0
    _sq: float | None = field(default=None, repr=False)

    @property
    def form(self) -> str:
        """``"factors"`` (``scale * up @ down``), ``"kron"`` (``kron(w1, w2)``) or ``"dense"``."""
        return "factors" if self.up is not None else "kron" if self.w1 is not None else "dense"

    @property
    def k(self) -> int | None:
        """The inner dimension of the factor form (None for the other forms)."""
        return int(self.up.shape[1]) if self.up is not None else None

    def weight(self) -> torch.Tensor:
        """``dW`` as a dense ``(out, cols)`` matrix (only where a caller really needs it)."""
        if self.up is not None:
            return (self.up @ self.down) * self.scale
        if self.w1 is not None:
            return torch.kron(self.w1, self.w2)
        return self.dense

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``dW @ x`` for ``x`` ``(cols, p)``, without forming ``dW``."""
        if self.up is not None:
            return (self.up @ (self.down @ x)) * self.scale
        if self.w1 is not None:
            return kron_matmul(self.w1, self.w2, x)
        return self.dense @ x

    def weight_sq_norm(self) -> float:
        """``||dW||_F^2`` (from the Gram matrices of the factors, or ``||w1||^2 ||w2||^2``)."""
        if self.up is not None:
            k = self.k
            if k * (self.out + self.cols) <= self.out * self.cols:
                gu = self.up.T @ self.up
                gd = self.down @ self.down.T
                return max(float((gu.double() * gd.double()).sum()), 0.0) * self.scale**2
            return float(self.weight().double().square().sum())
        if self.w1 is not None:
            return float(self.w1.double().square().sum()) * float(self.w2.double().square().sum())
        return float(self.dense.double().square().sum())

    def sq_norm(self) -> float:
        """``||[dW | db]||_F^2`` (cached)."""
        if self._sq is None:
            b = 0.0 if self.bias is None else float(self.bias.double().square().sum())
            self._sq = self.weight_sq_norm() + b
        return self._sq

    def norm(self) -> float:
        """``||[dW | db]||_F``, the module's norm in cosines and sketches (:meth:`sq_norm`)."""
        return math.sqrt(self.sq_norm())


def kron_matmul(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``kron(w1, w2) @ x`` without the Kronecker product: ``w1`` ``(a, c)``, ``w2`` ``(b, d)``,
    ``x`` ``(c*d, p)``; row ``i*b + k`` of the result is ``sum_{j,l} w1[i,j] w2[k,l] x[j*d + l]``,
    i.e. ``w1 X w2^T`` for each column reshaped ``(c, d)``. Cost ``O(p (b d c + a c b))``."""
    a, c = w1.shape
    b, d = w2.shape
    xs = x.reshape(c, d, -1)
    t = torch.einsum("kl,jlp->jkp", w2, xs)  # (c, b, p)
    return torch.einsum("ij,jkp->ikp", w1, t).reshape(a * b, -1)


def all_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite. A NaN or Inf entry makes the sum NaN or Inf, so a finite
    sum (one cheap pass, no boolean mask) proves it; only a non-finite sum (which may also be a
    float32 overflow of finite entries) is checked entry by entry."""
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _finite(patch: Patch) -> bool:
    for t in patch.tensors().values():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            if not all_finite(t):
                return False
    return True


def _shape2d(shape) -> tuple[int, int]:
    out = int(shape[0])
    cols = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    return out, cols


def _bias(patch: Patch) -> torch.Tensor | None:
    try:
        b = patch.bias_delta()
    except (ValueError, TypeError):
        return None
    return None if b is None else b.float().reshape(-1)


DORA_PART = "DoRA: the low-rank update before the magnitude rescale (the rest needs the base weight)"
GLORA_PART = "GLoRA: the base-free term gamma * b1 b2 (gamma * W a1 a2 needs the base weight)"


NONFINITE = "non-finite values (NaN or Inf) in its tensors"


def update_form(patch: Patch, base_weight: torch.Tensor | None = None,
                check_finite: bool = True) -> tuple[UpdateForm | None, str | None]:
    """``(form, None)`` for a patch, or ``(None, reason)`` when it cannot be formed (non-finite
    values; a base-dependent kind without ``base_weight``). See the module docstring for the rules."""
    if check_finite and not _finite(patch):
        return None, NONFINITE
    shape = tuple(patch.shape)
    out, cols = _shape2d(shape)
    kind = patch.kind
    dora = getattr(patch, "dora_scale", None) is not None
    if base_weight is not None and patch.needs_base:
        d = patch.delta(base_weight).float().reshape(out, cols)
        return UpdateForm(out, cols, dense=d, bias=_bias(patch)), None
    partial = DORA_PART if dora else None
    if kind == "lora" and hasattr(patch, "factors"):
        up, down = patch.factors(torch.float32)
        return UpdateForm(out, cols, up=up.contiguous(), down=down.contiguous(), bias=_bias(patch), partial=partial,
                          scale=float(patch.scale)), None
    if kind == "loha" and hasattr(patch, "halves"):
        from loradex.core.kinds.loha import hadamard_lora_factors

        (a1, b1), (a2, b2) = patch.halves(torch.float32)
        scale = float(patch.scale)
        k = a1.shape[1] * a2.shape[1]
        if k >= min(out, cols):
            d = (a1 @ b1) * (a2 @ b2) * scale
            return UpdateForm(out, cols, dense=d.reshape(out, cols), partial=partial), None
        up, down = hadamard_lora_factors([(a1, b1), (a2, b2)])
        return UpdateForm(out, cols, up=up.contiguous(), down=down.contiguous(), partial=partial, scale=scale), None
    if kind == "lokr" and hasattr(patch, "halves"):
        (a1, b1), (a2, b2) = patch.halves(torch.float32)
        w1 = (a1 @ b1) * float(patch.scale)
        w2 = a2 @ b2
        if w1.shape[0] * w2.shape[0] != out or w1.shape[1] * w2.shape[1] != cols:
            d = torch.kron(w1, w2).reshape(out, cols)
            return UpdateForm(out, cols, dense=d, partial=partial), None
        return UpdateForm(out, cols, w1=w1.contiguous(), w2=w2.contiguous(), partial=partial), None
    if kind == "glora" and base_weight is None:
        zero = torch.zeros(shape, dtype=torch.float32)
        d = patch.delta(zero).float().reshape(out, cols)
        return UpdateForm(out, cols, dense=d, partial=GLORA_PART), None
    if patch.needs_base:
        return None, (f"{kind}: its update depends on the base weight and has no base-free part "
                      "(give the base model to include it)")
    # full, norm, and any other additive kind: its dense update
    try:
        d = patch.delta().float().reshape(out, cols)
    except ValueError as e:
        return None, f"{kind}: {e}"
    return UpdateForm(out, cols, dense=d, bias=_bias(patch)), None


def adapter_forms(
    adapter, base_weights: Callable[[str], torch.Tensor | None] | None = None, norms: bool = False
) -> tuple[dict[str, UpdateForm], dict[str, str]]:
    """``(forms, skipped)``: the :class:`UpdateForm` of every patch of ``adapter`` (a
    ``loradex.Adapter``), and module -> why for those without one. ``base_weights(name)`` (or
    None) gives a module's base weight: base-dependent kinds then get their exact update.
    ``norms``: compute every form's norm now (for callers that need them) and let it be the
    finiteness check (a NaN or Inf factor makes it non-finite; confirmed entry by entry) instead
    of one pass over each tensor."""
    forms: dict[str, UpdateForm] = {}
    skipped: dict[str, str] = {}
    for name, p in adapter.patches.items():
        w = None
        if base_weights is not None and p.needs_base:
            w = base_weights(name)
        try:
            f, why = update_form(p, w, check_finite=not norms)
            if f is not None and norms and not math.isfinite(f.sq_norm()) and not _finite(p):
                f, why = None, NONFINITE
        except (ValueError, RuntimeError) as e:  # a base weight of the wrong shape, say
            f, why = None, f"{p.kind}: {e}"
        if f is None:
            skipped[name] = why
        else:
            forms[name] = f
    return forms, skipped


# ---- exact inner products and spectra ---------------------------------------------------------------
def inner(a: UpdateForm, b: UpdateForm) -> float:
    """``<[dW_a | db_a], [dW_b | db_b]>_F`` exactly, from the factors (see the module docstring)."""
    if (a.out, a.cols) != (b.out, b.cols):
        raise ValueError(f"updates of shapes {(a.out, a.cols)} and {(b.out, b.cols)} do not compare")
    val = _inner_weight(a, b)
    if a.bias is not None and b.bias is not None:
        val += float(torch.dot(a.bias.double(), b.bias.double()))
    return val


def _inner_weight(a: UpdateForm, b: UpdateForm) -> float:
    if a.w1 is not None and b.w1 is not None and a.w1.shape == b.w1.shape and a.w2.shape == b.w2.shape:
        return float((a.w1.double() * b.w1.double()).sum()) * float((a.w2.double() * b.w2.double()).sum())
    if a.up is not None or b.up is not None:
        if a.up is None or (b.up is not None and b.k > a.k):
            a, b = b, a  # a: the factor form with the smaller k
        lr, other = a, b
        if other.up is not None:
            gu = lr.up.T @ other.up  # (k_a, k_b)
            gd = lr.down @ other.down.T  # (k_a, k_b)
            return float((gu.double() * gd.double()).sum()) * lr.scale * other.scale
        t = other.matmul(lr.down.T.contiguous())  # (out, k): X @ down^T
        return float((lr.up.double() * t.double()).sum()) * lr.scale
    return float((a.weight().double() * b.weight().double()).sum())


def singular_values(f: UpdateForm) -> torch.Tensor:
    """The singular values of ``dW`` (float64, descending), from the factors where there are any."""
    from loradex.core.linalg import factors_svd

    if f.up is not None:
        if f.k <= min(f.out, f.cols):
            return factors_svd(f.up.double(), f.down.double())[1] * abs(f.scale)
        return torch.linalg.svdvals(f.weight().double())
    if f.w1 is not None:
        s1 = torch.linalg.svdvals(f.w1.double())
        s2 = torch.linalg.svdvals(f.w2.double())
        return torch.sort(torch.outer(s1, s2).reshape(-1), descending=True).values
    d = f.dense
    return torch.linalg.svdvals(d.double() if d.numel() <= (1 << 22) else d.float()).double()


# ---- sketches ------------------------------------------------------------------------------------------
@dataclass
class Sketch:
    """An adapter's sketch: per module (sorted by :func:`module_key`) the exact norm ``||M_m||`` and
    the unit sketch ``S_m / ||S_m||`` (``SKETCH_ROWS * SKETCH_COLS`` numbers; zeros for a zero
    update), plus the modules skipped or sketched in part, by name and why."""

    family: str | None
    keys: np.ndarray  # int64 (M,), sorted
    norms: np.ndarray  # float64 (M,)
    units: np.ndarray  # float32 (M, q*p)
    skipped: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    names: list[str] | None = None  # in the keys' order; not stored
    algo: str = ALGO

    @property
    def modules(self) -> int:
        """The number of modules sketched (skipped ones not counted; partial ones counted)."""
        return int(self.keys.shape[0])

    @property
    def total_norm(self) -> float:
        """``||A|| = sqrt(sum_m ||M_m||^2)`` over every sketched module."""
        return float(math.sqrt(float(np.square(self.norms).sum()))) if self.modules else 0.0

    def signature(self) -> np.ndarray:
        """The unit ``SIGNATURE_DIM`` vector (zeros for an empty or all-zero adapter)."""
        return signature(self.keys, self.norms, self.units)


def signature(keys: np.ndarray, norms: np.ndarray, units: np.ndarray) -> np.ndarray:
    """``sum_m (||A_m|| / ||A||) E_m(u_m)``, normalised (see the module docstring)."""
    out = np.zeros(SIGNATURE_DIM, dtype=np.float64)
    total = float(np.sqrt(np.square(norms).sum())) if len(norms) else 0.0
    if total == 0.0:
        return out.astype(np.float32)
    buckets, signs = _buckets(np.ascontiguousarray(keys, dtype=np.int64).tobytes(), units.shape[1])
    vals = signs * (norms / total)[:, None] * units.astype(np.float64)
    out = np.bincount(buckets.ravel(), weights=vals.ravel(), minlength=SIGNATURE_DIM)
    n = float(np.linalg.norm(out))
    return (out / n if n > 0 else out).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _buckets(keys: bytes, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature-hashing buckets and signs ``(M, t)`` of the entries of each module's sketch, from
    the module keys (cached: adapters of one structure share them)."""
    k = np.frombuffer(keys, dtype=np.int64)
    with np.errstate(over="ignore"):
        base = k.view(np.uint64)[:, None] ^ (
            (np.arange(1, t + 1, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93))[None, :])
    h = _splitmix(base)
    buckets = (h % np.uint64(SIGNATURE_DIM)).astype(np.int64)
    signs = 1.0 - 2.0 * (h >> np.uint64(63)).astype(np.float64)
    return buckets, signs


def sketch_forms(forms: Mapping[str, UpdateForm], family: str | None, seed: int = SKETCH_SEED,
                 skipped: Mapping[str, str] | None = None) -> Sketch:
    """The :class:`Sketch` of modules given as :class:`UpdateForm`; factor forms of one shape and
    rank, and dense forms of one shape, are sketched together (batched matrix products). Factors
    may be float16 here (they are converted group by group, the way a planned file is read)."""
    q, p = SKETCH_ROWS, SKETCH_COLS
    names = list(forms)
    sk = np.zeros((len(names), q * p), dtype=np.float32)
    norms = np.zeros(len(names), dtype=np.float64)
    groups: dict[tuple, list[int]] = {}
    for i, n in enumerate(names):
        f = forms[n]
        if f.up is not None:
            key = ("f", f.out, f.cols, f.k, f.bias is not None)
        elif f.dense is not None:
            key = ("d", f.out, f.cols, f.bias is not None)
        else:
            key = ("k", i)
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        fs = [forms[names[i]] for i in idx]
        f0 = fs[0]
        h, g = projections(family, f0.out, f0.cols, seed)
        gw, gb = g[: f0.cols], g[f0.cols]
        known = all(f._sq is not None for f in fs)
        if key[0] == "f":
            b_, k, out, n = len(fs), f0.k, f0.out, f0.cols
            up = torch.stack([f.up for f in fs]).float()  # (B, out, k)
            down = torch.stack([f.down for f in fs]).float()  # (B, k, n)
            sc = torch.tensor([f.scale for f in fs], dtype=torch.float64)
            dg = (down.reshape(b_ * k, n) @ gw).reshape(b_, k, -1)  # down G, one product
            s = (torch.matmul(h.T, up) @ dg) * sc[:, None, None].float()  # (B, q, p)
            if known:
                sq = torch.tensor([f.weight_sq_norm() if f.bias is not None else f._sq for f in fs],
                                  dtype=torch.float64)
            elif k * (out + n) <= out * n:
                gu = up.transpose(1, 2) @ up
                gd = down @ down.transpose(1, 2)
                sq = (gu.double() * gd.double()).sum(dim=(1, 2)).clamp_min(0.0) * sc * sc
            else:
                sq = (up @ down).double().square().sum(dim=(1, 2)) * sc * sc
        elif key[0] == "d":
            x = torch.stack([f.dense for f in fs])  # (B, out, n)
            s = torch.matmul(h.T, x @ gw)
            sq = x.double().square().sum(dim=(1, 2))
        else:
            s = (h.T @ f0.matmul(gw))[None]
            sq = torch.tensor([f0.weight_sq_norm()], dtype=torch.float64)
        if key[-1] is True or (key[0] == "k" and f0.bias is not None):
            b = torch.stack([f.bias for f in fs])  # (B, out)
            s = s + (b @ h)[:, :, None] * gb[None, None, :]
            sq = sq + b.double().square().sum(dim=1)
        flat = s.reshape(len(fs), -1).double()
        ns = flat.norm(dim=1, keepdim=True)
        unit = torch.where(ns > 0, flat / ns.clamp_min(1e-300), torch.zeros_like(flat))
        for j, i in enumerate(idx):
            forms[names[i]]._sq = float(sq[j])
        sk[idx] = unit.float().numpy()
        norms[idx] = sq.sqrt().numpy()
    return _assemble(family, names, [(forms[n].out, forms[n].cols) for n in names], norms, sk,
                     dict(skipped or {}), {n: f.partial for n, f in forms.items() if f.partial})


def _assemble(family, names, shapes, norms, units, skipped, partial) -> Sketch:
    keys = np.array([module_key(n, o, c) for n, (o, c) in zip(names, shapes)], dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    if len(set(keys.tolist())) != len(keys):  # two names hashing alike: astronomically unlikely
        raise ValueError("module keys collide")
    return Sketch(family, keys[order], norms[order], units[order], skipped, partial,
                  [names[i] for i in order])


def sketch_adapter(adapter, family: str | None = None, seed: int = SKETCH_SEED,
                   base_weights: Callable[[str], torch.Tensor | None] | None = None) -> Sketch:
    """The :class:`Sketch` of a ``loradex.Adapter``. ``family``: the projections' family (default:
    the adapter's arch's family; ``None`` when the arch is unknown -- such sketches compare only
    with each other)."""
    if family is None:
        family = family_of(adapter.arch)
    forms, skipped = adapter_forms(adapter, base_weights)
    return sketch_forms(forms, family, seed, skipped)


def family_of(arch) -> str | None:
    """The family name of an arch (name or Arch), or None when it is unknown."""
    if arch is None:
        return None
    fam = getattr(getattr(arch, "family", None), "name", None)
    if fam is not None:
        return fam
    try:
        from loradex.core.archs import get_arch

        return get_arch(arch).family.name
    except Exception:  # an arch this process cannot resolve: its name stands for its family
        log.debug("arch %r not resolvable; its sketches use the name as the family", arch)
        return str(arch)


# ---- estimators --------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """A cosine estimate: ``cosine``, ``modules`` compared (both non-zero), ``shared`` (both have)."""

    cosine: float
    modules: int
    shared: int


def estimate_cosine(a: Sketch, b: Sketch) -> Estimate:
    """``sum_m ||A_m|| ||B_m|| <u_Am, u_Bm> / (||A|| ||B||)`` over the modules both sketched."""
    ta, tb = a.total_norm, b.total_norm
    common, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=True, return_indices=True)
    if len(common) == 0 or ta == 0.0 or tb == 0.0:
        return Estimate(0.0, 0, int(len(common)))
    na, nb = a.norms[ia], b.norms[ib]
    c = np.einsum("ij,ij->i", a.units[ia].astype(np.float64), b.units[ib].astype(np.float64))
    live = (na > 0) & (nb > 0)
    val = float((na * nb * c).sum()) / (ta * tb)
    return Estimate(max(-1.0, min(1.0, val)), int(live.sum()), int(len(common)))


def estimate_group(q: Sketch, keys: np.ndarray, norms: np.ndarray, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`estimate_cosine` of ``q`` against ``K`` sketches that share their module ``keys``
    (sorted): ``norms`` ``(K, M)``, ``units`` ``(K, M, t)``. Returns ``(cosines (K,), modules compared
    (K,))``: one intersection for the group, one batched product."""
    k = norms.shape[0]
    tq = q.total_norm
    tb = np.sqrt(np.square(norms).sum(axis=1))
    if np.array_equal(q.keys, keys):
        iq, ib = slice(None), slice(None)
    else:
        _, iq, ib = np.intersect1d(q.keys, keys, assume_unique=True, return_indices=True)
    nq = q.norms[iq]
    if tq == 0.0 or len(nq) == 0:
        return np.zeros(k), np.zeros(k, dtype=np.int64)
    c = np.einsum("kmt,mt->km", units[:, ib, :], q.units[iq].astype(np.float32), optimize=True).astype(np.float64)
    nb = norms[:, ib]
    with np.errstate(divide="ignore", invalid="ignore"):
        val = np.where(tb > 0, (nb * nq[None, :] * c).sum(axis=1) / (tq * tb), 0.0)
    live = ((nb > 0) & (nq[None, :] > 0)).sum(axis=1)
    return np.clip(val, -1.0, 1.0), live


@dataclass
class Exact:
    """An exact cosine from the factors: ``cosine``, ``inner``, the two norms, modules compared."""

    cosine: float
    inner: float
    norm_a: float
    norm_b: float
    modules: int


def exact_cosine(fa: Mapping[str, UpdateForm], fb: Mapping[str, UpdateForm]) -> Exact:
    """``sum_m <A_m, B_m> / (||A|| ||B||)`` exactly, over the modules both have (each adapter's norm
    over all of its own modules)."""
    na = math.sqrt(sum(f.sq_norm() for f in fa.values()))
    nb = math.sqrt(sum(f.sq_norm() for f in fb.values()))
    val, n = 0.0, 0
    for name, f in fa.items():
        g = fb.get(name)
        if g is None or (g.out, g.cols) != (f.out, f.cols):
            continue
        val += inner(f, g)
        n += 1
    cos = val / (na * nb) if na > 0 and nb > 0 else 0.0
    return Exact(max(-1.0, min(1.0, cos)), val, na, nb, n)
