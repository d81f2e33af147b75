"""The LoRA slot layer: every target Linear / Conv2d of a pipeline is wrapped ONCE with fixed-capacity
LoRA buffers, and adapters are swapped by copying tensors into those buffers in place.

A wrapped module keeps its own ``weight`` / ``bias`` Parameters (the same objects, so the
pipeline's state dict and module names do not change) and gains two non-persistent buffers::

    down [S, R, in * kh * kw]      up [S, R, out]         (S slots, R = max_rank)

holding, for each slot, a plain LoRA ``dW = up_s^T @ down_s`` with the adapter's scale
(``alpha / rank``, LoHa/LoKr converted exactly to LoRA) folded into ``up``, and rows beyond the
adapter's rank left at zero. The forward pass is::

    y = base(x) + sum_k coef[b, k] * up[idx[b, k]]^T (down[idx[b, k]] x)

where ``idx [B, K]`` (a per-sample slot index) and ``coef [B, K]`` (the per-sample adapter weight)
come from a :class:`Routing` shared by every wrapped layer. Each sample gathers its own factors
(``down[idx]``: a gathered / batched matmul), so one forward pass serves a batch whose samples use
different adapters, and ``K > 1`` stacks several adapters on a sample with their own weights. When
every sample uses the same slots (the common case) the gather is skipped and the factors are shared
(two plain matmuls). Rows beyond ``routing.rank`` (the largest active rank, rounded up) are not
computed.

Swapping never creates a module: ``load_slot`` ``copy_``s the new factors into the buffers (one
``torch._foreach_copy_`` over all modules) and zeroes only the rows the previous occupant used
beyond the new one's rank, so compiled graphs (``torch.compile``) stay valid: the buffers are the
same tensors with the same shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn


class Routing:
    """Which slots each sample of the current batch uses, and with what weight.

    ``idx`` ``[B, K]`` (long) and ``coef`` ``[B, K]`` (bank dtype) live on the device. ``B`` is the
    number of requests; a layer that sees ``n * B`` rows (classifier-free guidance runs the
    unconditional and the conditional halves in one UNet call) repeats them ``n`` times.
    ``uniform``: every sample uses the same slot indices (the gather can be skipped). ``active``:
    at least one adapter is routed (else the layers add nothing). ``rank``: columns computed.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype, max_rank: int) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rank = max_rank
        self.idx = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.coef = torch.zeros(1, 1, dtype=dtype, device=self.device)
        self.uniform = True
        self.active = False
        self.rank = max_rank
        #: round the active rank up to a multiple of this (fewer distinct shapes); under
        #: torch.compile the engine fixes ``rank`` to ``max_rank`` instead (no new shapes at all).
        self.rank_step = 8
        self.fixed_rank = False
        self._lengths: list[int] = []
        self._ranks: list[int] = []

    def set(self, rows: list[list[tuple[int, float]]], rank: int, ranks: list[int] | None = None) -> None:
        """Route sample ``b`` through ``rows[b]`` = [(slot, weight), ...]; rows are padded to the
        longest with weight 0. Tensors of an unchanged shape are overwritten in place. ``ranks``:
        each row's own largest rank (for :meth:`only`; default ``rank`` for every row)."""
        k = max((len(r) for r in rows), default=0)
        self._lengths = [len(r) for r in rows]
        self._ranks = [self._round(x) for x in (ranks if ranks is not None else [rank] * len(rows))]
        if k == 0:
            self.active = False
            return
        idx = [[s for s, _ in r] + [r[0][0] if r else 0] * (k - len(r)) for r in rows]
        coef = [[float(w) for _, w in r] + [0.0] * (k - len(r)) for r in rows]
        idx_t = torch.tensor(idx, dtype=torch.long)
        coef_t = torch.tensor(coef, dtype=self.dtype)
        # in place when the shape is unchanged (compiled graphs keep their inputs), unless the tensors
        # were made under torch.inference_mode and this call is outside it (they cannot be written then)
        stale = self.idx.is_inference() and not torch.is_inference_mode_enabled()
        if tuple(self.idx.shape) == tuple(idx_t.shape) and not stale:
            self.idx.copy_(idx_t, non_blocking=True)
            self.coef.copy_(coef_t, non_blocking=True)
        else:
            self.idx = idx_t.to(self.device)
            self.coef = coef_t.to(self.device)
        self.uniform = all(r == idx[0] for r in idx)
        self.active = True
        self.rank = self._round(rank)

    def _round(self, rank: int) -> int:
        if self.fixed_rank:
            return self.max_rank
        step = self.rank_step
        return min(self.max_rank, max(step, -(-max(rank, 1) // step) * step))

    @contextlib.contextmanager
    def only(self, row: int) -> Iterator[None]:
        """Route as if sample ``row`` (modulo the routed samples, as :meth:`rows_for` repeats them)
        were alone: its own slots without the batch's zero-weight padding, its own rank. A forward
        pass over that one sample then runs exactly the operations it runs in a batch of one (the
        engine's exact batches), not a wider product with zero columns, whose summation order can
        differ in the last bit."""
        if not self.active:
            yield
            return
        saved = (self.idx, self.coef, self.uniform, self.rank, self.active)
        b = row % self.idx.shape[0]
        k = self._lengths[b] if b < len(self._lengths) else self.idx.shape[1]
        try:
            self.idx, self.coef = self.idx[b:b + 1, :k], self.coef[b:b + 1, :k]
            self.uniform, self.active = True, k > 0
            self.rank = self._ranks[b] if b < len(self._ranks) else self.rank
            yield
        finally:
            self.idx, self.coef, self.uniform, self.rank, self.active = saved

    def clear(self) -> None:
        """No adapter rows for the next forward: every slot layer adds nothing."""
        self.active = False

    def rows_for(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx, coef)`` for a layer input with ``n`` rows (repeated for CFG-doubled batches)."""
        idx, coef = self.idx, self.coef
        b = idx.shape[0]
        if n == b:
            return idx, coef
        if n % b == 0:
            return idx.repeat(n // b, 1), coef.repeat(n // b, 1)
        raise RuntimeError(f"a slot layer got a batch of {n} rows for {b} routed samples")


class _SlotMixin:
    """The LoRA buffers and their bookkeeping, shared by the Linear and Conv2d wrappers."""

    routing: Routing
    down: torch.Tensor
    up: torch.Tensor

    def _init_slots(self, routing: Routing, slots: int, max_rank: int, fan_in: int, fan_out: int) -> None:
        w = self.weight  # type: ignore[attr-defined]
        dtype = routing.dtype
        self.routing = routing
        self.fan_in, self.fan_out = fan_in, fan_out
        self.register_buffer("down", torch.zeros(slots, max_rank, fan_in, dtype=dtype, device=w.device), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("up", torch.zeros(slots, max_rank, fan_out, dtype=dtype, device=w.device), persistent=False)  # type: ignore[attr-defined]

    def _factors(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """``(down, up, coef, shared)``: per-sample gathered ``[n, K*R, in]`` / ``[n, K*R, out]``
        factors, or the shared ``[K*R, ...]`` ones when the batch is uniform; ``coef`` is
        ``[n, K*R]`` (each sample's weight repeated over its adapter's R rows)."""
        r = self.routing
        rank = r.rank
        idx, coef = r.rows_for(n)
        k = idx.shape[1]
        coef_r = coef.to(self.down.dtype).repeat_interleave(rank, dim=1)
        down = self.down[:, :rank]
        up = self.up[:, :rank]
        if r.uniform:
            sel = idx[0]
            return down[sel].reshape(k * rank, -1), up[sel].reshape(k * rank, -1), coef_r, True
        return down[idx].reshape(n, k * rank, -1), up[idx].reshape(n, k * rank, -1), coef_r, False


def _adopt(cls: type, base: nn.Module) -> nn.Module:
    """A ``cls`` instance that *is* ``base``: same Parameters, buffers, children and hooks (so module
    names, the state dict and anything holding the Parameters are unaffected)."""
    m = cls.__new__(cls)
    m.__dict__.update(base.__dict__)
    m._parameters = dict(base._parameters)
    m._buffers = dict(base._buffers)
    m._modules = dict(base._modules)
    m._non_persistent_buffers_set = set(base._non_persistent_buffers_set)
    return m


class SlotLinear(nn.Linear, _SlotMixin):
    """``nn.Linear`` + S LoRA slots (see the module docstring)."""

    @classmethod
    def wrap(cls, base: nn.Linear, routing: Routing, slots: int, max_rank: int) -> SlotLinear:
        """Turn ``base`` in place into a slot layer with ``slots`` LoRA slots of rank <= ``max_rank``."""
        m = _adopt(cls, base)
        m._init_slots(routing, slots, max_rank, base.in_features, base.out_features)
        return m  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.routing.active:
            return y
        n = x.shape[0]
        down, up, coef, shared = self._factors(n)
        xd = x.to(down.dtype)
        if shared:
            h = F.linear(xd, down)  # [..., K*R]
            h = h * coef.reshape(n, *([1] * (h.ndim - 2)), coef.shape[1])
            return y + (h @ up).to(y.dtype)
        xf = xd.reshape(n, -1, self.in_features)
        h = torch.bmm(xf, down.transpose(1, 2)) * coef[:, None, :]
        return y + torch.bmm(h, up).reshape(y.shape).to(y.dtype)


class SlotConv2d(nn.Conv2d, _SlotMixin):
    """``nn.Conv2d`` (groups 1, zero padding) + S LoRA slots: ``down`` is a conv with the base's
    kernel, stride, padding and dilation (LoCon), ``up`` a 1x1 conv."""

    @classmethod
    def wrap(cls, base: nn.Conv2d, routing: Routing, slots: int, max_rank: int) -> SlotConv2d:
        """Turn ``base`` in place into a slot layer (kernel flattened: ``in*kh*kw`` columns)."""
        m = _adopt(cls, base)
        kh, kw = base.kernel_size
        m._init_slots(routing, slots, max_rank, base.in_channels * kh * kw, base.out_channels)
        return m  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        if not self.routing.active:
            return y
        n = x.shape[0]
        down, up, coef, shared = self._factors(n)
        kr = coef.shape[1]
        kh, kw = self.kernel_size
        xd = x.to(down.dtype)
        if shared:
            h = F.conv2d(xd, down.reshape(kr, self.in_channels, kh, kw), None, self.stride, self.padding, self.dilation)
            h = h * coef[:, :, None, None]
            return y + F.conv2d(h, up.t().reshape(self.out_channels, kr, 1, 1)).to(y.dtype)
        # per-sample kernels: a grouped conv with one group per sample
        h = F.conv2d(
            xd.reshape(1, n * self.in_channels, *x.shape[2:]),
            down.reshape(n * kr, self.in_channels, kh, kw),
            None, self.stride, self.padding, self.dilation, groups=n,
        ).reshape(n, kr, *y.shape[2:])
        h = h * coef[:, :, None, None]
        return y + torch.bmm(up.transpose(1, 2), h.flatten(2)).reshape(y.shape).to(y.dtype)


def wrappable(mod: nn.Module) -> bool:
    """Linear, and Conv2d with groups 1 and zero padding (what LoRA/LoCon adapt)."""
    if type(mod) is nn.Linear:
        return True
    return type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"


def live_modules(component: str, model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(canonical name, module path, module)`` for every submodule of a component, spelled the way
    ``loradex.core.archs.module_table`` spells canonical names (CLIP always with ``text_model.``)."""
    from loradex.core.archs.tables import needs_text_model_level

    add_text_model = needs_text_model_level(model)
    for path, mod in model.named_modules():
        if not path:
            continue
        canon = f"{component}.{'text_model.' + path if add_text_model else path}"
        yield canon, path, mod


class SlotBank:
    """All slot layers of a pipeline, and which adapter each slot holds.

    ``components``: component name -> model (``unet``/``transformer``/``text_encoder*``). Every
    :func:`wrappable` module is wrapped (or only those whose canonical name contains one of
    ``targets``). ``occupant[s]`` is the id of the adapter in slot ``s`` (None when empty) and
    ``ranks[s]`` its rank per module (to zero exactly the rows it used when it is replaced).
    """

    def __init__(self, components: Mapping[str, nn.Module], *, slots: int, max_rank: int, device, dtype,
                 targets: tuple[str, ...] | None = None) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError("slots and max_rank must be >= 1")
        self.slots, self.max_rank = slots, max_rank
        self.routing = Routing(device, dtype, max_rank)
        self.layers: dict[str, SlotLinear | SlotConv2d] = {}
        for comp, model in components.items():
            for canon, path, mod in list(live_modules(comp, model)):
                if not wrappable(mod) or (targets and not any(t in canon for t in targets)):
                    continue
                cls = SlotLinear if isinstance(mod, nn.Linear) else SlotConv2d
                new = cls.wrap(mod, self.routing, slots, max_rank)  # type: ignore[arg-type]
                parent_path, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, child, new)
                self.layers[canon] = new
        self.occupant: list[str | None] = [None] * slots
        self.ranks: list[dict[str, int]] = [{} for _ in range(slots)]

    def nbytes(self) -> int:
        """Bytes of every slot's factors (allocated once, at the largest rank)."""
        return sum(m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size()
                   for m in self.layers.values())

    @torch.no_grad()
    def load_slot(self, slot: int, adapter_id: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy ``factors`` (canonical name -> ``(down [r, in*k*k], up [r, out])``, scale folded,
        bank dtype) into ``slot`` in place; rows the previous occupant used beyond the new ranks
        are zeroed. No module is created, no buffer reallocated."""
        old = self.ranks[slot]
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        zero: list[torch.Tensor] = []
        new_ranks: dict[str, int] = {}
        for name, (down, up) in factors.items():
            layer = self.layers[name]
            r = down.shape[0]
            dst += [layer.down[slot, :r], layer.up[slot, :r]]
            src += [down, up]
            new_ranks[name] = r
            prev = old.get(name, 0)
            if prev > r:
                zero += [layer.down[slot, r:prev], layer.up[slot, r:prev]]
        for name, prev in old.items():
            if name not in new_ranks:
                layer = self.layers[name]
                zero += [layer.down[slot, :prev], layer.up[slot, :prev]]
        if zero:
            torch._foreach_zero_(zero)
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=True)
        self.ranks[slot] = new_ranks
        self.occupant[slot] = adapter_id

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero what the slot's occupant wrote and mark it empty."""
        self.load_slot(slot, "", {})
        self.occupant[slot] = None

    def is_clean(self) -> bool:
        """True when every buffer is zero (all adapters removed)."""
        return all(not m.down.any() and not m.up.any() for m in self.layers.values())
