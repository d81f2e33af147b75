"""Logging for loradex: one ``loradex`` logger tree, and third-party chatter silenced by its own loggers.

Library modules log with ``logging.getLogger(__name__)`` (all under ``loradex``) and never print or
configure handlers; the CLI calls :func:`setup` once with the ``-v``/``-q`` count.

:func:`quiet` is what every place that builds models or adapters uses: diffusers, transformers, peft
and LyCORIS all print notices for toy-sized configs (``LyCORIS`` even logs INFO lines to *stdout*
through its own handler with ``propagate = False``, lycoris-lora 4.1.3 ``lycoris/logging.py``), so
their loggers are raised to ERROR and their Python warnings ignored for the duration. Nothing
touches ``sys.stderr``: redirecting it would swallow other threads' output (the server's, a progress
bar's) and is not thread-safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator

#: Loggers of the libraries loradex drives, silenced by :func:`quiet`.
THIRD_PARTY = ("diffusers", "transformers", "peft", "lycoris", "LyCORIS", "huggingface_hub", "accelerate")

class _AtLeast(logging.Filter):
    """Drops records below ``level``. A *filter*, not only a level, because lycoris-lora resets its
    ``LyCORIS`` logger to INFO when it is first imported (``lycoris/logging.py``), which may happen
    inside a ``quiet()`` block or after ``setup()``; filters on the logger object survive that."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


_ERRORS_ONLY = _AtLeast(logging.ERROR)
_lock = threading.RLock()
_depth = 0
_saved: list[tuple[logging.Logger, int]] = []
_saved_tlevel: int | None = None
_saved_filters: list | None = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the third-party loggers in :data:`THIRD_PARTY` (and transformers' own verbosity, which
    it keeps apart from ``logging``) and Python warnings while the block runs. Re-entrant and
    thread-safe: levels are saved by the outermost entry and restored when the last one exits."""
    global _depth, _saved_tlevel, _saved_filters
    with _lock:
        if _depth == 0:
            # warnings are process-wide: saved and set by the outermost entry, restored by the last
            # exit (``warnings.catch_warnings`` per block would restore out of order across threads)
            _saved_filters = warnings.filters[:]
            warnings.simplefilter("ignore")
            _saved[:] = [(lg, lg.level) for lg in map(logging.getLogger, THIRD_PARTY)]
            for lg, _ in _saved:
                lg.setLevel(logging.ERROR)
                lg.addFilter(_ERRORS_ONLY)
            try:
                from transformers.utils import logging as tlog

                _saved_tlevel = tlog.get_verbosity()
                tlog.set_verbosity_error()
            except ImportError:  # pragma: no cover - transformers is a dependency
                _saved_tlevel = None
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _saved_filters is not None:
                    warnings.filters[:] = _saved_filters
                    warnings._filters_mutated()  # type: ignore[attr-defined]  # drop the "once" caches
                    _saved_filters = None
                for lg, level in _saved:
                    lg.setLevel(level)
                    if not getattr(lg, "_loradex_quiet", False):  # setup() may want it kept
                        lg.removeFilter(_ERRORS_ONLY)
                _saved.clear()
                if _saved_tlevel is not None:
                    from transformers.utils import logging as tlog

                    tlog.set_verbosity(_saved_tlevel)


def setup(verbosity: int = 0) -> None:
    """Configure logging for the CLI. ``verbosity`` is ``-v`` count minus ``-q`` count: 0 shows
    loradex's warnings, 1 its info lines, 2 debug lines and the third-party libraries' info too;
    negative shows errors only. Messages go to stderr as ``loradex: message``."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(max(-1, min(verbosity, 2)), logging.DEBUG)
    root = logging.getLogger("loradex")
    root.setLevel(level)
    if not any(getattr(h, "_loradex", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("loradex: %(message)s"))
        handler._loradex = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    third = logging.INFO if verbosity >= 2 else logging.ERROR
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        lg.setLevel(third)
        lg._loradex_quiet = verbosity < 2  # type: ignore[attr-defined]
        if verbosity < 2:
            lg.addFilter(_ERRORS_ONLY)
        else:
            lg.removeFilter(_ERRORS_ONLY)
    # transformers and diffusers keep a verbosity of their own, read from these variables when they
    # are first imported (importing them here would cost seconds on every ``--help``).
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "info" if verbosity >= 2 else "error")
