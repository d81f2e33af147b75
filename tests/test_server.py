"""The HTTP server (inference/server.py), its micro-batcher (inference/batcher.py) and ``loradex serve``.

The server tests run a real uvicorn server on a free port in a thread and talk to it over real HTTP
(urllib), in front of the real Engine on the tiny pipeline with LoRA files made by lycoris-lora.
Pixel references come from ``engine.generate`` called with each request alone.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loradex.inference.batcher import Batcher
from loradex.inference.server import BackgroundServer, create_app, parse_generate, png_bytes
from loradex.inference.types import BadRequestError, GenerateRequest, QueueFullError

TINY = {"steps": 2, "width": 64, "height": 64}

pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process server computes in this process


# ---- the batcher alone (a plain function stands in for the engine's generate) ----------------------
def test_batcher_groups_a_window_and_isolates_failures():
    calls: list[list[str]] = []

    def generate(reqs):
        calls.append([r.prompt for r in reqs])
        if any(r.prompt == "boom" for r in reqs):
            raise BadRequestError("boom is not allowed")
        return [r.prompt.upper() for r in reqs]

    b = Batcher(generate, max_queue=16, max_batch=8, window_ms=300)
    try:
        futs = [b.submit(GenerateRequest(prompt=p)) for p in ("a", "boom", "c")]
        assert futs[0].result(5) == "A" and futs[2].result(5) == "C"
        with pytest.raises(BadRequestError, match="boom"):
            futs[1].result(5)
        # one window -> one call with all three, then each alone to find the culprit
        assert calls[0] == ["a", "boom", "c"] and sorted(calls[1:]) == [["a"], ["boom"], ["c"]]
        # the worker survived: the next request is served
        assert b.submit(GenerateRequest(prompt="d")).result(5) == "D"
        s = b.stats()
        assert s["completed"] == 3 and s["failed"] == 1 and s["retried_alone"] == 3 and s["batch_sizes"][3] == 1
    finally:
        b.close()


def test_batcher_bounded_queue_and_max_batch():
    gate = threading.Event()
    sizes: list[int] = []

    def generate(reqs):
        gate.wait(10)
        sizes.append(len(reqs))
        return [r.seed for r in reqs]

    b = Batcher(generate, max_queue=3, max_batch=2, window_ms=0)
    try:
        first = b.submit(GenerateRequest(prompt="x", seed=0))
        deadline = time.monotonic() + 5
        while b.in_flight == 0 and time.monotonic() < deadline:  # the worker holds the first
            time.sleep(0.005)
        queued = [b.submit(GenerateRequest(prompt="x", seed=i)) for i in (1, 2, 3)]
        with pytest.raises(QueueFullError):
            b.submit(GenerateRequest(prompt="x", seed=4))
        assert b.stats()["rejected"] == 1 and b.depth == 3
        gate.set()
        assert [f.result(5) for f in [first, *queued]] == [0, 1, 2, 3]
        assert max(sizes) <= 2 and sum(sizes) == 4
    finally:
        gate.set()
        b.close()


def test_batcher_wrong_result_count_fails_the_requests_not_the_worker():
    b = Batcher(lambda reqs: [], max_queue=4, window_ms=0)
    try:
        with pytest.raises(RuntimeError, match="0 results for 1"):
            b.submit(GenerateRequest(prompt="x")).result(5)
        assert b.alive
    finally:
        b.close()


# ---- the server in front of the real Engine ----------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bench):
    """Two LoRA files made by lycoris-lora on the tiny UNet (different seeds)."""
    from loradex.demo import make_lycoris_reference

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        d = tmp_path_factory.mktemp(f"server_adapter_{name}")
        out[name] = str(make_lycoris_reference(bench, "lora", d, seed=seed).path)
    return out


@pytest.fixture(scope="module")
def engine(adapters):
    engine_mod = pytest.importorskip("loradex.inference.engine",
                                     reason="the Engine (inference/engine.py) is not there yet")
    pytest.importorskip("starlette", reason="the 'serve' extra is not installed")
    pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
    from loradex.tiny import tiny_sd_pipeline

    return engine_mod.Engine(tiny_sd_pipeline(), max_rank=8, slots=2, registry=None)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, max_queue=16, max_batch=8, window_ms=150, defaults=TINY)
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


def call(url: str, body=None, raw: bytes | None = None, method: str | None = None, headers=None):
    """(status, content type, body bytes) of one HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_concurrent_requests_for_different_adapters(server, engine, adapters):
    """Four clients at once (base, A, B at a negative weight, A+B stacked): each image is
    bit-identical to what engine.generate gives for that request alone, and they were served in
    mixed batches."""
    a, b = adapters["a"], adapters["b"]
    bodies = [
        {"prompt": "a photo", "seed": 1},
        {"prompt": "a photo", "seed": 1, "adapters": [{"ref": a, "weight": 1.0}]},
        {"prompt": "a photo", "seed": 1, "adapters": [f"{b}:-1.5"], "response": "json"},
        {"prompt": "another", "seed": 7, "adapters": [f"{a}:0.7", [b, 0.5]]},
    ]
    engine.prefetch([a, b])  # warm: the requests reach the queue within the window
    before = server.app.state.batcher.stats()["batch_sizes"]
    barrier = threading.Barrier(len(bodies))

    def one(body):
        barrier.wait(30)
        return call(server.url + "/v1/generate", body)

    with ThreadPoolExecutor(len(bodies)) as ex:
        results = list(ex.map(one, bodies))
    images = []
    for body, (status, ctype, data) in zip(bodies, results):
        assert status == 200, data[:300]
        if body.get("response") == "json":
            import base64

            doc = json.loads(data)
            assert ctype.startswith("application/json") and doc["width"] == 64 and doc["seed"] == 1
            data = base64.b64decode(doc["image"])
        else:
            assert ctype == "image/png"
        images.append(pixels(data))
    after = server.app.state.batcher.stats()["batch_sizes"]
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert any(k > 1 and n > 0 for k, n in grew.items()), f"no mixed batch formed: {grew}"
    # the reference: each request alone through the engine
    for body, got in zip(bodies, images):
        req, _ = parse_generate({k: v for k, v in body.items() if k != "response"}, TINY)
        want = pixels(png_bytes(engine.generate([req])[0]))
        assert got.shape == (64, 64, 3)
        assert np.array_equal(got, want), body  # batched vs alone: bit-identical (exact batches, inference/exact.py)
    # and the adapters do change the image (the comparison above is not vacuous)
    assert np.abs(images[0] - images[1]).max() > 8 and np.abs(images[1] - images[2]).max() > 8


