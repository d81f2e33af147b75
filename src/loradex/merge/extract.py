"""``extract``: a fine-tuned (DreamBooth) checkpoint minus its base, as a LoRA.

For every Linear / Conv2d module the two models share, ``dW = W_tuned - W_base`` (in float32,
whatever the files store) is factorised by a truncated SVD: ``up = U_k S_k``, ``down = Vh_k``,
alpha = k (scale 1), the optimal rank-k approximation (Eckart-Young). The two models are read
lazily (``converters.checkpoint.CheckpointReader``): one pair of tensors is in memory at a time.

What differs from kohya sd-scripts' ``extract_lora_from_models.py`` (FORMATS.md §1):

* randomized SVD (Halko, Martinsson & Tropp 2011; ``core.linalg.svd``: Gaussian sketch,
  oversampling, 2 power iterations by default: on rank-32 deltas plus dense noise the error is
  within 1.0001x of the optimal truncation already at 1, and each iteration costs two passes over
  the layer) where the rank is a small share of the matrix, the exact SVD otherwise; no clamp of U/V at a quantile (kohya's 0.99 clamp cuts the large entries of U S and
  multiplies the error);
* rank policies with exact thresholds (``core.linalg.rank_for``): ``rank``, ``fro``, ``ratio``,
  ``cumulative`` per module; ``fro`` and ``ratio`` need only the top of the spectrum (the sketch
  grows until the threshold is inside it), ``cumulative`` needs the nuclear norm (exact SVD);
* every module is decided on its own: identical ones (``||dW|| <= min_diff * ||W||``, default:
  exactly equal) are skipped and reported one by one, never kohya's silent skip of the whole
  text encoder when its largest difference is <= 0.01;
* 3x3 convolutions become LoCon factors (``down`` a ``k x k`` conv of rank ``conv_rank``, ``up``
  1x1); without ``conv_rank`` they are reported as skipped. 1x1 convs count as linear.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch

from loradex.core.adapter import Adapter
from loradex.core.kinds.lora import LoraPatch
from loradex.core.linalg import EXACT_SHARE, SMALL_DIM, rank_for, svd
from loradex.errors import ConversionError, LoradexError


@dataclass
class ExtractReport:
    """Per extracted module: ``rank``, ``energy`` (kept share of ``||dW||^2``), ``error``
    (``||dW - up@down|| / ||dW||``), ``norm`` (``||dW|| / ||W_base||``), ``method``
    (``randomized``/``exact``); ``skipped``: module -> why (identical, conv without conv_rank,
    not a linear/conv layer...)."""

    policy: dict = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        """Largest ``||dW - up@down|| / ||dW||`` over the extracted modules (0 when none was)."""
        return max((m["error"] for m in self.modules.values()), default=0.0)

    def components(self) -> dict[str, dict[str, int]]:
        """Per component: modules extracted and skipped (identical or otherwise)."""
        out: dict[str, dict[str, int]] = {}
        for n in self.modules:
            out.setdefault(n.split(".", 1)[0], {"extracted": 0, "identical": 0, "skipped": 0})["extracted"] += 1
        for n, why in self.skipped.items():
            c = out.setdefault(n.split(".", 1)[0], {"extracted": 0, "identical": 0, "skipped": 0})
            c["identical" if why.startswith("identical") else "skipped"] += 1
        return out

    def to_dict(self) -> dict:
        """Every field plus ``components()`` and ``max_error``, JSON-ready (``loradex extract --json``)."""
        return {"policy": self.policy, "modules": self.modules, "skipped": self.skipped,
                "components": self.components(), "max_error": self.max_error, "notes": self.notes,
                "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        """One line: modules, rank range, the energy kept over the whole model (each module's
        ``energy`` weighted by its ``||dW||^2``), max error, per-component counts and the time."""
        if not self.modules:
            return f"nothing extracted ({len(self.skipped)} modules skipped)"
        ranks = [m["rank"] for m in self.modules.values()]
        energy = sum(m["energy"] * m["dw2"] for m in self.modules.values()) / max(
            sum(m["dw2"] for m in self.modules.values()), 1e-300)
        comps = ", ".join(f"{c}: {v['extracted']} extracted, {v['identical']} identical"
                          + (f", {v['skipped']} skipped" if v["skipped"] else "") for c, v in self.components().items())
        return (f"{len(self.modules)} modules, ranks {min(ranks)}-{max(ranks)}, energy kept {energy:.4f}, "
                f"max rel. error {self.max_error:.3g} ({comps}) in {self.seconds:.1f} s")


def check_policy(rank, conv_rank, fro, ratio, cumulative) -> dict:
    """The policy as a dict, or LoradexError for a missing / contradictory / out-of-range one."""
    dynamic = {k: v for k, v in (("fro", fro), ("ratio", ratio), ("cumulative", cumulative)) if v is not None}
    if len(dynamic) > 1:
        raise LoradexError(f"give at most one of fro, ratio, cumulative (got {', '.join(dynamic)})")
    if rank is None and not dynamic:
        raise LoradexError("extract needs a policy: rank, fro, ratio or cumulative")
    for name, v in (("rank", rank), ("conv_rank", conv_rank)):
        if v is not None and int(v) < 1:
            raise LoradexError(f"{name} must be a positive integer, got {v}")
    for k, v in dynamic.items():
        v = float(v)
        if math.isnan(v) or (k == "ratio" and v <= 0) or (k != "ratio" and not 0 < v <= 1):
            raise LoradexError(f"{k} must be {'> 0' if k == 'ratio' else 'in (0, 1]'}, got {v}")
    out: dict = {k: float(v) for k, v in dynamic.items()}
    if rank is not None:
        out["rank"] = int(rank)
    if conv_rank is not None:
        out["conv_rank"] = int(conv_rank)
    return out


#: Adaptive power iterations (see ``core.linalg.svd``): stop once the truncation error moves by
#: less than ~0.5% of itself; ``power_iters`` (default 4) is the most that are run.
POWER_TOL = 1e-2


def _norm2(t: torch.Tensor) -> float:
    """``||t||_F^2``: float32 dot products over chunks of ~1M entries, summed in float64 (a
    float64 copy of the whole layer would double the peak memory; a chunk's float32 sum is
    accurate to ~1e-7 relative, far below what energies and errors are reported with — small
    residuals are measured directly, see ``low_rank``)."""
    flat = t.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    step = 1 << 20
    return float(sum(float(torch.dot(flat[i : i + step], flat[i : i + step])) for i in range(0, flat.numel(), step)))


def _use_exact(k: int, m: int, n: int, method: str) -> bool:
    if method != "auto":
        return method == "exact"
    small = min(m, n)
    return small <= SMALL_DIM or (k + max(16, k // 4)) >= EXACT_SHARE * small


def low_rank(
    mat: torch.Tensor, cap: int | None, fro: float | None = None, ratio: float | None = None,
    cumulative: float | None = None, method: str = "auto", power_iters: int = 4, seed: int = 0,
    total: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The factors ``(up, down)`` of the policy's rank-``k`` truncation of a 2-D float32 matrix
    and ``{"rank", "energy", "error", "method"}``.

    ``cap`` is the fixed rank (alone) or the cap of a dynamic policy (None: ``min(m, n)``).
    For ``fro``/``ratio`` the randomized sketch starts at ``min(cap, 64)`` singular values and
    doubles until the threshold falls inside the computed spectrum: for ``fro`` the spectrum is
    closed by a virtual last value ``sqrt(||M||^2 - sum S^2)`` so ``rank_for`` sees the exact total
    energy; for ``ratio`` the last computed value must be below ``S_0 / ratio``. ``cumulative``
    needs the sum of all singular values: exact SVD. Energy and error are measured against
    ``||M||_F`` in float64 (``total``: ``||M||_F^2`` when the caller has it)."""
    m, n = mat.shape
    small = min(m, n)
    cap = small if cap is None else max(1, min(int(cap), small))
    total = _norm2(mat) if total is None else total
    dynamic = fro is not None or ratio is not None or cumulative is not None
    width = cap if not dynamic else min(cap, 64)
    if cumulative is not None:
        width = small
    while True:
        exact = _use_exact(width, m, n, method) or width >= small
        u, s, vh = svd(mat, None if exact else width, exact=exact, power_iters=power_iters, seed=seed,
                       tol=POWER_TOL, total=total)
        if exact:
            u, s, vh = u[:, :cap], s[:cap], vh[:cap]
        if not dynamic:
            k = min(cap, s.numel())
            break
        s64 = s.double()
        if fro is not None:
            tail = math.sqrt(max(total - float((s64 * s64).sum()), 0.0))
            spectrum = torch.cat([s64, s64.new_tensor([tail])]) if tail > 0 else s64
            k = rank_for(spectrum, fro=fro)
            done = k <= s.numel() or exact or s.numel() >= cap
        elif ratio is not None:
            k = rank_for(s64, ratio=ratio)
            done = exact or s.numel() >= cap or float(s64[-1]) <= float(s64[0]) / ratio
        else:
            k = rank_for(s64, cumulative=cumulative)
            done = True
        if done:
            k = max(1, min(k, cap, s.numel()))
            break
        width = min(cap, width * 2)
    up = (u[:, :k] * s[:k].to(u.dtype)).float()
    down = vh[:k].float()
    if total == 0:
        return up, down, {"rank": k, "energy": 1.0, "error": 0.0, "method": "exact" if exact else "randomized"}
    # U_k S_k Vh_k is the orthogonal projection of M onto span(U_k) (randomized: onto span(Q ub_k)),
    # so ||M - up@down||^2 = ||M||^2 - sum S_k^2 (Pythagoras). That difference cancels when the
    # error is small (float32 sketches hold ~1e-7 of the energy): below 1e-4 of the energy the
    # residual is measured directly, in float64.
    resid = max(total - float((s[:k].double() ** 2).sum()), 0.0)
    if resid <= 1e-4 * total:
        resid = float(torch.linalg.vector_norm(mat.double() - up.double() @ down.double())) ** 2
    return up, down, {"rank": k, "energy": max(0.0, 1.0 - resid / total), "error": math.sqrt(resid / total),
                      "method": "exact" if exact else "randomized"}


