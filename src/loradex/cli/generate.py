"""``loradex generate``: images from a base model with adapters swapped in (the inference Engine).

Without ``--base`` the embedded tiny pipeline (``loradex.tiny``) is used, so the command runs offline.
``--grid`` writes the comparison people look at first (AUTOMATIC1111's X/Y plot): a labelled PNG
grid of the base model next to each adapter, or, with ``--weights``, one row per adapter sweeping
its weight; every cell of a column uses the same seed, so only the adapter differs.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from loradex.cli.app import cli, emit
from loradex.cli.merge import _parse_item
from loradex.cli.options import device_option
from loradex.cli.registry import base_pipeline

LABEL_H = 14  # pixels of the label strip above each cell (PIL's default bitmap font is ~11 px)


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        ws = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    if not ws:
        raise click.BadParameter("give at least one weight", param_hint="--weights")
    return ws


def label_grid(cells: list[list[tuple[str, object]]]):
    """A PIL image of rows of ``(label, image)`` cells, each label drawn above its cell with PIL's
    default font (no font file needed)."""
    from PIL import Image, ImageDraw, ImageFont

    w = max(im.width for row in cells for _, im in row)
    h = max(im.height for row in cells for _, im in row)
    ncol = max(len(row) for row in cells)
    grid = Image.new("RGB", (ncol * w, len(cells) * (h + LABEL_H)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, row in enumerate(cells):
        for c, (label, im) in enumerate(row):
            x, y = c * w, r * (h + LABEL_H)
            text = label
            while text and draw.textlength(text, font=font) > w - 2:
                text = text[:-1]
            draw.text((x + 1, y + 1), text, fill="black", font=font)
            grid.paste(im, (x, y + LABEL_H))
    return grid


def _save_png(image, dst: Path, parameters: str | None = None) -> None:
    """Write the PNG atomically, with A1111's ``parameters`` text chunk (``loradex.pnginfo``)."""
    from loradex.pnginfo import save_png

    save_png(image, dst, parameters)


def _model_fields(source, base, tiny: bool, engine) -> dict:
    """A1111's ``Model hash`` / ``Model`` of the base: a stored REF's recorded sha256 (no re-hashing),
    a Hub id, a checkpoint file's sha256, a folder's name, a tiny model's arch name."""
    from loradex.pnginfo import model_fields

    if tiny:
        return model_fields(None, name=engine.arch.name)
    if base is not None and base.source == "ref":
        v = base.version
        return model_fields(source, name=base.identity, sha256=v.sha256 if getattr(v, "layout", "") == "file" else None)
    if base is not None and base.source == "hub":
        return model_fields(source, name=base.identity)
    return model_fields(source)


def _label(ref: str) -> str:
    return Path(ref).stem if Path(ref).exists() else ref


@cli.command()
@click.argument("prompt")
@click.option("--base", default=None, metavar="BASE",
              help="a diffusers folder, a .safetensors checkpoint, a registry REF, a Hub id in the local cache, or an "
                   "embedded tiny model (tiny, tiny-sdxl, tiny-flux1, tiny-sd3) [default: tiny]")
@click.option("--adapter", "adapters", multiple=True, metavar="REF[:W]", help="adapter path or registry REF, weight (repeatable: stacked)")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write")
@click.option("--steps", type=int, default=None, help="denoising steps (default 20; 4 on the tiny model)")
@click.option("--width", type=int, default=None, help="default 512 (64 on the tiny model)")
@click.option("--height", type=int, default=None, help="default 512 (64 on the tiny model)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--negative-prompt", default="", help="what the image should not show")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="classifier-free guidance scale")
@click.option("--grid", is_flag=True, help="a labelled grid: base vs each adapter (or a --weights sweep)")
@click.option("--weights", default=None, metavar="W,W,...", help="with --grid: weights to sweep for each adapter")
@device_option
@click.option("--max-rank", type=int, default=64, show_default=True, help="slot capacity (rank per adapter)")
@click.option("--exact-batches/--fast-batches", default=None,
              help="grid cells computed as if each were alone (bit-identical to generating it by itself) or the "
                   "whole batch in one call (faster on a GPU; float rounding differs) [default: exact on the CPU]")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report")
def generate(prompt, base, adapters, output, steps, width, height, seed, negative_prompt, guidance, grid, weights,
             device, max_rank, exact_batches, as_json):
    """Generate PROMPT with adapters (REF[:W]...) swapped into BASE; write a PNG (or a --grid)."""

    from loradex.inference.engine import Engine
    from loradex.inference.types import GenerateRequest

    sweep = _weights(weights)
    if sweep is not None and not grid:
        raise click.BadParameter("--weights needs --grid", param_hint="--weights")
    if grid and not adapters:
        raise click.BadParameter("--grid needs at least one --adapter", param_hint="--grid")
    items = [_parse_item(a) for a in adapters]
    with contextlib.ExitStack() as stack:
        source, base_info, tiny = base_pipeline(stack, base, "generate")
        steps = steps if steps is not None else (4 if tiny else 20)
        width = width if width is not None else (64 if tiny else 512)
        height = height if height is not None else (64 if tiny else 512)

        def req(ads: list[tuple[str, float]]) -> GenerateRequest:
            return GenerateRequest(prompt, adapters=ads, negative_prompt=negative_prompt, steps=steps, width=width,
                                   height=height, seed=seed, guidance_scale=guidance)

        if grid:
            if sweep is None:
                rows_spec = [[("base", []), *[(f"{_label(r)}:{w:g}", [(r, w)]) for r, w in items]]]
            else:
                rows_spec = [[(f"{_label(r)}:{w:g}", [(r, w)]) for w in sweep] for r, _ in items]
        else:
            rows_spec = [[(" + ".join(f"{_label(r)}:{w:g}" for r, w in items) or "base", items)]]
        flat = [req(ads).validate() for row in rows_spec for _, ads in row]  # bad values: exit 2 before loading
        registry = None
        if any(not Path(ref).exists() for ref, _ in items):
            from loradex.registry import Registry

            registry = Registry(readonly=None)
        bar = None
        if not as_json and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=1, desc="loading base", file=sys.stderr, leave=False)
        engine = Engine(source, device=device, max_rank=max_rank, registry=registry, exact_batches=exact_batches)
        if bar is not None:
            bar.set_description("generating")
            bar.reset(total=len(flat))
        images = []
        for i in range(0, len(flat), engine.max_batch):  # whole batches; the bar advances per batch
            chunk = engine.generate(flat[i:i + engine.max_batch])
            images += chunk
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        from loradex.pnginfo import request_infotext

        # A1111's infotext of the (first) image: a grid carries its first cell's, as A1111's X/Y plot does
        parameters = request_infotext(engine, flat[0], model=_model_fields(source, base_info, tiny, engine))
    it = iter(images)
    cells = [[(label, next(it)) for label, _ in row] for row in rows_spec]
    dst = Path(output)
    image = label_grid(cells) if grid else cells[0][0][1]
    _save_png(image, dst, parameters)
    stats = engine.stats()
    report = {"output": str(dst), "images": len(flat), "grid": grid, "size": list(image.size), "seed": seed,
              "steps": steps, "adapters": [{"ref": r, "weight": w} for r, w in items],
              "cells": [[label for label, _ in row] for row in rows_spec],
              "swaps": stats["swaps"], "batches": stats["batches"], "parameters": parameters}
    emit(report, as_json, f"wrote {dst} ({image.size[0]}x{image.size[1]}, {len(flat)} image(s), "
                          f"{stats['batches']} batch(es))")