BAD = [
    (b"{not json", 400, "invalid JSON"),
    (b"", 400, "empty body"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"adapters": []}', 400, "prompt is required"),
    (b'{"prompt": 3}', 400, "must be strings"),
    (b'{"prompt": "x", "steps": "2"}', 400, "steps must be an integer"),
    (b'{"prompt": "x", "steps": 2.5}', 400, "steps must be an integer"),
    (b'{"prompt": "x", "steps": 0}', 400, "steps must be in"),
    (b'{"prompt": "x", "width": 65}', 400, "multiples of 8"),
    (b'{"prompt": "x", "height": 100000}', 400, "height must be in"),
    (b'{"prompt": "x", "seed": -1}', 400, "seed must be in"),
    (b'{"prompt": "x", "guidance_scale": NaN}', 400, "guidance_scale must be in"),
    (b'{"prompt": "x", "guidance_scale": true}', 400, "guidance_scale must be a number"),
    (b'{"prompt": "x", "adapters": "a"}', 400, "adapters must be a list"),
    (b'{"prompt": "x", "adapters": [{"ref": "a", "weight": "high"}]}', 400, "finite number"),
    (b'{"prompt": "x", "adapters": [{"ref": "a", "w": 1}]}', 400, "unknown adapter field"),
    (b'{"prompt": "x", "adapters": [{"ref": ""}]}', 400, "non-empty"),
    (b'{"prompt": "x", "adapters": [7]}', 400, "each adapter"),
    (b'{"prompt": "x", "adapters": ["a:9"]}', 400, "adapter weight must be in"),
    (b'{"prompt": "x", "step": 2}', 400, "unknown field(s): step"),
    (b'{"prompt": "x", "response": "gif"}', 400, "response must be"),
    (b'{"prompt": "x", "adapters": ["no-such-adapter:0.5"]}', 404, "no-such-adapter"),
    (b'{"prompt": "x", "adapters": ["/nonexistent/x.safetensors"]}', 404, "x.safetensors"),
]


