"""``loradex extract`` (checkpoint minus base -> LoRA) and ``loradex bake`` (adapters -> checkpoint)."""

from __future__ import annotations

import contextlib
import sys

import click

from loradex.bases import resolve_base
from loradex.cli.app import LazyHelpOption, cli, emit, first, format_help
from loradex.cli.merge import dynamic_rank_options
from loradex.cli.options import dtype_option
from loradex.cli.registry import (
    ARCH_HELP,
    force_option,
    input_path,
    output_path,
    ref_arch,
    save_as_option,
    store_output,
)

MODEL_HELP = "a diffusers folder, a single-file checkpoint, a registry REF or a Hub id in the local cache"
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


@cli.command("extract")
@click.option("--base", "base", required=True, metavar="BASE", help="the base model: " + MODEL_HELP)
@click.option("--tuned", "tuned", required=True, metavar="TUNED", help="the fine-tuned model (same family): " + MODEL_HELP)
@click.option("-o", "--output", "dst", default=None, type=click.Path(), help="output file; optional with --save-as")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="rank of linear layers (with --fro/--ratio/--cumulative: a cap)")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="rank of 3x3 conv layers (LoCon); without it they are not extracted")
@dynamic_rank_options
@click.option("--min-diff", type=click.FloatRange(0), default=0.0, show_default=True,
              help="skip a module as identical when ||dW|| <= MIN_DIFF ||W|| (0: only exactly equal ones)")
@click.option("--to", "to", default="kohya", show_default=True, cls=LazyHelpOption,
              help_fn=lambda: format_help("output format: "))
@dtype_option("fp32")
@click.option("--arch", default=None, help=ARCH_HELP)
@force_option
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the per-module report as JSON")
def extract_cmd(base, tuned, dst, rank, conv_rank, fro, ratio, cumulative, min_diff, to, dtype, arch, force, save_as,
                as_json):
    """Extract a LoRA from TUNED minus BASE (diffusers folders or single-file checkpoints of the
    same model; SD1/SD2/SDXL/FLUX/SD3), one tensor pair at a time: truncated (randomized) SVD per
    module, every module decided and reported on its own."""
    import torch

    from loradex.api import save
    from loradex.merge import extract

    if rank is None and fro is None and ratio is None and cumulative is None:
        raise click.UsageError("give a policy: --rank N, --fro F, --ratio R or --cumulative C")
    if sum(v is not None for v in (fro, ratio, cumulative)) > 1:
        raise click.UsageError("give at most one of --fro, --ratio, --cumulative")
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(resolve_base(base))
        t = stack.enter_context(resolve_base(tuned))
        bpath, tpath = b.require_path("extract"), t.require_path("extract")
        adapter, report = extract(bpath, tpath, rank=rank, conv_rank=conv_rank, fro=fro, ratio=ratio,
                                  cumulative=cumulative, arch=arch or b.arch, min_diff=min_diff,
                                  dtype=getattr(torch, _DTYPES[dtype or "fp32"]), progress=_progress(as_json))
        if not adapter.patches:
            raise click.ClickException("the models are identical in every linear/conv layer: nothing to extract")
        adapter.metadata["loradex.base_model"] = b.identity
        params = {k: v for k, v in report.policy.items()}
        params.update(to=to, **({"min_diff": min_diff} if min_diff else {}), **({"dtype": dtype} if dtype else {}))
        with output_path(dst, save_as, folder=to.lower() == "peft", fmt=to) as out:
            dst = str(out) if dst is not None else None
            wreport = save(adapter, out, to, arch=adapter.arch)
            saved = store_output(out, save_as, "extract", [b.version or bpath, t.version or tpath], params,
                                 arch=adapter.arch, base=b) if save_as else None
    d = {"base": base, "tuned": tuned, "dst": dst, "format": to, **report.to_dict(), "write": wreport.to_dict()}
    text = [f"extracted {tuned} - {base}: {report.summary()}"]
    text += first([f"  {name}: rank {m['rank']}, energy {m['energy']:.4f} (norm {m['energy'] ** 0.5:.4f}), "
                   f"rel. error {m['error']:.3g}"
                   for name, m in sorted(report.modules.items(), key=lambda kv: -kv[1]["error"])])
    changed = {n: why for n, why in report.skipped.items() if not why.startswith("identical")}
    text += first([f"  skipped {name}: {why}" for name, why in changed.items()])
    text.append(f"wrote {dst} ({wreport.target})" if dst else f"written ({wreport.target})")
    if saved is not None:
        d["saved_as"] = saved.to_dict(metadata=False)
        text.append(f"stored as {saved.ref} (sha256 {saved.sha256[:12]})")
    text += [f"  note: {n}" for n in report.notes + wreport.notes]
    emit(d, as_json, "\n".join(text))


@cli.command("bake")
@click.option("--base", "base", required=True, metavar="BASE", help="the base model: " + MODEL_HELP)
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:W]...")
@click.option("-o", "--output", "dst", default=None, type=click.Path(), help="output (file or folder, like the base)")
@click.option("--with-embeddings", is_flag=True, help="append the adapters' TI tokens to the tokenizer(s) and embedding table(s)")
@click.option("--arch", default=None, help=ARCH_HELP)
@click.option("--allow-nonfinite", is_flag=True, help="bake adapters holding NaN/Inf values anyway")
@dtype_option("the base's, tensor by tensor")
@force_option
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def bake_cmd(base, adapters, dst, with_embeddings, arch, allow_nonfinite, dtype, force, save_as, as_json):
    """Merge ADAPTERs (files or registry REFs, each with an optional weight W, default 1) into BASE,
    with every kind's exact math, streaming tensor by tensor; the output has the base's layout
    (diffusers folder or single file)."""
    from loradex.api import load
    from loradex.cli.merge import _parse_item
    from loradex.converters.checkpoint import CheckpointReader
    from loradex.merge import bake

    parsed = [_parse_item(a) for a in adapters]
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(resolve_base(base))
        bpath = b.require_path("bake")
        reader = CheckpointReader(bpath, arch=arch or b.arch)
        items, parents = [], [b.version or bpath]
        for path, w in parsed:
            p, version = stack.enter_context(input_path(path))
            items.append((load(p, arch=ref_arch(arch, version) or reader.arch), w))
            parents.append(version or p)
        out = stack.enter_context(output_path(dst, save_as, folder=reader.layout == "folder"))
        report = bake(reader, items, out, with_embeddings=with_embeddings, progress=_progress(as_json),
                      allow_nonfinite=allow_nonfinite, dtype=dtype)
        saved = None
        if save_as:
            params = {"weights": [w for _, w in parsed], "with_embeddings": with_embeddings,
                      **({"dtype": dtype} if dtype else {})}
            saved = store_output(out, save_as, "bake", parents, params, arch=reader.arch, base=b)
    d = {"base": base, "adapters": [p for p, _ in parsed], "dst": dst, **report.to_dict()}
    text = [f"baked into {dst or save_as}: {report.summary()}"]
    for tok, ids in report.tokens.items():
        text.append(f"  token {tok}: " + ", ".join(f"{k} id {v[0]}" for k, v in ids.items()))
    if saved is not None:
        d["saved_as"] = saved.to_dict(metadata=False)
        text.append(f"stored as {saved.ref} (sha256 {saved.sha256[:12]})")
    text += [f"  note: {n}" for n in report.notes]
    emit(d, as_json, "\n".join(text))
