"""The ``loradex`` command: thin click commands that parse, call one library function, print.

The group and the shared helpers live in ``cli/app.py``; each ``cli/<topic>.py`` registers its
commands on that group when imported, which this module does below (one line per module). The
arrows point one way: ``cli`` -> command modules -> ``cli.app``.
"""

from __future__ import annotations

from loradex.cli import analyze as _analyze  # noqa: F401
from loradex.cli import checkpoint as _checkpoint  # noqa: F401  (registers commands)
from loradex.cli import convert as _convert  # noqa: F401
from loradex.cli import demo as _demo  # noqa: F401
from loradex.cli import generate as _generate  # noqa: F401
from loradex.cli import merge as _merge  # noqa: F401
from loradex.cli import registry as _registry  # noqa: F401
from loradex.cli import serve as _serve  # noqa: F401
from loradex.cli import train as _train  # noqa: F401
from loradex.cli.app import LazyHelpOption, cli, emit, first, format_help, main  # noqa: F401  (re-exported)
