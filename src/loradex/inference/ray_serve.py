"""Beyond one machine: the engine as a Ray Serve deployment with model multiplexing (extra ``ray``).

Each replica holds one base pipeline and an Engine. The adapter REF is Serve's *multiplexed model
id*: a client sends it in the ``serve_multiplexed_model_id`` HTTP header (or
``handle.options(multiplexed_model_id=REF)``), the replica loads it through a method decorated with
``@serve.multiplexed`` (which keeps an LRU of ``max_adapters_per_replica`` ids per replica and
reports them to the controller), and Serve's router then sends later requests with that id to a
replica where it is already warm. Loading here means resolving the REF and prefetching its tensors
into the Engine's CPU cache, so a routed request only pays the in-place slot copy.

Request body and answers are those of the single-machine server (``server.py``): POST
``/v1/generate`` with the same JSON (when ``adapters`` is absent, the multiplexed id is applied at
weight 1), PNG or JSON with base64; ``GET /healthz``; ``GET /v1/adapters``. Within a replica the
same ``Batcher`` micro-batches requests (Serve's ``max_ongoing_requests`` lets several in at once).
The answer carries ``X-Loradex-Replica`` (and ``replica`` in JSON) to make routing visible.

    loradex serve --ray --replicas 2 --port 8000
    curl -H 'serve_multiplexed_model_id: alice' -d '{"prompt": "a photo of sks"}' localhost:8000/v1/generate
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from loradex.errors import LoradexError
from loradex.inference.batcher import Batcher
from loradex.inference.server import MAX_BODY_BYTES, error_status, parse_generate, png_bytes
from loradex.inference.types import BadRequestError

#: the HTTP header Serve's proxy reads the multiplexed model id from
MODEL_ID_HEADER = "serve_multiplexed_model_id"


def _ray_serve():
    try:
        from ray import serve
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LoradexError("Ray Serve is not installed: pip install 'loradex[ray]'") from e
    return serve


class _Warm:
    """What the multiplexed loader returns for an adapter: its REF and the engine's id for it. It
    has no ``__del__`` (which Serve would call on eviction from its per-replica LRU): the tensors
    live in the Engine's own byte-bounded CPU cache, which decides what stays in memory."""

    def __init__(self, ref: str, key: str) -> None:
        self.ref, self.key = ref, key


