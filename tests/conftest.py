"""Shared fixtures: tiny models built in-process (no network), and a quiet lycoris."""

from __future__ import annotations

import logging

import pytest

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def bench():
    """The demo's tiny SD pipeline with fixed UNet inputs (see loradex/demo.py)."""
    from loradex.demo import TinyBench

    return TinyBench()
