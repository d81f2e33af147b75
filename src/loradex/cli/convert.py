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
@click.option("--metadata", "show_metadata", is_flag=True,
              help="every ss_* / ModelSpec field decoded: base model, training settings, datasets, tag frequency "
                   "table, trigger words, hashes")
@click.option("--raw", is_flag=True,
              help="the file as it is, without an architecture: keys grouped by module with kind, rank, alpha, "
                   "shapes and dtypes (what inspect shows by itself when the base model is unknown)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report (everything, --metadata's fields included)")
def inspect_cmd(path: str, arch: str | None, base: str | None, strict: bool, quality: bool, show_metadata: bool,
                raw: bool, as_json: bool) -> None:
    """Format, arch, kinds, modules, ranks, alphas, embeddings, metadata and hashes of PATH (or of a
    registry REF: NAME, NAME@N, NAME:TAG, sha256 prefix); --quality adds the spectrum and flags.

    Any safetensors file or pickle of tensors is shown, even when loradex cannot tell its base model
    (another trainer's SD3 keys, Wan, a custom model): its modules as the file holds them, and
    "base model: unknown". A PNG: the embedding it holds, else the A1111 generation parameters
    ("parameters" text chunk) that loradex generate, the server and A1111 write."""
    from loradex.api import inspect

    if raw and (arch or base):
        raise click.UsageError("--raw reads the file without an architecture; drop --arch/--base")
    with contextlib.ExitStack() as stack:
        p, version = stack.enter_context(input_path(path))
        a, b = chosen_arch(stack, arch, base, version)
        info = inspect(p, arch=a, strict=strict, raw=raw)
        if quality and (info.get("raw") or "modules" not in info):
            info.setdefault("notes", []).append("--quality needs an adapter read against its base model (--base/--arch)")
            quality = False
        if quality:
            from loradex.cli.analyze import quality_report

            info["quality"], quality_lines = quality_report(p, a, b, strict, stack)
    if version is not None:
        info.update(path=path, ref=version.ref)
    if as_json:
        emit(info, True)
        return
    if "modules" not in info:  # a PNG with generation parameters
        emit(info, False, "\n".join(_image_lines(info) + (_notes(info) if info.get("notes") else [])))
        return
    lines = [
        f"path:        {info['path']}",
        f"format:      {info['format']}",
        f"arch:        {info['arch'] or 'unknown'}",
        *([f"base model:  unknown (the file is shown as it holds its keys; {info['tensors']} tensors, "
           f"{info['parameters']:,} parameters, {info['container']})"] if info.get("raw") else []),
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
    if "generation" in info:  # an embedding image that also carries generation parameters
        lines.append(f"generation:  {info['generation']['prompt']!r} (--json has every parameter)")
    lines += _notes(info)
    if info.get("nonfinite"):
        bad = info["nonfinite"]
        lines.append(f"NaN/Inf:     {len(bad)} modules hold non-finite values: {', '.join(bad[:5])}"
                     + (f" and {len(bad) - 5} more (--json lists all)" if len(bad) > 5 else "")
                     + "; merge, bake and add refuse it without --allow-nonfinite")
    if info.get("unexplained"):
        lines.append(f"unexplained: {len(info['unexplained'])} keys no kind or module explains (not read)")
        lines += unexplained_lines(info["unexplained"], indent="  ")
    if info.get("raw"):
        lines += _module_lines(info)
    if show_metadata:
        lines += _metadata_lines(info["metadata_decoded"])
    if quality:
        lines += quality_lines
    emit(info, False, "\n".join(lines))


def _notes(info: dict) -> list[str]:
    return first([f"note:        {n}" for n in info["notes"]], 10, indent="note:        ")


def _shape(t: dict) -> str:
    return f"{'x'.join(map(str, t['shape'])) or 'scalar'} {t['dtype']}"


def _module_lines(info: dict, limit: int = 40) -> list[str]:
    """The raw view: one line per module (kind, rank, alpha, each tensor's shape and dtype), then the
    keys of no module; each list cut at ``limit`` with how many more (``--json`` has them all)."""
    rows = []
    for name, m in info["module_table"].items():
        kind = (m["kind"] or "-") + ("+dora" if m["dora"] else "")
        rank = f"r{m['rank']}" if m["rank"] is not None else "-"
        alpha = f"a{m['alpha']:g}" if m["alpha"] is not None else "-"
        tensors = ", ".join(f"{suf} {_shape(t)}" for suf, t in m["tensors"].items())
        rows.append(f"  {name}  {kind} {rank} {alpha}  [{tensors}]" + ("  NaN/Inf" if m.get("nonfinite") else ""))
    out = [f"modules by name ({len(rows)}): kind, rank, alpha, tensors"] + first(rows, limit)
    if info["other_keys"]:
        other = [f"  {k}  {_shape(t)}" for k, t in info["other_keys"].items()]
        out += [f"other keys ({len(other)}): no module suffix"] + first(other, limit)
    return out


def _value_text(v) -> str:
    import json

    if isinstance(v, str):
        if v.startswith("data:") and len(v) > 200:  # ModelSpec thumbnails: a data URI
            return f"{v[:v.find(',') + 1]}... ({len(v)} characters; --json has it)"
        return v
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def _metadata_lines(d: dict, tags: int = 25) -> list[str]:
    """``--metadata``: every field, decoded, by section; the tag table per dataset dir (each dir's
    first ``tags`` tags, then how many more: ``--json`` has them all)."""
    out: list[str] = []
    titles = {"base_model": "base model", "training": "training", "dataset": "dataset", "hashes": "hashes",
              "modelspec": "modelspec", "other": "other metadata"}
    for key, title in titles.items():
        fields = d[key]
        if key == "dataset" and isinstance(fields.get("ss_dataset_dirs"), dict):
            dirs = fields["ss_dataset_dirs"]
            out.append(f"dataset dirs ({len(dirs)}):")
            for name, spec in dirs.items():
                spec = spec if isinstance(spec, dict) else {}
                out.append(f"  {name}: {spec.get('img_count', '?')} images x {spec.get('n_repeats', '?')} repeats")
            fields = {k: v for k, v in fields.items() if k != "ss_dataset_dirs"}
        if not fields:
            continue
        width = max(len(k) for k in fields)
        out.append(f"{title}:")
        out += [f"  {k:<{width}}  {_value_text(v)}" for k, v in fields.items()]
    freq = d["tag_frequency"]
    if freq:
        out.append(f"tag frequency ({len(freq)} dataset dirs):")
        for name, counts in freq.items():  # [[tag, count], ...], most used first
            out.append(f"  {name} ({len(counts)} tags, {sum(c for _, c in counts)} uses)")
            width = max((len(t) for t, _ in counts[:tags]), default=0)
            out += first([f"    {t:<{width}}  {c:>6}" for t, c in counts], tags, indent="    ")
    t = d["triggers"]
    out.append("trigger words:")
    out.append(f"  trigger phrase (ModelSpec): {t['trigger_phrase'] or '-'}")
    out.append("  most used tags: " + (", ".join(f"{tag} ({c})" for tag, c in t["top_tags"]) or "-"))
    if t["dataset_dir_names"]:
        out.append("  dataset dir names: " + ", ".join(t["dataset_dir_names"]))
    return out


def _image_lines(info: dict) -> list[str]:
    """A PNG with A1111 generation parameters: the prompts and every parameter, in order."""
    g = info["generation"]
    img = info.get("image") or {}
    lines = [
        f"path:        {info['path']}",
        f"format:      png image {img.get('width', '?')}x{img.get('height', '?')} with A1111 generation parameters",
        f"prompt:      {g['prompt']}",
        f"negative:    {g['negative_prompt'] or '-'}",
    ]
    hashes = {"Lora hashes": g["lora_hashes"], "TI hashes": g["ti_hashes"]}
    for k, v in g["params"].items():
        if hashes.get(k):
            lines.append(f"{k + ':':<13}{len(hashes[k])} (name: A1111 short hash)")
            lines += [f"  {name}: {h}" for name, h in hashes[k].items()]
        else:
            lines.append(f"{k + ':':<13}{v}")
    lines.append(f"sha256:      {info['sha256']}")
    return lines


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
              help="kohya: fold per-module alphas into lora_up so diffusers' kohya loader reads the file exactly; "
                   "diffusers: fold alpha/r into lora_B (scale 1) for apps that ignore lora_adapter_metadata "
                   "(OneTrainer)")
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
