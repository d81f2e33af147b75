"""Shared fixtures: tiny models built in-process (no network), and a quiet lycoris."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
# a fresh architecture-table cache per test session (tests build the tables, and test the cache)
os.environ["LORADEX_CACHE"] = tempfile.mkdtemp(prefix="loradex-cache-")


@pytest.fixture(scope="session")
def bench():
    """The demo's tiny SD pipeline with fixed UNet inputs (see loradex/demo.py)."""
    from loradex.demo import TinyBench

    return TinyBench()


@pytest.fixture(scope="module", autouse=True)
def _archs_per_module():
    """Archs a test module derives or registers stay in that module: detection tries the archs known
    to the process first, so one module's custom bases must not decide another module's files."""
    from loradex.core.archs import lookup

    with lookup._LOCK:
        custom, derived = dict(lookup._CUSTOM), dict(lookup._DERIVED)
    yield
    with lookup._LOCK:
        lookup._CUSTOM.clear()
        lookup._CUSTOM.update(custom)
        lookup._DERIVED.clear()
        lookup._DERIVED.update(derived)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (``pytestmark = usefixtures``): on a
    shared 2-core machine two spinning OpenMP threads per process make each call of a tiny model
    ~20x slower (measured: 0.42 s vs 0.02 s for a tiny UNet at 8x8)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty registry home (``LORADEX_HOME``) of this test's own."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(h))
    return h


@pytest.fixture
def reg(home):
    """A ``Registry`` in :func:`home`, closed after the test."""
    from loradex import Registry

    r = Registry()
    yield r
    r.close()
