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
