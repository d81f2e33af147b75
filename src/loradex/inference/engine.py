"""``Engine``: one diffusers pipeline, loaded once, serving requests that each bring their adapters.

Tiers (fastest first): the slots (slots.py: fixed-capacity LoRA buffers inside every target Linear /
Conv2d of the denoiser and the text encoders), the ready cache (cache.py: converted, cast, pinned
tensors in CPU memory, LRU bounded in bytes), and the registry / disk. A request's adapters are
routed per sample, so a batch can mix adapters (one forward pass, equal to running them one by one).

What cannot go into the slots (DoRA, (IA)^3, OFT, GLoRA, norms, LoHa/LoKr whose exact LoRA rank is
above ``max_rank``...) is applied by in-place weight patching ``W += delta(W, m)`` for the batch and
restored after by copying back a pristine copy of the touched weights kept on the CPU: no
fuse/unfuse arithmetic, so the base weights come back bit-identical. Such requests run in their own
batches (the patch is shared by every sample of a batch). The deltas are computed on the weights'
device in float32 (the kinds' float64 where they need it), from the adapter's factors moved there
once (cache.DevicePatches): no weight makes a round trip through the CPU. The pristine copies stay
in CPU memory (pinned on CUDA, so the restore is an asynchronous host-to-device copy): a patch-mode
adapter may touch every weight of the denoiser, and a second copy of it on the device would cost as
much device memory as the model, to save a copy that runs at host-to-device bandwidth.

Exact batches (exact.py, on by default on the CPU): inside a batch each request runs through the
denoiser, the text encoders and the VAE on its own rows, as if alone, so a batched request's image
is bit-identical to the image it gets alone (the CPU kernels are not batch-invariant; exact.py says
what differs and what it costs).

Run control (for servers): ``run(..., control=c)`` calls ``c.wanted(indices)`` before each batch
(False: skip it) and ``c.step(indices, i, n, suspend)`` after each denoising step (through the
pipeline's ``callback_on_step_end``). ``step`` may raise RequestCancelled (the batch stops there,
between two steps; its outputs are None) or enter ``suspend()`` to lend the engine to other work
mid-run: the batch's weight patches, routing and TI rows are taken out and the engine lock released
until the context exits, when they are put back. Each run calls its own shallow copy of the
pipeline with its own scheduler, so suspended runs do not share per-call state. The time of each
step and of the decode feeds the cost model (cost.py) when one is attached.

Textual inversion: ``ti_tokens`` placeholder tokens are added to every tokenizer at start and their
rows reserved in the embedding tables; a request's TI token is rewritten to placeholders (one per
vector, as diffusers' ``maybe_convert_prompt`` expands ``<tok>`` to ``<tok> <tok>_1 ...``) whose rows
receive the vectors for the batch, and are restored after.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from loradex.converters.pipeline import load_pipeline, pipeline_components
from loradex.errors import FormatError, LoradexError, RegistryError
from loradex.inference import exact
from loradex.inference.cache import DevicePatches, Ready, ReadyCache, percentile, prepare
from loradex.inference.slots import SlotBank, live_modules
from loradex.inference.types import BadRequestError, GenerateRequest, RequestCancelled, UnknownAdapterError

log = logging.getLogger(__name__)

_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
TI_PLACEHOLDER = "<loradex-ti-{}>"


def _defuse(text: str) -> str:
    """Break any reserved placeholder spelled in user text so the tokenizer cannot match it."""
    return text.replace("<loradex-ti-", "<loradex ti-")


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in CPU memory (pinned when ``t`` is on CUDA: restores copy it back asynchronously)."""
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    out.copy_(t.detach())
    return out


