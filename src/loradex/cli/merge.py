"""``loradex resize`` and ``loradex merge``."""

from __future__ import annotations

import click

from loradex.cli.app import cli, emit, first
from loradex.cli.options import dtype_option
from loradex.cli.registry import (
    arch_options,
    chosen_arch,
    force_option,
    input_path,
    output_path,
    recorded_base,
    save_as_option,
    store_output,
    strict_option,
)


def default_format(adapter) -> str:
    """The input's format when it can hold ``adapter`` (modules of LoRA kind only for diffusers and
    peft, embeddings only in kohya files), else kohya."""
    from loradex.converters import converters, lora_targets, resolve_name

    fmt = (adapter.source_format or "").lower()
    if fmt not in lora_targets():
        return "kohya"
    fmt = resolve_name(fmt)  # comfy -> kohya: the writer of the keys ComfyUI loads
    conv = converters()[fmt]
    if adapter.embeddings and not conv.embeddings:
        return "kohya"
    if conv.kinds is not None and any(p.kind != "lora" or getattr(p, "mid", None) is not None
                                      for p in adapter.patches.values()):
        return "kohya"
    return fmt


def _parse_item(arg: str) -> tuple[str, float]:
    """``PATH[:W]``: the weight is what follows the last colon when it is a plain decimal number
    (the registry's rule, ``loradex.registry.split_weight``: ``sha256:HEX`` alone is always a REF);
    otherwise the whole argument is a file or a registry ``NAME:TAG`` reference, unless the part
    before the colon is an existing file or the tail looks like a number (then the weight is bad:
    exit 2)."""
    from pathlib import Path

    from loradex.registry.refs import split_weight

    if Path(arg).exists():
        return arg, 1.0
    ref, w, explicit = split_weight(arg)
    if explicit:
        return ref, w
    path, sep, tail = arg.rpartition(":")
    if sep and path and path.lower() != "sha256" and (Path(path).exists() or (tail and tail[0] in "+-.0123456789")):
        raise click.BadParameter(f"weight {tail!r} of {arg!r} is not a number", param_hint="IN[:W]")
    return arg, 1.0


def _write(adapter, to, dst, save_as, operation, parents, params, arch, base=None, dtype=None):
    from loradex.api import save

    to = to or default_format(adapter)
    with output_path(dst, save_as, folder=to.lower() == "peft", fmt=to) as out:
        report = save(adapter, out, to, arch=arch, dtype=dtype)
        saved = store_output(out, save_as, operation, parents, params, arch=arch or adapter.arch,
                             base=base) if save_as else None
    return to, report, saved, (str(out) if dst is not None else None)


def _tail(d: dict, text: list[str], dst, to, wreport, saved) -> None:
    d.update(dst=dst, format=to, write=wreport.to_dict())
    text.append(f"wrote {dst} ({wreport.target}): {wreport.summary()}" if dst else f"written ({wreport.target})")
    if saved is not None:
        d["saved_as"] = saved.to_dict(metadata=False)
        text.append(f"stored as {saved.ref} (sha256 {saved.sha256[:12]})")
    text += first([f"  note: {n}" for n in wreport.notes])


def dynamic_rank_options(f):
    """``--fro/--ratio/--cumulative``: the per-module rank policies of ``core.linalg.rank_for``
    (resize, merge and extract take the same three; ``--rank`` is each command's own)."""
    for opt in reversed((
        click.option("--fro", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="per module, the smallest rank with ||dW_k|| >= F ||dW||"),
        click.option("--ratio", type=click.FloatRange(0, min_open=True), default=None,
                     help="per module, the singular values S_i > S_0 / R"),
        click.option("--cumulative", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="per module, the smallest rank with sum(S[:k]) >= C sum(S)"),
    )):
        f = opt(f)
    return f


