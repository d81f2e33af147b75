"""Stacking conflicts: where two or more adapters change the same blocks of a model, and how much
they fight there, exactly from the factors; with block weights that remove the overlap.

For adapters ``A`` and ``B`` (each times its weight ``w``) and a block ``b`` of the family's LBW
layout (``merge/blocks.py``: SD1/SD2 ``BASE, IN00..IN11, M00, OUT00..OUT11``, SDXL ``BASE,
IN00..IN08, M00, OUT00..OUT08``, FLUX ``CLIP, T5, IN, D.., S.., OUT``; modules outside every block
are gathered under ``outside``), with ``A_b`` the update of A's modules in ``b`` (each module's
``[dW | db]``, see ``core/sketch.py``):

* ``cosine_b = <A_b, B_b> / (||A_b|| ||B_b||)``: do the two push the block's weights the same way
  (+1), the opposite way (-1), or independently (0)? The inner products are exact and come from
  the factors (``tr(dW_A^T dW_B) = sum((up_A^T up_B) * (down_A down_B^T))``; LoHa/LoKr through
  their exact forms), never from dense updates.
* ``overlap_b = 2 <A_b, B_b> / (||A_b||^2 + ||B_b||^2)``, in [-1, 1]: the *relative* size of the
  interaction, since ``||A_b + B_b||^2 = (||A_b||^2 + ||B_b||^2) (1 + overlap_b)``. +1: the same
  update twice (stacking doubles its strength, where independent updates would only add their
  energies); -1: they cancel; 0: independent. Unlike the cosine it is small when one update
  dwarfs the other (the small one cannot do much harm).
* ``share_b``: the block's part of each adapter's energy, ``||A_b||^2 / ||A||^2``.

A pair *fights* in a block when ``|overlap_b| >= threshold`` (default 0.3) and the block holds at
least ``min_share`` (default 2%) of each adapter's energy: ``opposing`` (negative: the stack
undoes both) or ``overlapping`` (positive: the stack overshoots). The suggested block weights
keep, in each block with fights, the adapters in order of their share of energy there (shares
within 10% of each other: the larger weighted energy first) and give 0 to any adapter that fights one already
kept; every other block keeps weight 1. They are written
in the family's full layout (26 entries for SD1/SD2, 20 for SDXL, 61 for FLUX), the syntax
``loradex merge IN:W:BLOCKS`` and ``--blocks`` take. Modules outside every block cannot be
weighted by LBW: their fights are reported, not resolved.

Base-dependent kinds follow ``core/sketch.py``: (IA)^3/OFT/BOFT skipped (listed) and DoRA/GLoRA
compared through their base-free part, unless the base weights are given.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from loradex.core.adapter import Adapter
from loradex.core.sketch import adapter_forms, inner
from loradex.errors import ArchError, LoradexError

log = logging.getLogger(__name__)

THRESHOLD = 0.3
MIN_SHARE = 0.02
OUTSIDE = "outside"


@dataclass
class ConflictReport:
    """See the module docstring. ``blocks``: block -> ``{"modules": {label: n}, "share": {label:
    s}, "pairs": {"A|B": {cosine, overlap, inner, modules}}}``; ``pairs``: the same over the whole
    adapters; ``fights``: one entry per (block, pair) that fights; ``suggestion``: label -> block
    weights (None when nothing needs to change); ``remaining``: the largest ``|overlap|`` left
    between adapters the suggestion keeps in the same LBW block (outside the blocks excluded: block
    weights cannot reach it)."""

    labels: list[str]
    weights: list[float]
    family: str
    layout: tuple[str, ...]
    threshold: float
    min_share: float
    blocks: dict[str, dict] = field(default_factory=dict)
    pairs: dict[str, dict] = field(default_factory=dict)
    fights: list[dict] = field(default_factory=list)
    suggestion: dict[str, str | None] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    remaining: float = 0.0
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    partial: dict[str, dict[str, str]] = field(default_factory=dict)
    outside: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (``conflicts --json``): the fields, with ``labels`` as ``adapters``,
        ``remaining`` as ``remaining_max_overlap``, and :meth:`merge_args` added."""
        return {"adapters": self.labels, "weights": self.weights, "family": self.family, "layout": list(self.layout),
                "threshold": self.threshold, "min_share": self.min_share, "pairs": self.pairs, "blocks": self.blocks,
                "fights": self.fights, "suggestion": self.suggestion, "dropped": self.dropped,
                "remaining_max_overlap": self.remaining, "skipped": self.skipped, "partial": self.partial,
                "outside": self.outside, "merge_args": self.merge_args()}

    def merge_args(self) -> list[str] | None:
        """``IN:W[:BLOCKS]`` arguments for ``loradex merge`` applying the suggestion (None when
        nothing needs to change)."""
        if not any(self.suggestion.values()):
            return None
        out = []
        for label, w in zip(self.labels, self.weights):
            s = self.suggestion.get(label)
            out.append(f"{label}:{w:g}" + (f":{s}" if s else ""))
        return out