class _TIRows:
    """Reserved placeholder tokens and embedding rows, per text encoder."""

    def __init__(self, pipe, n: int) -> None:
        self.tokens = [TI_PLACEHOLDER.format(i) for i in range(n)]
        self.tables: dict[str, tuple[nn.Embedding, list[int], torch.Tensor]] = {}
        if n <= 0:
            return
        for comp, tname in _TOKENIZER_OF.items():
            te, tok = getattr(pipe, comp, None), getattr(pipe, tname, None)
            if not isinstance(te, nn.Module) or tok is None or not hasattr(te, "get_input_embeddings"):
                continue
            tok.add_tokens(self.tokens)
            ids = [int(i) for i in tok.convert_tokens_to_ids(self.tokens)]
            if max(ids) >= te.get_input_embeddings().num_embeddings:
                te.resize_token_embeddings(len(tok))
            emb = te.get_input_embeddings()
            with torch.no_grad():
                emb.weight[ids] = 0
            self.tables[comp] = (emb, ids, emb.weight[ids].detach().clone())

    def width(self, comp: str) -> int | None:
        t = self.tables.get(comp)
        return None if t is None else t[0].weight.shape[1]

    @torch.no_grad()
    def write(self, start: int, vectors: dict[str, torch.Tensor]) -> None:
        for comp, vec in vectors.items():
            if comp in self.tables:
                emb, ids, _ = self.tables[comp]
                emb.weight[ids[start:start + vec.shape[0]]] = vec.to(emb.weight.device, emb.weight.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        for emb, ids, pristine in self.tables.values():
            emb.weight[ids] = pristine


class Engine:
    """One pipeline on ``device``; adapters swapped per request (see the module docstring).

    ``base``: a diffusers folder, a single-file ``.safetensors`` checkpoint, or a pipeline object.
    ``max_rank`` / ``slots``: capacity of each slot layer (rank per adapter, adapters resident at
    once; also the most slot adapters one batch can use). ``registry``: a ``loradex.Registry`` for
    REFs (else adapters are file paths). ``cache_bytes``: the CPU tier's budget. ``ti_tokens``:
    reserved placeholder tokens per text encoder. ``targets``: only wrap modules whose canonical
    name contains one of these substrings (default: every Linear and Conv2d). ``allow_paths``:
    accept file paths as adapter refs. ``max_batch``: most requests per forward pass.
    ``compile``: ``torch.compile`` the denoiser (the slot rank is then fixed at ``max_rank``).
    ``exact_batches``: run each request of a batch as if alone (exact.py; default: on the CPU only;
    off under ``compile``). ``patch_device_bytes``: budget of the patch-mode adapters' factors kept
    on a GPU (cache.DevicePatches).
    """

    def __init__(self, base, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 max_rank: int = 64, slots: int = 4, registry=None, cache_bytes: int = 2**30, ti_tokens: int = 16,
                 targets: Sequence[str] | None = None, allow_paths: bool = True, max_batch: int = 16,
                 compile: bool = False, exact_batches: bool | None = None, patch_device_bytes: int = 2**30) -> None:
        from loradex.core.archs import arch_from_models

        self.device = torch.device(device)
        if dtype is None and self.device.type == "cuda" and isinstance(base, (str, os.PathLike)):
            dtype = torch.float16
        self.pipe = load_pipeline(base, self.device, dtype)
        comps = pipeline_components(self.pipe)
        denoiser = comps.get("unet", comps.get("transformer"))
        if denoiser is None:
            raise FormatError("the base pipeline has no unet or transformer")
        self.dtype = dtype or next(denoiser.parameters()).dtype
        # the base's arch (before TI rows are appended to the token embeddings)
        self.arch = arch_from_models(comps, pipeline=type(self.pipe).__name__)
        self.ti = _TIRows(self.pipe, ti_tokens)
        comps = {c: getattr(self.pipe, c) for c in comps}  # resize_token_embeddings keeps the objects
        self.bank = SlotBank(comps, slots=slots, max_rank=max_rank, device=self.device, dtype=self.dtype,
                             targets=tuple(targets) if targets else None)
        self.modules: dict[str, nn.Module] = {
            canon: mod for comp, model in comps.items() for canon, _, mod in live_modules(comp, model)
            if isinstance(getattr(mod, "weight", None), torch.Tensor)
        }
        self.max_rank, self.slots, self.max_batch = max_rank, slots, max_batch
        self.registry = registry
        self.allow_paths = allow_paths
        self.cache = ReadyCache(cache_bytes, self._load_ready)
        self.on_device = DevicePatches(self.device, patch_device_bytes)
        self._lock = threading.RLock()
        self._sources: dict[str, tuple[str, object]] = {}
        self._pristine: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._slot_used = [0] * slots
        self._tick = 0
        self._swap_times: deque[float] = deque(maxlen=10000)
        self.swaps = self.batches = self.images = 0
        self.patched_batches = 0
        self.steps = 0  # denoising steps run (one per batch step)
        self.cancelled_batches = 0
        self.suspensions = 0
        #: the cost model (cost.py), attached by ``cost_model()``; fed by every single-request run
        self.cost = None
        self._cost_lock = threading.Lock()
        try:
            self._accepts = set(inspect.signature(type(self.pipe).__call__).parameters)
        except (TypeError, ValueError):  # pragma: no cover
            self._accepts = set()
        self.exact_batches = (self.device.type == "cpu") if exact_batches is None else bool(exact_batches)
        if compile:
            self.exact_batches = False
        if self.exact_batches:
            exact.install(self.pipe, list(comps), self.bank.routing)
        if compile:
            self.bank.routing.fixed_rank = True
            name = self.arch.denoiser
            setattr(self.pipe, name, torch.compile(getattr(self.pipe, name)))

    # ---- references -----------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The canonical id of an adapter REF (``sha256:<hex>`` of the stored version) or file path
        (``file:<absolute path>#<size>-<mtime_ns>``); UnknownAdapterError when it names nothing."""
        if not isinstance(ref, str) or not ref.strip():
            raise UnknownAdapterError("empty adapter reference")
        if self.registry is not None:
            try:
                with self._lock:
                    v = self.registry.get(ref)
            except RegistryError:
                v = None
            if v is not None:
                aid = f"sha256:{v.sha256}"
                self._sources.setdefault(aid, ("registry", v))
                return aid
        if self.allow_paths:
            p = Path(ref).expanduser()
            if p.exists():
                st = p.stat()  # size and mtime in the id: a file rewritten in place is a new adapter
                aid = f"file:{p.resolve()}#{st.st_size}-{st.st_mtime_ns}"
                self._sources.setdefault(aid, ("file", p.resolve()))
                return aid
        where = "in the registry" if self.registry is not None else "(no registry; not a file)"
        raise UnknownAdapterError(f"unknown adapter {ref!r} {where}".strip())

    def _load_ready(self, aid: str) -> Ready:
        import loradex

        kind, src = self._sources[aid]
        try:
            if kind == "registry":
                with self._lock:
                    adapter = self.registry.load(src, arch=self.arch)
            else:
                adapter = loradex.load(src, arch=self.arch)
        except UnknownAdapterError:
            raise
        except LoradexError as e:
            raise BadRequestError(f"adapter {aid}: cannot be used with this base ({e})") from None
        unknown = [n for n in adapter.patches if n not in self.modules]
        if unknown:
            raise BadRequestError(f"adapter {aid}: {len(unknown)} module(s) not in this base, e.g. {unknown[0]}")
        for tok, emb in adapter.embeddings.items():
            for comp, vec in emb.vectors.items():
                w = self.ti.width(comp)
                if w is not None and vec.shape[-1] != w:
                    raise BadRequestError(f"adapter {aid}: embedding {tok!r} is {vec.shape[-1]} wide, {comp} is {w}")
        return prepare(aid, adapter, self.bank.layers, max_rank=self.max_rank, dtype=self.dtype,
                       pin=self.device.type == "cuda")

    def ready(self, ref: str) -> Ready:
        """The ready form of an adapter (from the CPU cache, else loaded and converted)."""
        return self.cache.get(self.resolve(ref))

    def prefetch(self, refs: Iterable[str]) -> dict:
        """Load adapters into the CPU tier ahead of their requests: ``{ref: ready.describe()}``."""
        return {ref: self.ready(ref).describe() for ref in refs}

    def list_adapters(self) -> list[dict]:
        """The registry's adapters (when there is one) and every adapter in the CPU cache or a slot."""
        out: list[dict] = []
        cached = {r.id: r for r in self.cache.entries()}
        if self.registry is not None:
            with self._lock:
                rows = self.registry.list()
            for row in rows:
                out.append({"ref": row["name"], "versions": row.get("versions"), "arch": row.get("arch"),
                            "kinds": row.get("kinds"), "tags": row.get("tags")})
        in_slot = {o for o in self.bank.occupant if o}
        for aid, r in cached.items():
            out.append({"id": aid, "cached": True, "in_slot": aid in in_slot, **r.describe()})
        return out

    def stats(self) -> dict:
        """Cache hits/misses/evictions, swaps and their p50/p99 latency, cached bytes, slots in use,
        bytes of patch-mode factors held on the device."""
        times = list(self._swap_times)
        return {
            "hits": self.cache.hits, "misses": self.cache.misses, "evictions": self.cache.evictions,
            "swaps": self.swaps, "swap_latency_p50_s": percentile(times, 50),
            "swap_latency_p99_s": percentile(times, 99), "cached_bytes": self.cache.nbytes,
            "cached_adapters": len(self.cache), "slot_bytes": self.bank.nbytes(), "slots": self.slots,
            "slot_occupants": list(self.bank.occupant), "batches": self.batches, "images": self.images,
            "patched_batches": self.patched_batches, "steps": self.steps,
            "cancelled_batches": self.cancelled_batches, "suspensions": self.suspensions,
            "exact_batches": self.exact_batches, "patch_bytes_on_device": self.on_device.nbytes,
        }

    # ---- cost ------------------------------------------------------------------------------------
    def samples(self, request: GenerateRequest) -> int:
        """Denoiser samples per step for one request: 2 with classifier-free guidance (the
        unconditional and the conditional half), else 1. FLUX-style pipelines (``true_cfg_scale``)
        embed the guidance and run one sample unless a true CFG scale is asked, which the engine
        never does."""
        return 2 if request.guidance_scale > 1.0 and "true_cfg_scale" not in self._accepts else 1

    def cost_model(self, defaults: dict | None = None):
        """The engine's cost model (cost.py), calibrated on first use with a few small runs (then
        refined by every single-request run). ``defaults``: the request defaults of the front end,
        whose size the calibration brackets."""
        with self._cost_lock:
            if self.cost is None:
                from loradex.inference.cost import CostModel

                self.cost = CostModel.calibrate(self, defaults)
            return self.cost

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest], control=None) -> list:
        """One PIL image per request, in order (see ``run``)."""
        return self.run(requests, output_type="pil", control=control)

    def run(self, requests: Sequence[GenerateRequest], output_type: str = "pil", control=None) -> list:
        """Group the requests by ``batch_key`` (and by patch-mode adapters), run each group as mixed
        batches, return one output per request in order (``output_type="latent"``: the final latents
        ``[C, h, w]``; ``"pt"`` / ``"np"`` as diffusers gives them). ``control``: see the module
        docstring; the outputs of a batch it stops or skips are None."""
        reqs = list(requests)
        for r in reqs:
            if not isinstance(r, GenerateRequest):
                raise BadRequestError("requests must be GenerateRequest objects")
            r.validate()
        routed: list[list[tuple[Ready, float]]] = []
        for r in reqs:
            items = [(self.cache.get(self.resolve(ref)), float(w)) for ref, w in r.adapters]
            n_slot = len({rd.id for rd, _ in items if rd.mode == "slots" and rd.factors})
            if n_slot > self.slots:
                raise BadRequestError(f"{n_slot} LoRA-slot adapters in one request; this engine has {self.slots} slots")
            if sum(e.num_vectors for rd, _ in items for e in rd.embeddings.values()) > len(self.ti.tokens):
                raise BadRequestError(f"more than {len(self.ti.tokens)} textual-inversion vectors in one request")
            routed.append(items)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            patch_key = tuple((rd.id, w) for rd, w in routed[i] if rd.mode == "patch")
            groups.setdefault((r.batch_key(), patch_key), []).append(i)
        out: list = [None] * len(reqs)
        for idxs in groups.values():
            for chunk in self._chunks(idxs, routed):
                if control is not None and not control.wanted(chunk):
                    continue
                try:
                    results = self._run_chunk([reqs[i] for i in chunk], [routed[i] for i in chunk], output_type,
                                              control, chunk)
                except RequestCancelled:
                    with self._lock:
                        self.cancelled_batches += 1
                    if control is None:
                        raise
                    continue
                for i, res in zip(chunk, results):
                    out[i] = res
        return out

    def _chunks(self, idxs: list[int], routed) -> Iterable[list[int]]:
        """Split a group so that each batch uses at most ``slots`` slot adapters, ``max_batch``
        requests and the reserved TI rows."""
        chunk: list[int] = []
        ids: set[str] = set()
        vecs = 0
        for i in idxs:
            mine = {rd.id for rd, _ in routed[i] if rd.mode == "slots" and rd.factors}
            nv = sum(e.num_vectors for rd, _ in routed[i] for e in rd.embeddings.values())
            if chunk and (len(chunk) >= self.max_batch or len(ids | mine) > self.slots
                          or vecs + nv > len(self.ti.tokens)):
                yield chunk
                chunk, ids, vecs = [], set(), 0
            chunk.append(i)
            ids |= mine
            vecs += nv
        if chunk:
            yield chunk

    def _acquire_slots(self, needed: list[Ready]) -> dict[str, int]:
        """Slot index per adapter id, swapping in what is missing (least recently used slot first)."""
        where: dict[str, int] = {}
        occ = self.bank.occupant
        want = {r.id for r in needed}
        for r in needed:
            if r.id in occ:
                where[r.id] = occ.index(r.id)
        for r in needed:
            if r.id in where:
                continue
            free = [s for s in range(self.slots) if occ[s] not in want and s not in where.values()]
            s = min(free, key=lambda k: (occ[k] is not None, self._slot_used[k]))
            t0 = time.perf_counter()
            self.bank.load_slot(s, r.id, r.factors)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._swap_times.append(time.perf_counter() - t0)
            self.swaps += 1
            where[r.id] = s
        for s in where.values():
            self._tick += 1
            self._slot_used[s] = self._tick
        return where

    def remove_all(self) -> None:
        """Empty every slot (the base model exactly as loaded)."""
        with self._lock:
            for s in range(self.slots):
                self.bank.clear_slot(s)

    @contextlib.contextmanager
    def activate(self, per_sample: Sequence[Sequence[tuple[str, float]]]):
        """Route sample ``b`` of the next forward passes through ``per_sample[b]`` = [(ref, weight)]
        (slot adapters, patch-mode adapters applied to the weights, shared by every sample), for
        code that calls the pipeline's models directly (tests, benchmarks). TI is not handled here."""
        with self._lock:
            items = [[(self.ready(ref), float(w)) for ref, w in row] for row in per_sample]
            patches = [(rd, w) for rd, w in items[0] if rd.mode == "patch"] if items else []
            touched = self._apply_patches(patches)
            try:
                self._route(items)
                yield self
            finally:
                self.bank.routing.clear()
                self._restore(touched)

    def _route(self, items: list[list[tuple[Ready, float]]]) -> None:
        slot_readies: dict[str, Ready] = {}
        for row in items:
            for rd, _ in row:
                if rd.mode == "slots" and rd.factors:
                    slot_readies[rd.id] = rd
        if len(slot_readies) > self.slots:
            raise BadRequestError(f"{len(slot_readies)} LoRA-slot adapters at once; this engine has {self.slots} slots")
        where = self._acquire_slots(list(slot_readies.values()))
        rows = [[(where[rd.id], w) for rd, w in row if rd.id in where] for row in items]
        ranks = [max((rd.rank for rd, _ in row if rd.id in where), default=0) for row in items]
        self.bank.routing.set(rows, rank=max((r.rank for r in slot_readies.values()), default=0), ranks=ranks)

    @torch.no_grad()
    def _apply_patches(self, patches: list[tuple[Ready, float]]) -> list[str]:
        """``W += delta(W, m)`` for each patch-mode adapter in order, on the weights' device in
        float32; returns the touched modules."""
        touched: list[str] = []
        try:
            for rd, w in patches:
                for name, patch in self.on_device.get(rd).items():
                    mod = self.modules[name]
                    weight = mod.weight
                    bias = getattr(mod, "bias", None)
                    if name not in self._pristine:
                        self._pristine[name] = (_host_copy(weight), None if bias is None else _host_copy(bias))
                    if name not in touched:
                        touched.append(name)
                    cur = weight.detach().float()
                    try:
                        d = patch.delta(cur, multiplier=w)
                        bd = patch.bias_delta(None if bias is None else bias.detach().float(), multiplier=w)
                    except ValueError as e:
                        raise BadRequestError(f"adapter {rd.id}: {name}: {e}") from None
                    weight.copy_((cur + d.reshape(cur.shape)).to(weight.dtype))
                    if bd is not None and bias is not None:
                        bias.copy_((bias.detach().float() + bd.reshape(bias.shape)).to(bias.dtype))
        except BaseException:
            self._restore(touched)
            raise
        return touched

    @torch.no_grad()
    def _restore(self, touched: list[str]) -> None:
        for name in touched:
            mod = self.modules[name]
            w, b = self._pristine[name]
            mod.weight.copy_(w, non_blocking=True)
            if b is not None:
                mod.bias.copy_(b, non_blocking=True)

    @staticmethod
    def _rewrite(text: str, mapping: list[tuple[str, str]]) -> str:
        """Replace every TI token by its placeholders in one pass (longest token first), so a
        placeholder is never rewritten again."""
        if not mapping:
            return text
        table = dict(mapping)
        pattern = re.compile("|".join(re.escape(t) for t, _ in mapping))
        return pattern.sub(lambda m: table[m.group(0)], text)

    def _pipe_for_call(self):
        """A shallow copy of the pipeline (same models) with its own scheduler: a pipeline call keeps
        per-call state on the pipeline (guidance scale, interrupt flag) and the scheduler (its
        timesteps, a multistep scheduler's history), and a suspended run must not share them."""
        pipe = copy.copy(self.pipe)
        sched = getattr(self.pipe, "scheduler", None)
        if sched is not None:
            pipe.__dict__["scheduler"] = copy.deepcopy(sched)
        return pipe

    def _release(self):
        """Release the engine lock entirely (a suspended run); returns what ``_reacquire`` needs."""
        save = getattr(self._lock, "_release_save", None)
        if save is not None:
            return save()
        self._lock.release()
        return None

    def _reacquire(self, state) -> None:
        restore = getattr(self._lock, "_acquire_restore", None)
        if restore is not None and state is not None:
            restore(state)
        else:
            self._lock.acquire()

    def _run_chunk(self, reqs: list[GenerateRequest], items: list[list[tuple[Ready, float]]], output_type: str,
                   control=None, index: list[int] | None = None) -> list:
        r0 = reqs[0]
        pipe = self._pipe_for_call()
        marks: list[float] = []  # end of each step (suspended time excluded)
        paused = [0.0]
        with self._lock:
            patches = [(rd, w) for rd, w in items[0] if rd.mode == "patch"]
            touched = [self._apply_patches(patches)]
            try:
                self._route(items)
                prompts, negatives = self._write_ti(reqs, items)
                kw = dict(prompt=prompts, num_inference_steps=r0.steps, width=r0.width, height=r0.height,
                          guidance_scale=r0.guidance_scale, output_type=output_type,
                          generator=[torch.Generator("cpu").manual_seed(r.seed) for r in reqs])
                if "negative_prompt" in self._accepts and ("true_cfg_scale" not in self._accepts or any(negatives)):
                    kw["negative_prompt"] = negatives

                @contextlib.contextmanager
                def suspend():
                    """Lend the engine: take this batch's state out, release the lock; put it back after."""
                    t0 = time.perf_counter()
                    self.bank.routing.clear()
                    self.ti.restore()  # the prompts are encoded: the TI rows are not read again
                    self._restore(touched[0])
                    touched[0] = []
                    self.suspensions += 1
                    state = self._release()
                    try:
                        yield
                    finally:
                        self._reacquire(state)
                        touched[0] = self._apply_patches(patches)
                        self._route(items)
                        paused[0] += time.perf_counter() - t0

                def on_step(pipe_, i, t, tensors):
                    self.steps += 1
                    marks.append(time.perf_counter() - paused[0])
                    if control is not None:
                        control.step(index if index is not None else list(range(len(reqs))), i, r0.steps, suspend)
                    return {}

                if "callback_on_step_end" in self._accepts:
                    kw["callback_on_step_end"] = on_step
                t_start = time.perf_counter()
                with torch.inference_mode(), exact.scope(self.exact_batches, len(reqs)):
                    res = pipe(**kw)
                t_end = time.perf_counter() - paused[0]
            finally:
                self.bank.routing.clear()
                self.ti.restore()
                self._restore(touched[0])
            self.batches += 1
            self.images += len(reqs)
            self.patched_batches += bool(patches)
        if self.cost is not None and len(reqs) == 1 and marks:
            steps = [b - a for a, b in zip([t_start, *marks[:-1]], marks)]
            try:
                self.cost.observe(r0, steps, t_end - marks[-1])
            except Exception:  # pragma: no cover - a statistics hook must not fail a request
                log.debug("cost model update failed", exc_info=True)
        images = res.images
        return [images[i] for i in range(len(reqs))]

    def _write_ti(self, reqs: list[GenerateRequest], items) -> tuple[list[str], list[str]]:
        """Write each request's TI vectors into placeholder rows; the prompts rewritten to them."""
        start = 0
        placed: dict[tuple[str, str], str] = {}
        prompts, negatives = [], []
        for r, row in zip(reqs, items):
            mapping: list[tuple[str, str]] = []
            for rd, _ in row:
                for tok, emb in rd.embeddings.items():
                    key = (rd.id, tok)
                    if key not in placed:
                        n = emb.num_vectors
                        self.ti.write(start, emb.vectors)
                        placed[key] = " ".join(self.ti.tokens[start:start + n])
                        start += n
                    mapping.append((tok, placed[key]))
            mapping.sort(key=lambda kv: -len(kv[0]))  # longest first: "<cat2>" before "<cat>"
            # a prompt must not name the placeholders itself (it would read another request's vectors)
            prompts.append(self._rewrite(_defuse(r.prompt), mapping))
            negatives.append(self._rewrite(_defuse(r.negative_prompt), mapping))
        return prompts, negatives