def _open(model, arch):
    from loradex.converters.checkpoint import CheckpointReader

    return model if isinstance(model, CheckpointReader) else CheckpointReader(model, arch=arch)


def extract(
    base, tuned, rank: int | None = None, conv_rank: int | None = None, fro: float | None = None,
    ratio: float | None = None, cumulative: float | None = None, arch=None, min_diff: float = 0.0,
    method: str = "auto", power_iters: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[Adapter, ExtractReport]:
    """LoRA of ``tuned - base`` (paths of diffusers folders or single-file checkpoints, or
    ``CheckpointReader``s; the two may differ in layout). Returns ``(adapter, report)``.

    ``rank`` applies to linear (and 1x1 conv) layers, ``conv_rank`` to 3x3 convs (skipped when
    None); with ``fro``/``ratio``/``cumulative`` they become caps (see ``low_rank``). A module
    whose ``||dW|| <= min_diff * ||W_base||`` is skipped as identical. ``method``: ``auto``
    (randomized where the rank is a small share of the matrix), ``randomized`` or ``exact``.
    Factors are stored in ``dtype``; alpha = rank."""
    policy = check_policy(rank, conv_rank, fro, ratio, cumulative)
    if method not in ("auto", "randomized", "exact"):
        raise LoradexError(f"method must be auto, randomized or exact, got {method!r}")
    t0 = time.perf_counter()
    rb = _open(base, arch)
    rt = _open(tuned, arch if arch is not None else rb.arch)
    if rb.arch.name != rt.arch.name:
        raise ConversionError(f"base is {rb.arch.name}, tuned is {rt.arch.name}: not the same model family")
    names = rt.modules()
    base_names = set(rb.modules())
    missing = [n for n in names if n not in base_names]
    extra = [n for n in base_names if n not in set(names)]
    if missing or extra:
        what = missing or extra
        raise ConversionError(
            f"base and tuned models do not match: {len(missing)} modules only in tuned, {len(extra)} only in base "
            f"(e.g. {what[0]}); wrong files?")
    report = ExtractReport(policy=policy)
    patches: dict[str, LoraPatch] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), unit="module", desc="extract", leave=False)
    try:
        for name in names:
            shape_b, shape_t = rb.shape(name), rt.shape(name)
            if shape_b != shape_t:
                raise ConversionError(f"{name}: base {list(shape_b)} vs tuned {list(shape_t)}: not the same model")
            if bar is not None:
                bar.update(1)
            if len(shape_t) not in (2, 4) or (rt.arch.modules.get(name) is not None
                                              and rt.arch.modules[name].type not in ("linear", "conv")):
                continue  # norms, embeddings: no LoRA form (not reported module by module)
            conv3 = len(shape_t) == 4 and tuple(shape_t[2:]) != (1, 1)
            cap = policy.get("conv_rank") if conv3 else policy.get("rank")
            if conv3 and "conv_rank" not in policy:
                if not torch.equal(rb.weight(name), rt.weight(name)):
                    report.skipped[name] = "conv layer changed, not extracted: give conv_rank"
                continue
            wb = rb.weight(name)
            dw = rt.weight(name).float()
            dw -= wb  # in fp32 whatever the files store (the difference of two fp16 values is exact)
            total = _norm2(dw)
            norm_d, norm_b = math.sqrt(total), float(torch.linalg.vector_norm(wb))  # the latter: reported only
            del wb
            if norm_d == 0 or norm_d <= min_diff * norm_b:
                report.skipped[name] = "identical" if norm_d == 0 else f"identical within min_diff (|dW|/|W| = {norm_d / norm_b:.2e})"
                continue
            mat = dw.reshape(shape_t[0], -1)
            up, down, info = low_rank(mat, cap, fro, ratio, cumulative, method=method, power_iters=power_iters,
                                      seed=seed, total=total)
            k = info["rank"]
            patches[name] = LoraPatch._from_2d(up, down, tuple(shape_t), dtype, alpha=torch.tensor(float(k), dtype=dtype))
            report.modules[name] = {**info, "shape": list(shape_t), "norm": norm_d / norm_b if norm_b else math.inf,
                                    "dw2": norm_d * norm_d}
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    if not patches:
        report.notes.append("the models are identical in every linear/conv layer: nothing to extract")
    conv = any(len(p.shape) == 4 and p.shape[2:] != (1, 1) for p in patches.values())
    meta = {
        "ss_network_module": "networks.lora",
        "ss_v2": str(rt.arch.family.kohya_v2),
        "modelspec.description": f"LoRA extracted by loradex from {rt.path.name} minus {rb.path.name} "
                                 f"({json.dumps(policy, sort_keys=True)})",
    }
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(policy.get("conv_rank")), "conv_alpha": str(policy.get("conv_rank"))})
    adapter = Adapter(patches=patches, metadata=meta, arch=rt.arch.name, source_format="extract")
    return adapter, report
