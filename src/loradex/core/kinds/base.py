"""The contract every patch kind implements.

A *patch* is what an adapter stores for one module of the base model (a Linear, a Conv2d, a norm).
Each kind is a dataclass of its tensors, kept exactly as the files store them (LyCORIS/kohya
suffixes such as ``lora_down.weight`` or ``hada_w1_a``), so that a read followed by a write is
bit-identical. The math lives here and nowhere else:

* ``delta(base_weight, multiplier)`` is the exact dense change of the module's weight,
  ``W' - W``, computed in float32 and shaped like the weight (``(out, in)`` for Linear,
  ``(out, in, kh, kw)`` for Conv2d, ``(C,)`` for norms). Kinds whose update depends on ``W``
  ((IA)^3, GLoRA, OFT, BOFT, and any kind carrying DoRA's ``dora_scale``) set ``needs_base`` and
  raise ``ValueError`` when it is missing.
* ``to_lora(rank)`` returns an equivalent plain LoRA and its relative Frobenius error
  ``||dW - dW_lora|| / ||dW||``: exact (error 0) where the algebra allows it, a truncated SVD at
  ``rank`` otherwise.
* ``tensors()`` / ``from_tensors()`` map to and from the on-disk suffix dictionary.

Multipliers: for additive kinds ``delta(m) = m * delta(1)``. For DoRA/OFT/BOFT/(IA)^3 the
multiplier enters non-linearly, exactly as the reference implementation (lycoris-lora) applies it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

Shape = tuple[int, ...]


@dataclass
class Patch(ABC):
    """Base class of all patch kinds. Subclasses are dataclasses with tensor fields."""

    kind: ClassVar[str] = "?"
    #: True when ``delta`` needs the base module's weight.
    needs_base: ClassVar[bool] = False
    #: Suffixes (after ``<module>.``) whose presence identifies this kind in a file.
    detect_suffixes: ClassVar[tuple[str, ...]] = ()

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

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk tensors, keyed by suffix (``lora_up.weight``, ``alpha``, ``hada_w1_a``...)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> Patch:
        """Build from the suffix dictionary. ``weight_shape`` (from the architecture table) is needed
        where the file does not determine it (e.g. LoHa conv factors are stored flattened)."""

    def to_lora(self, rank: int | None = None, base_weight: torch.Tensor | None = None):
        """Return ``(LoraPatch, relative_error)``. Default: truncated SVD of ``delta`` at ``rank``."""
        from loradex.core.kinds.lora import LoraPatch

        if rank is None:
            raise ValueError(f"a {self.kind} patch has no exact LoRA form: a rank is needed")
        return LoraPatch.from_dense(self.delta(base_weight), rank)

    # ---- conveniences shared by all kinds -------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
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
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def scalar(t: torch.Tensor | float | None) -> float | None:
    """A 0-dim (or 1-element) tensor or number as a Python float; None stays None."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().reshape(-1)[0])
    return float(t)


def alpha_scale(alpha: torch.Tensor | float | None, rank: int) -> float:
    """kohya/LyCORIS scale ``alpha / rank``; alpha missing or 0 means alpha = rank (scale 1)."""
    a = scalar(alpha)
    if a is None or a == 0 or math.isnan(a):
        return 1.0
    return a / rank


def relative_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """``||exact - approx||_F / ||exact||_F`` in float64 (0 when both are 0)."""
    e = exact.double()
    n = torch.linalg.vector_norm(e)
    d = torch.linalg.vector_norm(e - approx.double())
    if n == 0:
        return 0.0 if d == 0 else math.inf
    return float(d / n)
