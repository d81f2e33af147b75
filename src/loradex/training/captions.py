"""Captions as kohya's trainers treat them, and the dataset facts kohya's metadata records.

Per step (``process``, kohya's ``BaseDataset.process_caption`` in ``library/train_util.py``,
kohya-ss/sd-scripts 48d368f): with probability ``caption_dropout_rate`` the caption becomes ``""``
(the unconditional prompt); otherwise, with ``shuffle_caption``, the caption is split on ``,``,
the first ``keep_tokens`` pieces stay in front and the rest are shuffled, and the pieces are joined
with ``", "``. kohya draws from Python's ``random``; loradex draws from the loop's one generator
(dropout first, then the permutation), so a resumed run draws the same captions.

Per run: ``tag_frequency`` (``ss_tag_frequency``: per dataset folder, each comma-separated tag of
each image's caption, lowercased, counted once per image, as ``BaseDataset.set_tag_frequency``) and
``dataset_dirs`` (``ss_dataset_dirs``: per folder ``n_repeats`` and ``img_count``).
"""

from __future__ import annotations

import torch

__all__ = ["dataset_dirs", "num_train_images", "process", "tag_frequency"]


def process(caption: str, gen: torch.Generator, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """One step's version of ``caption`` (see the module docstring); draws nothing when neither
    shuffling nor dropout is on."""
    if dropout > 0 and float(torch.rand((), generator=gen)) < dropout:
        return ""
    if not shuffle:
        return caption
    tokens = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tokens[:keep_tokens], tokens[keep_tokens:]
    perm = torch.randperm(len(flex), generator=gen).tolist()
    return ", ".join(fixed + [flex[i] for i in perm])


def tag_frequency(examples) -> dict[str, dict[str, int]]:
    """``{folder: {tag: images whose caption has it}}`` over the training prompts (kohya counts the
    caption, or the folder's class tokens when there is none: the prompt the image trains with)."""
    out: dict[str, dict[str, int]] = {}
    for ex in examples:
        freq = out.setdefault(ex.subset or "examples", {})
        for tag in ex.prompt.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


def dataset_dirs(examples) -> dict[str, dict[str, int]]:
    """``{folder: {"n_repeats": N, "img_count": images}}`` in kohya's ``ss_dataset_dirs`` shape."""
    out: dict[str, dict[str, int]] = {}
    for ex in examples:
        d = out.setdefault(ex.subset or "examples", {"n_repeats": ex.repeats, "img_count": 0})
        d["img_count"] += 1
    return out


def num_train_images(examples) -> int:
    """Images times their repeats (kohya's ``ss_num_train_images``)."""
    return sum(ex.repeats for ex in examples)
