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
