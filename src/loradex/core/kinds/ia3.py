"""(IA)^3 (kind ``ia3``): a learned per-channel rescale of the weight.

On-disk suffixes (LyCORIS ``IA3Module``): ``weight`` -- ``(ch,)`` for Linear, ``(1, ch, 1, 1)``
for Conv2d -- and ``on_input`` (0-dim integer: 1 when the scale is on the input channels, LyCORIS
``train_on_input``; on the meta device -- shapes only, as architecture detection builds patches --
the axis is unknown and the scales need only fit one of the two). Checked against LyCORIS' forward:
``W' = W * (1 + m * w)`` along the output axis (``on_input=0``) or the input axis
(``on_input=1``), so ``dW = m * W * w``: it needs the base weight. The bias is not touched (the
forward rebuilds the weight only).

PEFT's IA3 differs: its ``ia3_l`` is the whole factor (initialised to 1, i.e. ``w = ia3_l - 1``)
and on the output side it also scales the bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loradex.core.kinds.base import (
    Patch,
    Shape,
    as_shape,
    compute_dtype,
    fields_from,
    fit_to,
    register_kind,
    require,
    scalar,
)
from loradex.core.tensorspec import is_tensor

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)


@register_kind
@dataclass(eq=False)
class IA3Patch(Patch):
    """``weight`` (one scale per channel) and ``on_input`` (0-dim; nonzero = input channels).
    ``weight_shape`` (not stored in files) is the module weight's shape when known."""

    weight: torch.Tensor
    on_input: torch.Tensor | None = None
    weight_shape: Shape | None = None

    kind = "ia3"
    always_needs_base = True
    MARKERS = ("on_input",)
    SUFFIXES = {"weight": "weight", "on_input": "on_input"}

    def __post_init__(self) -> None:
        if self.on_input is None:
            self.on_input = torch.tensor(0)
        elif not is_tensor(self.on_input):
            self.on_input = torch.tensor(int(bool(self.on_input)))
        self.weight_shape = as_shape(self.weight_shape)
        w = self.weight
        require(
            w.ndim == 1 or all(s == 1 for i, s in enumerate(w.shape) if i != 1),
            f"ia3: weight must be (ch,) or (1, ch, 1, ...), got {tuple(w.shape)}",
        )
        if self.weight_shape is not None:
            self._check(self.weight_shape)

    @property
    def train_on_input(self) -> bool:
        """LyCORIS' ``train_on_input``: True when the scales multiply the input channels.
        Reads the value of ``on_input``, so not on the meta device."""
        return bool(scalar(self.on_input))

    @property
    def axis(self) -> int:
        """The weight axis the scales multiply: 1 (input) or 0 (output)."""
        return 1 if self.train_on_input else 0

    def _check(self, weight_shape: Shape) -> None:
        n = self.weight.numel()
        if self.on_input.is_meta:
            # shapes only (architecture detection): which axis ``on_input`` names is unknown, so
            # the scales must fit one of the two (LyCORIS writes the output axis by default)
            require(
                any(len(weight_shape) > ax and weight_shape[ax] == n for ax in (0, 1)),
                f"ia3: {n} scales fit neither axis of a weight {tuple(weight_shape)}",
            )
            return
        require(
            len(weight_shape) > self.axis and weight_shape[self.axis] == n,
            f"ia3: {n} scales do not fit axis {self.axis} of a weight {tuple(weight_shape)}",
        )

    @property
    def shape(self) -> Shape:
        if self.weight_shape is None:
            raise ValueError("the shape of an (IA)^3 patch is unknown: build it with weight_shape")
        return self.weight_shape

    def delta(self, base_weight: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("an (IA)^3 patch needs the base weight")
        w0 = base_weight if self.weight_shape is None else base_weight.reshape(self.weight_shape)
        self._check(tuple(w0.shape))
        dt = compute_dtype(self.weight, base_weight)
        view = [1] * w0.ndim
        view[self.axis] = -1
        d = w0.to(dt) * (self.weight.to(dt).reshape(view) * multiplier)
        return fit_to(d.float(), base_weight)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], weight_shape: Shape | None = None) -> IA3Patch:
        return cls(**fields_from("ia3", tensors, cls.SUFFIXES, ("weight", "on_input")), weight_shape=weight_shape)

    def scaled(self, factor: float) -> IA3Patch:
        """``factor`` times the update (``dW`` is linear in ``w``)."""
        return IA3Patch(
            weight=(self.weight.double() * factor).to(self.weight.dtype),
            on_input=self.on_input,
            weight_shape=self.weight_shape,
        )
