"""torch, imported on first use, and mappings built on first read.

``import torch`` costs 1.5 s on a small machine, and describing an adapter file (``loradex
inspect``: keys, shapes, dtypes, alphas, hashes) needs none of it. Modules that do math with torch
bind the name ``torch`` to :data:`torch` below instead of importing it::

    if TYPE_CHECKING:
        import torch
    else:
        from loradex.core.lazy import torch

Their code is unchanged (``torch.zeros(...)``, ``isinstance(x, torch.Tensor)``): the first
attribute read imports torch, so importing the module costs nothing and a process that never
touches a tensor never imports it. Then the real module takes the stand-in's place in every
loradex module (:class:`LazyModule`), so the math pays nothing for it. Type checkers see the real
module. Code that must *not* import torch to answer (is this a tensor?) asks ``sys.modules``
instead (``core.tensorspec``).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for the module ``name``: reading any attribute imports the real module and
    answers from it. On that first read the real module also replaces the stand-in wherever a
    loradex module bound it (and in this module), so from then on ``torch.x`` is the plain module
    lookup it always was -- no indirection in the math, and what tests patch on the real module
    (``torch.save``) is what every module sees."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        _replace(self, module)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def _replace(stand_in: LazyModule, module: types.ModuleType) -> None:
    """Bind ``module`` wherever a loradex module's globals hold ``stand_in``."""
    for name, mod in list(sys.modules.items()):
        if name.partition(".")[0] != "loradex" or mod is None:
            continue
        space = getattr(mod, "__dict__", None)
        if isinstance(space, dict):
            for key, value in list(space.items()):
                if value is stand_in:
                    space[key] = module


#: torch, imported the first time one of its attributes is read (see the module docstring).
torch = LazyModule("torch")


class LazyMapping(Mapping):
    """A read-only mapping whose contents ``build()`` makes the first time it is read (a table of
    torch dtypes that must not import torch when its module is imported)."""

    def __init__(self, build: Callable[[], Mapping]) -> None:
        self._build = build
        self._data: Mapping | None = None

    def _table(self) -> Mapping:
        if self._data is None:
            self._data = dict(self._build())
        return self._data

    def __getitem__(self, key):
        return self._table()[key]

    def __iter__(self) -> Iterator:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table()) if self._data is not None else "<lazy mapping (not built yet)>"
