"""``merge(..., method="concat")``: the exact weighted sum of adapters, as one LoRA per module.

For each module, every input that patches it becomes a plain LoRA (LoRA as is with its Tucker
``mid`` folded; LoHa / LoKr through their exact ``to_lora()``), its scale ``gamma_i = alpha_i /
r_i`` and the weight ``w_i`` are folded into ``up`` (``up_i * w_i * gamma_i``), and the factors
are concatenated: ``up = [up_1 ... up_n]`` (columns), ``down = [down_1; ...; down_n]`` (rows),
``alpha = total rank`` (scale 1). Then ``up @ down = sum_i w_i dW_i`` exactly (no cross terms,
unlike kohya's merge_lora, and no kept-first alpha). Negative weights are allowed. A LoRA bias is
summed the same way. The factors are computed in float64 and stored in the inputs' common dtype.

Refused (LoradexError): DoRA patches (their update depends non-linearly on the base weight) and
kinds without an exact LoRA form (full, norm, (IA)^3, OFT, BOFT, GLoRA).

Embeddings (textual inversion) of the inputs are kept; a token present in several inputs gets the
weighted average ``sum w_i v_i / sum w_i`` of its vectors (the first input's vectors when the
shapes differ or the weights sum to 0), with a warning in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loradex.core.adapter import Embedding
from loradex.core.kinds import exact_lora_kinds
from loradex.core.kinds.lora import LoraPatch
from loradex.errors import LoradexError


@dataclass
class MergeReport:
    """``modules``: name -> ``{inputs: [input indices], kinds: [...], rank: total rank}``;
    ``warnings``: embeddings averaged or conflicting; ``notes``: anything else."""

    method: str = "concat"
    weights: list[float] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)
    embeddings: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: rank policy, density and seed of the svd / sparse methods (empty for concat)
    params: dict = field(default_factory=dict)
    #: per input index (as a string): what its block weights did (``BlockReport.to_dict()``)
    blocks: dict[str, dict] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """Largest per-module relative Frobenius error ``||sum w_i dW_i - merged|| / ||sum w_i dW_i||``
        (0 for ``concat``, which is exact, and when no module reports one)."""
        return max((m.get("error", 0.0) for m in self.modules.values()), default=0.0)

    def to_dict(self) -> dict:
        """Every field plus ``max_error``, JSON-ready (what ``loradex merge --json`` prints)."""
        return {"method": self.method, "weights": self.weights, "modules": self.modules,
                "embeddings": self.embeddings, "warnings": self.warnings, "notes": self.notes,
                "params": self.params, "blocks": self.blocks, "max_error": self.max_error}

    def summary(self) -> str:
        """One line for the terminal: inputs, modules and their rank range, exact or the max error,
        and the counts of embeddings and warnings."""
        ranks = [m["rank"] for m in self.modules.values() if m.get("rank") is not None]
        rank = f"ranks {min(ranks)}-{max(ranks)}" if ranks else "no modules" if not self.modules else "1-D only"
        if self.method in ("concat", "scale"):
            how = f"exact ({self.method})"
        else:
            how = f"{self.method}, max rel. error {self.max_error:.3g}"
        s = f"{len(self.weights)} inputs, {len(self.modules)} modules ({rank}), {how}"
        if self.embeddings:
            s += f", {len(self.embeddings)} embeddings"
        if self.warnings:
            s += f", {len(self.warnings)} warnings"
        return s


def _as_lora(patch, where: str) -> LoraPatch:
    if getattr(patch, "dora_scale", None) is not None:
        raise LoradexError(
            f"{where}: a DoRA patch cannot be merged by concat (its update depends non-linearly on "
            "the base weight, so a weighted sum of DoRA adapters is not a DoRA adapter); bake or "
            "convert it first"
        )
    if not patch.has_exact_lora:
        raise LoradexError(f"{where}: a {patch.kind} patch has no exact LoRA form; concat merges "
                           f"{', '.join(exact_lora_kinds())}")
    return patch if patch.kind == "lora" else patch.to_lora()[0]


def _merge_module(name: str, parts: list[tuple[int, object, float]]) -> tuple[LoraPatch, dict]:
    ups, downs, biases = [], [], []
    shape = None
    dtype = None
    for i, patch, w in parts:
        lora = _as_lora(patch, f"input {i + 1}, {name}")
        s = tuple(lora.shape)
        if shape is None or len(s) > len(shape):
            if shape is not None and (s[0] != shape[0] or math.prod(s) != math.prod(shape)):
                raise LoradexError(f"{name}: inputs disagree on the module's shape ({shape} vs {s})")
            shape = s
        elif s[0] != shape[0] or math.prod(s) != math.prod(shape):
            raise LoradexError(f"{name}: inputs disagree on the module's shape ({shape} vs {s})")
        up, down = lora.factors(torch.float64)
        g = lora.scale * w
        ups.append(up * g)
        downs.append(down)
        if lora.bias is not None:
            biases.append(lora.bias.double() * g)
        dtype = lora.up.dtype if dtype is None else torch.promote_types(dtype, lora.up.dtype)
    up = torch.cat(ups, 1)
    down = torch.cat(downs, 0)
    bias = torch.stack(biases).sum(0).to(dtype) if biases else None
    rank = up.shape[1]
    # alpha = rank written out: lycoris-lora's loaders cannot read a LoRA without an alpha key
    merged = LoraPatch._from_2d(up, down, shape, dtype, bias=bias, alpha=torch.tensor(float(rank)))
    return merged, {"inputs": [i for i, _, _ in parts], "kinds": [p.kind for _, p, _ in parts], "rank": rank}


def _merge_embeddings(items, report: MergeReport) -> dict[str, Embedding]:
    seen: dict[str, list[tuple[int, Embedding, float]]] = {}
    for i, (a, w) in enumerate(items):
        for tok, e in a.embeddings.items():
            seen.setdefault(tok, []).append((i, e, w))
    out = {}
    for tok, group in seen.items():
        first = group[0][1]
        if len(group) == 1:
            out[tok] = first
            report.embeddings[tok] = f"from input {group[0][0] + 1}"
            continue
        ins = ", ".join(str(i + 1) for i, _, _ in group)
        same = all(
            set(e.vectors) == set(first.vectors) and all(e.vectors[c].shape == first.vectors[c].shape for c in e.vectors)
            for _, e, _ in group
        )
        wsum = sum(w for _, _, w in group)
        if not same or wsum == 0:
            why = "their shapes differ" if not same else "the weights sum to 0"
            out[tok] = first
            report.embeddings[tok] = f"from input {group[0][0] + 1}"
            report.warnings.append(f"embedding {tok!r} is in inputs {ins}; {why}: kept input {group[0][0] + 1}'s")
            continue
        vecs = {
            c: (sum(e.vectors[c].double() * w for _, e, w in group) / wsum).to(v.dtype)
            for c, v in first.vectors.items()
        }
        out[tok] = Embedding(tok, vecs)
        report.embeddings[tok] = f"weighted average of inputs {ins}"
        report.warnings.append(f"embedding {tok!r} is in inputs {ins}: stored their weighted average")
    return out


def merge_concat(by_module: dict, progress=None) -> tuple[dict, dict]:
    """``by_module``: name -> ``[(input index, patch, weight), ...]``. Returns ``(patches, module
    infos)``: per module exactly ``sum_i w_i dW_i`` as one LoRA with alpha = total rank."""
    patches, infos = {}, {}
    for name, parts in by_module.items():
        patches[name], infos[name] = _merge_module(name, parts)
        if progress is not None:
            progress.update(1)
    return patches, infos
