"""Block weights ("LBW"): one multiplier per UNet block, as the sd-webui-lora-block-weight extension
(hako-mikan) defines them, applied exactly to an adapter's patches.

Layouts (facts from the extension's ``BLOCKID*`` tables; ``BASE`` is every text-encoder module):

* SD1/SD2, 26 entries: ``BASE, IN00..IN11, M00, OUT00..OUT11``;
  17 entries: ``BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11`` (the blocks that hold
  attention layers, i.e. where a plain LoRA lives).
* SDXL, 20 entries: ``BASE, IN00..IN08, M00, OUT00..OUT08``;
  12 entries: ``BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05``.
* FLUX.1, 61 entries: ``CLIP, T5, IN, D00..D18, S00..S37, OUT`` (``IN``: img_in, txt_in,
  time_in, vector_in, guidance_in; ``D``/``S``: double/single blocks; ``OUT``: final_layer). For
  an arch with other block counts (the tiny test models) the layout has ``3 + doubles + singles + 1``
  entries in the same order.
* SD3: no tool defines one; loradex's own ``CLIP, T5, IN, J00..J<n-1>, OUT`` (``J``: joint blocks;
  see ``core/archs/sd3.py``).

A block of a UNet module is read from its SGM ("ldm") name (:meth:`Arch.sgm_name`):
``input_blocks.N`` -> ``INnn``, ``middle_block`` -> ``M00``, ``output_blocks.N`` -> ``OUTnn``
(FLUX: the BFL name). As in the extension:

* a short layout (17 / 12 entries) gives weight **0** to the blocks it does not list (its ``to26``
  fills the missing entries with 0): a LoCon's ``IN00``/``IN03``/... modules vanish under a 17-entry
  vector. They are reported (``unlisted``);
* modules outside every block (``time_embed``, ``label_emb``, ``out.*``; FLUX modules outside the
  named parts) keep weight 1 and are reported (``outside``).

Named presets: the extension's built-in table (``DEF_WEIGHT_PRESET``, also in its README), all
17-entry SD1 vectors: ``NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5``, and
``FLUXALL``. ``NONE``, ``ALL``, ``ALL0.5`` and ``FLUXALL`` are uniform and used for any arch; the
others are SD1/SD2 vectors and refused for SDXL/FLUX (the extension would silently map them onto
the SD1 positions, zeroing SDXL's OUT00-OUT02). Note: the extension's shipped ``lbwpresets.txt``
differs from its built-in table (``IND``, ``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL`` there have
``BASE = 0``); the built-in table is used here.

Applying weight ``w`` to a patch: ``w = 1`` keeps it as is, ``w = 0`` drops it (its update is
exactly 0), otherwise ``Patch.scaled(w)`` (exact for LoRA/LoHa/LoKr/full/norm/(IA)^3; OFT, BOFT,
GLoRA and DoRA patches are not linear in a multiplier: LoradexError unless w is 0 or 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from loradex.core.adapter import Adapter
from loradex.errors import ArchError, LoradexError

_U = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5, "FLUXALL": 1.0}


def _arch(arch):
    from loradex.core.archs import get_arch

    if arch is None:
        raise ArchError("block weights need the adapter's architecture (give arch=, or --arch)")
    return get_arch(arch)


def presets() -> tuple[str, ...]:
    """Every preset name: the uniform ones, then each family's (its spec's ``lbw_presets``)."""
    from loradex.core.archs import families

    names = dict.fromkeys(_U)
    for fam in families().values():
        names.update(dict.fromkeys(fam.lbw_presets))
    return tuple(names)


def family(arch) -> str:
    """The family name of ``arch`` (block layouts and presets are the family spec's)."""
    return _arch(arch).family.name


def layouts(arch) -> dict[int, tuple[str, ...]]:
    """The accepted layouts of ``arch``: number of entries -> block ids (the full one last)."""
    a = _arch(arch)
    return a.family.lbw_layouts(a)


def block_of(arch, canonical: str) -> str | None:
    """The LBW block id of a canonical module name, or None when it lies outside every block
    (weight 1, as in the extension)."""
    a = _arch(arch)
    return a.family.lbw_block(a, canonical)


@dataclass
class BlockWeights:
    """A resolved block-weight vector: ``weights`` block id -> multiplier over the full layout of
    the arch (blocks missing from a short layout are 0), ``given``: the ids the vector named."""

    spec: str
    family: str
    given: tuple[str, ...]
    weights: dict[str, float]

    def weight(self, block: str | None) -> float:
        """The multiplier of a block id: 1 outside every block (None), 0 for an id the layout does
        not have."""
        return 1.0 if block is None else self.weights.get(block, 0.0)

    def to_dict(self) -> dict:
        """``{"spec", "layout": number of entries given, "weights": {given id: weight}}``."""
        return {"spec": self.spec, "layout": len(self.given), "weights": dict(zip(self.given, (self.weights[b] for b in self.given)))}


def parse_block_weights(spec: str | Sequence[float], arch) -> BlockWeights:
    """``spec``: a preset name (case-insensitive), ``"w,w,..."`` or a sequence of numbers with as
    many entries as one of the arch's layouts. LoradexError otherwise."""
    a = _arch(arch)
    fam = a.family
    lays = layouts(a)
    full = lays[max(lays)]
    if isinstance(spec, str):
        text = spec.strip()
        name = text.upper()
        if name in _U:
            vals = [_U[name]] * len(full)
        elif name in fam.lbw_presets:
            vals = list(fam.lbw_presets[name])
        elif name in presets():
            from loradex.core.archs import families

            owner = next(f for f in families().values() if name in f.lbw_presets)
            raise LoradexError(
                f"block-weight preset {name} is a {owner.label} vector ({len(owner.lbw_presets[name])} entries); "
                f"for {fam.label} give {' or '.join(str(n) for n in sorted(lays))} weights (or NONE, ALL, ALL0.5)"
            )
        elif "," in text or _is_number(text):
            try:
                vals = [float(x) for x in text.split(",")]
            except ValueError:
                raise LoradexError(f"block weights {spec!r}: every entry must be a number") from None
        else:
            raise LoradexError(f"unknown block-weight preset {spec!r}; presets: {', '.join(presets())} (or w,w,...)")
    else:
        vals = [float(x) for x in spec]
    if not all(math.isfinite(v) for v in vals):
        raise LoradexError(f"block weights {spec!r}: every entry must be a finite number")
    if len(vals) not in lays:
        want = " or ".join(str(n) for n in sorted(lays))
        names = f" ({lays[max(lays)][0]}, {lays[max(lays)][1]}, ..., {lays[max(lays)][-1]})"
        raise LoradexError(f"block weights {spec!r} have {len(vals)} entries; {fam.label} layouts have {want}{names}")
    given = lays[len(vals)]
    weights = {b: 0.0 for b in full}
    weights.update(zip(given, vals))
    return BlockWeights(spec if isinstance(spec, str) else ",".join(map(str, vals)), fam.name, given, weights)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


@dataclass
class BlockReport:
    """What block weights did: ``blocks`` module -> block id (None outside), ``weights`` module ->
    multiplier applied, ``dropped`` (weight 0), ``unlisted`` (dropped because a short layout does not
    list their block), ``outside`` (kept at weight 1)."""

    weights_spec: dict = field(default_factory=dict)
    blocks: dict[str, str | None] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Every field, JSON-ready; ``weights_spec`` is written as ``block_weights``."""
        return {"block_weights": self.weights_spec, "blocks": self.blocks, "weights": self.weights,
                "dropped": self.dropped, "unlisted": self.unlisted, "outside": self.outside}

    def summary(self) -> str:
        """One line: the spec, modules kept / dropped, how many of the dropped a short layout
        omits, and how many lie outside the blocks."""
        kept = sum(1 for w in self.weights.values() if w != 0)
        s = f"block weights {self.weights_spec.get('spec')}: {kept} modules kept, {len(self.dropped)} dropped (weight 0)"
        if self.unlisted:
            s += f" of which {len(self.unlisted)} in blocks the {self.weights_spec.get('layout')}-entry layout omits"
        if self.outside:
            s += f", {len(self.outside)} outside the blocks (weight 1)"
        return s


def apply_block_weights(adapter: Adapter, spec: str | Sequence[float] | BlockWeights, arch=None) -> tuple[Adapter, BlockReport]:
    """Scale every patch of ``adapter`` by its block's weight (see the module docstring). ``arch``
    defaults to ``adapter.arch``. Embeddings and metadata are carried over."""
    a = _arch(arch if arch is not None else adapter.arch)
    bw = spec if isinstance(spec, BlockWeights) else parse_block_weights(spec, a)
    report = BlockReport(weights_spec=bw.to_dict())
    patches = {}
    for name, p in adapter.patches.items():
        block = block_of(a, name)
        w = bw.weight(block)
        report.blocks[name] = block
        report.weights[name] = w
        if block is None:
            report.outside.append(name)
        if w == 0:
            report.dropped.append(name)
            if block is not None and block not in bw.given:
                report.unlisted.append(name)
            continue
        if w == 1:
            patches[name] = p
            continue
        try:
            patches[name] = p.scaled(w)
        except ValueError as e:
            raise LoradexError(f"{name}: block weight {w} cannot be applied ({e}); only 0 or 1 works for it") from None
    out = Adapter(patches=patches, embeddings=dict(adapter.embeddings), metadata=dict(adapter.metadata),
                  arch=adapter.arch if adapter.arch is not None else a.name, source_format=adapter.source_format,
                  notes=list(adapter.notes))
    return out, report
