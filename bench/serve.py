"""Benchmark: the HTTP server's micro-batching against serving one request at a time.

The same Engine (tiny embedded pipeline, 64x64, 2 steps, or ``--base``), ``--adapters`` LoRA files
made by lycoris-lora, and ``--clients`` concurrent HTTP clients (real uvicorn, real sockets), each
sending ``--requests`` generate requests with a random adapter and seed.

* baseline: ``max_batch=1, window_ms=0`` (every request is its own ``engine.generate`` call).
* loradex: ``max_batch=--max-batch, window_ms=--window-ms`` (requests of a window share one call:
  a mixed-adapter batch).

The two configurations run interleaved ``--rounds`` times; printed: images/s and latency
p50/p99 of each (medians over the rounds), and the ratios.

    python bench/serve.py [--clients 8] [--requests 4] [--adapters 4] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_adapters(n: int, out: Path) -> list[str]:
    from loradex.demo import TinyBench, make_lycoris_reference

    bench = TinyBench()
    paths = []
    for i in range(n):
        d = out / f"a{i}"
        d.mkdir()
        paths.append(str(make_lycoris_reference(bench, "lora", d, seed=i + 1).path))
    return paths


def run_config(engine, adapters: list[str], clients: int, requests: int, max_batch: int, window_ms: float,
               defaults: dict, seed: int) -> dict:
    from loradex.inference.server import BackgroundServer, create_app

    app = create_app(engine, max_queue=clients * requests + 1, max_batch=max_batch, window_ms=window_ms,
                     defaults=defaults)
    rng = random.Random(seed)
    bodies = [[{"prompt": f"client {c} request {i}", "seed": rng.randrange(1 << 30),
                "adapters": [f"{rng.choice(adapters)}:{rng.uniform(0.5, 1.0):.2f}"]}
               for i in range(requests)] for c in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    with BackgroundServer(app) as srv:
        def client(mine: list[dict]) -> None:
            for body in mine:
                t0 = time.perf_counter()
                req = urllib.request.Request(srv.url + "/v1/generate", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    assert r.status == 200
                    r.read()
                with lock:
                    latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(client, bodies))
        wall = time.perf_counter() - t0
        sizes = app.state.batcher.stats()["batch_sizes"]
    latencies.sort()
    n = len(latencies)
    return {"images_per_s": n / wall, "p50_s": latencies[n // 2], "p99_s": latencies[min(n - 1, int(n * 0.99))],
            "mean_batch": sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="diffusers folder / single file (default: the tiny pipeline)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--window-ms", type=float, default=10.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from loradex.inference.engine import Engine
    from loradex.tiny import quiet, tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp, quiet():
        adapters = make_adapters(args.adapters, Path(tmp))
        base = args.base or tiny_sd_pipeline()
        defaults = {"steps": 2, "width": 64, "height": 64} if args.base is None else {}
        engine = Engine(base, device=args.device, max_rank=8, slots=max(2, args.adapters))
        engine.prefetch(adapters)
        configs = {"one at a time": (1, 0.0), "micro-batched": (args.max_batch, args.window_ms)}
        run_config(engine, adapters, 2, 1, 1, 0.0, defaults, seed=-1)  # warm-up
        results: dict[str, list[dict]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for name, (mb, win) in configs.items():
                results[name].append(run_config(engine, adapters, args.clients, args.requests, mb, win, defaults,
                                                seed=r))
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in results.items()}
    base_, ours = med["one at a time"], med["micro-batched"]
    summary = {
        "config": vars(args), "results": med,
        "throughput_ratio": ours["images_per_s"] / base_["images_per_s"],
        "p50_ratio": ours["p50_s"] / base_["p50_s"], "p99_ratio": ours["p99_s"] / base_["p99_s"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name, m in med.items():
        print(f"{name:14s} {m['images_per_s']:7.2f} images/s  p50 {m['p50_s'] * 1000:7.0f} ms  "
              f"p99 {m['p99_s'] * 1000:7.0f} ms  mean batch {m['mean_batch']:.1f}")
    print(f"micro-batching: {summary['throughput_ratio']:.2f}x the images/s of one-at-a-time, "
          f"p50 latency {summary['p50_ratio']:.2f}x, p99 {summary['p99_ratio']:.2f}x "
          f"({args.clients} clients, {args.adapters} adapters, medians of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
