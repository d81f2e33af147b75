"""Running the ``loradex`` CLI in-process from tests, and the shape every input error must have."""

from __future__ import annotations

import pytest

from loradex.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``loradex ARGS...``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(x) for x in args])
    out, err = capsys.readouterr()
    return (info.value.code or 0), out, err


def bad(r, needle=""):
    """An input error: exit 2, nothing on stdout, ONE line ``error: ...`` (containing ``needle``)."""
    code, out, err = r
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, r
    assert needle in err, r