def _pair(a: str, b: str) -> str:
    return f"{a}|{b}"


def _stats(inner_: float, na2: float, nb2: float) -> dict:
    cos = inner_ / math.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else 0.0
    ov = 2.0 * inner_ / (na2 + nb2) if na2 + nb2 > 0 else 0.0
    return {"cosine": max(-1.0, min(1.0, cos)), "overlap": max(-1.0, min(1.0, ov)), "inner": inner_}


def conflicts(
    items: Sequence[tuple[str, Adapter, float]],
    arch=None,
    threshold: float = THRESHOLD,
    min_share: float = MIN_SHARE,
    base_weights: Callable[[str], torch.Tensor | None] | None = None,
) -> ConflictReport:
    """The :class:`ConflictReport` of ``items`` = ``(label, adapter, weight)`` (at least two).
    ``arch``: name or Arch (default: the adapters'; they must be of one family)."""
    from loradex.core.archs import get_arch
    from loradex.merge.blocks import block_of, layouts

    def _arch(x):
        if x is None:
            raise ArchError("conflicts needs the adapters' architecture (give --arch or --base)")
        return get_arch(x)

    if len(items) < 2:
        raise LoradexError("conflicts needs at least two adapters")
    if not 0 < threshold <= 1:
        raise LoradexError(f"threshold must be in (0, 1], got {threshold}")
    if not 0 <= min_share < 1:
        raise LoradexError(f"min_share must be in [0, 1), got {min_share}")
    labels = [label for label, _, _ in items]
    if len(set(labels)) != len(labels):
        raise LoradexError("conflicts: the same adapter is named twice (" + ", ".join(labels) + ")")
    a = _arch(arch if arch is not None else next((ad.arch for _, ad, _ in items if ad.arch), None))
    fams = {}
    for label, ad, _ in items:
        if ad.arch is None:
            continue
        try:
            fams[label] = _arch(ad.arch).family.name
        except ArchError:
            fams[label] = str(ad.arch)
    if len(set(fams.values()) | {a.family.name}) > 1:
        raise LoradexError("conflicts: the adapters are for different model families ("
                           + ", ".join(f"{k}: {v}" for k, v in fams.items()) + ")")
    lays = layouts(a)
    layout = lays[max(lays)]
    rep = ConflictReport(labels, [float(w) for _, _, w in items], a.family.name, layout, threshold, min_share)

    forms, blocks_of, energy = [], {}, []
    for label, ad, w in items:
        f, skipped = adapter_forms(ad, base_weights, norms=True)
        forms.append(f)
        if skipped:
            rep.skipped[label] = skipped
        part = {n: x.partial for n, x in f.items() if x.partial}
        if part:
            rep.partial[label] = part
        e: dict[str, float] = {}
        for n, x in f.items():
            if n not in blocks_of:
                try:
                    blocks_of[n] = block_of(a, n) or OUTSIDE
                except ArchError:  # a module the arch does not list: no LBW block
                    blocks_of[n] = OUTSIDE
            b = blocks_of[n]
            e[b] = e.get(b, 0.0) + (w * w) * x.sq_norm()
            if b == OUTSIDE:
                rep.outside.setdefault(label, []).append(n)
        energy.append(e)
    totals = [sum(e.values()) for e in energy]
    order = [*layout, OUTSIDE]
    for b in order:
        present = {labels[i]: sum(1 for n in forms[i] if blocks_of[n] == b) for i in range(len(items))}
        if not any(present.values()):
            continue
        rep.blocks[b] = {"modules": present,
                         "share": {labels[i]: (energy[i].get(b, 0.0) / totals[i] if totals[i] > 0 else 0.0)
                                   for i in range(len(items))},
                         "energy": {labels[i]: energy[i].get(b, 0.0) for i in range(len(items))},
                         "pairs": {}}
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            wij = rep.weights[i] * rep.weights[j]
            per_block: dict[str, list] = {}
            for n, fi in forms[i].items():
                fj = forms[j].get(n)
                if fj is None or (fj.out, fj.cols) != (fi.out, fi.cols):
                    continue
                acc = per_block.setdefault(blocks_of[n], [0.0, 0])
                acc[0] += wij * inner(fi, fj)
                acc[1] += 1
            key = _pair(labels[i], labels[j])
            total_inner = sum(v[0] for v in per_block.values())
            rep.pairs[key] = {**_stats(total_inner, totals[i], totals[j]),
                              "modules": sum(v[1] for v in per_block.values())}
            for b, (val, cnt) in per_block.items():
                st = {**_stats(val, energy[i].get(b, 0.0), energy[j].get(b, 0.0)), "modules": cnt}
                rep.blocks[b]["pairs"][key] = st
                si, sj = rep.blocks[b]["share"][labels[i]], rep.blocks[b]["share"][labels[j]]
                if abs(st["overlap"]) >= threshold and min(si, sj) >= min_share:
                    rep.fights.append({"block": b, "a": labels[i], "b": labels[j],
                                       "kind": "opposing" if st["overlap"] < 0 else "overlapping",
                                       "cosine": st["cosine"], "overlap": st["overlap"], "share_a": si, "share_b": sj})
    # the worst first: the size of the interaction times how much the block matters to both
    rep.fights.sort(key=lambda f: -abs(f["overlap"]) * math.sqrt(f["share_a"] * f["share_b"]))
    _suggest(rep)
    return rep


