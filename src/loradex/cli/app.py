"""The ``loradex`` click group and what every command module shares: ``emit`` (text or
``--json``), ``first`` (lists never cut silently), ``LazyHelpOption``/``format_help`` (help texts
derived from the registries), and ``main`` (one-line errors, exit 2).

Every failure caused by input prints ONE line ``error: ...`` on stderr and exits 2 (click's own
usage errors included); no traceback reaches the user unless ``LORADEX_DEBUG=1``. The command
modules import this module; ``loradex.cli`` imports them (so they register), never the reverse.
"""

from __future__ import annotations

import json
import os
import sys

import click

from loradex.errors import LoradexError


class LazyHelpOption(click.Option):
    """An option whose help text is computed when help is shown (``help_fn()``): texts derived from
    a registry (the ``--to`` formats) stay true without importing it to build the command table."""

    def __init__(self, *args, help_fn, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._help_fn = help_fn

    def get_help_record(self, ctx):
        """click's ``(opts, help)`` pair, with ``help`` recomputed from ``help_fn`` first."""
        self.help = self._help_fn()
        return super().get_help_record(ctx)


def format_help(prefix: str = "") -> str:
    """``--to`` help: ``prefix`` followed by every write target of the format registry.

    The registry is built by importing the format modules, which import torch (seconds); the text
    is cached in ``$LORADEX_CACHE`` keyed by the format modules' names, sizes and mtimes, so a
    ``--help`` after the first costs no import and changes as soon as a format file does. A process
    that has the registry loaded already (formats registered by a plugin) reads it live."""
    import json
    from pathlib import Path

    if "loradex.converters" in sys.modules:  # already paid for: the live registry (plugins included)
        from loradex.converters import targets_help

        return f"{prefix}{targets_help()}"
    pkg = Path(__file__).resolve().parent.parent / "converters"
    try:
        stamp = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in pkg.glob("*.py"))
    except OSError:
        stamp = None
    cache = Path(os.environ.get("LORADEX_CACHE") or Path.home() / ".cache" / "loradex") / "format-help.json"
    key = json.dumps(stamp)
    try:
        got = json.loads(cache.read_text())
        if stamp is not None and got.get("key") == key:
            return f"{prefix}{got['text']}"
    except (OSError, ValueError, AttributeError):
        pass
    from loradex.converters import targets_help

    text = targets_help()
    if stamp is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "text": text}))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home: no cache, the text is still right
    return f"{prefix}{text}"


def first(lines: list[str], limit: int = 20, indent: str = "  ") -> list[str]:
    """``lines`` cut to ``limit``, with ``... and N more (--json lists all)`` when cut: a report never
    drops entries silently, and ``--json`` always holds the whole list."""
    if len(lines) <= limit:
        return list(lines)
    return list(lines[:limit]) + [f"{indent}... and {len(lines) - limit} more (--json lists all)"]


def emit(obj, as_json: bool, text: str | None = None) -> None:
    """A command's result on stdout: ``obj`` as indented, key-sorted JSON under ``--json`` (values
    JSON cannot hold, e.g. paths and dtypes, as ``str``), else ``text`` (nothing when None)."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    elif text is not None:
        click.echo(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loradex")
@click.option("-v", "--verbose", count=True, help="more log lines on stderr (-vv: the libraries' own too)")
@click.option("-q", "--quiet", count=True, help="errors only on stderr")
def cli(verbose: int, quiet: int) -> None:
    """Store, convert, merge, serve and train diffusion-model adapters (LoRA, LyCORIS, TI)."""
    from loradex.log import setup

    setup(verbose - quiet)


def _verbosity(args: list[str]) -> int:
    """``-v`` count minus ``-q`` count of the options before the command name (``-vv``, ``-v -v``,
    ``--verbose``), read before click parses them: transformers reads its verbosity once, when
    first imported."""
    n = 0
    for a in args:
        if not a.startswith("-"):
            break
        if a in ("--verbose", "--quiet"):
            n += 1 if a == "--verbose" else -1
        elif not a.startswith("--"):
            n += a.count("v") - a.count("q")
    return n


def main(argv: list[str] | None = None) -> None:
    """The console entry point: run ``loradex`` on ``argv`` (default ``sys.argv[1:]``) and exit.

    Exit status: the command's (0 on success); 2 with one ``error: ...`` line for bad input
    (click usage errors, any LoradexError); 130 on Ctrl-C / abort; 1 with one line for anything
    else (a bug; ``LORADEX_DEBUG=1`` re-raises it with its traceback). Never returns."""
    # transformers prints import-time notices (e.g. about torchvision) that are noise on a CLI;
    # ``-vv`` turns them back on (loradex.log.setup)
    if _verbosity(argv if argv is not None else sys.argv[1:]) < 2:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        rv = cli.main(args=argv, prog_name="loradex", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(2)
    except LoradexError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug: still one line, details with LORADEX_DEBUG=1
        if os.environ.get("LORADEX_DEBUG"):
            raise
        click.echo(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                   "rerun with LORADEX_DEBUG=1 for details", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
