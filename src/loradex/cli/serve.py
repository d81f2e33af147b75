"""``loradex serve``: the inference engine over HTTP (uvicorn), or as a Ray Serve deployment."""

from __future__ import annotations

import click

from loradex.cli.app import cli
from loradex.cli.options import device_option
from loradex.cli.registry import base_pipeline
from loradex.errors import LoradexError

#: request defaults for the tiny embedded pipeline (a 64x64, 2-step image in well under a second)
TINY_DEFAULTS = {"steps": 2, "width": 64, "height": 64}


@cli.command("serve")
@click.option("--base", default=None, metavar="BASE",
              help="a diffusers folder, a single-file checkpoint, a registry REF, a Hub id in the local cache, or an "
                   "embedded tiny model (tiny, tiny-sdxl, tiny-flux1, tiny-sd3) [default: tiny, offline]")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to listen on")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="port (0: a free one)")
@click.option("--registry-home", default=None, type=click.Path(file_okay=False),
              help="registry folder adapters are resolved in (default: LORADEX_HOME or the default home)")
@click.option("--no-registry", is_flag=True, help="no registry: adapters are file paths (needs --allow-paths)")
@click.option("--allow-paths", is_flag=True,
              help="also accept adapter file paths in requests (any file the server can read: trusted clients only)")
@device_option
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="pipeline dtype (default: fp32 on CPU)")
@click.option("--slots", default=4, show_default=True, type=click.IntRange(1, 64),
              help="adapters stacked per request at most (LoRA slots per module)")
@click.option("--max-rank", default=64, show_default=True, type=click.IntRange(1, 4096), help="rank capacity of a slot")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="requests waiting beyond the running batch; more get 429")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="requests per engine call at most")
@click.option("--window-ms", default=10.0, show_default=True, type=click.FloatRange(0, 10000),
              help="micro-batching window: how long the first request of a batch waits for company")
@click.option("--max-request-seconds", type=click.FloatRange(0, min_open=True), default=None, metavar="S",
              help="most estimated compute one request may cost, in seconds of this server's own measured step "
                   "time (413 beyond) [default: 10, or twice the default request's cost when more]")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=None, metavar="S",
              help="deadline of a request (a client's own \"timeout\" may only be shorter); its work stops between "
                   "two steps when it passes (504) [default: 60, or 4x the cost limit when more]")
@click.option("--large-share", type=click.FloatRange(0.01, 0.99), default=0.25, show_default=True,
              help="share of the engine large requests get while small ones wait (the rest: small ones)")
@click.option("--header-timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              metavar="S", help="seconds a client may take to send a request's header block (slowloris: 408)")
@click.option("--body-timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              metavar="S", help="seconds a client may take to send a request's body (408)")
@click.option("--exact-batches/--fast-batches", default=None,
              help="run each sample of a batch as if alone (bit-identical to the request alone) or the whole "
                   "batch in one call (faster on a GPU; float rounding differs) [default: exact on the CPU]")
@click.option("--ray", "use_ray", is_flag=True, help="serve with Ray Serve (model multiplexing by adapter REF)")
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1, 1024), help="with --ray: replicas")
@click.option("--ray-address", default=None, help="with --ray: an existing cluster (default: RAY_ADDRESS or a local one)")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_cmd(base, host, port, registry_home, no_registry, allow_paths, device, dtype, slots, max_rank, max_queue, max_batch,
              window_ms, max_request_seconds, request_timeout, large_share, header_timeout, body_timeout, exact_batches,
              use_ray, replicas, ray_address, log_level):
    """Serve one base model with adapters hot-swapped per request.

    \b
    POST /v1/generate  {"prompt": "...", "adapters": ["alice:0.8"], "steps": 20, "seed": 1,
                        "width": 512, "height": 512, "negative_prompt": "", "guidance_scale": 7.5,
                        "response": "png" | "json"}
    GET /v1/adapters, POST /v1/adapters/prefetch {"refs": [...]}, GET /healthz, GET /metrics
    400 bad input, 404 unknown adapter, 408 header/body too slow, 413 request too costly
    (--max-request-seconds), 429 queue full, 504 deadline passed (--request-timeout, or the
    request's own "timeout"). /healthz: ok / busy (200), overloaded (503).
    With --ray the adapter REF is also Serve's multiplexed model id: send it in the
    `serve_multiplexed_model_id` header to reach a replica where it is warm.
    """
    import contextlib

    with contextlib.ExitStack() as stack:  # a REF base stays checked out while the server runs
        source, _, tiny = base_pipeline(stack, base, "serve")
        limits = {"max_request_seconds": max_request_seconds, "request_timeout": request_timeout,
                  "large_share": large_share, "header_timeout": header_timeout, "body_timeout": body_timeout}
        _serve(source if base is not None else None, tiny, host, port, registry_home, no_registry, allow_paths,
               device, dtype, slots, max_rank, max_queue, max_batch, window_ms, use_ray, replicas, ray_address,
               log_level, limits, exact_batches)