def _suggest(rep: ConflictReport) -> None:
    """Greedy per block: keep adapters by decreasing share of their energy in the block, drop (0)
    each one that fights one already kept."""
    dropped: dict[str, set[str]] = {label: set() for label in rep.labels}
    fights_in: dict[str, set[frozenset]] = {}
    for f in rep.fights:
        fights_in.setdefault(f["block"], set()).add(frozenset((f["a"], f["b"])))
    for b, pairs in fights_in.items():
        if b == OUTSIDE:
            continue
        involved = sorted({x for p in pairs for x in p}, key=functools.cmp_to_key(_precedence(rep, b)))
        kept: list[str] = []
        for x in involved:
            if any(frozenset((x, y)) in pairs for y in kept):
                dropped[x].add(b)
            else:
                kept.append(x)
    remaining = 0.0
    for b, info in rep.blocks.items():
        if b == OUTSIDE:
            continue
        for key, st in info["pairs"].items():
            x, y = key.split("|", 1)
            if b in dropped[x] or b in dropped[y]:
                continue
            if min(info["share"][x], info["share"][y]) >= rep.min_share:
                remaining = max(remaining, abs(st["overlap"]))
    rep.remaining = remaining
    for label in rep.labels:
        if dropped[label]:
            rep.suggestion[label] = ",".join("0" if blk in dropped[label] else "1" for blk in rep.layout)
            rep.dropped[label] = [blk for blk in rep.layout if blk in dropped[label]]
        else:
            rep.suggestion[label] = None