@cli.command("resize")
@click.argument("src", type=click.Path(exists=False), metavar="IN|REF")
@click.option("-o", "--output", "dst", default=None, type=click.Path(), help="output file; optional with --save-as")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="fixed rank (with --fro/--ratio/--cumulative: a cap)")
@dynamic_rank_options
@click.option("--to", "to", default=None, help="output format (default: the input's when it can hold the result, else kohya)")
@dtype_option("the input's")
@arch_options
@strict_option
@force_option
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def resize_cmd(src, dst, rank, fro, ratio, cumulative, to, dtype, arch, base, strict, force, save_as, as_json):
    """Truncate every LoRA / LoHa / LoKr module of IN to a fixed or per-module dynamic rank (SVD from
    the factors; the scale alpha/rank is preserved). Other kinds are kept as they are."""
    from loradex.api import load
    from loradex.merge import resize

    if rank is None and fro is None and ratio is None and cumulative is None:
        raise click.UsageError("give a policy: --rank N, --fro F, --ratio R or --cumulative C")
    if sum(v is not None for v in (fro, ratio, cumulative)) > 1:
        raise click.UsageError("give at most one of --fro, --ratio, --cumulative")
    import contextlib

    with contextlib.ExitStack() as stack:
        src_path, version = stack.enter_context(input_path(src))
        a, b = chosen_arch(stack, arch, base, version)
        adapter = load(src_path, arch=a, strict=strict)
        out, report = resize(adapter, rank=rank, fro=fro, ratio=ratio, cumulative=cumulative)
        params = {"rank": rank, "fro": fro, "ratio": ratio, "cumulative": cumulative, "to": to, "base": base,
                  "dtype": dtype}
        to, wreport, saved, dst = _write(out, to, dst, save_as, "resize", [version or src_path],
                                    {k: v for k, v in params.items() if v is not None}, a, b or recorded_base(version),
                                    dtype=dtype)
    d = {"src": src, **report.to_dict()}
    text = [f"resized {src}: {report.summary()}"]
    text += first([f"  {name}: rank {m['old_rank']} -> {m['new_rank']}, {_kept(m)}"
                   for name, m in sorted(report.modules.items(), key=lambda kv: -kv[1]["error"])])
    text += first([f"  kept {name}: {why}" for name, why in report.kept.items()])
    _tail(d, text, dst, to, wreport, saved)
    emit(d, as_json, "\n".join(text))


def _kept(m: dict) -> str:
    """What a truncation kept: the energy (share of sum S^2: what --cumulative-style policies and
    the error bound speak of), the norm share sqrt(energy) (what --fro names), the relative error."""
    return (f"energy {m['energy']:.4f} (norm {m['energy'] ** 0.5:.4f}), rel. error {m['error']:.3g}")


def _parse_merge_item(arg: str) -> tuple[str, float, str | None]:
    """``IN[:W[:BLOCKS]]``: ``BLOCKS`` (a preset name or ``w,w,...``) after a numeric weight; else as
    :func:`_parse_item`."""
    from pathlib import Path

    if not Path(arg).exists():
        parts = arg.rsplit(":", 2)
        if len(parts) == 3 and parts[0] and parts[2] and parts[0].lower() != "sha256":
            try:
                return parts[0], float(parts[1]), parts[2]
            except ValueError:
                pass
    path, w = _parse_item(arg)
    return path, w, None


_METHOD_HELP = ("concat: the exact weighted sum (ranks add up; one input: only scaled, kinds kept); "
                "svd: that sum reduced to the rank policy; ties / dare / dare_ties / magnitude: peft's "
                "sparsifying merges of the dense updates (--density), then the same reduction")


@cli.command("merge")
@click.argument("inputs", nargs=-1, required=True, metavar="IN[:W[:BLOCKS]]...")
@click.option("-o", "--output", "dst", default=None, type=click.Path(), help="output file; optional with --save-as")
@click.option("--method", type=click.Choice(["concat", "svd", "ties", "dare", "dare_ties", "magnitude"]),
              default="concat", show_default=True, help=_METHOD_HELP)
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="svd/ties/dare/magnitude: fixed rank (with --fro/--ratio/--cumulative: a cap)")
@dynamic_rank_options
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="ties/dare/magnitude: the kept fraction of each input's entries, in (0, 1]")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the drop masks")
@click.option("--blocks", default=None,
              help="block weights for every input without its own :BLOCKS: a preset (ALL, INALL, MIDD, OUTALL, ...) "
                   "or w,w,... (SD1 17/26, SDXL 12/20, FLUX 61 entries; other bases: their own layout)")
