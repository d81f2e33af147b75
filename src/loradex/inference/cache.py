"""The tiers below the slots: an LRU of *ready* adapters in CPU memory, bounded in bytes, above the
registry / disk.

Ready means everything a swap needs is done: the file is parsed, every patch is converted to a plain
LoRA exactly (LoHa: row-wise Khatri-Rao product; LoKr: Kronecker product of the factors; Tucker
folded), the scale ``alpha / rank`` is folded into ``up``, ``up`` is stored transposed (``[r, out]``,
the slot layout) and everything is cast to the bank's dtype (and pinned on CUDA, so the host to
device copy is asynchronous). A swap is then only ``copy_`` into the slot buffers.

An adapter goes into the slots only when all its patches can: every module is a slot layer, the
kind has an exact LoRA form (no DoRA, no bias, not (IA)^3/OFT/GLoRA/norm...) and the exact rank
fits ``max_rank``. Otherwise it is a *patch-mode* adapter: the engine adds ``m * delta(W)`` to the
weights for the batch and restores them from a pristine copy after (see engine.py). Its patches stay
in CPU memory here; :class:`DevicePatches` keeps copies of them on the engine's device (another LRU),
so that the deltas are computed where the weights are.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from loradex.core.adapter import Adapter, Embedding
from loradex.core.kinds.base import Patch

#: an exact conversion may leave float rounding; anything above this is an approximation
EXACT_TOL = 1e-5


@dataclass
class Ready:
    """An adapter prepared for swapping. ``mode`` is ``"slots"`` (``factors``: canonical name ->
    ``(down [r, in*k*k], up [r, out])``) or ``"patch"`` (``patches`` applied to the weights;
    ``reason`` says why). ``embeddings``: its textual-inversion tokens (either mode)."""

    id: str
    mode: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    patches: dict[str, Patch] = field(default_factory=dict)
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    rank: int = 0
    reason: str = ""
    nbytes: int = 0
    arch: str | None = None

    def describe(self) -> dict:
        """JSON-able summary: id, mode (slots or patch), module count, rank, embeddings, bytes, and why
        it is in patch mode when it is."""
        return {"id": self.id, "mode": self.mode, "modules": len(self.factors) or len(self.patches),
                "rank": self.rank, "embeddings": sorted(self.embeddings), "bytes": self.nbytes,
                **({"reason": self.reason} if self.reason else {})}


def _slot_factors(patch: Patch, fan: tuple[int, int], max_rank: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(down [r, in*k*k], up^T [r, out])`` float32 with the scale in ``up``, or why it cannot be."""
    if getattr(patch, "dora_scale", None) is not None:
        return "DoRA depends on the base weight"
    if patch.needs_base:
        return f"{patch.kind} depends on the base weight"
    if getattr(patch, "bias", None) is not None:
        return "the patch changes the bias"
    try:
        lora, err = patch.to_lora(None)
    except ValueError:
        return f"{patch.kind} has no exact LoRA form"
    if err > EXACT_TOL or lora.bias is not None or lora.dora_scale is not None:
        return f"{patch.kind} has no exact LoRA form"
    if lora.rank > max_rank:
        return f"exact rank {lora.rank} > max_rank {max_rank}"
    up, down = lora.factors(torch.float64)
    if up.shape[0] != fan[1] or down.shape[1] != fan[0]:
        return f"shape {tuple(patch.shape)} does not fit"
    return down.float(), (up * lora.scale).t().float()


