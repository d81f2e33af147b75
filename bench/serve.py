"""Benchmark: the HTTP server under a mix of small and large requests (issue 12).

The same Engine (tiny embedded pipeline, or ``--base``), ``--clients`` concurrent HTTP clients (real
uvicorn, real sockets, closed loop: each sends its next request when the last one is answered).
``--large-clients`` of them send large-but-allowed requests (``--large-steps`` steps, the side chosen
so that the server's own cost model estimates ``--large-cost`` seconds, at least 6x the default
request), the others small ones (the server's default request, a random seed and LoRA adapter each).

* small only: the small clients alone (the baseline of the small requests' latency);
* mixed: the small and the large clients together, with the server's lanes (batcher.py: small
  requests micro-batched, the large lane yielding to them between steps, ``large_share`` of the
  engine);
* mixed, first come first served (``--fifo``, on with ``--full``): the same mix without lanes
  (``large_seconds=inf``; the scheduling of the server before issue 12).

Printed: p50/p99 latency of the small and the large requests in each, throughput, and the small
requests' p99 in the mixes against their p99 alone, each next to its goal (within 3x).
``--batching`` also runs the older comparison: micro-batching against one request at a time.

    python bench/serve.py [--quick | --full] [--fifo] [--clients 50] [--large-clients 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GOAL_SMALL_P99 = 3.0  # small requests' p99 with large ones in flight, at most this times their p99 without


def make_adapters(n: int, out: Path) -> list[str]:
    from loradex.demo import TinyBench, make_lycoris_reference

    bench = TinyBench()
    paths = []
    for i in range(n):
        d = out / f"a{i}"
        d.mkdir()
        paths.append(str(make_lycoris_reference(bench, "lora", d, seed=i + 1).path))
    return paths


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def post(url: str, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        e.read()
        code = e.code
    return code, time.perf_counter() - t0


def run_mix(engine, app_kwargs: dict, small: list[list[dict]], large: list[list[dict]]) -> dict:
    """Serve the clients' request lists (each client sends its list in order); latencies by kind."""
    from loradex.inference.server import BackgroundServer, create_app

    app = create_app(engine, **app_kwargs)
    lat: dict[str, list[float]] = {"small": [], "large": []}
    codes: dict[int, int] = {}
    lock = threading.Lock()
    with BackgroundServer(app) as srv:
        def client(kind: str, bodies: list[dict]) -> None:
            for body in bodies:
                code, dt = post(srv.url, body)
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        lat[kind].append(dt)

        jobs = [("small", b) for b in small] + [("large", b) for b in large]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as ex:
            list(ex.map(lambda j: client(*j), jobs))
        wall = time.perf_counter() - t0
        stats = app.state.batcher.stats()
    n = len(lat["small"]) + len(lat["large"])
    return {"wall_s": wall, "images_per_s": n / wall, "codes": codes, "preemptions": stats["preemptions"],
            "engine_busy": stats["busy_seconds"] / wall,
            "lane_seconds": stats["lane_seconds"],
            **{f"{k}_{q}_s": pct(v, q) for k, v in lat.items() for q in (50, 99)},
            "small_n": len(lat["small"]), "large_n": len(lat["large"])}


