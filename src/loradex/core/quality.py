"""Quality of an adapter, module by module, from the factors: spectrum, effective rank, energy
at half rank, norms (relative to the base weight when it is known) and flags.

Pure math (no file I/O); ``loradex inspect --quality`` prints it. Per module, with ``dW`` its
full-strength update in the exact form of :mod:`loradex.core.sketch` (``UpdateForm``):

* **spectrum**: the singular values ``sigma_1 >= sigma_2 >= ...`` of ``dW`` (flattened to ``(out,
  in*kh*kw)``), from the factors: QR of ``up`` and ``down^T`` and the SVD of the small ``k x k``
  core (``linalg.factors_svd``; ``O((out + in) k^2)``, never the dense update); LoKr's are the
  products ``sigma_i(w1) sigma_j(w2)``; full diffs take ``svdvals`` of the diff. A norm layer's
  1-D update has no spectrum (only its norm is reported).
* **effective rank** ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` (Roy & Vetterli 2007):
  ``k`` for ``k`` equal singular values, 1 for one dominant direction. A LoRA of rank 32 whose
  effective rank is 3 spends most of its parameters on noise: ``resize`` can shrink it.
* **rank99**: the fewest singular values that keep 99% of ``||dW||_F^2 = sum sigma_i^2``.
* **energy at r/2**: ``sum_{i <= r/2} sigma_i^2 / sum sigma_i^2`` with ``r`` the rank of the exact
  LoRA form (a LoRA's rank, ``r1 r2`` for LoHa): what ``resize --rank r/2`` would keep.
* **norm**: ``||dW||_F``, its per-entry RMS ``||dW||_F / sqrt(out * in*kh*kw)`` (comparable across
  layer sizes), and ``||dW||_F / ||W||_F`` when the base weight is given.
* **flags** (the *scale* is ``||dW|| / ||W||`` when the base is known for every module, else the
  per-entry RMS; *median*: over the modules with a finite, non-zero update):

  - ``dead``: an all-zero update, or a scale below ``dead_factor`` (1e-3) times the median --
    a module that was never trained (zero-initialised factor) or was zeroed by a merge;
  - ``outlier``: a scale at least ``outlier_factor`` (10) times the median -- the signature of
    over-training (a few layers blown up) or of a bad merge weight;
  - ``nonfinite``: NaN or Inf in the module's tensors (no math is done on it).

Base-dependent kinds ((IA)^3, Diag-OFT, BOFT) are reported as skipped without the base weight;
DoRA and GLoRA through their base-free part (see ``core/sketch.py``), unless the base is given.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loradex.core.sketch import NONFINITE, UpdateForm, adapter_forms, singular_values

#: A scale below this share of the median is ``dead``.
DEAD_FACTOR = 1e-3
#: A scale at least this many times the median is an ``outlier``.
OUTLIER_FACTOR = 10.0
#: Relative size (of the largest) under which a singular value counts as zero.
ZERO_SV = 1e-7


def spectrum_stats(s: torch.Tensor, r: int | None = None) -> dict:
    """``effective_rank``, ``rank99``, ``energy_half`` (at ``max(1, r // 2)``, ``r`` default: the
    number of singular values) and ``numerical_rank`` of a spectrum (descending, any length)."""
    s = s.double().clamp_min(0.0)
    total = float(s.sum())
    if s.numel() == 0 or total == 0.0:
        return {"effective_rank": 0.0, "rank99": 0, "energy_half": None, "numerical_rank": 0}
    keep = s[s > ZERO_SV * float(s[0])]
    p = keep / float(keep.sum())
    erank = math.exp(float(-(p * p.log()).sum()))
    e = (s * s).cumsum(0) / float((s * s).sum())
    rank99 = int((e < 0.99 - 1e-12).sum()) + 1
    r = int(r if r is not None else s.numel())
    half = max(1, r // 2)
    energy_half = float(e[min(half, s.numel()) - 1])
    return {"effective_rank": erank, "rank99": min(rank99, s.numel()), "energy_half": energy_half,
            "half_rank": half, "numerical_rank": int(keep.numel())}


@dataclass
class QualityReport:
    """``modules``: name -> stats (see the module docstring); ``flags``: flag -> module names;
    ``skipped``: name -> why; ``summary``: adapter-level figures; ``scale``: which measure the flags
    compare (``rel_base`` or ``rms``)."""

    modules: dict[str, dict] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=lambda: {"dead": [], "outlier": [], "nonfinite": []})
    skipped: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    scale: str = "rms"
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (``inspect --quality --json``): every field; ``modules`` last, since it is
        the long part."""
        return {"summary": self.summary, "scale": self.scale, "thresholds": self.thresholds, "flags": self.flags,
                "skipped": self.skipped, "partial": self.partial, "modules": self.modules}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def quality(adapter, base_weights: Callable[[str], torch.Tensor | None] | None = None,
            dead_factor: float = DEAD_FACTOR, outlier_factor: float = OUTLIER_FACTOR) -> QualityReport:
    """The :class:`QualityReport` of a ``loradex.Adapter``. ``base_weights(name)`` (or None) gives a
    module's base weight: norms relative to it, and the exact update of base-dependent kinds."""
    rep = QualityReport(thresholds={"dead_factor": dead_factor, "outlier_factor": outlier_factor})
    forms, skipped = adapter_forms(adapter, base_weights, norms=True)
    for name, why in skipped.items():
        if why == NONFINITE:
            rep.flags["nonfinite"].append(name)
            rep.modules[name] = {"kind": adapter.patches[name].kind, "shape": list(adapter.patches[name].shape),
                                 "nonfinite": True, "flags": ["nonfinite"]}
        else:
            rep.skipped[name] = why
    base_known = base_weights is not None
    for name, f in forms.items():
        p = adapter.patches[name]
        rep.modules[name] = _module_stats(p, f, base_weights(name) if base_known else None)
        if f.partial:
            rep.partial[name] = f.partial
    live = {n: m for n, m in rep.modules.items() if not m.get("nonfinite")}
    use_base = base_known and live and all(m.get("rel_base") is not None for m in live.values())
    rep.scale = "rel_base" if use_base else "rms"
    scales = {n: m[rep.scale] for n, m in live.items()}
    med = _median([v for v in scales.values() if v > 0 and math.isfinite(v)])
    for n, v in scales.items():
        fl = live[n]["flags"]
        if v == 0.0 or (med is not None and v < dead_factor * med):
            fl.append("dead")
            rep.flags["dead"].append(n)
        elif med is not None and v >= outlier_factor * med:
            fl.append("outlier")
            rep.flags["outlier"].append(n)
        live[n]["scale_vs_median"] = (v / med) if med else None
    rep.summary = _summary(rep, live, med, adapter)
    return rep


def _module_stats(p, f: UpdateForm, w: torch.Tensor | None) -> dict:
    norm = math.sqrt(f.weight_sq_norm())
    d = {"kind": p.kind, "shape": list(p.shape), "rank": p.rank, "form": f.form, "norm": norm,
         "rms": norm / math.sqrt(f.out * f.cols), "flags": []}
    if f.bias is not None:
        d["bias_norm"] = float(f.bias.double().norm())
    if w is not None:
        wn = float(w.double().norm())
        d["base_norm"] = wn
        d["rel_base"] = norm / wn if wn > 0 else None
    if f.cols == 1 and f.dense is not None and len(p.shape) == 1:
        d["spectrum"] = None  # a norm layer's 1-D update
        return d
    s = singular_values(f)
    r = s.numel()
    if f.up is not None:
        r = min(f.k, f.out, f.cols)
    d["spectrum"] = [float(x) for x in s]
    d.update(spectrum_stats(s, r))
    d["form_rank"] = r
    return d


def _summary(rep: QualityReport, live: dict, med, adapter) -> dict:
    mats = [m for m in live.values() if m.get("spectrum")]
    erank = [m["effective_rank"] for m in mats]
    ranks = [m["form_rank"] for m in mats]
    eh = [m["energy_half"] for m in mats if m.get("energy_half") is not None]
    r99 = [m["rank99"] for m in mats]
    rel = [m["rel_base"] for m in live.values() if m.get("rel_base") is not None]
    total = math.sqrt(sum(m["norm"] ** 2 for m in live.values()))
    top = sorted(live, key=lambda n: -live[n][rep.scale])[:5]
    return {
        "modules": len(adapter.patches), "analysed": len(live), "skipped": len(rep.skipped),
        "partial": len(rep.partial), "kinds": dict(adapter.kinds()), "total_norm": total,
        "scale": rep.scale, "median_scale": med,
        "median_rms": _median([m["rms"] for m in live.values()]),
        "median_effective_rank": _median(erank), "median_form_rank": _median(ranks),
        "median_rank99": _median(r99), "median_energy_half": _median(eh), "min_energy_half": min(eh) if eh else None,
        "median_rel_base": _median(rel), "max_rel_base": max(rel) if rel else None,
        "top": [{"module": n, rep.scale: live[n][rep.scale], "scale_vs_median": live[n].get("scale_vs_median")}
                for n in top],
        "flags": {k: len(v) for k, v in rep.flags.items()},
    }


def format_quality(rep: QualityReport, limit: int = 8) -> list[str]:
    """The one-screen text of a report: figures, then each flag's modules (the first ``limit``,
    then how many more: ``--json`` lists every one)."""
    s = rep.summary
    lines = []

    def g(x, fmt=".3g"):
        return "-" if x is None else format(x, fmt)

    kinds = ", ".join(f"{k} x{v}" for k, v in s["kinds"].items()) or "-"
    lines.append(f"quality:     {s['analysed']} of {s['modules']} modules analysed ({kinds}); spectra from the factors")
    lines.append(f"norm:        total ||dW|| {g(s['total_norm'])}; median per-entry RMS {g(s['median_rms'])}")
    if s["median_rel_base"] is not None:
        lines.append(f"vs base:     median ||dW||/||W|| {g(s['median_rel_base'])}, max {g(s['max_rel_base'])}")
    if s["median_effective_rank"] is not None:
        lines.append(f"eff. rank:   median {g(s['median_effective_rank'], '.2f')} of rank {g(s['median_form_rank'], 'g')} "
                     f"(exp of spectral entropy); 99% energy at rank {g(s['median_rank99'], 'g')} (median)")
        lines.append(f"rank r/2:    keeps {g(s['median_energy_half'], '.1%')} of the energy (median; "
                     f"worst module {g(s['min_energy_half'], '.1%')})")
    f = s["flags"]
    lines.append(f"flags:       {f['dead']} dead, {f['outlier']} outlier, {f['nonfinite']} non-finite "
                 f"(scale: {'||dW||/||W||' if rep.scale == 'rel_base' else 'per-entry RMS'} vs the median)")
    for flag in ("dead", "outlier", "nonfinite"):
        names = rep.flags[flag]
        for n in names[:limit]:
            m = rep.modules[n]
            extra = ""
            if flag != "nonfinite":
                ratio = m.get("scale_vs_median")
                extra = f" (norm {g(m['norm'])}" + (f", {ratio:.3g}x the median)" if ratio is not None else ")")
            lines.append(f"  {flag}: {n}{extra}")
        if len(names) > limit:
            lines.append(f"  {flag}: ... and {len(names) - limit} more (--json lists all)")
    if rep.skipped:
        first = next(iter(rep.skipped.items()))
        more = f" and {len(rep.skipped) - 1} more" if len(rep.skipped) > 1 else ""
        lines.append(f"skipped:     {first[0]}: {first[1]}{more} (--json lists all)")
    if rep.partial:
        lines.append(f"partial:     {len(rep.partial)} modules analysed through their base-free part "
                     "(DoRA/GLoRA; give --base for the whole update)")
    if s["top"]:
        lines.append("largest:     " + "; ".join(
            f"{t['module']} {g(t['scale_vs_median'], '.2g')}x" for t in s["top"][:3]))
    return lines