class LoradexReplica:
    """One Serve replica: an Engine over ``base`` (None: the tiny embedded pipeline) and a Batcher.

    A plain class (it also works outside Serve, e.g. in a notebook); ``deployment()`` wraps it with
    ``serve.deployment`` and its ``get_adapter`` with ``serve.multiplexed``. No /metrics here: Serve
    exports its own (requests, latencies, multiplexed model loads) on the Ray metrics port."""

    def __init__(self, base: str | None = None, engine_kwargs: dict | None = None, registry_home: str | None = None,
                 defaults: dict | None = None, max_queue: int = 64, max_batch: int = 8, window_ms: float = 10.0,
                 torch_threads: int | None = None) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from loradex.inference.engine import Engine

        registry = None
        if registry_home is not None:
            from loradex.registry import Registry

            registry = Registry(registry_home)
        if base is None:
            from loradex.tiny import tiny_sd_pipeline

            base = tiny_sd_pipeline()
            defaults = {"steps": 2, "width": 64, "height": 64, **(defaults or {})}
        self.engine = Engine(base, registry=registry, **(engine_kwargs or {}))
        self.defaults = defaults or {}
        self.batcher = Batcher(self.engine.generate, max_queue=max_queue, max_batch=max_batch, window_ms=window_ms)
        try:
            self.replica = _ray_serve().get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit use)
            self.replica = "local"

    async def get_adapter(self, ref: str) -> _Warm:
        """The multiplexed loader: resolve ``ref`` (UnknownAdapterError when there is none) and warm
        its tensors in this replica's engine cache."""
        key = await asyncio.to_thread(self.engine.resolve, ref)
        await asyncio.to_thread(self.engine.prefetch, [ref])
        return _Warm(ref, key)

    def _model_id(self) -> str:
        try:
            return _ray_serve().get_multiplexed_model_id() or ""
        except Exception:
            return ""

    async def handle(self, body: Any, model_id: str = "") -> tuple[int, dict, bytes | None]:
        """One generate request -> (status, JSON answer, PNG bytes or None). Never raises for user
        input: 400 / 404 / 429 with ``{"error": ...}`` as the HTTP server does."""
        t0 = time.perf_counter()
        try:
            if isinstance(body, dict) and not body.get("adapters") and model_id:
                body = {**body, "adapters": [{"ref": model_id, "weight": 1.0}]}
            req, kind = parse_generate(body, self.defaults)
            if model_id:
                await self.get_adapter(model_id)  # the multiplexed loader (registered by deployment())
            others = [r for r in dict.fromkeys(r for r, _ in req.adapters) if r != model_id]
            if others:  # unknown -> 404, unfit -> 400 before queueing (as server.py does)
                await asyncio.to_thread(self.engine.prefetch, others)
            image = await asyncio.wrap_future(self.batcher.submit(req))
            data = await asyncio.to_thread(png_bytes, image)
        except Exception as e:
            status = error_status(e)
            return status, {"error": str(e) if status != 500 else f"internal error ({type(e).__name__})",
                            "replica": self.replica}, None
        dt = time.perf_counter() - t0
        meta = {"format": "png", "width": image.width, "height": image.height, "seed": req.seed,
                "adapters": [{"ref": r, "weight": w} for r, w in req.adapters], "replica": self.replica,
                "latency_ms": round(dt * 1000, 1), "response": kind}
        return 200, meta, data

    async def __call__(self, request) -> Any:
        """HTTP (a Starlette Request from Serve's proxy) or a DeploymentHandle call with a dict body
        (answered with a dict: status, replica, image as base64 PNG)."""
        model_id = self._model_id()
        if isinstance(request, dict):
            status, meta, data = await self.handle(request, model_id)
            if data is not None:
                meta["image"] = base64.b64encode(data).decode("ascii")
            return {"status": status, **meta}
        return await self._http(request, model_id)

    async def _http(self, request, model_id: str):
        from starlette.responses import JSONResponse, Response

        path = request.url.path.rstrip("/")
        headers = {"X-Loradex-Replica": self.replica}
        if request.method == "GET" and path.endswith("/healthz"):
            return JSONResponse({"status": "ok", "replica": self.replica, **self.batcher.stats()}, headers=headers)
        if request.method == "GET" and path.endswith("/v1/adapters"):
            return JSONResponse({"adapters": await asyncio.to_thread(self.engine.list_adapters),
                                 "replica": self.replica}, headers=headers)
        if request.method != "POST" or not path.endswith("/v1/generate"):
            return JSONResponse({"error": "not found"}, status_code=404, headers=headers)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                return JSONResponse({"error": f"body larger than {MAX_BODY_BYTES} bytes"}, status_code=413,
                                    headers=headers)
        try:
            body = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            return JSONResponse({"error": str(BadRequestError(f"invalid JSON: {e}"))}, status_code=400,
                                headers=headers)
        status, meta, data = await self.handle(body, model_id)
        if data is None:
            return JSONResponse(meta, status_code=status, headers=headers)
        if meta.pop("response") == "png":
            return Response(data, media_type="image/png", headers=headers)
        return JSONResponse({**meta, "image": base64.b64encode(data).decode("ascii")}, headers=headers)

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close(timeout=1.0)


def deployment(base: str | None = None, *, replicas: int = 2, engine_kwargs: dict | None = None,
               registry_home: str | None = None, defaults: dict | None = None, max_adapters_per_replica: int = 64,
               max_queue: int = 64, max_batch: int = 8, window_ms: float = 10.0, num_cpus: float = 1.0,
               num_gpus: float = 0.0, torch_threads: int | None = None, name: str = "loradex"):
    """A bound Serve application: ``replicas`` copies of ``LoradexReplica``, each with its own
    Engine, ``@serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)`` on the
    adapter loader. Pass it to ``serve.run``. ``base`` is a path (diffusers folder or single file)
    every replica can read, or None for the tiny embedded pipeline."""
    serve = _ray_serve()

    class Replica(LoradexReplica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)
        async def get_adapter(self, ref: str) -> _Warm:
            return await LoradexReplica.get_adapter(self, ref)

    Replica.__name__ = Replica.__qualname__ = "LoradexReplica"
    dep = serve.deployment(
        Replica, name=name, num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # let a batch form inside the replica: more requests in than one at a time
        max_ongoing_requests=max(max_batch * 2, 8),
    )
    return dep.bind(base, engine_kwargs, registry_home, defaults, max_queue, max_batch, window_ms, torch_threads)


def run(base: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
        ray_address: str | None = None, num_cpus: int | None = None, **kw):
    """Start (or join, with ``ray_address`` / RAY_ADDRESS) a Ray cluster, Serve's HTTP proxy on
    host:port, and the deployment; returns its DeploymentHandle (``blocking=True``: serve until
    interrupted)."""
    import ray

    serve = _ray_serve()
    if not ray.is_initialized():
        ray.init(address=ray_address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(deployment(base, **kw), name=kw.get("name", "loradex"), route_prefix="/", blocking=blocking)


def shutdown(name: str = "loradex", joined: bool = False) -> None:
    """Take the deployment down: on a cluster we joined (``joined``) only our application is
    deleted; a local cluster we started goes entirely (Serve, then Ray)."""
    import ray

    serve = _ray_serve()
    if not ray.is_initialized():
        return
    if joined:
        serve.delete(name)
    else:
        serve.shutdown()
    ray.shutdown()