@pytest.mark.parametrize("raw,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_are_4xx_before_queueing(server, raw, status, message):
    submitted = server.app.state.batcher.stats()["submitted"]
    t0 = time.perf_counter()
    code, ctype, data = call(server.url + "/v1/generate", raw=raw)
    assert (code, ctype) == (status, "application/json"), data
    assert message in json.loads(data)["error"]
    assert server.app.state.batcher.stats()["submitted"] == submitted  # refused before the queue
    assert time.perf_counter() - t0 < 5


def test_no_500_for_any_field_of_the_wrong_type(server):
    """Every field x a range of wrong-typed / out-of-range values: a 4xx (or 200 where the value
    happens to be valid, e.g. a string prompt), never a 500."""
    values = [None, [], {}, True, -1, 2**70, "x", 1.5, [None], [[]], [{}], ["a", "b", "c"], "x" * 3000]
    fields = ["prompt", "negative_prompt", "steps", "width", "height", "seed", "guidance_scale", "adapters",
              "response"]
    statuses = set()
    for field in fields:
        for v in values:
            body = {"prompt": "p", field: v}
            code, _, data = call(server.url + "/v1/generate", body)
            assert code in (200, 400, 404), (field, v, code, data[:200])
            statuses.add(code)
    assert 400 in statuses


def test_http_limits_and_routes(server, adapters):
    code, _, data = call(server.url + "/v1/generate", raw=b'{"prompt": "' + b"x" * 70000 + b'"}')
    assert code == 413 and "larger than" in json.loads(data)["error"]
    assert call(server.url + "/v1/nothing")[0] == 404
    assert call(server.url + "/v1/generate", method="GET")[0] == 405
    code, _, data = call(server.url + "/healthz")
    assert code == 200 and json.loads(data)["status"] == "ok"
    # prefetch: known adapters warm up, unknown ones 404, a bad body 400
    code, _, data = call(server.url + "/v1/adapters/prefetch", {"refs": [adapters["a"], adapters["b"]]})
    assert code == 200, data
    assert call(server.url + "/v1/adapters/prefetch", {"refs": ["nope"]})[0] == 404
    assert call(server.url + "/v1/adapters/prefetch", {"refs": "a"})[0] == 400
    code, _, data = call(server.url + "/v1/adapters")
    assert code == 200 and isinstance(json.loads(data)["adapters"], list)


def test_queue_full_is_429(engine):
    """max_queue=1, max_batch=1: one slow request runs, one waits, the third is refused at once
    (no cost limit here: the 8-step request must be admitted however slow the machine is now)."""
    app = create_app(engine, max_queue=1, max_batch=1, window_ms=0, defaults=TINY, max_request_seconds=math.inf)
    batcher = app.state.batcher
    with BackgroundServer(app) as srv, ThreadPoolExecutor(2) as ex:
        slow = ex.submit(call, srv.url + "/v1/generate", {"prompt": "slow", "steps": 8, "response": "json"})
        _wait(lambda: batcher.in_flight == 1)
        queued = ex.submit(call, srv.url + "/v1/generate", {"prompt": "queued", "response": "json"})
        _wait(lambda: batcher.depth == 1)
        t0 = time.perf_counter()
        code, _, data = call(srv.url + "/v1/generate", {"prompt": "refused"})
        assert code == 429 and "queue full" in json.loads(data)["error"]
        assert time.perf_counter() - t0 < 2
        assert slow.result(120)[0] == 200 and queued.result(120)[0] == 200
        metrics = _metrics(srv.url)
        assert _sample(metrics, "loradex_queue_rejected_total") == 1
        assert _sample(metrics, "loradex_http_requests_total", route="/v1/generate", code="429") == 1


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _metrics(url: str) -> dict:
    """GET /metrics parsed by prometheus_client's own parser: {"types": {family: type}, "samples": [...]}
    (the parser names a counter's family without its ``_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    code, ctype, data = call(url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = list(text_string_to_metric_families(data.decode()))
    return {"types": {f.name: f.type for f in fams}, "samples": [s for f in fams for s in f.samples]}


def _sample(metrics: dict, name: str, **labels) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in metrics["samples"]
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_parse_and_count(server, adapters):
    pytest.importorskip("prometheus_client", reason="the test parses with prometheus_client")
    m0 = _metrics(server.url)
    ok = call(server.url + "/v1/generate", {"prompt": "count me", "adapters": [adapters["a"]]})
    bad = call(server.url + "/v1/generate", {"prompt": "count me", "steps": -3})
    assert (ok[0], bad[0]) == (200, 400)
    m1 = _metrics(server.url)
    for code, n in (("200", 1), ("400", 1)):
        delta = (_sample(m1, "loradex_http_requests_total", route="/v1/generate", code=code)
                 - _sample(m0, "loradex_http_requests_total", route="/v1/generate", code=code))
        assert delta == n
    types = m1["types"]
    assert types["loradex_http_requests"] == "counter" and types["loradex_generate_latency_seconds"] == "histogram"
    assert types["loradex_queue_depth"] == "gauge" and _sample(m1, "loradex_queue_depth") == 0
    count = _sample(m1, "loradex_generate_latency_seconds_count")
    assert count == _sample(m0, "loradex_generate_latency_seconds_count") + 1
    assert _sample(m1, "loradex_generate_latency_seconds_bucket", le="+Inf") == count
    assert _sample(m1, "loradex_engine_images") >= 1, "engine stats are exported"


def test_cli_serve_bad_port_is_one_line_error(capsys):
    """`loradex serve` on a port already taken: exit 2, one line, no traceback."""
    import socket

    from loradex.cli import main

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(SystemExit) as info:
            main(["serve", "--no-registry", "--allow-paths", "--port", str(s.getsockname()[1])])
    finally:
        s.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("error: cannot listen on 127.0.0.1:")
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_cli_serve_end_to_end(tmp_path, engine, adapters):
    """The installed ``loradex serve`` (tiny embedded pipeline) in a subprocess with a registry:
    a REF with a weight (``alice:0.8``) answers the same pixels as the engine given the file, a
    512 px request is refused with its cost limit, and SIGTERM stops the server cleanly (no
    traceback)."""
    import os
    import re
    import shutil
    import signal
    import subprocess

    from loradex.registry import Registry

    home = tmp_path / "home"
    from loradex.tiny import tiny_arch

    tiny_arch("sd1")
    Registry(home, create=True).add(adapters["a"], "alice", arch="tiny-sd1")
    exe = shutil.which("loradex")
    assert exe, "the loradex console script is installed"
    proc = subprocess.Popen([exe, "serve", "--port", "0", "--registry-home", str(home), "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "LORADEX_HOME": str(home)})
    try:
        url = None
        lines = []
        for line in proc.stderr:  # "loradex: serving on http://127.0.0.1:PORT"
            lines.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(lines)
        body = {"prompt": "a photo", "seed": 4, "adapters": ["alice:0.8"]}
        code, ctype, data = call(url + "/v1/generate", body)
        assert (code, ctype) == (200, "image/png"), data[:300]
        req, _ = parse_generate({**body, "adapters": [f"{adapters['a']}:0.8"]}, TINY)
        assert np.abs(pixels(data) - pixels(png_bytes(engine.generate([req])[0]))).max() <= 1
        assert call(url + "/v1/generate", {"prompt": "x", "adapters": ["bob"]})[0] == 404
        # issue 12's request: refused at once with the limit, the server stays ready
        code, _, data = call(url + "/v1/generate", {"prompt": "x", "width": 512, "height": 512, "steps": 2})
        assert code == 413 and "(--max-request-seconds)" in json.loads(data)["error"]
        code, _, data = call(url + "/healthz")
        assert code == 200 and json.loads(data)["status"] == "ok"
        # without --allow-paths a client cannot make the server read files by path
        assert call(url + "/v1/generate", {"prompt": "x", "adapters": [adapters["a"]]})[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    # uvicorn shuts down gracefully, then re-raises the captured signal: death by SIGTERM, not a crash
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in rest, rest