def run_batching(engine, adapters: list[str], clients: int, requests: int, defaults: dict) -> dict:
    """The older comparison: micro-batching against one request at a time (images/s, latency)."""
    rng = random.Random(0)
    bodies = [[{"prompt": f"client {c} request {i}", "seed": rng.randrange(1 << 30),
                "adapters": [f"{rng.choice(adapters)}:{rng.uniform(0.5, 1.0):.2f}"]} for i in range(requests)]
              for c in range(clients)]
    out = {}
    for name, (mb, win) in {"one at a time": (1, 0.0), "micro-batched": (8, 10.0)}.items():
        out[name] = run_mix(engine, {"max_queue": clients * requests + 1, "max_batch": mb, "window_ms": win,
                                     "defaults": defaults}, bodies, [])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="diffusers folder / single file (default: the tiny pipeline)")
    ap.add_argument("--quick", action="store_true", default=True, help="the CI-sized run (the default)")
    ap.add_argument("--full", dest="quick", action="store_false", help="more requests per client")
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients in all")
    ap.add_argument("--large-clients", type=int, default=5, help="how many of them send large requests")
    ap.add_argument("--requests", type=int, default=None, help="small requests per client (quick: 2, full: 6)")
    ap.add_argument("--large-requests", type=int, default=1, help="large requests per large client")
    ap.add_argument("--large-steps", type=int, default=12, help="steps of a large request")
    ap.add_argument("--large-px-max", type=int, default=256, help="largest side of a large request")
    ap.add_argument("--large-cost", type=float, default=6.0,
                    help="estimated seconds of a large request (at least 6x the default request's)")
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 on the tiny model, whose ops are too small to share out and which "
                         "slow down ~20x when OpenMP threads spin on a busy machine; torch's default with --base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fifo", action="store_true", default=None,
                    help="also run the mix first come first served, without lanes (on with --full)")
    ap.add_argument("--batching", action="store_true", help="also compare micro-batching with one at a time")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    requests = args.requests or (2 if args.quick else 6)

    import torch

    threads = args.threads or (1 if args.base is None else None)
    if threads:
        torch.set_num_threads(threads)
    from loradex.inference.engine import Engine
    from loradex.inference.types import GenerateRequest
    from loradex.log import quiet
    from loradex.tiny import tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        with quiet():
            adapters = make_adapters(args.adapters, Path(tmp))
            base = args.base or tiny_sd_pipeline()
        defaults = {"steps": 2, "width": 64, "height": 64} if args.base is None else {}
        engine = Engine(base, device=args.device, max_rank=8, slots=max(2, args.adapters))
        engine.prefetch(adapters)
        cost = engine.cost_model(defaults)
        # a large request: --large-steps steps without guidance, its side chosen so that the cost model
        # estimates --large-cost seconds (at least 6x the default request, so that it is in the large
        # lane, whose threshold is 4x)
        default_cost = cost.estimate(GenerateRequest("x", **defaults))
        target = max(args.large_cost, 6 * default_cost)
        probe = GenerateRequest("x", width=512, height=512, steps=args.large_steps, guidance_scale=1.0)
        px = max(64, min(args.large_px_max, cost.largest_side(probe, target)))
        large_body = {"prompt": "a large one", "width": px, "height": px, "steps": args.large_steps,
                      "guidance_scale": 1.0}
        steps = args.large_steps
        large_estimate = cost.estimate(GenerateRequest(**large_body))
        rng = random.Random(1)
        n_small = args.clients - args.large_clients
        small = [[{"prompt": f"client {c} request {i}", "seed": rng.randrange(1 << 30),
                   "adapters": [f"{rng.choice(adapters)}:{rng.uniform(0.5, 1.0):.2f}"]} for i in range(requests)]
                 for c in range(n_small)]
        large = [[{**large_body, "seed": rng.randrange(1 << 30)} for _ in range(args.large_requests)]
                 for _ in range(args.large_clients)]
        common = {"max_queue": args.clients * (requests + args.large_requests) + 1, "max_batch": args.max_batch,
                  "window_ms": 10.0, "defaults": defaults, "max_request_seconds": max(10.0, 3 * target)}
        post_warm = run_mix(engine, common, [[{"prompt": "warm-up"}]], [[{**large_body, "steps": 2}]])
        del post_warm
        results = {
            "small only": run_mix(engine, common, small, []),
            "mixed": run_mix(engine, common, small, large),
        }
        if args.fifo or (args.fifo is None and not args.quick):
            results["mixed, first come first served"] = run_mix(engine, {**common, "large_seconds": math.inf},
                                                                small, large)
        batching = run_batching(engine, adapters, min(8, n_small), 4, defaults) if args.batching else None
    alone = results["small only"]["small_99_s"]
    ratios = {name: r["small_99_s"] / alone for name, r in results.items() if name != "small only"}
    summary = {"config": {**vars(args), "requests": requests, "large_px": px, "default_estimate_s": default_cost,
                          "large_estimate_s": large_estimate},
               "results": results, "small_p99_ratio": ratios, "goal": GOAL_SMALL_P99, "cost_model": cost.describe()}
    if batching:
        summary["batching"] = batching
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{n_small} small clients x {requests} (64 px, 2 steps, CFG, est. {default_cost:.2f} s) + "
          f"{args.large_clients} large clients x {args.large_requests} ({px} px, {steps} steps, "
          f"est. {large_estimate:.1f} s)")
    for name, r in results.items():
        line = (f"{name:32s} small p50 {r['small_50_s']:6.2f} s  p99 {r['small_99_s']:6.2f} s   "
                f"{r['images_per_s']:5.2f} images/s (engine busy {r['engine_busy']:.0%})")
        if r["large_n"]:
            line += f"   large p50 {r['large_50_s']:6.2f} s  p99 {r['large_99_s']:6.2f} s  ({r['preemptions']} yields)"
        print(line)
    for name, ratio in ratios.items():
        mark = "ok" if ratio <= GOAL_SMALL_P99 else "MISSED"
        print(f"small requests' p99, {name}: {ratio:.2f}x their p99 without large requests "
              f"(goal <= {GOAL_SMALL_P99:g}x: {mark})")
    if batching:
        b0, b1 = batching["one at a time"], batching["micro-batched"]
        print(f"micro-batching: {b1['images_per_s'] / b0['images_per_s']:.2f}x the images/s of one at a time, "
              f"p50 latency {b1['small_50_s'] / b0['small_50_s']:.2f}x, p99 {b1['small_99_s'] / b0['small_99_s']:.2f}x")


if __name__ == "__main__":
    main()
