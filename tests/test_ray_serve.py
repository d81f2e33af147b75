"""The Ray Serve deployment (inference/ray_serve.py): two local replicas on CPU, each with the real
Engine on the tiny pipeline; the adapter REF (here a file path) is Serve's multiplexed model id.

Requests go through Serve's real HTTP proxy with the ``serve_multiplexed_model_id`` header and
through a DeploymentHandle with ``options(multiplexed_model_id=...)``; each image must equal what a
local Engine (same tiny pipeline, same seed) gives for the same request, and repeated requests for
an adapter must be routed to the replica where it is warm.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve", reason="the 'ray' extra (ray[serve]) is not installed")
#: a Ray cluster per module: ~45 s of set-up and routing on 2 cores (run by .ci/run, -m slow)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bench):
    from loradex.demo import make_lycoris_reference

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        d = tmp_path_factory.mktemp(f"ray_adapter_{name}")
        out[name] = str(make_lycoris_reference(bench, "lora", d, seed=seed).path)
    return out


@pytest.fixture(scope="module")
def local_engine():
    engine_mod = pytest.importorskip("loradex.inference.engine",
                                     reason="the Engine (inference/engine.py) is not there yet")
    from loradex.tiny import tiny_sd_pipeline

    return engine_mod.Engine(tiny_sd_pipeline(), max_rank=8, slots=2)


@pytest.fixture(scope="module")
def cluster(local_engine):
    """A local Ray instance (2 CPUs), Serve's HTTP proxy on a free port, two replicas: what
    ``loradex serve --ray --replicas 2`` starts (through the same ``ray_serve.run``)."""
    from loradex.inference import ray_serve

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    try:
        handle = ray_serve.run(None, host="127.0.0.1", port=port, num_cpus=2, replicas=2,
                               engine_kwargs={"max_rank": 8, "slots": 2}, max_adapters_per_replica=4, window_ms=20,
                               torch_threads=1)
        yield handle, f"http://127.0.0.1:{port}"
    finally:
        ray_serve.shutdown()
    assert not ray.is_initialized()


def post(url: str, body, model_id: str | None = None):
    headers = {"Content-Type": "application/json"}
    if model_id is not None:
        headers["serve_multiplexed_model_id"] = model_id
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def reference(engine, body: dict) -> np.ndarray:
    from loradex.inference.server import parse_generate, png_bytes

    req, _ = parse_generate(body, {"steps": 2, "width": 64, "height": 64})
    return pixels(png_bytes(engine.generate([req])[0]))


def test_multiplexed_routing_and_images(cluster, adapters, local_engine):
    handle, url = cluster
    states = serve.status().applications["loradex"].deployments["loradex"].replica_states
    assert states.get("RUNNING") == 2, states
    first = {"prompt": "a photo", "seed": 3}
    again = {"prompt": "again", "seed": 5}
    replicas: dict[str, set[str]] = {"a": set(), "b": set()}
    want: dict[tuple[str, str], np.ndarray] = {}
    for name in ("a", "b"):
        ref = adapters[name]
        status, headers, data = post(url, first, model_id=ref)  # adapters absent: the model id at weight 1
        assert status == 200, data[:300]
        want[name, "first"] = reference(local_engine, {**first, "adapters": [ref]})
        assert np.abs(pixels(data) - want[name, "first"]).max() <= 1
        replicas[name].add(headers["X-Loradex-Replica"])
        want[name, "again"] = reference(local_engine, {**again, "adapters": [{"ref": ref, "weight": 0.8}]})
    assert np.abs(want["a", "first"] - want["b", "first"]).max() > 8  # the adapters matter
    time.sleep(1.0)  # the replicas report their warm ids to the controller, which tells the router
    for _ in range(2):
        for name in ("a", "b"):
            body = {**again, "adapters": [{"ref": adapters[name], "weight": 0.8}], "response": "json"}
            status, headers, data = post(url, body, model_id=adapters[name])
            assert status == 200, data[:300]
            doc = json.loads(data)
            replicas[name].add(doc["replica"])
            assert np.abs(pixels(base64.b64decode(doc["image"])) - want[name, "again"]).max() <= 1
    # each adapter stayed on the replica where it was warm
    assert len(replicas["a"]) == 1 and len(replicas["b"]) == 1, replicas
    # the handle path: the same routing by multiplexed model id, the answer as a dict
    out = handle.options(multiplexed_model_id=adapters["b"]).remote(first).result()
    assert out["status"] == 200 and out["replica"] in replicas["b"]
    assert np.abs(pixels(base64.b64decode(out["image"])) - want["b", "first"]).max() <= 1


def test_ray_bad_requests(cluster, adapters):
    _, url = cluster
    status, _, data = post(url, {"prompt": "x"}, model_id="/no/such/adapter.safetensors")
    assert status == 404 and "adapter.safetensors" in json.loads(data)["error"]
    status, _, data = post(url, {"prompt": "x", "steps": "many"}, model_id=adapters["a"])
    assert status == 400 and "steps" in json.loads(data)["error"]
