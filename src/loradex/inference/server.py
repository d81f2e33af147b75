"""The HTTP front end of the inference engine: a Starlette app served by uvicorn (extra ``serve``).

Endpoints (all answers JSON unless said otherwise; errors are ``{"error": "..."}``):

    POST /v1/generate            {"prompt": "...", "adapters": [{"ref": "alice", "weight": 0.8}] | ["alice:0.8"],
                                  "steps", "width", "height", "seed", "negative_prompt", "guidance_scale",
                                  "timeout": seconds, "response": "png" | "json"}
                                 -> image/png, or JSON with base64 PNG
    GET  /v1/adapters            the engine's adapters (cached / in slots)
    POST /v1/adapters/prefetch   {"refs": [...]} -> warm them in the engine's CPU cache
    GET  /healthz                readiness: ok / busy (200), overloaded or worker stopped (503)
    GET  /metrics                Prometheus text exposition (format 0.0.4)

Status codes: 400 bad JSON / wrong types / out of range (checked before queueing), 404 unknown
adapter (resolved before queueing, so it is immediate), 408 header or body not received in time,
413 body too large or request too costly (its estimated compute, cost.py, is above
``max_request_seconds``; the answer names the limit), 429 queue full, 504 the request's deadline
passed (its work is stopped between two steps), 499 (logged only) the client went away first, 500
only for a server bug, never for user input.

Requests go through a ``Batcher`` (batcher.py: bounded queue, a small lane micro-batched and a large
lane that yields to it between steps) to ``engine.generate``; the engine runs mixed-adapter batches
in one pipeline call. Each request has a deadline (``request_timeout``, or its own shorter
``timeout``); a client that disconnects cancels its request (out of the queue, or its batch stopped
at the next step when no other request of the batch is waiting for it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from loradex.errors import LoradexError
from loradex.inference.batcher import Batcher
from loradex.inference.types import (
    LIMITS,
    BadRequestError,
    CostLimitError,
    DeadlineError,
    GenerateRequest,
    QueueFullError,
    RequestCancelled,
    UnknownAdapterError,
)

log = logging.getLogger(__name__)

#: the largest request body accepted (a prompt is <= 2000 chars; 64 KiB leaves room for adapter lists)
MAX_BODY_BYTES = 64 * 1024
#: latency histogram buckets in seconds (tiny CPU models answer in ~0.1 s, real ones in seconds)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: seconds a client may take to send a request's header block / its body (slowloris; httpguard.py)
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
#: seconds an idle kept-alive connection stays open (uvicorn's own timeout)
KEEP_ALIVE_TIMEOUT = 5
#: the default deadline of a request is at least this, and at least this many times the cost limit
MIN_REQUEST_TIMEOUT = 60.0
TIMEOUT_PER_LIMIT = 4.0
#: requests estimated above this many times the default request's cost go to the large lane
LARGE_PER_DEFAULT = 4.0
#: the HTTP status of a request whose client went away (nginx's "client closed request"; never read)
CLIENT_CLOSED = 499

_REQUEST_FIELDS = {f.name for f in fields(GenerateRequest)}
_BODY_FIELDS = _REQUEST_FIELDS | {"response", "timeout"}


# ---- request parsing (shared with ray_serve.py) -----------------------------------------------------
def parse_adapter(item: Any) -> tuple[str, float]:
    """One adapter of a request: ``{"ref": R, "weight": W}``, ``[R, W]``, ``"R:W"`` or ``"R"``.

    In ``"R:W"`` the weight is what follows the last colon when it is a plain decimal number, by the
    registry's rule (``loradex.registry.refs.split_weight``: ``sha256:HEX`` alone is always a REF);
    otherwise the whole string is the REF (``NAME:TAG`` references contain a colon too)."""
    if isinstance(item, dict):
        extra = set(item) - {"ref", "weight"}
        if extra:
            raise BadRequestError(f"unknown adapter field(s): {', '.join(sorted(extra))}")
        ref, weight = item.get("ref"), item.get("weight", 1.0)
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        ref, weight = item
    elif isinstance(item, str):
        from loradex.registry.refs import split_weight

        ref, weight, _ = split_weight(item)
    else:
        raise BadRequestError("each adapter must be {\"ref\": ..., \"weight\": ...} or \"ref:weight\"")
    if not isinstance(ref, str) or not ref:
        raise BadRequestError("adapter ref must be a non-empty string")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise BadRequestError(f"adapter weight of {ref!r} must be a finite number")
    return ref, float(weight)


def parse_timeout(body: Any, default: float | None, maximum: float | None = None) -> float | None:
    """The request's deadline in seconds from now: its ``timeout`` field (a positive number, at most
    ``maximum``), else ``default``."""
    value = body.get("timeout") if isinstance(body, dict) else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadRequestError("timeout must be a positive number of seconds")
    if maximum is not None and value > maximum:
        raise BadRequestError(f"timeout must be at most {maximum:g} s on this server, got {value:g}")
    return float(value)


def parse_generate(body: Any, defaults: dict | None = None) -> tuple[GenerateRequest, str]:
    """A JSON body -> (validated GenerateRequest, response kind "png" | "json").

    ``defaults`` override GenerateRequest's defaults (e.g. a tiny model's 64x64, 2 steps). Unknown
    fields are refused (a typo such as "step" would otherwise silently fall back to a default).
    ``timeout`` is accepted here and read by ``parse_timeout``."""
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    unknown = set(body) - _BODY_FIELDS
    if unknown:
        raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "prompt" not in body:
        raise BadRequestError("prompt is required")
    kind = body.get("response", "png")
    if kind not in ("png", "json"):
        raise BadRequestError('response must be "png" or "json"')
    adapters = body.get("adapters", [])
    if not isinstance(adapters, list):
        raise BadRequestError("adapters must be a list")
    if len(adapters) > LIMITS["adapters"]:
        raise BadRequestError(f"at most {LIMITS['adapters']} adapters per request")
    args = {k: v for k, v in (defaults or {}).items() if k in _REQUEST_FIELDS}
    args.update({k: v for k, v in body.items() if k in _REQUEST_FIELDS and k != "adapters"})
    # JSON has one number type: 30.0 for steps is fine, 30.5 is not
    for k in ("steps", "width", "height", "seed"):
        v = args.get(k)
        if isinstance(v, float) and v.is_integer():
            args[k] = int(v)
    req = GenerateRequest(**args, adapters=[parse_adapter(a) for a in adapters])
    return req.validate(), kind


def png_bytes(image, parameters: str | None = None) -> bytes:
    """A PIL image as PNG bytes (lossless: clients can compare pixels), with ``parameters`` (A1111's
    generation parameters, ``loradex.pnginfo``) as its ``parameters`` text chunk when given."""
    from loradex.pnginfo import png_info

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters))
    return buf.getvalue()


def encode_png(engine, image, request: GenerateRequest, model: dict) -> tuple[bytes, str | None]:
    """``(PNG bytes, parameters text)`` of an answer: the PNG carries A1111's infotext of ``request``
    (``loradex.pnginfo.request_infotext``), as ``loradex generate`` writes it. ``model`` memoizes the
    base's ``Model hash`` / ``Model`` (hashing a checkpoint once per server). An infotext that
    cannot be made (an engine without a pipeline...) is logged and left out: the image is the answer."""
    from loradex import pnginfo

    try:
        if not model:
            pipe = getattr(engine, "pipe", None)
            model.update(pnginfo.model_fields(getattr(pipe, "name_or_path", None)
                                              or getattr(getattr(engine, "arch", None), "name", None)))
        text = pnginfo.request_infotext(engine, request, model=model)
    except Exception as e:  # noqa: BLE001 - never fail a finished image over its caption
        log.warning("generate: no generation parameters for the PNG (%s: %s)", type(e).__name__, e)
        text = None
    return png_bytes(image, text), text


def error_status(e: BaseException) -> int:
    """HTTP status of an error: the contract of inference/types.py, other LoradexErrors (e.g. an
    adapter file that does not fit the base model) are the request's fault (400), anything else is
    a server bug (500)."""
    if isinstance(e, UnknownAdapterError):
        return 404
    if isinstance(e, QueueFullError):
        return 429
    if isinstance(e, CostLimitError):
        return 413
    if isinstance(e, DeadlineError):
        return 504
    if isinstance(e, RequestCancelled):
        return CLIENT_CLOSED
    if isinstance(e, LoradexError):
        return 400
    return 500


# ---- metrics ----------------------------------------------------------------------------------------
def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Histogram:
    """A cumulative-bucket histogram as Prometheus defines it (``_bucket{le=...}``, ``_sum``, ``_count``)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        """Count one value in its bucket (Prometheus histogram, cumulative on output)."""
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The histogram in Prometheus text format: cumulative ``_bucket``, ``_sum``, ``_count``."""
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{_num(b)}"}} {acc}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """Request counters by route and status, latency and batch-size histograms, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.images = 0
        self.started = time.time()

    def count(self, method: str, route: str, status: int) -> None:
        """Count one HTTP answer by method, route and status."""
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_generate(self, seconds: float) -> None:
        """Record one image's end-to-end latency."""
        with self._lock:
            self.latency.observe(seconds)
            self.images += 1

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one engine batch: its size and how long it ran."""
        with self._lock:
            self.batch_size.observe(size)
            self.batch_latency.observe(seconds)

    def render(self, batcher: Batcher, engine_stats: dict, limits: dict | None = None) -> str:
        """The text exposition format 0.0.4: ``# HELP``/``# TYPE`` then samples, one family each."""
        b = batcher.stats()
        backlog = batcher.backlog()
        L: list[str] = []

        def family(name: str, typ: str, help_: str, samples: list[str]) -> None:
            L.extend([f"# HELP {name} {help_}", f"# TYPE {name} {typ}", *samples])

        with self._lock:
            family("loradex_http_requests_total", "counter", "HTTP requests by method, route and status code.",
                   [f'loradex_http_requests_total{{method="{_esc(m)}",route="{_esc(r)}",code="{c}"}} {n}'
                    for (m, r, c), n in sorted(self.requests.items())])
            family("loradex_images_total", "counter", "Images generated and returned.",
                   [f"loradex_images_total {self.images}"])
            family("loradex_generate_latency_seconds", "histogram",
                   "Time from accepting a generate request to its image (queue + batch).",
                   self.latency.lines("loradex_generate_latency_seconds"))
            family("loradex_batch_latency_seconds", "histogram", "Duration of one engine.generate call.",
                   self.batch_latency.lines("loradex_batch_latency_seconds"))
            family("loradex_batch_size", "histogram", "Requests per engine.generate call.",
                   self.batch_size.lines("loradex_batch_size"))
            uptime = time.time() - self.started
        family("loradex_queue_depth", "gauge", "Requests waiting in the queue.",
               [f"loradex_queue_depth {b['queue_depth']}"])
        family("loradex_queue_capacity", "gauge", "Bound of the queue (429 beyond).",
               [f"loradex_queue_capacity {b['max_queue']}"])
        family("loradex_in_flight", "gauge", "Requests in the batch being generated.",
               [f"loradex_in_flight {b['in_flight']}"])
        family("loradex_queue_rejected_total", "counter", "Requests refused because the queue was full.",
               [f"loradex_queue_rejected_total {b['rejected']}"])
        family("loradex_generate_failed_total", "counter", "Queued requests that ended in an error.",
               [f"loradex_generate_failed_total {b['failed']}"])
        family("loradex_generate_cancelled_total", "counter",
               "Requests given up because their client went away (their work stopped between steps).",
               [f"loradex_generate_cancelled_total {b['cancelled']}"])
        family("loradex_generate_expired_total", "counter", "Requests stopped because their deadline passed.",
               [f"loradex_generate_expired_total {b['expired']}"])
        family("loradex_preemptions_total", "counter", "Times a large request yielded to small ones between steps.",
               [f"loradex_preemptions_total {b['preemptions']}"])
        family("loradex_lane_seconds_total", "counter", "Engine seconds used by each scheduling lane.",
               [f'loradex_lane_seconds_total{{lane="{k}"}} {_num(v)}' for k, v in sorted(b["lane_seconds"].items())])
        family("loradex_backlog_seconds", "gauge", "Estimated seconds of queued and started work.",
               [f"loradex_backlog_seconds {_num(backlog)}"])
        for key, value in sorted((limits or {}).items()):
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = f"loradex_{key}"
                family(name, "gauge", f"Server setting {key}.", [f"{name} {_num(value)}"])
        family("loradex_uptime_seconds", "gauge", "Seconds since the server started.",
               [f"loradex_uptime_seconds {_num(uptime)}"])
        for key, value in sorted(_flatten(engine_stats).items()):
            name = "loradex_engine_" + "".join(ch if ch.isalnum() else "_" for ch in key).strip("_").lower()
            family(name, "gauge", f"Engine statistic {_esc(key)}.", [f"{name} {_num(value)}"])
        return "\n".join(L) + "\n"


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested stats dict, keys joined with '_' (booleans as 0/1)."""
    out: dict[str, float] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        elif isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
    return out


# ---- the app ----------------------------------------------------------------------------------------
def create_app(engine, *, max_queue: int = 64, max_batch: int = 8, window_ms: float = 10.0,
               max_body_bytes: int = MAX_BODY_BYTES, defaults: dict | None = None,
               max_request_seconds: float | None = None, request_timeout: float | None = None,
               large_seconds: float | None = None, large_share: float = 0.25,
               header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT):
    """A Starlette app serving ``engine`` (a ``loradex.inference.Engine`` or anything with its
    ``generate / resolve / prefetch / list_adapters / stats`` methods; with ``cost_model`` too, the
    requests are costed).

    ``max_queue``: requests waiting beyond the batches in progress (more -> 429); ``max_batch`` and
    ``window_ms``: the micro-batching window; ``defaults``: request defaults (steps, width, height,
    guidance_scale...) for fields a client leaves out.

    Cost and time (cost.py, batcher.py): ``max_request_seconds`` bounds one request's estimated
    compute (413 beyond; default ``cost.DEFAULT_MAX_REQUEST_SECONDS``, or twice the default
    request's cost when that is more; ``math.inf``: no limit); ``request_timeout``: the deadline of a
    request, the most a client's own ``timeout`` may ask (default: 60 s or 4x the limit, the
    larger); ``large_seconds``: requests above it run in the large lane (default 4x the default
    request's cost), which gets ``large_share`` of the engine while small requests wait.
    ``header_timeout`` / ``body_timeout``: seconds a client may take to send the header block
    (enforced by the uvicorn runners below, httpguard.py) and the body (408 beyond).

    ``app.state.batcher`` / ``app.state.metrics`` / ``app.state.cost`` / ``app.state.limits`` are
    exposed for embedding; the batcher is closed at the app's shutdown."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LoradexError("the HTTP server needs the 'serve' extra: pip install 'loradex[serve]'") from e

    cost = engine.cost_model(defaults) if hasattr(engine, "cost_model") else None
    if cost is not None:
        default_req = GenerateRequest("x", **{k: v for k, v in (defaults or {}).items()
                                              if k in _REQUEST_FIELDS - {"prompt", "adapters"}})
        default_cost = cost.estimate(default_req)
        if max_request_seconds is None:
            max_request_seconds = cost.default_limit(defaults)
        if large_seconds is None:
            large_seconds = LARGE_PER_DEFAULT * default_cost
    limit = None if max_request_seconds is None or math.isinf(max_request_seconds) else float(max_request_seconds)
    if request_timeout is None:
        request_timeout = max(MIN_REQUEST_TIMEOUT, TIMEOUT_PER_LIMIT * (limit or 0.0))
    limits = {"max_request_seconds": limit, "request_timeout_seconds": request_timeout,
              "large_request_seconds": large_seconds, "large_share": large_share,
              "header_timeout_seconds": header_timeout, "body_timeout_seconds": body_timeout}
    if cost is not None:
        log.info("cost limit %.1f s per request, timeout %.0f s, large above %.2f s (%s)",
                 limit or math.inf, request_timeout, large_seconds or math.inf, cost.describe())

    metrics = Metrics()
    batcher = Batcher(engine.generate, max_queue=max_queue, max_batch=max_batch, window_ms=window_ms,
                      on_batch=metrics.observe_batch, large_seconds=large_seconds, large_share=large_share)

    class _TooLarge(Exception):
        pass

    class _SlowBody(Exception):
        pass

    async def read_json(request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _TooLarge()
        chunks, size = [], 0
        try:
            async with asyncio.timeout(body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_body_bytes:
                        raise _TooLarge()
                    chunks.append(chunk)
        except TimeoutError:
            raise _SlowBody() from None
        raw = b"".join(chunks)
        if not raw:
            raise BadRequestError("empty body: send a JSON object")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequestError(f"invalid JSON: {e}") from None
        except RecursionError:
            raise BadRequestError("invalid JSON: nested too deeply") from None

    def error(e: BaseException, status: int | None = None) -> JSONResponse:
        status = status or error_status(e)
        msg = str(e) if status != 500 else f"internal error ({type(e).__name__})"
        return JSONResponse({"error": msg}, status_code=status)

    def endpoint(route: str):
        """Wrap a handler: map errors to statuses, count every answer by route and status."""
        def deco(fn):
            async def handler(request):
                try:
                    resp = await fn(request)
                except _TooLarge:
                    resp = JSONResponse({"error": f"body larger than {max_body_bytes} bytes"}, status_code=413)
                except _SlowBody:
                    resp = JSONResponse({"error": f"request body not received within {body_timeout:g} s"},
                                        status_code=408, headers={"Connection": "close"})
                except Exception as e:
                    resp = error(e)
                metrics.count(request.method, route, resp.status_code)
                return resp
            handler.__name__ = fn.__name__
            return handler
        return deco

    async def ready_all(refs: list[str]) -> dict:
        """Resolve and load the adapters in this request's thread, before queueing: an unknown REF
        is a 404 at once, a file that does not fit the base a 400, and the batch worker finds them
        in the engine's CPU cache instead of stalling every queued request on a disk read."""
        refs = list(dict.fromkeys(refs))
        return await run_in_threadpool(engine.prefetch, refs) if refs else {}

    async def disconnected(request) -> None:
        """Returns when the client closes the connection (the body has been read: the next
        ``receive`` is uvicorn's ``http.disconnect``)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    def _retrieve(fut) -> None:  # an answer nobody waits for any more must not log "never retrieved"
        if not fut.cancelled():
            fut.exception()

    model_info: dict = {}  # the base's Model hash / Model for the PNGs' parameters (encode_png)

    @endpoint("/v1/generate")
    async def generate(request):
        t0 = time.perf_counter()
        start = time.monotonic()
        body = await read_json(request)
        req, kind = parse_generate(body, defaults)
        timeout = parse_timeout(body, request_timeout, request_timeout)
        estimate = cost.check(req, limit) if cost is not None else None
        await ready_all([ref for ref, _ in req.adapters])
        ticket = batcher.submit(req, cost=estimate, deadline=None if timeout is None else start + timeout)
        fut = asyncio.wrap_future(ticket)
        fut.add_done_callback(_retrieve)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            left = None if timeout is None else max(0.0, start + timeout - time.monotonic())
            done, _ = await asyncio.wait({fut, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if fut not in done:
            if gone in done:
                batcher.abandon(ticket, RequestCancelled("the client disconnected"))
                log.info("generate: client gone after %.2f s; its request was cancelled", time.perf_counter() - t0)
                return JSONResponse({"error": "client disconnected"}, status_code=CLIENT_CLOSED)
            batcher.abandon(ticket, DeadlineError(f"request timed out after {timeout:g} s"))
            raise DeadlineError(f"request timed out after {timeout:g} s (its work was stopped); "
                                f"this server's backlog is about {batcher.backlog():.1f} s")
        image = fut.result()
        data, parameters = await run_in_threadpool(encode_png, engine, image, req, model_info)
        dt = time.perf_counter() - t0
        metrics.observe_generate(dt)
        headers = {"X-Loradex-Latency-Ms": f"{dt * 1000:.1f}"}
        if estimate is not None:
            headers["X-Loradex-Cost-Seconds"] = f"{estimate:.3f}"
        if kind == "png":
            return Response(data, media_type="image/png", headers=headers)
        return JSONResponse({"image": base64.b64encode(data).decode("ascii"), "format": "png",
                             "width": image.width, "height": image.height, "seed": req.seed, "steps": req.steps,
                             "adapters": [{"ref": r, "weight": w} for r, w in req.adapters],
                             "parameters": parameters, "latency_ms": round(dt * 1000, 1),
                             **({"cost_s": round(estimate, 3)} if estimate is not None else {})}, headers=headers)

    @endpoint("/v1/adapters")
    async def adapters(request):
        return JSONResponse({"adapters": await run_in_threadpool(engine.list_adapters)})

    @endpoint("/v1/adapters/prefetch")
    async def prefetch(request):
        body = await read_json(request)
        refs = body.get("refs") if isinstance(body, dict) else body
        if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
            raise BadRequestError('send {"refs": ["REF", ...]}')
        if len(refs) > 1024:
            raise BadRequestError("at most 1024 refs per prefetch")
        return JSONResponse({"prefetched": await ready_all(refs)})

    def health() -> tuple[int, dict]:
        """Readiness: ``ok`` (idle: a request starts at once), ``busy`` (working or requests wait,
        but the queue has room and the estimated backlog fits a request's deadline),
        ``overloaded`` (the queue is full, or the backlog is longer than the default deadline: a
        new request would likely be refused or time out) and ``worker stopped``; the last two
        answer 503 so that a balancer routes elsewhere."""
        s = batcher.stats()
        backlog = batcher.backlog()
        if not batcher.alive:
            status = "worker stopped"
        elif s["queue_depth"] >= s["max_queue"] or (request_timeout is not None and backlog > request_timeout):
            status = "overloaded"
        elif s["queue_depth"] > 0 or s["in_flight"] > 0:
            status = "busy"
        else:
            status = "ok"
        doc = {"status": status, "queue_depth": s["queue_depth"], "max_queue": s["max_queue"],
               "in_flight": s["in_flight"], "queue_small": s["queue_small"], "queue_large": s["queue_large"],
               "running_large": s["running_large"], "backlog_s": round(backlog, 3),
               "max_request_seconds": limit, "request_timeout_s": request_timeout}
        return (200 if status in ("ok", "busy") else 503), doc

    @endpoint("/healthz")
    async def healthz(request):
        code, doc = health()
        return JSONResponse(doc, status_code=code)

    @endpoint("/metrics")
    async def metrics_(request):
        try:
            engine_stats = await run_in_threadpool(engine.stats)
        except Exception:  # metrics must answer even when the engine cannot report
            engine_stats = {}
        return PlainTextResponse(metrics.render(batcher, engine_stats, limits),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"error": getattr(exc, "detail", None) or "not found"}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(batcher.close)

    app = Starlette(
        routes=[Route("/v1/generate", generate, methods=["POST"]),
                Route("/v1/adapters", adapters, methods=["GET"]),
                Route("/v1/adapters/prefetch", prefetch, methods=["POST"]),
                Route("/healthz", healthz, methods=["GET"]),
                Route("/metrics", metrics_, methods=["GET"])],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.cost = cost
    app.state.limits = limits
    app.state.health = health
    app.state.header_timeout = header_timeout
    return app


# ---- uvicorn runners --------------------------------------------------------------------------------
def _uvicorn():
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LoradexError("the HTTP server needs the 'serve' extra: pip install 'loradex[serve]'") from e
    return uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind first, then hand the socket to uvicorn: port 0 picks a free port without a race, and a
    port in use is a clean LoradexError instead of uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LoradexError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)  # connections made before uvicorn's loop runs wait in the backlog, not refused
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, log_level: str = "info"):
    """uvicorn's Config for ``app``: the header-read timeout of ``create_app`` (``header_timeout``,
    httpguard.py) on uvicorn's own HTTP protocol, and its keep-alive timeout between requests."""
    from loradex.inference.httpguard import protocol_class

    uvicorn = _uvicorn()
    state = getattr(app, "state", None)
    header_timeout = getattr(state, "header_timeout", HEADER_TIMEOUT)
    return uvicorn.Config(app, log_level=log_level, lifespan="on", http=protocol_class(header_timeout),
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT)


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  sock: socket.socket | None = None) -> None:
    """Run ``app`` with uvicorn in this thread until interrupted (SIGINT/SIGTERM shut it down).
    ``sock``: a socket from ``bind_socket`` (bind before a slow model load to fail fast)."""
    uvicorn = _uvicorn()
    sock = sock if sock is not None else bind_socket(host, port)
    server = uvicorn.Server(uvicorn_config(app, log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread (tests, notebooks, embedding)::

        with BackgroundServer(create_app(engine)) as srv:
            urllib.request.urlopen(srv.url + "/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        uvicorn = _uvicorn()
        self._sock = bind_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(uvicorn_config(app, log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="loradex-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start serving in the background thread; LoradexError when it is not up within ``timeout`` s."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LoradexError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait up to ``timeout`` s for the thread, close the socket."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