@click.option("--to", "to", default=None,
              help="output format (default: the first input's when it can hold the result, else kohya)")
@dtype_option("the inputs'")
@arch_options
@strict_option
@click.option("--allow-nonfinite", is_flag=True, help="merge inputs holding NaN/Inf values anyway")
@force_option
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def merge_cmd(inputs, dst, method, rank, fro, ratio, cumulative, density, seed, blocks, to, dtype, arch, base, strict,
              allow_nonfinite, force, save_as, as_json):
    """Merge adapters IN (files or registry REFs), each with an optional weight W (default 1,
    negative allowed) and block weights BLOCKS. concat: the result's update is exactly
    sum_i W_i dW_i (LoHa/LoKr through their exact LoRA form). Embeddings are kept (a token in
    several inputs: weighted average). One input with --blocks applies block weights."""
    import contextlib
    import sys

    from loradex.api import load
    from loradex.merge import merge

    if sum(v is not None for v in (fro, ratio, cumulative)) > 1:
        raise click.UsageError("give at most one of --fro, --ratio, --cumulative")
    if method == "concat" and any(v is not None for v in (rank, fro, ratio, cumulative, density)):
        raise click.UsageError("--rank/--fro/--ratio/--cumulative/--density apply to --method svd, ties, dare, "
                               "dare_ties or magnitude (concat is exact)")
    if method == "svd" and density is not None:
        raise click.UsageError("--density applies to ties, dare, dare_ties and magnitude")
    parsed = [_parse_merge_item(a) for a in inputs]
    with contextlib.ExitStack() as stack:
        items, parents, bases = [], [], []
        a, b = chosen_arch(stack, arch, base)
        for path, w, spec in parsed:
            p, version = stack.enter_context(input_path(path))
            items.append((load(p, arch=a if a is not None else chosen_arch(stack, None, None, version)[0],
                               strict=strict), w, spec))
            parents.append(version or p)
            bases.append(recorded_base(version))
        out, report = merge(items, method=method, rank=rank, fro=fro, ratio=ratio, cumulative=cumulative,
                            density=density, seed=seed, blocks=blocks, arch=a,
                            progress=not as_json and sys.stderr.isatty(), allow_nonfinite=allow_nonfinite)
        params = {"method": method, "weights": [w for _, w, _ in parsed], **report.params,
                  **({"blocks": blocks} if blocks else {}),
                  **({"input_blocks": [b for _, _, b in parsed]} if any(b for _, _, b in parsed) else {}),
                  **({"to": to} if to else {}), **({"dtype": dtype} if dtype else {})}
        same = {x.identity for x in bases if x is not None}
        inherited = next(x for x in bases if x is not None) if len(same) == 1 and None not in bases else None
        to, wreport, saved, dst = _write(out, to, dst, save_as, "merge", parents, params, a, b or inherited,
                                         dtype=dtype)
    d = {"inputs": [p for p, _, _ in parsed], **report.to_dict()}
    text = [f"merged: {report.summary()}"]
    if report.method not in ("concat",):
        text += first([f"  {name}: rank {m['rank']}, {_kept(m)}"
                       for name, m in sorted(report.modules.items(), key=lambda kv: -kv[1].get("error", 0.0))
                       if m.get("rank") is not None])
    for i, b in report.blocks.items():
        w = b["block_weights"]
        text.append(f"  input {i}: block weights {w['spec']} ({w['layout']} entries): {len(b['dropped'])} modules "
                    f"dropped, {len(b['outside'])} outside the blocks kept at 1")
    text += [f"  warning: {w}" for w in report.warnings]
    _tail(d, text, dst, to, wreport, saved)
    emit(d, as_json, "\n".join(text))
