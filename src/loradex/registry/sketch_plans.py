"""Planned structures: sketch a stored file straight from its bytes.

The first file of a given structure (format, arch, every tensor's name, dtype and shape) is read
through the format's reader; its patches are matched tensor by tensor to the file's tensors and the
match (a *plan*) is kept in memory, so later files of the same structure -- a folder of LoRAs made
by one trainer -- are sketched from their bytes without the reader. Plain LoRA tensors only; a
structure whose reading changes values (fused rows, folded scales) is never planned. Split from
``registry.sketches``, which calls :func:`planned_sketch` and :func:`learn_plan`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
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


# ---- torch on one thread --------------------------------------------------------------------------------
_THREADS_LOCK = threading.Lock()
_THREADS = {"users": 0, "saved": 1}


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op pool held to one thread for the block (nested and concurrent blocks share
    it; the first in saves the setting, the last out restores it). A sketch is many small products:
    on a shared or busy machine a pool of several threads waits on its busiest one at every
    product -- measured 8-30x slower than one thread for a folder of small LoRAs, never faster."""
    with _THREADS_LOCK:
        if _THREADS["users"] == 0:
            _THREADS["saved"] = torch.get_num_threads()
            if _THREADS["saved"] != 1:
                torch.set_num_threads(1)
        _THREADS["users"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS["users"] -= 1
            if _THREADS["users"] == 0 and _THREADS["saved"] != 1:
                torch.set_num_threads(_THREADS["saved"])


# ---- planned structures: sketch straight from the bytes ---------------------------------------------
_PLANS: OrderedDict[str, dict | None] = OrderedDict()
_SEEN: OrderedDict[str, None] = OrderedDict()  # structures met once (planned when met again)
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 64
_STRUCTURAL = ("kohya", "lycoris", "diffusers", "comfy")


@dataclass
class _Raw:
    """A stored safetensors file's tensors (``safetensors_io.TensorInfo`` by key: dtype, shape,
    start, end) and its bytes: ``data`` holds the data section from offset ``base`` (the whole
    file's bytes, or the data section alone with ``base`` 0; None until they are read). Blobs are immutable and were validated by the reader when they were
    imported, so the header is parsed plainly (the registry's own parse is cached by the *source*
    path, not the blob's)."""

    tensors: dict
    metadata: dict[str, str]
    data: object = None  # a writable buffer: bytearray, or a private (copy-on-write) memory map
    base: int = 0
    path: Path | None = None
    data_offset: int = 0
    digest: str | None = None  # safetensors_io.structure_digest, when known

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a view of ``data`` (read first when it is not in memory yet)."""
        from loradex.converters.safetensors_io import DTYPES

        if self.data is None:
            self.load()
        info = self.tensors[key]
        dt, size = DTYPES[info.dtype]
        start, end = info.start, info.end
        t = torch.frombuffer(self.data, dtype=dt, count=(end - start) // size, offset=self.base + start) \
            if end > start else torch.empty(0, dtype=dt)
        return t.reshape(info.shape)

    def load(self) -> None:
        """Read the data section into memory (OSError when it cannot be read in full)."""
        with open(self.path, "rb") as f:
            f.seek(self.data_offset)
            data = bytearray(os.fstat(f.fileno()).st_size - self.data_offset)
            if f.readinto(data) != len(data):
                raise OSError(f"{self.path}: shorter than its header says")
        self.data, self.base = data, 0


def raw_from_header(header, data) -> _Raw:
    """A ``_Raw`` of a safetensors file already parsed (a ``safetensors_io.Header``) whose bytes
    (the whole file) are in the writable buffer ``data``: nothing is read again."""
    return _Raw(header.tensors, header.metadata, data, header.data_offset, header.path, header.data_offset)


def _read_raw(path: Path) -> _Raw | None:
    """A stored file's header (parsed plainly); its data section is read on first use."""
    from loradex.converters.safetensors_io import TensorInfo

    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            hdr = json.loads(f.read(n))
        if not isinstance(hdr, dict):
            return None
        meta = hdr.pop("__metadata__", None) or {}
        tensors = {k: TensorInfo(d["dtype"], tuple(d["shape"]), *d["data_offsets"]) for k, d in hdr.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return _Raw(tensors, meta, None, 0, Path(path), 8 + n)


def _structure_key(reg, v, raw: _Raw | None = None) -> tuple[str, _Raw] | None:
    """The key of a file's structure for plans: format, arch, ``safetensors_io.structure_digest``
    (every tensor's name, dtype and shape, the bytes of its one-element tensors -- what the
    registry's description memo keys by, and the import hands over as ``raw.digest``) and
    diffusers' ``lora_adapter_metadata``; with the file's ``_Raw`` (its data not read unless it
    was given). None for folders, pickles and formats whose reading depends on more."""
    if v.layout != "file" or v.format not in _STRUCTURAL:
        return None
    raw = raw or _read_raw(reg.path(v))
    if raw is None:
        return None
    if raw.digest is None:
        from loradex.converters import safetensors_io as sio

        try:
            header = sio.Header(raw.path, raw.data_offset - 8, dict(raw.metadata), raw.tensors)
            raw.digest = sio.structure_digest(raw.path, header)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
    m = hashlib.sha256(f"{v.format}|{v.arch}|{raw.digest}|".encode())
    m.update(str(raw.metadata.get("lora_adapter_metadata", "")).encode())
    return m.hexdigest(), raw


def learn_plan(reg, v, adapter, raw: _Raw | None = None) -> None:
    """Match the reader's patches to the file's tensors and remember the structure's plan when
    every module is a plain LoRA whose ``up`` and ``down`` are file tensors as they are (up to a
    reshape) and whose scale is the structure's (alphas are part of the key). Anything else --
    another kind, a Tucker core, DoRA, a tensor the reader transformed (fused rows split, scales
    folded), two equal tensors -- leaves the structure unplanned: it always goes through the
    reader. A structure is planned the second time it is met: matching reads every byte of the
    file twice over (fingerprints), worth it only for a structure that comes again (a folder of
    one trainer's LoRAs), not for each one-off (the structure key itself reads the header only).
    ``raw``: the file's ``_Raw`` when the caller has it."""
    key = _structure_key(reg, v, raw)
    if key is None:
        return
    digest, raw = key
    with _PLANS_LOCK:
        if digest in _PLANS:
            return
        if digest not in _SEEN:
            _SEEN[digest] = None
            while len(_SEEN) > 4 * _MAX_PLANS:
                _SEEN.popitem(last=False)
            return
    try:
        plan = _make_plan(raw, adapter)
    except OSError:
        return
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
        if math.prod(info.shape) > 1:
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


def plan_of(reg, v, raw: _Raw | None = None) -> tuple[str, dict, str | None] | None:
    """``(structure digest, plan, family)`` of a version whose structure is planned, else None."""
    key = _structure_key(reg, v, raw)
    if key is None:
        return None
    with _PLANS_LOCK:
        plan = _PLANS.get(key[0])
    if not plan:
        return None
    return key[0], plan, sk.family_of(arch_of(reg, v)) or plan["family"]


def planned_sketch(reg, v, raw: _Raw | None = None) -> sk.Sketch | None:
    """The sketch of a version whose structure is planned, straight from its bytes (``raw``: the
    file already in memory, see ``raw_from_header``; else the blob is read, and only when the
    structure is planned); None when it is not planned or a value is not finite (the reader path
    then records why). ``reg`` only answers ``reg.arch`` (and ``reg.path`` without ``raw``)."""
    if raw is None:
        key = _structure_key(reg, v)
        if key is None:
            return None
        raw = key[1]
    found = plan_of(reg, v, raw)
    if found is None:
        return None
    return planned_sketches(found[1], found[2], [raw])[0]


def _plan_keys(plan: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A plan's module keys in sorted order, the order that sorts them, and the names in it
    (the same for every file of the structure: computed once)."""
    got = plan.get("_keys")
    if got is None:
        keys = np.array([sk.module_key(name, out, cols) for name, *_x, out, cols in plan["lora"]], dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        if len(set(keys.tolist())) != len(keys):
            raise ValueError("module keys collide")
        got = plan["_keys"] = (keys[order], order, [plan["lora"][i][0] for i in order])
    return got


def planned_sketches(plan: dict, family: str | None, raws: list[_Raw]) -> list[sk.Sketch | None]:
    """The sketches of several files of one planned structure; each equals what ``sk.sketch_forms``
    gives for that file alone. Files whose planned tensors sit at the same offsets (one trainer's
    output) are sketched module by module for all of them at once (``_vector_sketches``: a few
    products per module, not a few per file and module); the rest through ``sk.sketch_forms``.
    None for a file whose bytes cannot be read or whose sketch is not finite."""
    out: list[sk.Sketch | None] = [None] * len(raws)
    readable = []
    for j, raw in enumerate(raws):
        try:
            if raw.data is None:
                raw.load()
            readable.append(j)
        except OSError:
            pass
    same = _same_layout(plan, [raws[j] for j in readable]) if sk.ALGO == _VECTOR_ALGO else None
    if same is not None:
        made = _vector_sketches(plan, family, [raws[j] for j in readable], same)
    else:
        made = [_forms_sketch(plan, family, raws[j]) for j in readable]
    for j, s in zip(readable, made):
        if s is not None and np.isfinite(s.norms).all() and np.isfinite(s.units).all():
            out[j] = s
    return out


def _forms_sketch(plan: dict, family: str | None, raw: _Raw) -> sk.Sketch:
    """One file's planned sketch through ``sk.sketch_forms`` (the reference path)."""
    forms = {}
    for name, up_k, down_k, r, scale, out, cols in plan["lora"]:
        up = raw.tensor(up_k).reshape(out, r)  # as stored (fp16 too): sketch_forms converts by group
        down = raw.tensor(down_k).reshape(r, cols)
        forms[name] = sk.UpdateForm(out, cols, up=up, down=down, scale=scale)
    return sk.sketch_forms(forms, family)


#: the sketch algorithm ``_vector_sketches`` reproduces (``core.sketch.sketch_forms`` on plain factor
#: forms without bias); under any other ``sk.ALGO`` every file goes through ``sketch_forms`` itself
_VECTOR_ALGO = "rad2-v1-q8p4-d256-s0"


def _same_layout(plan: dict, raws: list[_Raw]) -> int | None:
    """The data bytes the plan's tensors need when every file has them at the same offsets with
    the same dtypes (and in memory), else None."""
    if not raws:
        return None
    keys = _tensor_keys(plan)
    if not keys:
        return 0
    pick = operator.itemgetter(*keys)  # two keys a module at least: a tuple of TensorInfo
    first = pick(raws[0].tensors)  # TensorInfo: dtype, shape (the structure's), start, end
    if any(pick(raw.tensors) != first for raw in raws[1:]):
        return None
    want = [(t.dtype, t.start, t.end) for t in first]
    return max((e for _d, _s, e in want), default=0)


def _module_groups(plan: dict, tensors: dict) -> list[tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]]:
    """The plan's modules grouped by what one batched product can take together: the same
    ``(out, k, cols)`` (so the same projections) and the same dtypes of ``up`` and ``down``. Per
    group: the module indices and each factor's ``(start, end)`` in the data section."""
    groups: dict[tuple, tuple[list, list, list]] = {}
    for m, (_name, up_k, down_k, k, _scale, out, cols) in enumerate(plan["lora"]):
        up, down = tensors[up_k], tensors[down_k]
        g = groups.setdefault((out, k, cols, up.dtype, down.dtype), ([], [], []))
        g[0].append(m)
        g[1].append((up.start, up.end))
        g[2].append((down.start, down.end))
    return list(groups.values())


def _tensor_keys(plan: dict) -> list[str]:
    keys = plan.get("_tensor_keys")
    if keys is None:
        keys = plan["_tensor_keys"] = [k for _n, up_k, down_k, *_x in plan["lora"] for k in (up_k, down_k)]
    return keys


def _factors(plan: dict, raws: list[_Raw], size: int) -> list[tuple]:
    """Per group of ``_module_groups``: ``(module indices, k, out, cols, up, down)``, the factors of
    every file as ``(n, G*out*k)`` and ``(n, G*k*cols)`` tensors (as stored: fp16 stays fp16). The
    files' data sections are copied into one array (a plain copy, cheap next to a strided take),
    each group's factors then concatenated from views of it in one ``torch.cat``."""
    from loradex.converters.safetensors_io import DTYPES

    n = len(raws)
    width = -(-size // 8) * 8  # a multiple of every item size: the rows view as any dtype
    rows = np.empty((n, width), dtype=np.uint8)
    rows[:, size:] = 0
    for j, raw in enumerate(raws):
        rows[j, :size] = np.frombuffer(raw.data, dtype=np.uint8, count=size, offset=raw.base)
    data = torch.from_numpy(rows)
    first, mods = raws[0].tensors, plan["lora"]

    def factors(dtype: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        dt, item = DTYPES[dtype]
        if all(s % item == 0 for s, _e in spans):
            view = data.view(dt)
            parts = [view[:, s // item: e // item] for s, e in spans]
        else:  # unaligned in the file: through the bytes
            parts = [data[:, s:e].contiguous().view(dt) for s, e in spans]
        return torch.cat(parts, dim=1)

    out = []
    for idx, up_spans, down_spans in _module_groups(plan, first):
        _name, up_k, down_k, k, _scale, o, c = mods[idx[0]]
        out.append((idx, k, o, c, factors(first[up_k].dtype, up_spans), factors(first[down_k].dtype, down_spans)))
    return out


def _vector_sketches(plan: dict, family: str | None, raws: list[_Raw], size: int) -> list[sk.Sketch]:
    """``sk.sketch_forms`` of plain LoRA modules (``scale * up @ down``, no bias) for files of one
    layout: the modules of one shape (and factor dtypes) of all the files in one batch of products
    (``sketch_forms`` batches one file's modules of one shape the same way), the factors gathered
    from the files' bytes (``_factors``), the unit sketches and norms of every module finished
    together, so the same numbers up to the order of a few float sums."""
    n = len(raws)
    mods = plan["lora"]
    m_all = len(mods)
    q, p = sk.SKETCH_ROWS, sk.SKETCH_COLS
    s_all = torch.empty((n, m_all, q * p), dtype=torch.float32)
    sq_all = torch.empty((n, m_all), dtype=torch.float64)
    parts = _factors(plan, raws, size)
    for idx, k, out, cols, up, down in parts:
        g_ = len(idx)
        up = up.reshape(n, g_, out, k).float().contiguous()  # (n, G, out, k)
        down = down.reshape(n, g_, k, cols).float().contiguous()  # (n, G, k, cols)
        h, g = sk.projections(family, out, cols)
        sc = torch.tensor([mods[m][4] for m in idx], dtype=torch.float64)  # (G,)
        dg = (down.reshape(n * g_ * k, cols) @ g[:cols]).reshape(n, g_, k, -1)
        s = (torch.matmul(h.T, up) @ dg) * sc.float()[None, :, None, None]  # (n, G, q, p)
        if k * (out + cols) <= out * cols:
            gu = up.transpose(-1, -2) @ up
            gd = down @ down.transpose(-1, -2)
            sq = (gu.double() * gd.double()).sum(dim=(-1, -2)).clamp_min(0.0) * sc * sc  # (n, G)
        else:
            sq = (up @ down).double().square().sum(dim=(-1, -2)) * sc * sc
        sel = torch.as_tensor(idx)
        s_all[:, sel] = s.reshape(n, g_, -1)
        sq_all[:, sel] = sq
    flat = s_all.double()
    ns = flat.norm(dim=-1, keepdim=True)
    unit = torch.where(ns > 0, flat / ns.clamp_min(1e-300), torch.zeros_like(flat)).float()
    keys, order, names = _plan_keys(plan)
    sel = torch.as_tensor(order)
    units = unit[:, sel].numpy()  # (n, M, q*p), each file's rows in the keys' order
    norms = sq_all.sqrt()[:, sel].numpy()
    return [sk.Sketch(family, keys.copy(), norms[j], units[j], {}, {}, list(names)) for j in range(n)]
