"""Exact batches: inside a batch, each sample goes through the models as if it were alone.

Why: PyTorch's CPU kernels are not batch-invariant. Measured on the tiny pipeline (torch 2.13 CPU,
oneDNN): a Conv2d (``conv_in``, the 64-channel resnet convolutions, the VAE's ``conv_in``) and every
Linear fed one row (the time embedding, ``time_emb_proj``) return results that differ in the last
bit for a sample computed in a batch of 2 from the same sample in a batch of 1 (up to 7.5e-7 per
layer): oneDNN picks its algorithm and blocking by shape, and a 1-row Linear is a GEMV instead of a
GEMM. Through 2 denoising steps that grows to ~4e-5 in the latents and, after the VAE and the
rounding to 8 bits, to 1/255 in some pixels, so "a batched request gets what it would get alone"
was only true up to float rounding. Mixed-adapter batches add a second cause: samples with
different adapters take the gathered ``bmm`` path of the slot layers (slots.py) instead of the
shared ``F.linear`` path, and a sample's adapter columns are padded to the batch's widest rank.

The fix here: while the engine runs a batch of B requests (``scope(True, B)`` in that thread), the
denoiser, the text encoders and ``vae.decode`` run once per request on that request's rows (with
classifier-free guidance its unconditional and conditional row together, in that order: exactly
the batch of 2 it has alone), outputs put back in the batch's row order, with the LoRA routing
narrowed to that request's own slots and rank (``Routing.only``). A request then goes through the
kernels, shapes and summation orders of its own run alone, so its image is bit-identical to that
image. A batch of one is not split at all. What batching still shares: one pipeline call (prompt
handling, the scheduler, one adapter swap per batch) and one slot load for every request.

The cost is the batched GEMM's efficiency: a batch then costs about what its requests cost one by
one. On a CPU batching gains little anyway; on a GPU it is most of the point of batching, so the
engine turns exact batches on by default only on the CPU (``Engine(exact_batches=)``).
Calls made outside an engine batch (tests and benchmarks calling ``engine.pipe.unet`` directly, or
under ``torch.compile`` tracing) are not split.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

#: keyword arguments that are never per-sample, whatever their first dimension (FLUX's position ids)
NO_SPLIT = frozenset({"img_ids", "txt_ids"})

_STATE = threading.local()


@contextlib.contextmanager
def scope(on: bool, requests: int = 0) -> Iterator[None]:
    """Split batches per request in this thread while the block runs (``on``; ``requests``: how many
    requests the batch holds), else leave calls alone."""
    prev = (getattr(_STATE, "on", False), getattr(_STATE, "requests", 0))
    _STATE.on, _STATE.requests = bool(on), int(requests)
    try:
        yield
    finally:
        _STATE.on, _STATE.requests = prev


def active() -> bool:
    """True inside :func:`exact_batches` on this thread: batched layers run row by row."""
    return bool(getattr(_STATE, "on", False))


def _batch(args: tuple, kwargs: dict) -> int | None:
    """The batch size: the first dimension of the first tensor argument (positional first)."""
    for v in (*args, *(v for k, v in kwargs.items() if k not in NO_SPLIT)):
        if isinstance(v, torch.Tensor):
            return int(v.shape[0]) if v.ndim >= 1 else None
    return None


def _take(v: Any, rows: slice, n: int) -> Any:
    """``v[rows]`` for every tensor in ``v`` whose first dimension is the batch ``n`` (recursively in
    dicts, lists and tuples); anything else as is."""
    if isinstance(v, torch.Tensor):
        return v[rows] if v.ndim >= 1 and v.shape[0] == n else v
    if type(v) is dict:
        return {k: (x if k in NO_SPLIT else _take(x, rows, n)) for k, x in v.items()}
    if type(v) in (list, tuple):
        return type(v)(_take(x, rows, n) for x in v)
    return v


def _cat(outs: list, m: int) -> Any:
    """Join per-request outputs of ``m`` rows each back into the batch's row order: request ``j``'s
    row ``i`` goes to row ``i * B + j`` (``B = len(outs)``; with CFG the unconditional halves come
    first, as the pipelines concatenate them). Tuples / lists / output dataclasses field by field
    (diffusers' BaseOutput and transformers' ModelOutput are ordered dicts of their set fields)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.ndim == 0 or first.shape[0] != m:
            return first
        joined = torch.stack(outs, dim=1)  # [m, B, ...]
        return joined.reshape(m * len(outs), *first.shape[1:])
    if first is None:
        return None
    if isinstance(first, dict):
        joined = {k: _cat([o[k] for o in outs], m) for k in first.keys()}
        return type(first)(**joined) if type(first) is not dict else joined
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([o[i] for o in outs], m) for i in range(len(first)))
    return first


class _Split:
    """Replaces ``owner.<name>`` (an instance attribute shadowing the class's method): inside an
    engine batch, call the method once per request. A plain object holding the owner, not a
    closure over a bound method, so ``copy.deepcopy`` of the model gives a copy that calls its own
    method (the memo maps the owner to its copy)."""

    def __init__(self, owner: Any, name: str, routing) -> None:
        self.owner, self.name, self.routing = owner, name, routing

    def _method(self):
        return getattr(type(self.owner), self.name).__get__(self.owner)

    def __call__(self, *args, **kwargs):
        method = self._method()
        if not active() or torch.compiler.is_compiling():
            return method(*args, **kwargs)
        n = _batch(args, kwargs)
        b = getattr(_STATE, "requests", 0)
        if n is None or b <= 1 or n % b:
            return method(*args, **kwargs)  # one request (as alone already), or not a per-request batch
        m = n // b  # rows per request: 2 with classifier-free guidance (unconditional, conditional)
        outs = []
        for j in range(b):
            rows = slice(j, n, b)  # request j's rows, in the order a batch of one has them
            a = [_take(x, rows, n) for x in args]
            kw = {k: (v if k in NO_SPLIT else _take(v, rows, n)) for k, v in kwargs.items()}
            with self.routing.only(j) if self.routing is not None else contextlib.nullcontext():
                outs.append(method(*a, **kw))
        return _cat(outs, m)


def install(pipe, components: list[str], routing) -> list[str]:
    """Split the forward of each named component of ``pipe`` (routed through ``routing``) and its
    ``vae.decode`` (no routing: no slots in the VAE). Returns what was wrapped."""
    done = []
    for comp in components:
        model = getattr(pipe, comp, None)
        if isinstance(model, torch.nn.Module) and not isinstance(model.__dict__.get("forward"), _Split):
            model.forward = _Split(model, "forward", routing)
            done.append(comp)
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(type(vae), "decode") and not isinstance(vae.__dict__.get("decode"), _Split):
        vae.decode = _Split(vae, "decode", None)
        done.append("vae.decode")
    return done