def _serve(base, tiny, host, port, registry_home, no_registry, allow_paths, device, dtype, slots, max_rank, max_queue,
           max_batch, window_ms, use_ray, replicas, ray_address, log_level, limits, exact_batches):
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    engine_kwargs = {"device": device, "dtype": dtypes.get(dtype), "max_rank": max_rank, "slots": slots,
                     "allow_paths": allow_paths, "exact_batches": exact_batches}
    defaults = TINY_DEFAULTS if tiny else None
    if base is not None:
        base = str(base)
    if registry_home is not None and no_registry:
        raise click.UsageError("--registry-home and --no-registry exclude each other")
    if no_registry and not allow_paths:
        raise click.UsageError("with --no-registry, give --allow-paths (adapters would have nothing to resolve from)")
    if use_ray:
        from loradex.inference import ray_serve

        click.echo(f"loradex: Ray Serve, {replicas} replica(s), http://{host}:{port} "
                   f"(adapter REF in the '{ray_serve.MODEL_ID_HEADER}' header)", err=True)
        import os
        import signal
        import time

        def _stop(signum, frame):  # SIGTERM (e.g. from a process manager): the same clean exit as Ctrl-C
            raise KeyboardInterrupt

        try:
            ray_serve.run(base, host=host, port=port, ray_address=ray_address, replicas=replicas,
                          engine_kwargs=engine_kwargs, registry_home=None if no_registry else _home(registry_home),
                          defaults=defaults, max_queue=max_queue, max_batch=max_batch, window_ms=window_ms)
            # after ray.init, which installs its own SIGTERM handler (a stack dump, then death)
            signal.signal(signal.SIGTERM, _stop)
            click.echo(f"loradex: serving on http://{host}:{port} (Ctrl-C to stop)", err=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            ray_serve.shutdown(joined=bool(ray_address or os.environ.get("RAY_ADDRESS")))
        return
    from loradex.inference.server import bind_socket, create_app, serve_forever

    sock = bind_socket(host, port)  # a taken port fails now, not after the model load
    from loradex.inference.engine import Engine

    registry = None
    if not no_registry:
        from loradex.registry import Registry

        try:
            registry = Registry(registry_home, create=registry_home is None, readonly=None)
        except LoradexError:
            if registry_home is not None:
                raise
    if base is None:
        from loradex.tiny import tiny_sd_pipeline

        base = tiny_sd_pipeline()
    click.echo(f"loradex: loading the engine ({'tiny embedded pipeline' if defaults else base})", err=True)
    engine = Engine(base, registry=registry, **engine_kwargs)
    click.echo("loradex: measuring the engine's step time (cost model)", err=True)
    app = create_app(engine, max_queue=max_queue, max_batch=max_batch, window_ms=window_ms, defaults=defaults,
                     **limits)
    click.echo(_limits_line(app, defaults), err=True)
    click.echo(f"loradex: serving on http://{host}:{sock.getsockname()[1]}", err=True)
    serve_forever(app, host=host, port=port, log_level=log_level, sock=sock)


def _limits_line(app, defaults: dict | None) -> str:
    """One line saying what the server admits: the cost limit, what it means at the default steps,
    the deadline and the batching mode."""
    from loradex.inference.types import GenerateRequest

    lim = app.state.limits
    cost = app.state.cost
    req = GenerateRequest("x", **{k: v for k, v in (defaults or {}).items() if k in ("steps", "width", "height")})
    limit = lim["max_request_seconds"]
    fits = ""
    if cost is not None and limit is not None:
        side = cost.largest_side(req, limit)
        fits = f" (at {req.steps} steps: up to {side}x{side} px)" if side >= 64 else f" (nothing fits at {req.steps} steps)"
    exact = "exact" if getattr(app.state.engine, "exact_batches", False) else "fast"
    return (f"loradex: requests up to {limit or float('inf'):.1f} s of compute{fits}, deadline "
            f"{lim['request_timeout_seconds']:.0f} s, {exact} batches")


def _home(registry_home: str | None) -> str | None:
    """The registry folder Ray replicas open (they do not inherit a Registry object)."""
    if registry_home is not None:
        return registry_home
    import os

    from loradex.registry.registry import default_home

    home = os.environ.get("LORADEX_HOME") or str(default_home())
    return home if os.path.isdir(home) else None
