"""A bounded, cost-aware request scheduler with short-window micro-batching, independent of any web
framework.

Why micro-batching: a diffusion step costs about the same for one sample as for a few on a GPU, and
the engine runs samples with *different* adapters in one pipeline call. So requests that arrive
within a few milliseconds of each other are worth one ``generate`` call. The window is short
(default 10 ms) because it adds directly to the latency of a lone request.

Why lanes: one request may cost thousands of times another (cost.py). Served first-come first-served,
a large request holds the engine for its whole run and every small request behind it waits that
long (issue 12: one 512 px request took the server over). So each request carries its estimated
cost, and requests above ``large_seconds`` go to a second lane:

* small lane: first come first served, micro-batched (up to ``max_batch`` per call);
* large lane: one large request runs at a time, the next chosen by shortest estimated cost first,
  aged by its waiting time (``cost - aging * waited``) so a long one is not passed over forever.

The two lanes share the engine by weighted fair queuing on the engine time they actually use: the
large lane's weight is ``large_share`` (default 0.25), the small lane's the rest. A large request
yields between two denoising steps (the engine's run control: its state is taken out and the
engine lock released, engine.py) whenever small requests wait and the large lane has had its share;
it resumes where it stopped once they are served. So while small requests keep coming, large
requests still progress at ``large_share`` of the engine, and a small request waits at most one
large step plus the small work ahead of it. Small batches are not interrupted (they are small).

Deadlines and cancellation: each request may carry a deadline (monotonic seconds). A waiting
request past its deadline fails with DeadlineError without running; ``abandon`` (a client that
disconnected, a front end's timeout) takes a waiting request out of the queue at once, and a
running batch stops between two steps as soon as none of its requests is still wanted.

Admission control: the queue is bounded (``max_queue`` waiting requests); a request that finds it
full is refused at once with QueueFullError (HTTP 429) instead of waiting behind work the server
cannot do in time.

Threads: one dispatcher thread decides what runs next; each batch runs in a thread of its own (so a
paused large request can wait inside its pipeline call while small batches run), and exactly one of
them holds the engine ("the turn") at a time. When a batch call raises, each of its requests is
retried alone so that one bad request fails only its own Future; no thread dies of a request's error.

``generate(requests)`` or ``generate(requests, control=...)`` (the engine's signature; control is
passed when the callable takes it) returns one result per request, None for requests the control
stopped.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loradex.inference.types import DeadlineError, GenerateRequest, QueueFullError, RequestCancelled

log = logging.getLogger(__name__)

SMALL, LARGE = "small", "large"


class Ticket(Future):
    """A queued request: a Future of its result, with its estimated ``cost`` (seconds, or None),
    ``deadline`` (``time.monotonic()`` seconds, or None) and ``lane``. ``reason``: the error it was
    given up with (None while wanted)."""

    def __init__(self, request: GenerateRequest, cost: float | None, deadline: float | None, lane: str) -> None:
        super().__init__()
        self.request, self.cost, self.deadline, self.lane = request, cost, deadline, lane
        self.arrival = time.monotonic()
        self.reason: Exception | None = None

    def expired(self, now: float | None = None) -> bool:
        """True once the request's deadline (monotonic seconds) has passed."""
        return self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline

    @property
    def live(self) -> bool:
        """Still wanted: not given up, not past its deadline, not resolved."""
        return self.reason is None and not self.expired() and not self.done()


@dataclass
class BatcherStats:
    """Counters of a Batcher (read them with ``Batcher.stats()``)."""

    submitted: int = 0
    rejected: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    batches: int = 0
    retried_alone: int = 0
    preemptions: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    busy_seconds: float = 0.0
    lane_seconds: dict[str, float] = field(default_factory=lambda: {SMALL: 0.0, LARGE: 0.0})


class _Job:
    """A batch of tickets running (or paused) in its own thread."""

    def __init__(self, tickets: list[Ticket], lane: str) -> None:
        self.tickets, self.lane = tickets, lane
        self.turn_start = 0.0
        self.used = 0.0  # engine seconds used so far
        self.paused = False
        self.cost = sum(t.cost or 0.0 for t in tickets)


class _Control:
    """The engine's run control for one ``generate`` call of a job (engine.py): which requests are
    still wanted, and the step hook where a large job yields."""

    def __init__(self, batcher: Batcher, job: _Job, tickets: list[Ticket]) -> None:
        self.batcher, self.job, self.tickets = batcher, job, tickets

    def wanted(self, idx: Sequence[int]) -> bool:
        return any(self.tickets[i].live for i in idx)

    def step(self, idx: Sequence[int], i: int, n: int, suspend) -> None:
        if not self.wanted(idx):
            raise RequestCancelled("every request of the batch was given up")
        if i + 1 < n:  # no point in yielding before the decode: the request is nearly done
            self.batcher._maybe_yield(self.job, suspend)
            if not self.wanted(idx):  # given up while it waited: stop before another step
                raise RequestCancelled("every request of the batch was given up")


