"""The server under load (issue 12): cost limits, deadlines and cancellation, fair lanes, a truthful
/healthz, HTTP header/body timeouts.

A real uvicorn server on 127.0.0.1 in front of the real Engine on the tiny pipeline (its cost model
calibrated on this machine), talked to over real sockets. Work is sized from the server's own cost
model so that the tests take seconds whatever the machine's speed. The scheduler alone is tested
with a plain function standing in for ``engine.generate`` (as in test_server.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loradex.inference.batcher import Batcher
from loradex.inference.server import BackgroundServer, create_app, parse_generate, png_bytes
from loradex.inference.types import DeadlineError, GenerateRequest, RequestCancelled

TINY = {"steps": 2, "width": 64, "height": 64}

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"prompt": "small", "guidance_scale": 1.0}


# ---- the scheduler alone ------------------------------------------------------------------------------
def _stepper(step_s: float, log: list):
    """A generate function that runs ``request.steps`` steps of ``step_s`` seconds and calls the run
    control after each, as the engine does (no engine state to take out: a no-op suspend)."""
    def generate(requests, control=None):
        idx = list(range(len(requests)))
        for i in range(requests[0].steps):
            time.sleep(step_s)
            log.append((requests[0].prompt, i))
            if control is not None:
                control.step(idx, i, requests[0].steps, contextlib.nullcontext)
        return [r.prompt for r in requests]
    return generate


def test_large_lane_yields_to_small_requests_between_steps():
    log: list = []
    b = Batcher(_stepper(0.02, log), max_queue=32, max_batch=4, window_ms=0, large_seconds=1.0, large_share=0.25)
    try:
        big = b.submit(GenerateRequest("big", steps=40), cost=40 * 0.02 + 5)
        _wait(lambda: any(p == "big" for p, _ in log))
        smalls = [b.submit(GenerateRequest(f"s{i}", steps=1), cost=0.02) for i in range(6)]
        assert [f.result(10) for f in smalls] == [f"s{i}" for i in range(6)]
        assert not big.done(), "the small requests did not wait for the large one"
        assert big.result(10) == "big"
        # each small ran within a few large steps of its arrival, and the large one got its share
        order = [p for p, _ in log]
        first_small, last_small = order.index("s0"), max(i for i, p in enumerate(order) if p.startswith("s"))
        assert first_small < 12 and order.count("big") == 40
        assert sum(p == "big" for p in order[first_small:last_small]) <= 6
        st = b.stats()
        assert st["preemptions"] >= 1 and st["completed"] == 7 and st["lane_seconds"]["large"] > 0
    finally:
        b.close()


def test_a_paused_large_request_given_up_stops_without_another_step():
    log: list = []
    gate = threading.Event()

    def generate(requests, control=None):
        if requests[0].prompt == "small":
            gate.wait(10)  # holds the engine while the large one is paused
            return ["small"] * len(requests)
        for i in range(requests[0].steps):
            time.sleep(0.01)
            log.append(i)
            control.step([0], i, requests[0].steps, contextlib.nullcontext)
        return ["big"]

    b = Batcher(generate, max_queue=8, window_ms=0, large_seconds=1.0)
    try:
        big = b.submit(GenerateRequest("big", steps=100), cost=5.0)
        _wait(lambda: len(log) >= 1)
        small = b.submit(GenerateRequest("small"), cost=0.01)
        _wait(lambda: b.stats()["preemptions"] == 1)
        n = len(log)
        b.abandon(big)
        gate.set()
        assert small.result(10) == "small"
        with pytest.raises(RequestCancelled):
            big.result(10)
        _wait(lambda: b.in_flight == 0)
        assert len(log) == n  # resumed only to stop
        after = b.submit(GenerateRequest("next", steps=2), cost=5.0)  # the large lane is free again
        assert after.result(10) == "big"
    finally:
        gate.set()
        b.close()


def test_abandoned_and_expired_requests_stop_and_leave_the_queue():
    log: list = []
    b = Batcher(_stepper(0.02, log), max_queue=8, max_batch=1, window_ms=0)
    try:
        running = b.submit(GenerateRequest("run", steps=200))
        _wait(lambda: len(log) >= 2)
        waiting = b.submit(GenerateRequest("wait", steps=1))
        expiring = b.submit(GenerateRequest("exp", steps=1), deadline=time.monotonic() + 0.1)
        assert b.depth == 2
        b.abandon(waiting, RequestCancelled("client gone"))
        assert b.depth == 1
        with pytest.raises(RequestCancelled):
            waiting.result(1)
        with pytest.raises(DeadlineError):
            expiring.result(5)  # out of the queue at its deadline, while the engine is busy
        assert b.depth == 0
        n = len(log)
        b.abandon(running)
        with pytest.raises(RequestCancelled):
            running.result(5)
        _wait(lambda: b.in_flight == 0)
        assert len(log) - n <= 2 and all(p == "run" for p, _ in log)  # stopped within a step; others never ran
        st = b.stats()
        assert (st["cancelled"], st["expired"], st["completed"]) == (2, 1, 0)
    finally:
        b.close()


# ---- the server in front of the real Engine ----------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    engine_mod = pytest.importorskip("loradex.inference.engine")
    pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
    from loradex.tiny import tiny_sd_pipeline

    eng = engine_mod.Engine(tiny_sd_pipeline(), max_rank=8, slots=2, registry=None)
    eng.cost_model(TINY)  # calibrated once for the module
    return eng


def _sized(engine, seconds: float, side: int = 96, lo: int = 6, hi: int = 60) -> dict:
    """A request body of ``side`` px without guidance whose estimated cost is about ``seconds``."""
    step = engine.cost.step_seconds(GenerateRequest("x", width=side, height=side, guidance_scale=1.0))
    steps = int(min(hi, max(lo, math.ceil(seconds / max(step, 1e-6)))))
    return {"prompt": "large", "width": side, "height": side, "steps": steps, "guidance_scale": 1.0, "seed": 3}


def call(url: str, body=None, method: str | None = None, timeout: float = 120):
    """(status, headers, body bytes) of one HTTP request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw_post(url: str, body: dict) -> socket.socket:
    """Send a POST /v1/generate on a raw socket and return the socket (to close it early)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_512px_is_refused_with_the_limit_while_small_requests_run(engine):
    """The issue's request ({"width": 512, "height": 512, "steps": 2} on the tiny model) under the
    default limit, and a request over an explicit limit: 413 at once, naming the limit and what
    fits; never queued. Small requests are served meanwhile."""
    for limit in (None, 3.0):
        app = create_app(engine, defaults=TINY, max_request_seconds=limit)
        with BackgroundServer(app) as srv:
            lim = app.state.limits["max_request_seconds"]
            assert lim == (limit or app.state.cost.default_limit(TINY))
            t0 = time.perf_counter()
            code, _, data = call(srv.url + "/v1/generate", {"prompt": "x", "width": 512, "height": 512, "steps": 2})
            err = json.loads(data)["error"]
            assert code == 413 and f"the limit is {lim:.1f} s per request (--max-request-seconds)" in err, err
            assert time.perf_counter() - t0 < 5 and app.state.batcher.stats()["submitted"] == 0
            # the largest size the message names is admitted, 8 px more is not
            side = app.state.cost.largest_side(GenerateRequest("x", width=512, height=512, steps=2), lim)
            code, headers, _ = call(srv.url + "/v1/generate", SMALL)
            assert code == 200 and float(headers["X-Loradex-Cost-Seconds"]) < lim
            if side >= 64:
                assert f"the largest square that fits is {side}x{side}" in err
                ok = {"prompt": "x", "width": side, "height": side, "steps": 2}
                assert app.state.cost.estimate(parse_generate(ok, TINY)[0]) <= lim * 1.5  # (the fit moves)
                code, _, data = call(srv.url + "/v1/generate", {**ok, "width": 2 * side, "height": 2 * side})
                assert code == 413, data
            else:  # a machine so slow that no 2-step image fits
                assert "use fewer than 2 steps" in err


@pytest.mark.slow
def test_small_requests_keep_their_latency_while_a_large_one_runs(engine):
    """A large-but-allowed request in flight (24 steps at 80 px, the large lane): small requests sent
    meanwhile are answered in about their own time plus at most a large step, not after the large
    one; the large one's image (paused and resumed between steps) and the small ones' equal each
    request run alone."""
    cost = engine.cost
    small_est = cost.estimate(parse_generate(SMALL, TINY)[0])
    large = {"prompt": "large", "width": 80, "height": 80, "steps": 24, "guidance_scale": 1.0, "seed": 3}
    large_req = parse_generate(large, TINY)[0]
    assert cost.estimate(large_req) > 3 * small_est
    app = create_app(engine, defaults=TINY, max_request_seconds=120.0, large_seconds=3 * small_est, window_ms=5)
    batcher = app.state.batcher
    with BackgroundServer(app) as srv:
        alone = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert call(srv.url + "/v1/generate", SMALL)[0] == 200
            alone.append(time.perf_counter() - t0)
        base = sorted(alone)[1]
        steps0 = engine.stats()["steps"]
        with ThreadPoolExecutor(1) as ex:
            t_large = time.perf_counter()
            big = ex.submit(call, srv.url + "/v1/generate", large)
            _wait(lambda: engine.stats()["steps"] >= steps0 + 2)  # the large one runs
            assert batcher.stats()["running_large"] == 1
            large_step = cost.step_seconds(large_req)
            lat, smalls = [], []
            for i in range(3):
                t0 = time.perf_counter()
                code, _, data = call(srv.url + "/v1/generate", {**SMALL, "seed": i})
                lat.append(time.perf_counter() - t0)
                assert code == 200
                smalls.append(data)
            still_running = not big.done()
            code, _, big_png = big.result(300)
            large_s = time.perf_counter() - t_large
        assert code == 200
        assert still_running, f"the large request ended before the small ones ({lat}, large {large_s:.1f} s)"
        bound = 3 * base + 2 * large_step + 0.5
        assert max(lat) < bound, (lat, base, large_step)
        assert max(lat) < 0.5 * large_s
        assert batcher.stats()["preemptions"] >= 1
    # suspending and resuming a run leaves its result bit-identical
    want = png_bytes(engine.generate([large_req])[0])
    assert np.array_equal(pixels(big_png), pixels(want))
    for i, data in enumerate(smalls):
        want = png_bytes(engine.generate([parse_generate({**SMALL, "seed": i}, TINY)[0]])[0])
        assert np.array_equal(pixels(data), pixels(want))


def test_disconnected_client_stops_its_work_within_one_step(engine):
    """A waiting request whose client goes is out of the queue at once and never runs; a running
    one stops at the end of the step in progress."""
    app = create_app(engine, defaults=TINY, max_request_seconds=120.0, large_seconds=0.0)  # one at a time
    body = _sized(engine, 30.0, hi=150)
    batcher = app.state.batcher
    with BackgroundServer(app) as srv:
        steps0, batches0 = engine.stats()["steps"], engine.stats()["batches"]
        running = raw_post(srv.url, body)
        _wait(lambda: engine.stats()["steps"] >= steps0 + 2)
        waiting = raw_post(srv.url, {**body, "seed": 9})
        _wait(lambda: batcher.depth == 1)
        waiting.close()
        _wait(lambda: batcher.depth == 0, timeout=5)
        running.close()
        at_close = engine.stats()["steps"]
        _wait(lambda: batcher.in_flight == 0, timeout=30)
        after = engine.stats()["steps"]
        assert after - at_close <= 1, f"{after - at_close} steps after the client went"
        assert after - steps0 < body["steps"]
        s = batcher.stats()
        assert s["cancelled"] == 2 and s["completed"] == 0
        assert engine.stats()["batches"] == batches0  # neither finished; the waiting one never started
        assert engine.stats()["cancelled_batches"] >= 1
        # the engine is free again: a small request is served
        assert call(srv.url + "/v1/generate", SMALL)[0] == 200


def test_deadline_is_504_and_stops_the_work(engine):
    app = create_app(engine, defaults=TINY, max_request_seconds=120.0)
    body = {**_sized(engine, 30.0, hi=150), "timeout": 1.0}
    with BackgroundServer(app) as srv:
        t0 = time.perf_counter()
        code, _, data = call(srv.url + "/v1/generate", body)
        dt = time.perf_counter() - t0
        assert code == 504 and "timed out after 1 s" in json.loads(data)["error"]
        assert dt < 5
        _wait(lambda: app.state.batcher.in_flight == 0, timeout=10)
        assert app.state.batcher.stats()["expired"] == 1
        for bad in (0, -1, "1", 1e9):
            code, _, data = call(srv.url + "/v1/generate", {**SMALL, "timeout": bad})
            assert code == 400 and "timeout must be" in json.loads(data)["error"]


def test_healthz_ok_busy_overloaded(engine):
    app = create_app(engine, defaults=TINY, max_queue=2, max_request_seconds=120.0, large_seconds=0.0)
    body = _sized(engine, 30.0, hi=150)
    batcher = app.state.batcher

    def health():
        code, _, data = call(srv.url + "/healthz")
        return code, json.loads(data)

    with BackgroundServer(app) as srv:
        code, doc = health()
        assert (code, doc["status"], doc["queue_depth"]) == (200, "ok", 0)
        socks = [raw_post(srv.url, body)]
        try:
            _wait(lambda: batcher.in_flight == 1)
            code, doc = health()
            assert (code, doc["status"], doc["in_flight"]) == (200, "busy", 1) and doc["backlog_s"] > 0
            socks.append(raw_post(srv.url, {**body, "seed": 1}))
            _wait(lambda: batcher.depth == 1)
            code, doc = health()
            assert (code, doc["status"], doc["queue_depth"]) == (200, "busy", 1)
            socks.append(raw_post(srv.url, {**body, "seed": 2}))
            _wait(lambda: batcher.depth == 2)
            code, doc = health()
            assert (code, doc["status"], doc["queue_depth"], doc["max_queue"]) == (503, "overloaded", 2, 2)
            assert call(srv.url + "/v1/generate", SMALL)[0] == 429
        finally:
            for s in socks:
                s.close()
        _wait(lambda: batcher.in_flight == 0 and batcher.depth == 0, timeout=30)
        assert health()[1]["status"] == "ok"


def test_slowloris_connections_are_closed_after_the_header_timeout(engine):
    """Connections that trickle a header line at a time, send nothing, or stall in the body are
    closed with 408 after the timeouts; the server keeps answering meanwhile."""
    app = create_app(engine, defaults=TINY, header_timeout=0.5, body_timeout=0.5)
    with BackgroundServer(app) as srv:
        socks = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(30)]
        for s in socks[:25]:
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\n")
        t0 = time.perf_counter()
        stop = threading.Event()

        def trickle():
            while not stop.is_set():
                for s in socks[:25]:
                    with contextlib.suppress(OSError):
                        s.sendall(b"X-A: b\r\n")
                time.sleep(0.1)

        th = threading.Thread(target=trickle, daemon=True)
        th.start()
        try:
            assert call(srv.url + "/healthz", timeout=10)[0] == 200  # the server answers meanwhile
            closed_after, answered = [], 0
            for s in socks:
                got = b""
                try:  # the 408, then EOF (a reset when trickled bytes were still unread: closed too)
                    while chunk := s.recv(4096):
                        got += chunk
                except ConnectionResetError:
                    pass
                else:
                    assert got.startswith(b"HTTP/1.1 408"), got[:100]
                closed_after.append(time.perf_counter() - t0)
                answered += got.startswith(b"HTTP/1.1 408")
        finally:
            stop.set()
            th.join()
            for s in socks:
                s.close()
        assert max(closed_after) < 5 and answered >= 5, (closed_after, answered)
        # a body that stalls: 408 from the app after the body timeout
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        s.close()
        assert got.startswith(b"HTTP/1.1 408") and b"body not received within 0.5 s" in got
        # a kept-alive connection idle for less than the timeout between requests still works
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
        s.close()
