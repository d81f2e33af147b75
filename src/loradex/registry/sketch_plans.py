"""Planned structures: sketch a stored file straight from its bytes.

The first file of a given structure (format, arch, every tensor's name, dtype and shape) is read
through the format's reader; its patches are matched tensor by tensor to the file's tensors and the
match (a *plan*) is kept in memory, so later files of the same structure -- a folder of LoRAs made
by one trainer -- are sketched from their bytes without the reader. Plain LoRA tensors only; a
structure whose reading changes values (fused rows, folded scales) is never planned. Split from
``registry.sketches``, which calls :func:`planned_sketch` and :func:`learn_plan`.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loradex.core import sketch as sk
from loradex.errors import LoradexError


def arch_of(reg, v):
    """The arch the registry recorded for version ``v`` (None when unknown or not rebuildable)."""
    if not getattr(v, "arch", None):
        return None
    try:
        return reg.arch(v.arch)
    except LoradexError:
        return None


# ---- planned structures: sketch straight from the bytes ---------------------------------------------
_PLANS: OrderedDict[str, dict | None] = OrderedDict()
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 64
_STRUCTURAL = ("kohya", "lycoris", "diffusers", "comfy")


@dataclass
class _Raw:
    """A stored safetensors blob read in one go: header entries and the data section. Blobs are
    immutable and were validated by the reader when they were imported, so the header is parsed
    plainly (the registry's own parse is cached by the *source* path, not the blob's)."""

    tensors: dict[str, dict]
    metadata: dict[str, str]
    data: bytearray

    def tensor(self, key: str) -> torch.Tensor:
        from loradex.converters.safetensors_io import DTYPES

        info = self.tensors[key]
        dt, size = DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        t = torch.frombuffer(self.data, dtype=dt, count=(end - start) // size, offset=start) if end > start \
            else torch.empty(0, dtype=dt)
        return t.reshape(info["shape"])


def _read_raw(path: Path) -> _Raw | None:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            hdr = json.loads(f.read(n))
            data = bytearray(path.stat().st_size - 8 - n)
            f.readinto(data)
    except (OSError, ValueError):
        return None
    if not isinstance(hdr, dict):
        return None
    meta = hdr.pop("__metadata__", None) or {}
    return _Raw(hdr, meta, data)


def _structure_key(reg, v, raw: _Raw | None = None) -> tuple[str, _Raw] | None:
    """The registry's memo key of a file's structure (format, arch, every tensor's name, dtype and
    shape, the bytes of its one-element tensors, diffusers' ``lora_adapter_metadata``) and the
    file read, or None for folders, pickles and formats whose reading depends on more."""
    if v.layout != "file" or v.format not in _STRUCTURAL:
        return None
    raw = raw or _read_raw(reg.path(v))
    if raw is None:
        return None
    m = hashlib.sha256(f"{v.format}|{v.arch}|".encode())
    for k in sorted(raw.tensors):
        info = raw.tensors[k]
        shape = tuple(info.get("shape", ()))
        m.update(f"{k}|{info.get('dtype')}|{shape};".encode())
        if math.prod(shape) <= 1:
            a, b = info["data_offsets"]
            m.update(bytes(raw.data[a:b]))
    m.update(str(raw.metadata.get("lora_adapter_metadata", "")).encode())
    return m.hexdigest(), raw


def learn_plan(reg, v, adapter) -> None:
    """Match the reader's patches to the file's tensors and remember the structure's plan when
    every module is a plain LoRA whose ``up`` and ``down`` are file tensors as they are (up to a
    reshape) and whose scale is the structure's (alphas are part of the key). Anything else --
    another kind, a Tucker core, DoRA, a tensor the reader transformed (fused rows split, scales
    folded), two equal tensors -- leaves the structure unplanned: it always goes through the
    reader."""
    key = _structure_key(reg, v)
    if key is None:
        return
    digest, raw = key
    with _PLANS_LOCK:
        if digest in _PLANS:
            return
    plan = _make_plan(raw, adapter)
    with _PLANS_LOCK:
        _PLANS[digest] = plan
        while len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)


def _fingerprint(t: torch.Tensor) -> tuple:
    b = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return (t.numel(), str(t.dtype), hashlib.blake2b(b, digest_size=16).digest())


def _make_plan(raw: _Raw, adapter) -> dict | None:
    index: dict[tuple, list[str]] = {}
    for k, info in raw.tensors.items():
        if math.prod(info.get("shape", ())) > 1:
            index.setdefault(_fingerprint(raw.tensor(k)), []).append(k)
    lora = []
    for name, p in adapter.patches.items():
        plain = (p.kind == "lora" and getattr(p, "mid", None) is None and getattr(p, "dora_scale", None) is None
                 and getattr(p, "residual_values", None) is None and getattr(p, "bias", None) is None)
        if not plain:
            return None
        up_keys = index.get(_fingerprint(p.up), [])
        down_keys = index.get(_fingerprint(p.down), [])
        if len(up_keys) != 1 or len(down_keys) != 1:
            return None
        out, cols = int(p.shape[0]), int(math.prod(p.shape[1:]))
        lora.append((name, up_keys[0], down_keys[0], int(p.rank), float(p.scale), out, cols))
    return {"lora": lora, "family": sk.family_of(adapter.arch)}


def planned_sketch(reg, v) -> sk.Sketch | None:
    """The sketch of a version whose structure is planned, straight from its bytes; None when it is
    not planned or a value is not finite (the reader path then records why)."""
    key = _structure_key(reg, v)
    if key is None:
        return None
    digest, raw = key
    with _PLANS_LOCK:
        plan = _PLANS.get(digest)
    if not plan:
        return None
    forms = {}
    for name, up_k, down_k, r, scale, out, cols in plan["lora"]:
        up = raw.tensor(up_k).reshape(out, r)  # as stored (fp16 too): sketch_forms converts by group
        down = raw.tensor(down_k).reshape(r, cols)
        forms[name] = sk.UpdateForm(out, cols, up=up, down=down, scale=scale)
    fam = sk.family_of(arch_of(reg, v)) or plan["family"]
    s = sk.sketch_forms(forms, fam)
    if not (np.isfinite(s.norms).all() and np.isfinite(s.units).all()):
        return None
    return s
