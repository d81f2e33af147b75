"""``loradex demo``: every kind x every format on a tiny built-in model (see loradex/demo.py)."""

from __future__ import annotations

import sys

import click

from loradex.cli.app import cli, emit


@cli.command("demo")
@click.option("--json", "as_json", is_flag=True, help="print the matrix as JSON")
@click.option("--only", multiple=True, help="limit to these adapters (e.g. --only loha --only lokr)")
def demo_cmd(as_json: bool, only: tuple[str, ...]) -> None:
    """Make adapters of every kind with the real tools on a tiny in-process model, convert each to
    every format, load the results back with diffusers / peft / lycoris and print the errors."""
    from loradex.demo import LYCORIS_ALGOS, format_matrix, run_demo

    known = [*LYCORIS_ALGOS, "peft-lora"]
    for o in only:
        if o not in known:
            raise click.BadParameter(f"unknown adapter {o!r}; choose from {', '.join(known)}", param_hint="--only")
    show = not as_json and sys.stderr.isatty()

    def progress(label: str) -> None:
        if show:
            click.echo(f"  {label} ...", err=True)

    result = run_demo(list(only) or None, progress=progress)
    emit(result.to_dict(), as_json, format_matrix(result))
    if result.failures:
        sys.exit(1)