class Batcher:
    """Queue requests and run them with ``generate(list_of_requests) -> list_of_results`` (see the
    module docstring); ``submit`` returns a Ticket (a Future).

    ``generate`` is typically ``Engine.generate``. ``on_batch(size, seconds)`` (optional) is called
    after each batch, e.g. to feed a latency histogram. ``large_seconds``: requests whose estimated
    cost is above it go to the large lane (None: one lane, first come first served);
    ``large_share``: the large lane's share of the engine while small requests wait; ``aging``:
    seconds of estimated cost forgiven per second waited when the next large request is chosen.
    """

    def __init__(self, generate: Callable[..., Sequence[Any]], *, max_queue: int = 64, max_batch: int = 8,
                 window_ms: float = 10.0, on_batch: Callable[[int, float], None] | None = None,
                 name: str = "loradex-batcher", large_seconds: float | None = None, large_share: float = 0.25,
                 aging: float = 1.0) -> None:
        if max_queue < 1 or max_batch < 1 or window_ms < 0:
            raise ValueError("max_queue and max_batch must be >= 1, window_ms >= 0")
        if not 0.0 < large_share < 1.0:
            raise ValueError("large_share must be in (0, 1)")
        self._generate = generate
        try:
            params = inspect.signature(generate).parameters
            self._takes_control = "control" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            self._takes_control = False
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.large_seconds = large_seconds
        self.share = {SMALL: 1.0 - large_share, LARGE: large_share}
        self.aging = aging
        self._on_batch = on_batch
        self._name = name
        self._cv = threading.Condition()
        self._small: deque[Ticket] = deque()
        self._large: list[Ticket] = []
        self._jobs: list[_Job] = []
        self._turn: _Job | None = None
        self._vtime = {SMALL: 0.0, LARGE: 0.0}
        self._stats = BatcherStats()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name=name, daemon=True)
        self._thread.start()

    # ---- producer side -------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, *, cost: float | None = None, deadline: float | None = None) -> Ticket:
        """Queue ``request`` (estimated ``cost`` seconds, ``deadline`` in ``time.monotonic()``
        seconds); the Ticket resolves to its result (or its exception). Raises QueueFullError at
        once when ``max_queue`` requests are already waiting."""
        lane = LARGE if (self.large_seconds is not None and cost is not None and cost > self.large_seconds) else SMALL
        ticket = Ticket(request, cost, deadline, lane)
        with self._cv:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if len(self._small) + len(self._large) >= self.max_queue:
                self._stats.rejected += 1
                raise QueueFullError(f"queue full ({self.max_queue} requests waiting); retry later")
            if not self._has_work(lane):  # an idle lane does not bank credit: it joins at the others' pace
                busy = [self._vtime[x] for x in (SMALL, LARGE) if x != lane and self._has_work(x)]
                if busy:
                    self._vtime[lane] = max(self._vtime[lane], min(busy))
            (self._small.append if lane == SMALL else self._large.append)(ticket)
            self._stats.submitted += 1
            self._cv.notify_all()
        return ticket

    def abandon(self, ticket: Ticket, error: Exception | None = None) -> None:
        """Give ``ticket`` up (``error``: RequestCancelled by default, DeadlineError for a timeout):
        out of the queue at once if it waits, its batch stopped at the next step if it runs and no
        other request of the batch is wanted. Its Future fails with ``error``."""
        error = error or RequestCancelled("the request was cancelled")
        with self._cv:
            if ticket.reason is not None or ticket.done():
                return
            ticket.reason = error
            for q in (self._small, self._large):
                if ticket in q:
                    q.remove(ticket)
            self._count_given_up(error)
            self._cv.notify_all()
        self._fail(ticket, error)

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not yet in a batch)."""
        with self._cv:
            return len(self._small) + len(self._large)

    @property
    def in_flight(self) -> int:
        """Requests in batches that have started (running or paused)."""
        with self._cv:
            return sum(len(j.tickets) for j in self._jobs)

    @property
    def alive(self) -> bool:
        """Whether the dispatcher thread runs (False after ``close``)."""
        return self._thread.is_alive()

    def backlog(self) -> float:
        """Estimated seconds of work queued or started and not yet done (requests without a cost
        count as 0)."""
        with self._cv:
            waiting = sum(t.cost or 0.0 for t in (*self._small, *self._large))
            running = sum(max(0.0, j.cost - j.used - (time.monotonic() - j.turn_start if j is self._turn else 0.0))
                          for j in self._jobs)
            return waiting + running

    def stats(self) -> dict:
        """Counters since start (submitted, rejected, completed, failed, cancelled, expired, batches,
        retried alone, preemptions...) and the current queue depths, for ``/metrics`` and ``/healthz``."""
        with self._cv:
            s = self._stats
            return {"submitted": s.submitted, "rejected": s.rejected, "completed": s.completed,
                    "failed": s.failed, "cancelled": s.cancelled, "expired": s.expired, "batches": s.batches,
                    "retried_alone": s.retried_alone, "preemptions": s.preemptions,
                    "batch_sizes": dict(s.batch_sizes), "busy_seconds": s.busy_seconds,
                    "lane_seconds": dict(s.lane_seconds),
                    "queue_depth": len(self._small) + len(self._large),
                    "queue_small": len(self._small), "queue_large": len(self._large),
                    "in_flight": sum(len(j.tickets) for j in self._jobs),
                    "running_large": sum(j.lane == LARGE for j in self._jobs),
                    "max_queue": self.max_queue, "max_batch": self.max_batch, "window_ms": self.window_s * 1000,
                    "large_seconds": self.large_seconds, "large_share": self.share[LARGE]}

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop taking requests, finish the queued ones, stop the dispatcher."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # ---- bookkeeping (under self._cv) ---------------------------------------------------------
    def _has_work(self, lane: str) -> bool:
        if lane == SMALL:
            return bool(self._small) or any(j.lane == SMALL for j in self._jobs)
        return bool(self._large) or any(j.lane == LARGE for j in self._jobs)

    def _count_given_up(self, error: Exception) -> None:
        if isinstance(error, DeadlineError):
            self._stats.expired += 1
        else:
            self._stats.cancelled += 1

    @staticmethod
    def _fail(ticket: Ticket, error: BaseException) -> None:
        if not ticket.done():
            try:
                ticket.set_exception(error if isinstance(error, Exception) else RuntimeError(repr(error)))
            except Exception:  # resolved meanwhile by another thread  # pragma: no cover
                pass

    def _expire(self, now: float) -> list[Ticket]:
        """Take waiting tickets past their deadline out of the queue; return them (to fail)."""
        gone: list[Ticket] = []
        for q in (self._small, self._large):
            dead = [t for t in q if t.expired(now)]
            for t in dead:
                q.remove(t)
                t.reason = DeadlineError(f"the request's deadline passed after {now - t.arrival:.1f} s in the queue")
                self._count_given_up(t.reason)
                gone.append(t)
        return gone

    def _next_wakeup(self, now: float) -> float | None:
        ds = [t.deadline for q in (self._small, self._large) for t in q if t.deadline is not None]
        return max(0.0, min(ds) - now) if ds else None

    def _runnable(self) -> list[str]:
        lanes = []
        if self._small:
            lanes.append(SMALL)
        if any(j.lane == LARGE and j.paused for j in self._jobs) or (
                self._large and not any(j.lane == LARGE for j in self._jobs)):
            lanes.append(LARGE)
        return lanes

    def _pick(self) -> str | None:
        lanes = self._runnable()
        if not lanes:
            return None
        return min(lanes, key=lambda x: (self._vtime[x], x != SMALL))

    def _charge(self, job: _Job, now: float) -> None:
        used = max(0.0, now - job.turn_start)
        job.used += used
        job.turn_start = now
        self._vtime[job.lane] += used / self.share[job.lane]
        self._stats.lane_seconds[job.lane] += used

    def _maybe_yield(self, job: _Job, suspend) -> None:
        """At a step end of ``job`` (it holds the turn): a large job yields when small requests
        wait and the large lane is ahead of its share."""
        with self._cv:
            if job.lane != LARGE or not self._small:
                return
            now = time.monotonic()
            ahead = self._vtime[LARGE] + (now - job.turn_start) / self.share[LARGE]
            if ahead <= self._vtime[SMALL]:
                return
            self._charge(job, now)
            job.paused = True
            self._stats.preemptions += 1
        with suspend():  # the engine state of this job is out, the engine lock released
            with self._cv:
                self._turn = None
                self._cv.notify_all()
                while self._turn is not job:
                    self._cv.wait()
                job.paused = False
                job.turn_start = time.monotonic()

    # ---- dispatcher ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._cv:
                job = None
                while job is None:
                    now = time.monotonic()
                    gone = self._expire(now)
                    if gone:
                        self._cv.release()
                        try:
                            for t in gone:
                                self._fail(t, t.reason)
                        finally:
                            self._cv.acquire()
                        continue
                    if self._turn is None:
                        lane = self._pick()
                        if lane is not None:
                            # a paused job nobody waits for any more goes first: it only stops
                            dead = [j for j in self._jobs if j.paused and not any(t.live for t in j.tickets)]
                            if dead:
                                self._turn = dead[0]
                                self._cv.notify_all()
                                continue
                        if lane == SMALL:
                            job = self._take_small()
                            if job is None:
                                continue
                        elif lane == LARGE:
                            paused = [j for j in self._jobs if j.lane == LARGE and j.paused]
                            if paused:
                                self._turn = paused[0]
                                self._cv.notify_all()
                                continue
                            job = self._take_large(now)
                            if job is None:
                                continue
                        elif self._closed and not self._jobs:
                            return
                    if job is None:
                        self._cv.wait(self._next_wakeup(now))
                self._jobs.append(job)
                self._turn = job
                job.turn_start = time.monotonic()
            threading.Thread(target=self._job_main, args=(job,), name=f"{self._name}-{job.lane}", daemon=True).start()

    def _take_small(self) -> _Job | None:
        """The small lane's next batch: wait for company until the window after the first waiting
        request's arrival ends (no wait when it already waited that long), then take up to
        ``max_batch`` wanted requests."""
        head = self._small[0]
        end = head.arrival + self.window_s
        while len(self._small) < self.max_batch and not self._closed:
            left = end - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)
            if not self._small:
                return None
        tickets: list[Ticket] = []
        while self._small and len(tickets) < self.max_batch:
            t = self._small.popleft()
            if t.live and t.set_running_or_notify_cancel():
                tickets.append(t)
        return _Job(tickets, SMALL) if tickets else None

    def _take_large(self, now: float) -> _Job | None:
        """The large request with the smallest aged cost."""
        while self._large:
            best = min(self._large, key=lambda t: (t.cost or 0.0) - self.aging * (now - t.arrival))
            self._large.remove(best)
            if best.live and best.set_running_or_notify_cancel():
                return _Job([best], LARGE)
        return None

    # ---- a job's thread ---------------------------------------------------------------------------
    def _job_main(self, job: _Job) -> None:
        t0 = time.perf_counter()
        try:
            outcomes = self._process(job)
        except BaseException as e:  # pragma: no cover - _process catches per request
            outcomes = [(t, None, e) for t in job.tickets]
        with self._cv:
            self._charge(job, time.monotonic())
            self._jobs.remove(job)
            if self._turn is job:
                self._turn = None
            s = self._stats
            s.batches += 1
            s.batch_sizes[len(job.tickets)] = s.batch_sizes.get(len(job.tickets), 0) + 1
            s.busy_seconds += job.used
            for t, _result, err in outcomes:
                if err is None and not t.done():
                    s.completed += 1
                elif err is not None and t.reason is None:
                    if isinstance(err, (RequestCancelled, DeadlineError)):
                        self._count_given_up(err)
                    else:
                        s.failed += 1
            self._cv.notify_all()
        for t, result, err in outcomes:
            if t.done():
                continue
            if err is None:
                t.set_result(result)
            else:
                self._fail(t, err)
        if self._on_batch is not None:
            try:
                self._on_batch(len(job.tickets), time.perf_counter() - t0)
            except Exception:  # a metrics hook must not stop the scheduler
                log.debug("on_batch hook failed", exc_info=True)

    def _process(self, job: _Job) -> list[tuple[Ticket, Any, BaseException | None]]:
        tickets = job.tickets
        try:
            results = self._call(job, tickets)
            return [(t, r, None if r is not None else self._why(t)) for t, r in zip(tickets, results)]
        except BaseException as e:  # the scheduler must survive any request's failure
            if len(tickets) == 1:
                return [(tickets[0], None, e)]
            outcomes = []  # find the culprit(s): run each alone
            with self._cv:
                self._stats.retried_alone += len(tickets)
            for t in tickets:
                if not t.live:
                    outcomes.append((t, None, self._why(t)))
                    continue
                try:
                    r = self._call(job, [t])[0]
                    outcomes.append((t, r, None if r is not None else self._why(t)))
                except BaseException as e1:
                    outcomes.append((t, None, e1))
            return outcomes

    @staticmethod
    def _why(ticket: Ticket) -> Exception:
        """The error of a request that got no result: why it was given up."""
        if ticket.reason is not None:
            return ticket.reason
        if ticket.expired():
            return DeadlineError("the request's deadline passed while it ran; its work was stopped")
        return RequestCancelled("the request was stopped")

    def _call(self, job: _Job, tickets: list[Ticket]) -> list:
        requests = [t.request for t in tickets]
        if self._takes_control:
            results = list(self._generate(requests, control=_Control(self, job, tickets)))
        else:
            results = list(self._generate(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"generate returned {len(results)} results for {len(requests)} requests")
        return results
