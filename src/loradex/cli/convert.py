"""``loradex inspect`` and ``loradex convert``."""

from __future__ import annotations

import contextlib

import click

from loradex.cli.app import LazyHelpOption, cli, emit, first, format_help
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
    unexplained_lines,
)


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items()) or "-"


@cli.command("inspect")
@click.argument("path", type=click.Path(exists=False), metavar="PATH|REF")
@arch_options
@strict_option
@click.option("--quality", is_flag=True,
              help="per module: singular values from the factors, effective rank, energy at rank r/2, norm "
                   "(relative to --base's weights when it has them), dead / outlier / non-finite flags")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report")
def inspect_cmd(path: str, arch: str | None, base: str | None, strict: bool, quality: bool, as_json: bool) -> None:
    """Format, arch, kinds, modules, ranks, alphas, embeddings, metadata and hashes of PATH (or of a
    registry REF: NAME, NAME@N, NAME:TAG, sha256 prefix); --quality adds the spectrum and flags."""
    from loradex.api import inspect

    with contextlib.ExitStack() as stack:
        p, version = stack.enter_context(input_path(path))
        a, b = chosen_arch(stack, arch, base, version)
        info = inspect(p, arch=a, strict=strict)
        if quality:
            from loradex.cli.analyze import quality_report

            info["quality"], quality_lines = quality_report(p, a, b, strict, stack)
    if version is not None:
        info.update(path=path, ref=version.ref)
    if as_json:
        emit(info, True)
        return
    lines = [
        f"path:        {info['path']}",
        f"format:      {info['format']}",
        f"arch:        {info['arch'] or 'unknown'}",
        f"modules:     {info['modules']} ({_fmt_counts(info['components'])})",
        f"kinds:       {_fmt_counts(info['kinds'])}" + (f" (+DoRA on {info['dora']})" if info["dora"] else ""),
        f"ranks:       {_fmt_counts(info['ranks'])}",
        f"alphas:      {_fmt_counts(info['alphas'])}",
        f"dtype:       {info['dtype']}",
    ]
    for tok, e in info["embeddings"].items():
        enc = ", ".join(f"{c} {s}" for c, s in e["encoders"].items())
        lines.append(f"embedding:   {tok!r}: {e['vectors']} vectors ({enc})")
    m = info["metadata"]
    lines.append(f"metadata:    {m['keys']} keys" + "".join(f"; {k}={v}" for k, v in m.items() if k != "keys" and v))
    if "hashes" in info:
        h = info["hashes"]
        lines.append(f"sha256:      {h['sha256']}")
        lines.append(f"civitai:     AutoV1 {h['autov1']}  AutoV2 {h['autov2']}  AutoV3 {h['autov3'] or '-'}")
    lines += first([f"note:        {n}" for n in info["notes"]], 10, indent="note:        ")
    if info.get("nonfinite"):
        bad = info["nonfinite"]
        lines.append(f"NaN/Inf:     {len(bad)} modules hold non-finite values: {', '.join(bad[:5])}"
                     + (f" and {len(bad) - 5} more (--json lists all)" if len(bad) > 5 else "")
                     + "; merge, bake and add refuse it without --allow-nonfinite")
    if info.get("unexplained"):
        lines.append(f"unexplained: {len(info['unexplained'])} keys no kind or module explains (not read)")
        lines += unexplained_lines(info["unexplained"], indent="  ")
    if quality:
        lines += quality_lines
    emit(info, False, "\n".join(lines))


@cli.command("convert")
@click.argument("src", type=click.Path(exists=False), metavar="SRC|REF")
@click.option("-o", "--output", "dst", default=None, type=click.Path(),
              help="output file (a folder for peft); optional with --save-as")
@click.option("--to", "to", required=True, cls=LazyHelpOption, help_fn=format_help)
@click.option("--rank", type=int, default=None, help="SVD rank for kinds the target cannot hold exactly")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None, help="cast the output tensors")
@arch_options
@strict_option
@click.option("--uniform-alpha", is_flag=True,
              help="kohya: fold per-module alphas into lora_up so diffusers' kohya loader reads the file exactly")
@force_option
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the conversion report as JSON")
def convert_cmd(
    src: str, dst: str | None, to: str, rank: int | None, dtype: str | None, arch: str | None, base: str | None,
    strict: bool, uniform_alpha: bool, force: bool, save_as: str | None, as_json: bool
) -> None:
    """Convert SRC (any supported format) to FORMAT, exact wherever the math allows.

    Modules of a kind the target cannot hold become LoRA: exactly for LoHa (rank r1*r2), LoKr
    (product of the factor ranks) and Tucker LoCon; otherwise by SVD at --rank, with the error
    reported per module."""
    from loradex.api import convert

    options = {"uniform_alpha": True} if uniform_alpha else {}
    with contextlib.ExitStack() as stack:
        src_path, version = stack.enter_context(input_path(src))
        a, b = chosen_arch(stack, arch, base, version)
        out = stack.enter_context(output_path(dst, save_as, folder=to.lower() == "peft", fmt=to))
        dst = str(out) if dst is not None else None
        report = convert(src_path, out, to, rank=rank, dtype=dtype, arch=a, strict=strict, **options)
        saved = None
        if save_as:
            params = {"to": to, "rank": rank, "dtype": dtype, "arch": getattr(a, "name", a), "base": base, **options}
            saved = store_output(out, save_as, "convert", [version or src_path], {k: v for k, v in params.items() if v},
                                 arch=a, base=b or recorded_base(version))
    d = report.to_dict()
    d.update(src=src, dst=dst)
    text = [f"wrote {dst} ({report.target}): {report.summary()}" if dst else f"converted ({report.target}): {report.summary()}"]
    if saved is not None:
        d["saved_as"] = saved.to_dict(metadata=False)
        text.append(f"stored as {saved.ref} (sha256 {saved.sha256[:12]})")
    text += _listed("exact  ", [f"{name}: {how}" for name, how in report.exact.items()])
    text += _listed("svd    ", [f"{name}: rel. error {err:.3g}" for name, err in
                               sorted(report.approximated.items(), key=lambda kv: -kv[1])])
    text += _listed("dropped", [f"{name}: {why}" for name, why in report.dropped.items()])
    text += unexplained_lines(report.unexplained)
    text += _listed("note:", list(report.notes))
    emit(d, as_json, "\n".join(text))


def _listed(label: str, items: list[str], limit: int = 20) -> list[str]:
    """The first ``limit`` report lines, then how many more (``--json`` has them all)."""
    return first([f"  {label} {x}" for x in items], limit, indent=f"  {label} ")
