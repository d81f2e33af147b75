"""``loradex similar``, ``loradex conflicts`` and the ``--quality`` part of ``loradex inspect``.

Thin: parse, call ``registry.sketches.similar`` / ``merge.conflicts.conflicts`` /
``core.quality.quality``, print (``--json`` for every figure, lists never cut there).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import click

from loradex.cli.app import cli, emit
from loradex.cli.registry import arch_options, chosen_arch, input_path

log = logging.getLogger(__name__)


def base_weight_getter(stack: contextlib.ExitStack, b):
    """``name -> base weight or None`` for a resolved ``--base`` with weights (a folder or file),
    else None (an architecture name has no weights)."""
    if b is None or getattr(b, "path", None) is None:
        return None
    from loradex.converters.checkpoint import CheckpointReader

    reader = CheckpointReader(b.path, arch=b.arch)

    def get(name: str):
        return reader.weight(name).float() if reader.has(name) else None

    return get


def quality_report(path, arch, b, strict: bool, stack: contextlib.ExitStack) -> tuple[dict, list[str]]:
    """``(json, text lines)`` of ``core.quality`` for the adapter at ``path`` (``inspect --quality``)."""
    from loradex.api import load
    from loradex.core.quality import format_quality, quality

    adapter = load(path, arch=arch, strict=strict)
    rep = quality(adapter, base_weights=base_weight_getter(stack, b))
    lines = format_quality(rep)
    if b is not None and getattr(b, "path", None) is None:
        lines.append(f"note:        --base {b.spec} names an architecture without weights: no ||dW||/||W||")
    return rep.to_dict(), lines


def _bar(as_json: bool, **kw):
    if as_json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, **kw)


@cli.command("similar")
@click.argument("ref", metavar="REF|PATH")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="how many stored versions to list")
@click.option("--exact", is_flag=True, help="recompute the listed cosines exactly from both adapters' factors (loads each)")
@click.option("--no-reindex", "no_reindex", is_flag=True,
              help="do not sketch stored versions that have no sketch yet (they are then not searched)")
@arch_options
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def similar_cmd(ref: str, top: int, exact: bool, no_reindex: bool, arch, base, as_json: bool) -> None:
    """The stored adapters closest to REF (a registry REF, or an adapter file) by the cosine of
    their whole updates, estimated from sketches (random projections of each module's update,
    made from the factors); --exact recomputes the listed ones exactly. A cosine near 1 is the
    same update (a re-saved, converted, fp16 or resized copy), near 0 unrelated, negative opposed."""
    from loradex.registry import Registry, sketches

    reg = Registry()
    reindexed = None
    if not no_reindex:
        bar = _bar(as_json, desc="sketching", unit="version")
        try:
            reindexed = sketches.reindex(reg, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
    if Path(ref).exists():
        from loradex.api import load

        with contextlib.ExitStack() as stack:
            a, _ = chosen_arch(stack, arch, base)
            adapter = load(ref, arch=a)
        rep = sketches.similar(reg, None, top=top, exact=exact, adapter=adapter, label=ref)
    else:
        if arch or base:
            raise click.UsageError("--arch/--base apply to a file; a REF uses the architecture it was stored with")
        rep = sketches.similar(reg, ref, top=top, exact=exact)
    d = rep.to_dict()
    if reindexed is not None:
        d["reindexed"] = reindexed
    lines = [f"similar to {rep.query} ({rep.family or 'unknown family'}, {rep.modules} modules sketched): "
             f"{rep.scanned} stored versions scanned, {rep.candidates} re-ranked, {rep.seconds * 1000:.0f} ms"]
    if reindexed and (reindexed["sketched"] or reindexed["none"]):
        lines.append(f"  (sketched {len(reindexed['sketched'])} versions that had no sketch"
                     + (f"; {len(reindexed['none'])} have none: --json says why" if reindexed["none"] else "") + ")")
    if not rep.hits:
        lines.append("  no stored adapter of this family to compare with")
    else:
        head = "  cosine  modules" + ("   exact" if exact else "") + "  version"
        lines.append(head)
        for h in rep.hits:
            ex = ""
            if exact:
                c = (h.exact or {}).get("cosine")
                ex = f"  {c:+.4f}" if c is not None else "       -"
            lines.append(f"  {h.cosine:+.3f}  {h.modules:7d}{ex}  {h.ref}" + ("  (partial)" if h.partial else ""))
    if rep.skipped:
        first = next(iter(rep.skipped.items()))
        more = f" and {len(rep.skipped) - 1} more" if len(rep.skipped) > 1 else ""
        lines.append(f"  not compared: {first[0]} ({first[1]}){more} (--json lists all)")
    if rep.partial or any(h.partial for h in rep.hits):
        lines.append("  (partial): DoRA/GLoRA modules compared through their base-free part")
    if rep.dropped_stale:
        lines.append(f"  dropped {len(rep.dropped_stale)} stale sketches of removed versions")
    emit(d, as_json, "\n".join(lines))


def _parse_weighted(arg: str) -> tuple[str, float]:
    """``IN[:W]``: an existing path as is; else a trailing ``:number`` is the weight (a registry
    ``NAME:TAG`` stays whole)."""
    if Path(arg).exists():
        return arg, 1.0
    head, sep, w = arg.rpartition(":")
    if sep and head:
        try:
            return head, float(w)
        except ValueError:
            if Path(head).exists():
                raise click.BadParameter(f"weight {w!r} of {arg!r} is not a number", param_hint="IN[:W]") from None
    return arg, 1.0


@cli.command("conflicts")
@click.argument("inputs", nargs=-1, required=True, metavar="IN[:W]...")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.3, show_default=True,
              help="a pair fights in a block where |overlap| reaches this")
@click.option("--min-share", type=click.FloatRange(0, 1, max_open=True), default=0.02, show_default=True,
              help="... and the block holds at least this share of both adapters' energy")
@arch_options
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def conflicts_cmd(inputs, threshold: float, min_share: float, arch, base, as_json: bool) -> None:
    """Where adapters IN (files or registry REFs, each with an optional weight W) change the same
    blocks, exactly from the factors: per LBW block the cosine and the relative overlap
    2<A,B>/(||A||^2+||B||^2) of their updates, the pairs that fight (opposing or overlapping), and
    block weights for `loradex merge IN:W:BLOCKS` that remove the overlap. With --base (a model
    with weights) base-dependent kinds (IA3, OFT, BOFT, DoRA, GLoRA) are compared whole."""
    from loradex.api import load
    from loradex.merge.conflicts import conflicts, format_conflicts

    if len(inputs) < 2:
        raise click.UsageError("conflicts needs at least two adapters")
    parsed = [_parse_weighted(x) for x in inputs]
    with contextlib.ExitStack() as stack:
        a, b = chosen_arch(stack, arch, base)
        items = []
        for path, w in parsed:
            p, version = stack.enter_context(input_path(path))
            ad = load(p, arch=a if a is not None else chosen_arch(stack, None, None, version)[0])
            items.append((path, ad, w))
        rep = conflicts(items, arch=a, threshold=threshold, min_share=min_share,
                        base_weights=base_weight_getter(stack, b))
    emit(rep.to_dict(), as_json, "\n".join(format_conflicts(rep)))
