"""The contract every patch kind implements.

A *patch* is what an adapter stores for one module of the base model (a Linear, a Conv2d, a norm).
Each kind is a dataclass of its tensors, kept exactly as the files store them (LyCORIS/kohya
suffixes such as ``lora_down.weight`` or ``hada_w1_a``), so that a read followed by a write is
bit-identical. The math lives here and nowhere else:

* ``delta(base_weight, multiplier)`` is the exact dense change of the module's weight,
  ``W' - W``, returned as float32 and shaped like the weight (``(out, in)`` for Linear,
  ``(out, in, kh, kw)`` for Conv2d, ``(C,)`` for norms). Kinds whose update depends on ``W``
  ((IA)^3, GLoRA, OFT, BOFT, and any LoRA/LoHa/LoKr carrying DoRA's ``dora_scale``) report
  ``needs_base`` (a per-instance property) and raise ``ValueError`` when it is missing.
* ``to_lora(rank)`` returns an equivalent plain LoRA and its relative Frobenius error
  ``||dW - dW_lora|| / ||dW||``: exact (error 0) where the algebra allows it, a truncated SVD at
  ``rank`` otherwise (``ValueError`` when there is no exact form and no rank was given).
* ``tensors()`` / ``from_tensors()`` map to and from the on-disk suffix dictionary.

Multipliers: for additive kinds ``delta(m) = m * delta(1)``. For DoRA/OFT/BOFT/(IA)^3 the
multiplier enters non-linearly, exactly as the reference implementation (lycoris-lora) applies it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, ClassVar

from loradex.core.tensorspec import TensorSpec, is_tensor
from loradex.errors import FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

Shape = tuple[int, ...]


@dataclass(eq=False)
class Patch(ABC):
    """Base class of all patch kinds. Subclasses are dataclasses with tensor fields.

    ``eq=False``: patches compare and hash by identity (comparing tensor fields with ``==`` is
    ambiguous); compare ``tensors()`` or ``delta()`` instead.
    """

    kind: ClassVar[str] = "?"
    #: True when every patch of the kind needs the base module's weight ((IA)^3, GLoRA, OFT, BOFT).
    always_needs_base: ClassVar[bool] = False
    #: Suffixes (after ``<module>.``) whose presence identifies this kind in a file. Suffixes several
    #: kinds share (``alpha``, ``dora_scale``, ``rescale``) identify nothing and are left out.
    MARKERS: ClassVar[tuple[str, ...]] = ()
    #: True when ``to_lora()`` (no rank, no base weight) is exact for every patch of the kind that
    #: carries no DoRA (LoRA, LoHa, LoKr): merges, resizes and the writers of LoRA-only formats use
    #: that form. See :attr:`has_exact_lora` for the per-patch answer.
    exact_lora: ClassVar[bool] = False
    #: True when the kind may carry DoRA's ``dora_scale`` (see ``dora.py``).
    dora: ClassVar[bool] = False
    #: Which factor holds the module's inputs (``"in"``: its trailing axes are ``in`` or
    #: ``in*kh*kw``) or outputs (``"out"``: first axis ``out``; ``"out*"``: first or second), or is a
    #: dense update shaped like the weight (``"full"``), by suffix: architecture detection reads a
    #: module's size from these shapes alone.
    FACTOR_ROLES: ClassVar[dict[str, str]] = {}
    #: Other tools' names of this kind's tensors (diffusers/PEFT spellings) -> the kind's suffix;
    #: only the tensors whose shape :attr:`FACTOR_ROLES` judges need to be listed.
    SPELLINGS: ClassVar[dict[str, str]] = {}

    @classmethod
    def claims(cls, tensors) -> str | None:
        """The kind name when a module's suffix dictionary (values may be meta tensors or shapes)
        is of this kind -- any of :attr:`MARKERS` present -- else None. Kinds that share markers
        (OFT/BOFT) override it to tell themselves apart."""
        return cls.kind if any(m in tensors for m in cls.MARKERS) else None

    @property
    def needs_base(self) -> bool:
        """True when ``delta`` of *this* patch needs the base module's weight: always for the
        kinds that set ``always_needs_base``, and for LoRA/LoHa/LoKr when DoRA's ``dora_scale``
        is present."""
        return self.always_needs_base or getattr(self, "dora_scale", None) is not None

    @property
    @abstractmethod
    def shape(self) -> Shape:
        """Shape of the base module's weight this patch applies to."""

    @property
    def rank(self) -> int | None:
        """Rank of the factorisation (None for kinds without one)."""
        return None

    @abstractmethod
    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        """Exact dense ``W' - W`` (float32, shaped like the weight)."""

    def bias_delta(self, base_bias: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor | None:
        """Change of the module's bias, or None when the patch leaves the bias alone."""
        return None

    #: On-disk suffix -> dataclass field, in the order the tensors are listed.
    SUFFIXES: ClassVar[dict[str, str]] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk tensors, keyed by suffix (``lora_up.weight``, ``alpha``, ``hada_w1_a``...):
        every field of ``SUFFIXES`` that is set."""
        return {k: v for k, f in self.SUFFIXES.items() if (v := getattr(self, f)) is not None}

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> Patch:
        """Build from the suffix dictionary. ``weight_shape`` (from the architecture table) is needed
        where the file does not determine it (e.g. LoHa conv factors are stored flattened)."""

    @property
    def has_exact_lora(self) -> bool:
        """True when ``to_lora()`` of *this* patch is exact: its kind has an exact LoRA form
        (:attr:`exact_lora`) and it carries no DoRA (whose update depends on the base weight)."""
        return type(self).exact_lora and getattr(self, "dora_scale", None) is None

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        """Return ``(LoraPatch, relative_error)``. Default: truncated SVD of ``delta`` at ``rank``."""
        if rank is None:
            raise ValueError(f"a {self.kind} patch has no exact LoRA form: a rank is needed")
        return KINDS["lora"].from_dense(self.delta(base_weight), rank)

    def scaled(self, factor: float) -> Patch:
        """A patch whose ``delta`` is ``factor`` times this one's (additive kinds only)."""
        raise ValueError(f"a {self.kind} patch cannot be scaled linearly")

    # ---- conveniences shared by all kinds -------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype: that of the first floating-point, non-scalar tensor in ``SUFFIXES``
        order (so a float32 ``alpha`` next to fp16 factors does not decide); float32 when there is
        none. ``delta`` computes in float32/float64 whatever this is."""
        for t in self.tensors().values():
            if t.is_floating_point() and t.ndim > 0:
                return t.dtype
        return torch.float32

    def to(self, dtype: torch.dtype) -> Patch:
        """Copy with every floating-point tensor field cast to ``dtype`` (alpha scalars included)."""
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                changes[f.name] = v.to(dtype)
        return replace(self, **changes)

    def nbytes(self) -> int:
        """Bytes of the on-disk tensors (:meth:`tensors`), scalars included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


#: kind name -> class, in registration order. Filled by :func:`register_kind` as each kind's module
#: (``core/kinds/<kind>.py``) is imported; every table of kinds elsewhere (suffixes, markers, exact
#: LoRA kinds, shape roles) is derived from it by ``loradex.core.kinds``.
KINDS: dict[str, type[Patch]] = {}
_generation = [0]


def register_kind(cls: type[Patch]) -> type[Patch]:
    """Class decorator: make ``cls`` a patch kind that readers detect (:meth:`Patch.claims`),
    writers emit and merges use. A new kind is one file with this decorator plus its module name
    in ``loradex.core.kinds.BUILTIN`` (or, outside loradex, an import of the file). Registering a
    name again replaces the class (a reloaded module); the derived tables follow."""
    if not cls.kind or cls.kind == "?":
        raise ValueError(f"{cls.__name__}: a patch kind needs a name (class attribute 'kind')")
    if not cls.SUFFIXES or not set(cls.MARKERS) <= set(cls.SUFFIXES):
        raise ValueError(f"{cls.__name__}: MARKERS must be a non-empty subset of SUFFIXES")
    KINDS[cls.kind] = cls
    _generation[0] += 1
    return cls


def unregister_kind(name: str) -> None:
    """Remove a kind (tests that register a toy kind clean up with this)."""
    if KINDS.pop(name, None) is not None:
        _generation[0] += 1


def kinds_generation() -> int:
    """A counter that changes whenever a kind is registered or removed (derived-table caches key on it)."""
    return _generation[0]


class DensePatch(Patch):
    """A kind that stores its update densely, shaped like the weight, with an optional bias change
    (``full``: ``diff``/``diff_b``; ``norm``: ``w_norm``/``b_norm``). Subclasses name the two fields
    (:attr:`WEIGHT`, :attr:`BIAS`); the update is linear in the multiplier."""

    #: dataclass field holding the weight update, and the one holding the bias update (or None)
    WEIGHT: ClassVar[str] = ""
    BIAS: ClassVar[str] = ""

    @property
    def shape(self) -> Shape:
        return tuple(getattr(self, self.WEIGHT).shape)

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        w = getattr(self, self.WEIGHT)
        return fit_to((w.to(compute_dtype(w)) * multiplier).float(), base_weight)

    def bias_delta(self, base_bias: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor | None:
        b = getattr(self, self.BIAS)
        if b is None:
            return None
        return (b.to(compute_dtype(b)) * multiplier).float()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> DensePatch:
        suffix = next(s for s, f in cls.SUFFIXES.items() if f == cls.WEIGHT)
        patch = cls(**fields_from(cls.kind, tensors, cls.SUFFIXES, (suffix,)))
        check_fits(cls.kind, patch.shape, weight_shape)
        return patch


def scalar(t: torch.Tensor | float | None) -> float | None:
    """A 0-dim (or 1-element) tensor or number as a Python float; None stays None."""
    if t is None:
        return None
    if isinstance(t, TensorSpec):  # a file being described: its stored number, rounded as .float() does
        return t.float32_value()
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().reshape(-1)[0])
    return float(t)


def alpha_scale(alpha: torch.Tensor | float | None, rank: int) -> float:
    """kohya/LyCORIS scale ``alpha / rank``; alpha missing or 0 means alpha = rank (scale 1)."""
    a = scalar(alpha)
    if a is None or a == 0 or math.isnan(a):
        return 1.0
    return a / rank


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64, else float32: the dtype the math runs in."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def as_shape(shape) -> Shape | None:
    """A weight shape as a tuple of ints (None stays None)."""
    return None if shape is None else tuple(int(s) for s in shape)


def fit_to(delta: torch.Tensor, base_weight: torch.Tensor | None) -> torch.Tensor:
    """Reshape ``delta`` to the base weight's shape when both hold the same numbers in the same
    order (a 2-D LoRA on a 1x1 conv, flattened LoHa/LoKr conv factors without ``weight_shape``)."""
    if base_weight is None or tuple(delta.shape) == tuple(base_weight.shape):
        return delta
    if delta.numel() != base_weight.numel() or delta.shape[0] != base_weight.shape[0]:
        raise ValueError(
            f"patch of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(base_weight.shape)}"
        )
    return delta.reshape(base_weight.shape)


def check_fits(kind: str, shape: Shape, weight_shape: Shape | None) -> None:
    """FormatError unless a patch of ``shape`` fits a module weight of ``weight_shape`` (same
    output rows and same number of entries per row, e.g. ``(out, in*k*k)`` vs ``(out, in, k, k)``)."""
    if weight_shape is None:
        return
    if (
        len(weight_shape) == 0
        or shape[0] != weight_shape[0]
        or math.prod(shape) != math.prod(weight_shape)
    ):
        raise FormatError(f"{kind} patch of shape {tuple(shape)} does not fit a weight of shape {tuple(weight_shape)}")


def require(cond: bool, message: str) -> None:
    """Raise FormatError(message) unless ``cond``: the shape checks of ``from_tensors``."""
    if not cond:
        raise FormatError(message)


#: Suffixes that hold integers (``on_input`` is 0/1, the sparse residual's indices and size are
#: int16 in LyCORIS files): architecture detection builds its meta tensors of these with an
#: integer dtype, so the kinds' dtype checks hold on shapes alone.
INTEGER_SUFFIXES = frozenset({"on_input", "bias_indices", "bias_size"})


def fields_from(
    kind: str,
    tensors: dict[str, torch.Tensor],
    suffixes: dict[str, str],
    required: tuple[str, ...],
    own_checks: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Map an on-disk suffix dictionary to dataclass field values, rejecting (FormatError) unknown
    suffixes, missing required ones, non-tensors, empty tensors and non-float factors (``alpha``
    and ``on_input`` may be integer scalars). Suffixes in ``own_checks`` are only required to be
    tensors: the kind checks them itself (the sparse residual may be empty and is integer)."""
    unknown = sorted(set(tensors) - set(suffixes))
    require(not unknown, f"{kind} patch: unexpected tensors {unknown}")
    missing = [k for k in required if k not in tensors]
    require(not missing, f"{kind} patch: missing tensors {missing}")
    out = {}
    for key, t in tensors.items():
        require(is_tensor(t), f"{kind} patch: {key} is not a tensor")
        if key in own_checks:
            pass
        elif key in ("alpha", "on_input"):
            require(t.numel() == 1, f"{kind} patch: {key} must hold one number, has shape {tuple(t.shape)}")
        else:
            require(t.numel() > 0 and t.ndim > 0, f"{kind} patch: {key} is empty (shape {tuple(t.shape)})")
            require(t.is_floating_point(), f"{kind} patch: {key} has non-float dtype {t.dtype}")
        out[suffixes[key]] = t
    return out


def as_alpha(alpha: torch.Tensor | float | None) -> torch.Tensor | None:
    """An alpha given as a number becomes a 0-dim float32 tensor (None stays None)."""
    if alpha is None or is_tensor(alpha):
        return alpha
    return torch.tensor(float(alpha), dtype=torch.float32)


def relative_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """``||exact - approx||_F / ||exact||_F`` in float64 (0 when both are 0)."""
    e = exact.double()
    n = torch.linalg.vector_norm(e)
    d = torch.linalg.vector_norm(e - approx.double())
    if n == 0:
        return 0.0 if d == 0 else math.inf
    return float(d / n)