def _precedence(rep: ConflictReport, b: str):
    """Who keeps block ``b`` first: the larger share of its own energy there; shares within 10% of
    each other tie and the larger weighted energy in the block wins; then the input order."""
    share, energy = rep.blocks[b]["share"], rep.blocks[b]["energy"]

    def cmp(x: str, y: str) -> int:
        sx, sy = share[x], share[y]
        if abs(sx - sy) > 0.1 * max(sx, sy):
            return -1 if sx > sy else 1
        if energy[x] != energy[y]:
            return -1 if energy[x] > energy[y] else 1
        return rep.labels.index(x) - rep.labels.index(y)

    return cmp


def _short_names(labels: list[str]) -> dict[str, str]:
    """File names without folder and extension where they are unique, else the labels as given."""
    from pathlib import PurePath

    short = {x: PurePath(x).stem if ("/" in x or x.endswith(".safetensors")) else x for x in labels}
    return short if len(set(short.values())) == len(labels) else {x: x for x in labels}


def format_conflicts(rep: ConflictReport, limit: int = 12) -> list[str]:
    """The text report: each pair's overall figures, the fights (the first ``limit``, then how
    many more), the suggested block weights and the merge command that applies them."""
    short = _short_names(rep.labels)
    lines = [f"family {rep.family}, LBW layout of {len(rep.layout)} blocks; exact from the factors"]
    if any(short[x] != x for x in rep.labels):
        lines.append("adapters: " + "; ".join(f"{short[x]} = {x}" for x in rep.labels if short[x] != x))
    for key, st in rep.pairs.items():
        a, b = (short[x] for x in key.split("|", 1))
        lines.append(f"{a} vs {b}: cosine {st['cosine']:+.3f}, overlap {st['overlap']:+.3f} "
                     f"over {st['modules']} shared modules")
    blocks_with = [b for b, info in rep.blocks.items() if info["pairs"]]
    lines.append(f"blocks with shared modules: {len(blocks_with)} ({', '.join(blocks_with[:limit])}"
                 + (f", ... and {len(blocks_with) - limit} more" if len(blocks_with) > limit else "") + ")")
    if not rep.fights:
        lines.append(f"no fights (|overlap| < {rep.threshold:g} in every block holding >= {rep.min_share:.0%} "
                     "of both adapters' energy)")
    else:
        lines.append(f"fights ({len(rep.fights)}; |overlap| >= {rep.threshold:g}):")
        for f in rep.fights[:limit]:
            lines.append(f"  {f['block']}: {short[f['a']]} vs {short[f['b']]} {f['kind']}: overlap {f['overlap']:+.3f}, "
                         f"cosine {f['cosine']:+.3f}, share {f['share_a']:.0%} / {f['share_b']:.0%}")
        if len(rep.fights) > limit:
            lines.append(f"  ... and {len(rep.fights) - limit} more (--json lists all)")
    if any(rep.suggestion.values()):
        lines.append("suggested block weights (" + ",".join(rep.layout) + "):")
        for label, s in rep.suggestion.items():
            if s:
                lines.append(f"  {short[label]}: {s}   (drops {', '.join(rep.dropped[label])})")
        lines.append(f"  largest |overlap| left between kept adapters: {rep.remaining:.3f}")
        lines.append("  loradex merge " + " ".join(rep.merge_args()) + " -o merged.safetensors")
    if OUTSIDE in {f["block"] for f in rep.fights}:
        lines.append("  note: fights outside every LBW block cannot be removed by block weights")
    for label, sk in rep.skipped.items():
        first = next(iter(sk.items()))
        more = f" and {len(sk) - 1} more" if len(sk) > 1 else ""
        lines.append(f"{short[label]}: skipped {first[0]} ({first[1]}){more}")
    for label, part in rep.partial.items():
        lines.append(f"{short[label]}: {len(part)} modules compared through their base-free part (DoRA/GLoRA)")
    return lines
