"""Merging and resizing adapters.

* ``resize``: dynamic-rank truncation computed from the factors (resize.py).
* ``extract``: a fine-tuned checkpoint minus its base as a LoRA (extract.py); ``bake``: adapters
  merged into a base checkpoint, written in its layout (bake.py).
* ``merge``: ``concat`` (the exact weighted sum, concat.py), ``svd`` (weighted sum reduced to a rank,
  svd.py), ``ties`` / ``dare`` / ``dare_ties`` / ``magnitude`` (sparsifying merges as peft defines
  them, then the same rank reduction, ties.py); block weights per input or for all (blocks.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from loradex.core.adapter import Adapter
from loradex.errors import LoradexError
from loradex.merge.bake import BakeReport, bake
from loradex.merge.blocks import BlockReport, apply_block_weights, parse_block_weights
from loradex.merge.concat import MergeReport, _merge_embeddings, merge_concat
from loradex.merge.extract import ExtractReport, extract
from loradex.merge.resize import ResizeReport, resize
from loradex.merge.svd import check_policy, merge_svd
from loradex.merge.ties import SPARSE_METHODS, check_density, merge_sparse

METHODS = ("concat", "svd", *SPARSE_METHODS)

__all__ = ["METHODS", "BakeReport", "BlockReport", "ExtractReport", "MergeReport", "ResizeReport",
           "apply_block_weights", "bake", "extract", "merge", "parse_block_weights", "resize"]


def _scale_only(adapter: Adapter, w: float, report: MergeReport) -> dict:
    """One input under ``concat``: each patch scaled by ``w`` exactly, kinds kept."""
    patches = {}
    for name, p in adapter.patches.items():
        if w != 1:
            try:
                p = p.scaled(w)
            except ValueError as e:
                raise LoradexError(f"{name}: weight {w} cannot be applied to a {p.kind} patch ({e})") from None
        patches[name] = p
        report.modules[name] = {"inputs": [0], "kinds": [p.kind], "rank": p.rank}
    return patches


def merge(
    items: Sequence[tuple],
    method: str = "concat",
    *,
    rank: int | None = None,
    fro: float | None = None,
    ratio: float | None = None,
    cumulative: float | None = None,
    density: float | None = None,
    seed: int = 0,
    blocks: str | Sequence[float] | None = None,
    arch=None,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[Adapter, MergeReport]:
    """Merge ``[(adapter, weight) or (adapter, weight, block_weights), ...]`` into one adapter.

    ``method``: ``concat`` (exactly ``sum_i w_i dW_i``; with a single input the patches are only
    scaled, kinds kept), ``svd`` (that sum reduced by the rank policy ``rank`` / ``fro`` / ``ratio``
    / ``cumulative``), ``ties`` / ``dare`` / ``dare_ties`` / ``magnitude`` (with ``density`` in
    (0, 1], DARE seeded by ``seed``; then the same rank reduction). ``blocks``: block weights (a
    preset name or ``w,w,...``, see :mod:`loradex.merge.blocks`) applied to every input that has no
    own third element. ``arch`` (name or Arch) is used where an adapter carries none. Modules
    present in only some inputs are fine. An input holding NaN/Inf values is refused (FormatError)
    unless ``allow_nonfinite``; inputs for different archs, an unknown method or a non-finite
    weight are LoradexErrors. ``progress``: a tqdm bar (one tick per module) on stderr.

    Returns ``(adapter, report)``: the merged Adapter (metadata kept only for a single ``concat``
    input; ``arch`` the inputs' or ``arch``) and a :class:`MergeReport` (per-module ranks and errors,
    block-weight and embedding decisions, warnings, the inputs' notes)."""
    if method not in METHODS:
        raise LoradexError(f"unknown merge method {method!r}; available: {', '.join(METHODS)}")
    if not items:
        raise LoradexError("merge needs at least one input")
    if not allow_nonfinite:
        for i, item in enumerate(items):
            item[0].check_finite(f"merge input {i + 1}")
    params: dict = {}
    if method != "concat":
        params.update(check_policy(method, rank, fro, ratio, cumulative))
    if method in SPARSE_METHODS:
        params["density"] = check_density(density)
    if method.startswith("dare"):
        params["seed"] = int(seed)
    norm = []
    for it in items:
        if len(it) not in (2, 3):
            raise LoradexError("merge items are (adapter, weight) or (adapter, weight, block_weights)")
        a, w = it[0], float(it[1])
        if not math.isfinite(w):
            raise LoradexError(f"merge weights must be finite numbers, got {w}")
        norm.append((a, w, it[2] if len(it) == 3 and it[2] is not None else blocks))
    archs = {getattr(a.arch, "name", a.arch) for a, _, _ in norm if a.arch is not None}
    if len(archs) > 1:
        raise LoradexError(f"the inputs are for different architectures ({', '.join(sorted(map(str, archs)))})")
    report = MergeReport(method=method, weights=[w for _, w, _ in norm], params=params)
    weighted = []
    for i, (a, w, spec) in enumerate(norm):
        if spec is not None:
            a, br = apply_block_weights(a, spec, a.arch if a.arch is not None else arch)
            report.blocks[str(i + 1)] = br.to_dict()
            if br.unlisted:
                report.warnings.append(
                    f"input {i + 1}: {len(br.unlisted)} modules are in blocks the {br.weights_spec['layout']}-entry "
                    "layout does not list: weight 0 (as the LBW extension does); give the full layout to keep them")
        weighted.append((a, w))
    arch_out = next((a.arch for a, _ in weighted if a.arch is not None), getattr(arch, "name", arch))

    metadata: dict = {}
    if method == "concat" and len(weighted) == 1:
        a, w = weighted[0]
        patches = _scale_only(a, w, report)
        metadata = dict(a.metadata)
    else:
        by_module: dict[str, list[tuple[int, object, float]]] = {}
        for i, (a, w) in enumerate(weighted):
            for name, p in a.patches.items():
                by_module.setdefault(name, []).append((i, p, w))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(by_module), unit="module", desc=f"merge ({method})", leave=False)
        try:
            if method == "concat":
                patches, infos = merge_concat(by_module, bar)
            elif method == "svd":
                patches, infos = merge_svd(by_module, params, seed, bar)
            else:
                patches, infos = merge_sparse(by_module, method, params, params["density"], seed, bar)
        finally:
            if bar is not None:
                bar.close()
        report.modules.update(infos)
    embeddings = _merge_embeddings(weighted, report)
    out = Adapter(patches=patches, embeddings=embeddings, metadata=metadata, arch=arch_out,
                  source_format=norm[0][0].source_format)
    for i, (a, _, _) in enumerate(norm):
        report.notes += [f"input {i + 1}: {n}" for n in a.notes]
    return out, report
