"""A bounded request queue with short-window micro-batching, independent of any web framework.

Why: a diffusion step costs about the same for one sample as for a few on a GPU, and the engine can
run samples with *different* adapters in one forward pass (per-sample adapter index). So requests
that arrive within a few milliseconds of each other are worth one ``engine.generate`` call. The
window is short (default 10 ms) because it adds directly to the latency of a lone request.

Admission control: the queue is bounded (``max_queue``); a request that finds it full is refused at
once with ``QueueFullError`` (HTTP 429) instead of waiting behind work the server cannot do in time.

One worker thread owns the engine calls:

    loop:  first = queue.get()                          # blocks while idle
           batch = [first] + whatever arrives until first + window_ms, at most max_batch
           images = generate(batch)                     # one call per window
           resolve each request's Future with its image

When a batch call raises, each of its requests is retried alone so that one bad request fails only
its own Future; the worker itself never dies of a request's error.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loradex.inference.types import GenerateRequest, QueueFullError

_STOP = object()


@dataclass
class BatcherStats:
    """Counters of a Batcher (read them with ``Batcher.stats()``)."""

    submitted: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0
    batches: int = 0
    retried_alone: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    busy_seconds: float = 0.0


class Batcher:
    """Collect requests for up to ``window_ms`` (or ``max_batch`` of them) and run them with one
    ``generate(list_of_requests) -> list_of_results`` call; ``submit`` returns a Future.

    ``generate`` is typically ``Engine.generate``. ``on_batch(size, seconds)`` (optional) is called
    after each batch, e.g. to feed a latency histogram.
    """

    def __init__(self, generate: Callable[[Sequence[GenerateRequest]], Sequence[Any]], *, max_queue: int = 64,
                 max_batch: int = 8, window_ms: float = 10.0,
                 on_batch: Callable[[int, float], None] | None = None, name: str = "loradex-batcher") -> None:
        if max_queue < 1 or max_batch < 1 or window_ms < 0:
            raise ValueError("max_queue and max_batch must be >= 1, window_ms >= 0")
        self._generate = generate
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self._on_batch = on_batch
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._stats = BatcherStats()
        self._in_flight = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- producer side -------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> Future:
        """Queue ``request``; the Future resolves to its result (or its exception). Raises
        QueueFullError at once when ``max_queue`` requests are already waiting."""
        fut: Future = Future()
        if self._closed:
            raise QueueFullError("the server is shutting down")
        try:
            self._q.put_nowait((request, fut))
        except queue.Full:
            with self._lock:
                self._stats.rejected += 1
            raise QueueFullError(f"queue full ({self.max_queue} requests waiting); retry later") from None
        with self._lock:
            self._stats.submitted += 1
        return fut

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not yet taken into a batch)."""
        return self._q.qsize()

    @property
    def in_flight(self) -> int:
        """Requests in the batch being generated now."""
        return self._in_flight

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False after ``close``)."""
        return self._thread.is_alive()

    def stats(self) -> dict:
        with self._lock:
            s = self._stats
            return {"submitted": s.submitted, "rejected": s.rejected, "completed": s.completed,
                    "failed": s.failed, "batches": s.batches, "retried_alone": s.retried_alone,
                    "batch_sizes": dict(s.batch_sizes), "busy_seconds": s.busy_seconds,
                    "queue_depth": self.depth, "in_flight": self._in_flight,
                    "max_queue": self.max_queue, "max_batch": self.max_batch, "window_ms": self.window_s * 1000}

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop taking requests, finish the queued ones, stop the worker."""
        if self._closed:
            return
        self._closed = True
        try:  # a full queue frees a place as soon as the worker takes the next batch
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            return  # the worker is stuck in a long batch; it is a daemon thread
        self._thread.join(timeout)

    # ---- worker side ---------------------------------------------------------------------------
    def _collect(self, first) -> tuple[list, bool]:
        """``first`` plus what arrives within the window; (batch, stop_seen)."""
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                break
            batch, stop = self._collect(first)
            # a caller may have cancelled its Future while it waited: skip those
            batch = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            if batch:
                self._process(batch)
        # drain what is left after a stop (close() finishes the queued requests)
        rest = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                rest.append(item)
        for i in range(0, len(rest), self.max_batch):
            self._process(rest[i:i + self.max_batch])

    def _process(self, batch: list) -> None:
        self._in_flight = len(batch)
        t0 = time.perf_counter()
        try:
            results = self._call([r for r, _ in batch])
            outcomes: list = list(zip(batch, results, [None] * len(batch)))
        except BaseException as e:  # the worker must survive any request's failure
            if len(batch) == 1:
                outcomes = [(batch[0], None, e)]
            else:  # find the culprit(s): run each alone
                outcomes = []
                for item in batch:
                    try:
                        outcomes.append((item, self._call([item[0]])[0], None))
                    except BaseException as e1:
                        outcomes.append((item, None, e1))
                with self._lock:
                    self._stats.retried_alone += len(batch)
        dt = time.perf_counter() - t0
        ok = 0
        for (_, fut), result, err in outcomes:
            if err is None:
                fut.set_result(result)
                ok += 1
            else:
                fut.set_exception(err if isinstance(err, Exception) else RuntimeError(repr(err)))
        with self._lock:
            s = self._stats
            s.batches += 1
            s.completed += ok
            s.failed += len(batch) - ok
            s.batch_sizes[len(batch)] = s.batch_sizes.get(len(batch), 0) + 1
            s.busy_seconds += dt
        self._in_flight = 0
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), dt)
            except Exception:  # a metrics hook must not stop the worker
                pass

    def _call(self, requests: list[GenerateRequest]) -> list:
        results = list(self._generate(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"generate returned {len(results)} results for {len(requests)} requests")
        return results
