"""Samples during training: each prompt rendered by the training pipeline itself (its adapter
layers live, so what is drawn is the adapter as trained so far), one fixed generator per prompt
seeded with the run's seed (the same noise at every sample step, so the images show only what
training changed, and the loop's own generator is never touched), and every prompt of a step in one
grid PNG (``work/samples/step-N.png``: a row of up to four images per line, in prompt order).

The in-loop pipeline is used rather than the inference engine (``loradex.inference``): the engine
serves adapters from files, and writing the live layers to a file at every sample step would cost
more than the sample.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["grid", "render"]

#: images per row of a sample grid
COLUMNS = 4


def grid(images: list):
    """One PIL image with ``images`` (same size) in rows of ``COLUMNS``; a single image as is."""
    if len(images) == 1:
        return images[0]
    from PIL import Image

    w, h = images[0].size
    cols = min(COLUMNS, len(images))
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return out


def render(ctx, prompts: list[str], path: Path, modules: list) -> Path:
    """Render ``prompts`` (already as the method spells them) with the pipeline and write their
    grid to ``path`` atomically; ``modules`` are put in eval mode for it and back in train mode
    after."""
    from loradex.converters.safetensors_io import atomic_path

    cfg = ctx.cfg
    for m in modules:
        m.eval()
    images = []
    try:
        with torch.no_grad(), ctx.autocast():
            for prompt in prompts:
                g = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
                images.append(ctx.pipe(prompt, num_inference_steps=cfg.sample_steps, generator=g,
                                       height=cfg.resolution, width=cfg.resolution).images[0])
    finally:
        for m in modules:
            m.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid(images).save(tmp, format="PNG")
    return path