def prepare(adapter_id: str, adapter: Adapter, layers: Mapping[str, torch.nn.Module], *, max_rank: int,
            dtype: torch.dtype, pin: bool = False) -> Ready:
    """Convert ``adapter`` into its ready form for the slot ``layers`` (canonical name -> slot layer
    with ``fan_in`` / ``fan_out``)."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reason = ""
    for name, patch in adapter.patches.items():
        layer = layers.get(name)
        if layer is None:
            reason = f"{name} is not a slot module"
            break
        got = _slot_factors(patch, (layer.fan_in, layer.fan_out), max_rank)
        if isinstance(got, str):
            reason = f"{name}: {got}"
            break
        down, up = got
        down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
        if pin:
            down, up = down.pin_memory(), up.pin_memory()
        factors[name] = (down, up)
    emb_bytes = sum(v.numel() * v.element_size() for e in adapter.embeddings.values() for v in e.vectors.values())
    if reason:
        nbytes = adapter.nbytes()
        ranks = [p.rank for p in adapter.patches.values() if p.rank]
        return Ready(adapter_id, "patch", patches=dict(adapter.patches), embeddings=dict(adapter.embeddings),
                     rank=max(ranks, default=0), reason=reason, nbytes=nbytes, arch=adapter.arch)
    nbytes = sum(d.numel() * d.element_size() + u.numel() * u.element_size() for d, u in factors.values())
    rank = max((d.shape[0] for d, _ in factors.values()), default=0)
    return Ready(adapter_id, "slots", factors=factors, embeddings=dict(adapter.embeddings), rank=rank,
                 nbytes=nbytes + emb_bytes, arch=adapter.arch)


class ReadyCache:
    """LRU of :class:`Ready` adapters bounded by ``capacity_bytes`` (an entry larger than the whole
    budget is still returned, just not kept). ``load(id)`` builds a missing entry (the disk /
    registry tier). Thread-safe; ``hits``/``misses``/``evictions`` count lookups."""

    def __init__(self, capacity_bytes: int, load: Callable[[str], Ready]) -> None:
        self.capacity = int(capacity_bytes)
        self._load = load
        self._lru: OrderedDict[str, Ready] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = 0

    def get(self, adapter_id: str) -> Ready:
        """The prepared adapter ``adapter_id`` (moved to the recent end), or KeyError; counts hits and misses."""
        with self._lock:
            r = self._lru.get(adapter_id)
            if r is not None:
                self._lru.move_to_end(adapter_id)
                self.hits += 1
                return r
            self.misses += 1
        r = self._load(adapter_id)  # outside the lock: parsing a file must not block the hits
        with self._lock:
            self._put(r)
        return r

    def _put(self, r: Ready) -> None:
        if r.id in self._lru:
            self._bytes -= self._lru.pop(r.id).nbytes
        if r.nbytes > self.capacity:
            return
        self._lru[r.id] = r
        self._bytes += r.nbytes
        while self._bytes > self.capacity and self._lru:
            _, old = self._lru.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._lru

    def entries(self) -> list[Ready]:
        """The cached adapters, least recently used first (a copy)."""
        with self._lock:
            return list(self._lru.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached adapters' tensors (what the byte budget counts)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)


def patch_to_device(patch: Patch, device: torch.device | str) -> Patch:
    """A copy of ``patch`` whose floating-point tensors of one or more dimensions are on ``device``
    (the factors). Scalars (``alpha``, ``on_input``) and integer tensors (sparse indices and sizes)
    stay where they are: the kinds read them as Python numbers or move them themselves, and a
    number read from a device tensor would synchronise the device. The patch itself when nothing
    moves."""
    device = torch.device(device)
    changes = {}
    for f in dataclasses.fields(patch):
        v = getattr(patch, f.name)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim > 0 and v.device != device:
            changes[f.name] = v.to(device, non_blocking=True)
    return dataclasses.replace(patch, **changes) if changes else patch


class DevicePatches:
    """The patches of patch-mode adapters on the engine's device, LRU bounded in bytes: moved there
    once (the first batch that uses an adapter), not per batch. On the CPU the ready patches are
    used as they are (nothing is copied or cached). An adapter larger than the whole budget is
    moved for its batch and not kept. Thread-safe."""

    def __init__(self, device: torch.device | str, capacity_bytes: int) -> None:
        self.device = torch.device(device)
        self.capacity = int(capacity_bytes)
        self._lru: OrderedDict[str, tuple[int, dict[str, Patch]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, ready: Ready) -> dict[str, Patch]:
        """``ready.patches`` with their factors on the device."""
        if self.device.type == "cpu":
            return ready.patches
        with self._lock:
            hit = self._lru.get(ready.id)
            if hit is not None:
                self._lru.move_to_end(ready.id)
                return hit[1]
        moved = {name: patch_to_device(p, self.device) for name, p in ready.patches.items()}
        size = sum(p.nbytes() for p in moved.values())
        with self._lock:
            if size <= self.capacity and ready.id not in self._lru:
                self._lru[ready.id] = (size, moved)
                self._bytes += size
                while self._bytes > self.capacity:
                    _, (old, _) = self._lru.popitem(last=False)
                    self._bytes -= old
        return moved

    @property
    def nbytes(self) -> int:
        """Bytes of the patches held on the device."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
