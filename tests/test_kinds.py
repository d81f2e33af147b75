"""Patch kinds against the real tools' forward passes (lycoris-lora, PEFT), exact LoRA forms,
SVD optimality, rank policies and hostile inputs.

Reference adapters are built on the tiny in-process SD UNet / CLIP text encoder: every
parameter randomized (lycoris zero-inits one factor), alpha != rank, then each wrapped module's
real forward difference ``wrapped(x) - base(x)`` is compared with the output of loradex's
``delta`` computed from that module's tensors as saved to a file (``save_weights``).
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from loradex.core.kinds import (
    KINDS,
    BoftPatch,
    FullPatch,
    GloraPatch,
    IA3Patch,
    LohaPatch,
    LokrPatch,
    LoraPatch,
    NormPatch,
    OftPatch,
    patch_from_tensors,
)
from loradex.core.kinds.base import relative_error
from loradex.core.kinds.dora import dora_scale_from_magnitude, magnitude_from_dora_scale
from loradex.core.linalg import rank_for, svd, svd_truncate, truncate_factors
from loradex.errors import FormatError
from loradex.tiny import quiet, tiny_text_encoder, tiny_unet

TOL = 1e-5
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    log = logging.getLogger("LyCORIS")
    level = log.level
    log.setLevel(logging.ERROR)
    yield {"unet": tiny_unet(), "te": tiny_text_encoder()}
    log.setLevel(level)


def _op(mod: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.GroupNorm):
        return F.group_norm(x, mod.num_groups, w, b, mod.eps)
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm(x, mod.normalized_shape, w, b, mod.eps)
    raise TypeError(type(mod))


def _input(mod: nn.Module, dt: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return torch.randn(2, 3, mod.in_features, dtype=dt, generator=gen)
    if isinstance(mod, nn.Conv2d):
        return torch.randn(1, mod.in_channels, 5, 5, dtype=dt, generator=gen)
    if isinstance(mod, nn.GroupNorm):
        return torch.randn(2, mod.num_channels, 3, 3, dtype=dt, generator=gen)
    return torch.randn(2, 3, *mod.normalized_shape, dtype=dt, generator=gen)


def _delta_out(mod, x, w0, b0, dw, db) -> torch.Tensor:
    """Output change for the weight/bias change ``dw``/``db`` (None: no bias change)."""
    if isinstance(mod, (nn.Linear, nn.Conv2d)):  # linear in the parameters
        return _op(mod, x, dw, db)
    b1 = b0 if db is None else (db if b0 is None else b0 + db)
    return _op(mod, x, w0 + dw, b1) - _op(mod, x, w0, b0)


def _category(mod: nn.Module) -> str:
    if isinstance(mod, nn.Conv2d):
        return f"conv{mod.kernel_size[0]}x{mod.kernel_size[1]}"
    return type(mod).__name__


def _rel(ref: torch.Tensor, mine: torch.Tensor) -> float:
    n = float(ref.norm())
    d = float((ref - mine).norm())
    return d if n == 0 else d / n


def _randomize(net, gen: torch.Generator, std: float) -> None:
    with torch.no_grad():
        for lora in net.loras:
            for name, p in lora.named_parameters():
                if name == "dora_scale":
                    p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
                elif name == "rescale":
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _lycoris_net(model: nn.Module, dt: torch.dtype, std: float, direct: dict | None = None, **kw):
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset(
        {
            # lycoris' own defaults (the class attributes are global: leave them as found)
            "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
            "target_name": [],
            "module_algo_map": {},
            "name_algo_map": {},
            "exclude_name": [],
            "lora_prefix": "lycoris",
        }
    )
    with quiet():
        model = copy.deepcopy(model).to(dt)
        if direct is not None:
            net = LycorisNetwork(model, **direct)
        else:
            kw = {"linear_dim": 4, "linear_alpha": 3, "conv_dim": 4, "conv_alpha": 5, **kw}
            net = create_lycoris(model, 1.0, **kw)
    for lora in net.loras:
        lora.to(dt)
    _randomize(net, torch.Generator().manual_seed(1), std)
    return net


# config -> (lycoris kwargs, dtype, parameter std, facts the checked unet modules must all show).
# Facts: on-disk suffixes, "cat:<module type>", and the derived ones of _facts().
# OFT/BOFT run in float32: lycoris inverts (I - Q) in float32 and cannot run in float64.
LINEAR = {"cat:Linear", "cat:conv1x1", "cat:conv3x3"}
LYCORIS_CONFIGS = {
    "lora": (dict(algo="lora"), F64, 0.3, {"lora_up.weight", "gamma!=1", *LINEAR}),
    "locon_tucker": (dict(algo="lora", use_tucker=True), F64, 0.3, {"lora_mid.weight", "gamma!=1"}),
    # rank-stabilised scale alpha / sqrt(r): lycoris writes alpha * sqrt(r), so alpha / r holds
    "lora_rs": (
        dict(direct=dict(network_module="lora", lora_dim=4, alpha=3, conv_lora_dim=4, conv_alpha=5, rs_lora=True)),
        F64,
        0.3,
        {"gamma!=1", *LINEAR},
    ),
    "loha": (dict(algo="loha"), F64, 0.5, {"hada_w1_a", "gamma!=1", *LINEAR}),
    "loha_tucker": (dict(algo="loha", use_tucker=True), F64, 0.5, {"hada_t1", "gamma!=1"}),
    "loha_rs": (
        dict(direct=dict(network_module="loha", lora_dim=4, alpha=3, conv_lora_dim=4, conv_alpha=5, rs_lora=True)),
        F64,
        0.5,
        {"gamma!=1", *LINEAR},
    ),
    "lokr": (dict(algo="lokr"), F64, 0.3, {"lokr_w2_a", "lokr:full_full", "gamma!=1", *LINEAR}),
    "lokr_decompose_both": (
        dict(algo="lokr", decompose_both=True, linear_dim=2, conv_dim=2),
        F64,
        0.3,
        {"lokr_w1_a", "lokr_w2_a", "gamma!=1"},
    ),
    "lokr_factor2": (dict(algo="lokr", factor=2), F64, 0.3, {"lokr_w2_b", "gamma!=1"}),
    "lokr_full_matrix": (dict(algo="lokr", full_matrix=True), F64, 0.3, {"lokr:full_full", *LINEAR}),
    "lokr_tucker": (
        dict(algo="lokr", use_tucker=True, decompose_both=True),
        F64,
        0.3,
        {"lokr_t2", "lokr_w1_a", "gamma!=1"},
    ),
    "full": (dict(algo="full"), F64, 0.1, {"diff", "diff_b", *LINEAR}),
    "norm": (dict(algo="lora", train_norm=True), F64, 0.3, {"w_norm", "b_norm", "cat:GroupNorm", "cat:LayerNorm"}),
    "ia3": (dict(algo="ia3"), F64, 0.5, {"ia3:output", *LINEAR}),
    "ia3_on_input": (
        dict(direct=dict(network_module="ia3", lora_dim=4, conv_lora_dim=4, train_on_input=True)),
        F64,
        0.5,
        {"ia3:input", *LINEAR},
    ),
    "glora": (dict(algo="glora"), F64, 0.3, {"a1.weight", "gamma!=1", *LINEAR}),
    "diag_oft": (dict(algo="diag-oft"), torch.float32, 0.1, {"oft_blocks", *LINEAR}),
    "diag_oft_constraint_rescale": (
        dict(algo="diag-oft", constraint=1e-3, rescaled=True),
        torch.float32,
        0.1,
        {"rescale", "oft:clamped"},
    ),
    "boft": (dict(algo="boft"), torch.float32, 0.1, {"oft_blocks", *LINEAR}),
    "boft_constraint_rescale": (
        dict(algo="boft", constraint=1e-3, rescaled=True),
        torch.float32,
        0.1,
        {"rescale", "oft:clamped"},
    ),
    "dora": (dict(algo="lora", dora_wd=True), F64, 0.3, {"dora:out", *LINEAR}),
    "dora_on_input": (dict(algo="lora", dora_wd=True, wd_on_output=False), F64, 0.3, {"dora:in", *LINEAR}),
    "doha": (dict(algo="loha", dora_wd=True), F64, 0.5, {"dora:out", *LINEAR}),
    "doha_on_input": (dict(algo="loha", dora_wd=True, wd_on_output=False), F64, 0.5, {"dora:in", *LINEAR}),
    "dokr": (dict(algo="lokr", dora_wd=True), F64, 0.3, {"dora:out", *LINEAR}),
    "dokr_on_input": (dict(algo="lokr", dora_wd=True, wd_on_output=False), F64, 0.3, {"dora:in", *LINEAR}),
}


def _facts(patch, tensors: dict, mod: nn.Module) -> set[str]:
    facts = set(tensors) | {f"cat:{_category(mod)}"}
    if patch.kind in ("lora", "loha", "lokr", "glora") and patch.scale != 1.0:
        facts.add("gamma!=1")
    if patch.kind == "lokr" and patch.rank is None:
        facts.add("lokr:full_full")
    if patch.kind == "ia3":
        facts.add("ia3:input" if patch.train_on_input else "ia3:output")
    if getattr(patch, "dora_scale", None) is not None:
        facts.add("dora:out" if patch.dora_on_output else "dora:in")
    if patch.kind in ("oft", "boft") and patch.constraint > 0:
        q = patch.oft_blocks - patch.oft_blocks.transpose(-1, -2)
        if float(q.norm()) > patch.constraint:
            facts.add("oft:clamped")
    return facts


MULTIPLIERS = (1.0, 0.6)
#: The kinds whose multiplier is not linear also run at m = 0 (DoRA: W + dW; OFT rescale: kept).
NONLINEAR_MULTIPLIERS = (1.0, 0.6, 0.0)


# ---------------------------------------------------------------------------------------------
# 1. lycoris-lora: every kind, real forward vs delta from the saved tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["unet", "te"])
@pytest.mark.parametrize("config", list(LYCORIS_CONFIGS))
def test_lycoris_forward_matches_delta(models, config, model_name, tmp_path):
    kw, dt, std, expect = LYCORIS_CONFIGS[config]
    kw = dict(kw)
    net = _lycoris_net(models[model_name], dt, std, **kw)
    assert net.loras
    snap = {
        lora.lora_name: (
            lora.org_module[0].weight.detach().clone(),
            None if lora.org_module[0].bias is None else lora.org_module[0].bias.detach().clone(),
        )
        for lora in net.loras
    }
    with quiet():
        net.apply_to()
    net.save_weights(str(tmp_path / "adapter.safetensors"), None, None)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(tmp_path / "adapter.safetensors")).items():
        name, suffix = key.split(".", 1)
        groups.setdefault(name, {})[suffix] = t

    # one module per (module type, tensor layout): every layout the config produced is checked
    sample: dict[tuple, nn.Module] = {}
    for lora in net.loras:
        sig = (_category(lora.org_module[0]), tuple(sorted(groups[lora.lora_name])))
        sample.setdefault(sig, lora)
    chosen = list(sample.values())
    seen: set[str] = set()
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    nonlinear = config.startswith(("dora", "doha", "dokr", "diag_oft", "boft"))
    for m in NONLINEAR_MULTIPLIERS if nonlinear else MULTIPLIERS:
        net.set_multiplier(m)
        for lora in chosen:
            mod = lora.org_module[0]
            w0, b0 = snap[lora.lora_name]
            tensors = groups[lora.lora_name]
            patch = patch_from_tensors(tensors, tuple(w0.shape))
            # bit-identical round trip of the file's tensors
            assert set(patch.tensors()) == set(tensors)
            assert all(torch.equal(patch.tensors()[k], tensors[k]) for k in tensors)
            seen |= _facts(patch, tensors, mod)
            if patch.kind in ("lora", "loha", "lokr"):
                assert patch.needs_base == ("dora_scale" in tensors)
            x = _input(mod, dt, gen)
            with torch.no_grad():
                ref = mod(x) - _op(mod, x, w0, b0)
                dw = patch.delta(w0 if patch.needs_base else None, multiplier=m).to(dt)
                db = patch.bias_delta(b0, multiplier=m)
                mine = _delta_out(mod, x, w0, b0, dw, None if db is None else db.to(dt))
            rel = _rel(ref, mine)
            worst = max(worst, rel)
            assert rel <= TOL, f"{config}/{model_name} {lora.lora_name} m={m}: rel err {rel:.2e}"
    if model_name == "unet":
        assert expect <= seen, f"{config}: not produced: {sorted(expect - seen)}"
    assert worst <= TOL


def test_lycoris_layout_details(models):
    """Facts the kinds rely on: LoKr with both halves full writes alpha = lora_dim and uses
    gamma 1; DoRA's dora_scale is (out, 1, ...) or (1, in, 1, ...)."""
    net = _lycoris_net(models["unet"], F64, 0.3, algo="lokr", full_matrix=True)
    for lora in net.loras:
        sd = lora.state_dict()
        assert float(sd["alpha"]) == lora.lora_dim and lora.scale == 1.0
    for on_out in (True, False):
        net = _lycoris_net(models["unet"], F64, 0.3, algo="lora", dora_wd=True, wd_on_output=on_out)
        for lora in net.loras:
            w = lora.org_module[0].weight
            ds = lora.state_dict()["dora_scale"]
            expect = (w.shape[0], *[1] * (w.ndim - 1)) if on_out else (1, w.shape[1], *[1] * (w.ndim - 2))
            assert tuple(ds.shape) == expect


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_merge_path_applies_gamma_twice(models, algo):
    """lycoris 4.1.3's get_diff_weight (used by merge_to) = gamma * the forward's update: the
    forward pass (what loradex follows) applies gamma once."""
    net = _lycoris_net(models["te"], F64, 0.3, algo=algo, decompose_both=True, linear_dim=2)
    lora = next(lo for lo in net.loras if lo.scale != 1.0)
    w0 = lora.org_module[0].weight.detach().clone()
    with quiet():
        net.apply_to()
    sd = {k: v.detach() for k, v in lora.state_dict().items()}
    forward_delta = patch_from_tensors(sd, tuple(w0.shape)).delta().double()
    x = torch.randn(3, w0.shape[1], dtype=F64)
    with torch.no_grad():
        assert _rel(lora.org_module[0](x) - x @ w0.T, x @ forward_delta.T) < TOL
        merged_diff = lora.get_diff_weight(1.0)[0].reshape(w0.shape)
    assert relative_error(merged_diff, forward_delta * lora.scale) < 1e-6
    assert relative_error(merged_diff, forward_delta) > 1e-2


# ---------------------------------------------------------------------------------------------
# 3. PEFT: LoHa, LoKr, DoRA, lora_B bias map 1:1 onto the kinds
# ---------------------------------------------------------------------------------------------
PEFT_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv_shortcut",
    "time_embedding.linear_1",
]


def _peft_modules(unet, cfg):
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    with quiet():
        model = inject_adapter_in_model(cfg, copy.deepcopy(unet))
        model.double()
        sd = get_peft_model_state_dict(model)
    gen = torch.Generator().manual_seed(3)
    for name in PEFT_TARGETS:
        mod = model.get_submodule(name)
        base = mod.base_layer
        tensors = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
        x = _input(base, F64, gen)
        yield mod, base, tensors, x


def _check_peft(mod, base, patch, x, ref=None):
    with torch.no_grad():
        if ref is None:
            ref = mod(x) - base(x)
        w0 = base.weight
        dw = patch.delta(w0 if patch.needs_base else None).double()
        db = patch.bias_delta(base.bias)
        mine = _delta_out(base, x, w0, base.bias, dw, None if db is None else db.double())
    rel = _rel(ref, mine)
    assert rel <= TOL, rel


@pytest.mark.parametrize("effective_conv2d", [False, True])
def test_peft_loha(models, effective_conv2d):
    from peft import LoHaConfig

    cfg = LoHaConfig(r=4, alpha=3, target_modules=PEFT_TARGETS, init_weights=False, use_effective_conv2d=effective_conv2d)
    tucker_seen = False
    for mod, base, tensors, x in _peft_modules(models["unet"], cfg):
        # alpha is not a tensor in PEFT files: it comes from the config
        patch = LohaPatch.from_tensors({**tensors, "alpha": torch.tensor(float(cfg.alpha))}, tuple(base.weight.shape))
        tucker_seen |= patch.tucker
        _check_peft(mod, base, patch, x)
    assert tucker_seen == effective_conv2d


@pytest.mark.parametrize(
    "options",
    [dict(r=4), dict(r=2, decompose_both=True), dict(r=2, use_effective_conv2d=True), dict(r=16)],
    ids=["default", "decompose_both", "tucker", "both_full"],
)
def test_peft_lokr(models, options):
    from peft import LoKrConfig

    cfg = LoKrConfig(**options, alpha=3, target_modules=PEFT_TARGETS, init_weights=False)
    for mod, base, tensors, x in _peft_modules(models["unet"], cfg):
        patch = LokrPatch.from_tensors({**tensors, "alpha": torch.tensor(3.0)}, tuple(base.weight.shape))
        if patch.rank is None:
            # PEFT scales by alpha / r even when both halves are full (LyCORIS: 1): fold it
            patch = patch.scaled(cfg.alpha / cfg.r)
        else:
            assert patch.rank == cfg.r
        _check_peft(mod, base, patch, x)


def test_peft_dora_magnitude_maps_to_dora_scale(models):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=3, target_modules=PEFT_TARGETS, init_lora_weights=False, use_dora=True)
    for mod, base, tensors, x in _peft_modules(models["unet"], cfg):
        with torch.no_grad():
            mod.lora_magnitude_vector["default"].weight.mul_(1.3)  # away from ||W + dW||
            ref = mod(x) - base(x)
        mag = mod.lora_magnitude_vector["default"].weight.detach()
        shape = tuple(base.weight.shape)
        assert tuple(mag.shape) == ((shape[0],) if len(shape) == 2 else (1, shape[0], 1, 1))
        dora_scale = dora_scale_from_magnitude(mag, shape)
        assert torch.equal(magnitude_from_dora_scale(dora_scale, shape), mag)
        patch = LoraPatch(
            up=tensors["lora_B.weight"], down=tensors["lora_A.weight"], alpha=3.0, dora_scale=dora_scale
        )
        assert patch.needs_base and patch.dora_on_output
        _check_peft(mod, base, patch, x, ref)


def test_peft_lora_bias(models):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=3, target_modules=PEFT_TARGETS, init_lora_weights=False, lora_bias=True)
    for mod, base, tensors, x in _peft_modules(models["unet"], cfg):
        patch = patch_from_tensors(
            {
                "lora_up.weight": tensors["lora_B.weight"],
                "lora_down.weight": tensors["lora_A.weight"],
                "lora_up.bias": tensors["lora_B.bias"],
                "alpha": torch.tensor(3.0),
            },
            tuple(base.weight.shape),
        )
        assert patch.bias is not None
        _check_peft(mod, base, patch, x)


# ---------------------------------------------------------------------------------------------
# 2. to_lora: exact forms and optimal truncation
# ---------------------------------------------------------------------------------------------
def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=_g(seed)) * scale


def _loha(out, inn, k=None, r=4, tucker=False, seed=0):
    if tucker:
        return LohaPatch(
            hada_w1_a=_rn(r, out, seed=seed),
            hada_w1_b=_rn(r, inn, seed=seed + 1),
            hada_w2_a=_rn(r, out, seed=seed + 2),
            hada_w2_b=_rn(r, inn, seed=seed + 3),
            hada_t1=_rn(r, r, k, k, seed=seed + 4),
            hada_t2=_rn(r, r, k, k, seed=seed + 5),
            alpha=3.0,
        )
    flat = inn * (k * k if k else 1)
    return LohaPatch(
        hada_w1_a=_rn(out, r, seed=seed),
        hada_w1_b=_rn(r, flat, seed=seed + 1),
        hada_w2_a=_rn(out, r, seed=seed + 2),
        hada_w2_b=_rn(r, flat, seed=seed + 3),
        alpha=3.0,
        weight_shape=(out, inn, k, k) if k else None,
    )


LOHA_CASES = {
    "linear": lambda: _loha(48, 40),
    "conv3x3_flat": lambda: _loha(32, 16, k=3),
    "conv_tucker": lambda: _loha(32, 16, k=3, tucker=True),
    "uneven_ranks": lambda: LohaPatch(
        hada_w1_a=_rn(24, 3), hada_w1_b=_rn(3, 20, seed=1), hada_w2_a=_rn(24, 5, seed=2),
        hada_w2_b=_rn(5, 20, seed=3), alpha=2.0,
    ),
}


@pytest.mark.parametrize("case", list(LOHA_CASES))
def test_loha_to_lora_exact(case):
    p = LOHA_CASES[case]()
    lora, err = p.to_lora()
    assert err == 0.0
    r1, r2 = p.hada_w1_b.shape[0], p.hada_w2_b.shape[0]
    assert lora.rank == r1 * r2 == p.exact_lora_rank
    assert lora.shape == p.shape
    assert relative_error(p.delta(), lora.delta()) < 1e-6
    assert relative_error(p.delta(multiplier=0.4), lora.delta(multiplier=0.4)) < 1e-6


def _lokr(w1="full", w2="full", conv=None, r=3, seed=0):
    a, c, b, d = 4, 3, 6, 5
    f = {}
    if w1 == "full":
        f["lokr_w1"] = _rn(a, c, seed=seed)
    else:
        f["lokr_w1_a"], f["lokr_w1_b"] = _rn(a, r, seed=seed), _rn(r, c, seed=seed + 1)
    k = conv or 1
    if w2 == "full":
        f["lokr_w2"] = _rn(b, d, k, k, seed=seed + 2) if conv else _rn(b, d, seed=seed + 2)
    elif w2 == "tucker":
        f["lokr_w2_a"], f["lokr_w2_b"] = _rn(r, b, seed=seed + 2), _rn(r, d, seed=seed + 3)
        f["lokr_t2"] = _rn(r, r, k, k, seed=seed + 4)
    else:
        f["lokr_w2_a"], f["lokr_w2_b"] = _rn(b, r, seed=seed + 2), _rn(r, d * k * k, seed=seed + 3)
    shape = (a * b, c * d, k, k) if conv else None
    return LokrPatch(**f, alpha=torch.tensor(2.0), weight_shape=shape)


LOKR_CASES = {
    "full_full": dict(),
    "full_lowrank": dict(w2="lowrank"),
    "lowrank_lowrank": dict(w1="lowrank", w2="lowrank"),
    "lowrank_full": dict(w1="lowrank"),
    "conv_full_full": dict(conv=3),
    "conv_full_lowrank": dict(w2="lowrank", conv=3),
    "conv_lowrank_lowrank": dict(w1="lowrank", w2="lowrank", conv=3),
    "conv_tucker": dict(w2="tucker", conv=3),
    "conv_tucker_lowrank_w1": dict(w1="lowrank", w2="tucker", conv=3),
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_to_lora_exact(case):
    p = _lokr(**LOKR_CASES[case])
    lora, err = p.to_lora()
    assert err == 0.0
    (a1, _), (a2, _) = p.halves(torch.float64)
    assert lora.rank == a1.shape[1] * a2.shape[1] == p.exact_lora_rank
    assert lora.shape == p.shape
    assert relative_error(p.delta(), lora.delta()) < 1e-6
    if p.rank is None:
        assert p.scale == 1.0  # both halves full: gamma = 1 whatever alpha says


def test_lokr_gamma_and_kron_layout():
    """dW[i*b + p, j*d + q, h, w] = gamma * w1[i, j] * w2[p, q, h, w]."""
    p = _lokr(w2="lowrank", conv=3)
    d = p.delta().double()
    w1, w2 = p.w1(F64), p.w2(F64).reshape(6, 5, 3, 3)
    assert p.scale == pytest.approx(2.0 / 3)
    i, j, pp, q, h, w = 2, 1, 4, 3, 0, 2
    assert float(d[i * 6 + pp, j * 5 + q, h, w]) == pytest.approx(p.scale * float(w1[i, j] * w2[pp, q, h, w]), rel=1e-6)


def test_lora_tucker_folds_exactly_and_truncates_optimally():
    p = LoraPatch(up=_rn(24, 6, 1, 1), down=_rn(6, 10, 1, 1, seed=1), mid=_rn(6, 6, 3, 3, seed=2), alpha=4.0)
    assert p.shape == (24, 10, 3, 3)
    lora, err = p.to_lora()
    assert err == 0.0 and lora.mid is None and lora.rank == 6
    assert tuple(lora.down.shape) == (6, 10, 3, 3)
    assert relative_error(p.delta(), lora.delta()) < 1e-6
    _assert_optimal(p.delta(), *p.to_lora(3), 3)


def _assert_optimal(dense: torch.Tensor, lora: LoraPatch, err: float, k: int) -> None:
    """``lora`` is the optimal rank-k approximation of ``dense``: its error is the Eckart-Young
    bound and its singular values are the top-k ones."""
    s = torch.linalg.svdvals(dense.double().reshape(dense.shape[0], -1))
    optimal = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
    assert lora.rank == k
    assert err == pytest.approx(optimal, rel=1e-6, abs=1e-9)
    assert relative_error(dense, lora.delta()) == pytest.approx(optimal, rel=1e-4, abs=1e-7)
    s_lora = torch.linalg.svdvals(lora.delta().double().reshape(dense.shape[0], -1))[:k]
    assert torch.allclose(s_lora, s[:k], rtol=1e-5)


def test_truncation_from_factors_is_optimal():
    p = _loha(40, 36)
    _assert_optimal(p.delta(), *p.to_lora(5), 5)
    q = _lokr(w1="lowrank", w2="lowrank")
    _assert_optimal(q.delta(), *q.to_lora(4), 4)
    lora = LoraPatch(up=_rn(50, 8), down=_rn(8, 30, seed=1), alpha=5.0, bias=_rn(50, seed=2))
    small, err = lora.to_lora(3)
    _assert_optimal(lora.delta(), small, err, 3)
    assert small.alpha is None  # gamma folded, bias rescaled with it
    assert torch.allclose(small.bias_delta(), lora.bias_delta(), rtol=1e-6)
    same, err0 = lora.to_lora(8)
    assert same is lora and err0 == 0.0


def _base(shape, seed=9):
    return _rn(*shape, seed=seed, scale=0.2)


def test_svd_to_lora_for_kinds_without_exact_form():
    w_lin, w_conv = _base((32, 24)), _base((32, 16, 3, 3))
    cases = [
        (OftPatch(oft_blocks=_rn(4, 8, 8, scale=0.2), alpha=0.0, rescale=1 + _rn(32, 1, scale=0.1)), w_lin),
        (BoftPatch(oft_blocks=_rn(2, 8, 4, 4, scale=0.2)), w_conv),
        (IA3Patch(weight=_rn(24), on_input=torch.tensor(1)), w_lin),
        (FullPatch(diff=_rn(32, 16, 3, 3), diff_b=_rn(32, seed=1)), w_conv),
        (
            GloraPatch(
                a1=_rn(16, 4, 1, 1), a2=_rn(4, 16, 1, 1, seed=1), b1=_rn(32, 4, 1, 1, seed=2),
                b2=_rn(4, 16, 3, 3, seed=3), alpha=2.0,
            ),
            w_conv,
        ),
        (
            LoraPatch(up=_rn(32, 4), down=_rn(4, 24, seed=1), alpha=3.0, dora_scale=torch.rand(32, 1) + 0.5),
            w_lin,
        ),
    ]
    for patch, w in cases:
        assert patch.needs_base == (not isinstance(patch, FullPatch))
        dense = patch.delta(w)
        lora, err = patch.to_lora(5, base_weight=w)
        _assert_optimal(dense, lora, err, 5)
        with pytest.raises(ValueError):
            patch.to_lora(None, base_weight=w)
    full_lora, _ = cases[3][0].to_lora(5)
    assert torch.equal(full_lora.bias_delta(), cases[3][0].bias_delta())


def test_dora_needs_base():
    p = LoraPatch(up=_rn(8, 2), down=_rn(2, 6, seed=1), dora_scale=torch.rand(8, 1) + 0.5)
    assert p.needs_base and p.dora_on_output
    assert not LoraPatch(up=_rn(8, 2), down=_rn(2, 6, seed=1)).needs_base
    with pytest.raises(ValueError):
        p.delta()
    with pytest.raises(ValueError):
        p.to_lora(2)
    with pytest.raises(ValueError):
        p.to_lora(None, base_weight=_base((8, 6)))
    # lycoris semantics: the multiplier interpolates the scale; at m = 0 the result is W + dW
    w = _base((8, 6))
    plain = LoraPatch(up=p.up, down=p.down)
    assert relative_error(p.delta(w, multiplier=0.0), plain.delta()) < 1e-6


def test_glora_exact_rank_2r_current_and_legacy():
    w = _base((20, 16))
    cur = GloraPatch(a1=_rn(16, 3), a2=_rn(3, 16, seed=1), b1=_rn(20, 3, seed=2), b2=_rn(3, 16, seed=3), alpha=2.0)
    # the pre-3.0 layout stores the same maps under swapped names: dW = W a2 a1 + b2 b1
    old = GloraPatch(a1=cur.a2, a2=cur.a1, b1=cur.b2, b2=cur.b1, alpha=2.0)
    assert cur.layout == "current" and old.layout == "legacy" and cur.rank == old.rank == 3
    assert relative_error(cur.delta(w), old.delta(w)) < 1e-6
    ref = (w.double() @ cur.a1.double() @ cur.a2.double() + cur.b1.double() @ cur.b2.double()) * (2.0 / 3)
    assert relative_error(ref, cur.delta(w)) < 1e-6
    for p in (cur, old):
        lora, err = p.to_lora(base_weight=w)
        assert err == 0.0 and lora.rank == 6
        assert relative_error(p.delta(w), lora.delta()) < 1e-6


def test_fold_alpha_and_scaled():
    p = LoraPatch(up=_rn(12, 4), down=_rn(4, 9, seed=1), alpha=-2.0, bias=_rn(12, seed=2))
    for mode in ("sqrt", "up"):
        f = p.fold_alpha(mode)
        assert float(f.alpha) == 4.0 and f.scale == 1.0
        assert relative_error(p.delta(), f.delta()) < 1e-6
        assert torch.allclose(p.bias_delta(), f.bias_delta(), rtol=1e-6)
    for q in (p, _loha(10, 8), _lokr(w2="lowrank"), FullPatch(diff=_rn(5, 4)), NormPatch(w_norm=_rn(5))):
        assert relative_error(q.delta() * 0.3, q.scaled(0.3).delta()) < 1e-6
    with pytest.raises(ValueError):
        NormPatch(w_norm=_rn(5)).to_lora(2)


def test_multiplier_is_linear_for_additive_kinds():
    for p in (_loha(10, 8), _lokr(), LoraPatch(up=_rn(6, 2), down=_rn(2, 5)), FullPatch(diff=_rn(4, 3))):
        assert relative_error(p.delta() * -0.7, p.delta(multiplier=-0.7)) < 1e-6


def test_flat_conv_factors_without_weight_shape():
    p = _loha(32, 16, k=3)
    flat = LohaPatch.from_tensors(p.tensors())  # no weight_shape: 2-D (out, in*k*k)
    assert flat.shape == (32, 144)
    w = _base((32, 16, 3, 3))
    assert flat.delta(w).shape == w.shape  # reshaped to the base weight
    assert torch.equal(flat.delta(w), p.delta())
    with pytest.raises(FormatError):
        LohaPatch.from_tensors(p.tensors(), (32, 16, 5, 5))


# ---------------------------------------------------------------------------------------------
# linalg
# ---------------------------------------------------------------------------------------------
def test_randomized_svd_matches_exact():
    gen = _g(5)
    u, _ = torch.linalg.qr(torch.randn(300, 200, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(240, 200, generator=gen, dtype=F64))
    s = torch.logspace(0, -4, 200, dtype=F64)
    mat = ((u * s) @ v.T).float()
    k = 20
    _, s_rand, _ = svd(mat, k)  # 300x240 at rank 20: the randomized path
    assert torch.allclose(s_rand.double(), s[:k], rtol=1e-3)
    up, down, err = svd_truncate(mat, k)
    optimal = math.sqrt(float((s[k:] ** 2).sum() / (s**2).sum()))
    assert err == pytest.approx(optimal, rel=1e-4)
    _, _, err_exact = svd_truncate(mat, k, exact=True)
    assert err_exact == pytest.approx(optimal, rel=1e-4)
    # deterministic for a seed
    assert torch.equal(svd(mat, k, seed=3)[1], svd(mat, k, seed=3)[1])


def test_truncate_factors_matches_dense_svd():
    up, down = _rn(70, 12).double(), _rn(12, 50, seed=1).double()
    new_up, new_down, err = truncate_factors(up, down, 5)
    s = torch.linalg.svdvals(up @ down)
    assert err == pytest.approx(math.sqrt(float((s[5:] ** 2).sum() / (s**2).sum())), rel=1e-9)
    assert torch.allclose(torch.linalg.svdvals(new_up @ new_down)[:5], s[:5], rtol=1e-9)


def test_rank_for_thresholds():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # S^2: 16, 4, 1, 1 (sum 22); S sum 8
    assert rank_for(s) == 4
    assert rank_for(s, fixed=2) == 2 and rank_for(s, fixed=9) == 4
    # fro: smallest k with cumsum(S^2)/sum(S^2) >= p^2
    assert rank_for(s, fro=math.sqrt(16 / 22)) == 1  # exactly at the threshold: no off-by-one
    assert rank_for(s, fro=math.sqrt(16.5 / 22)) == 2
    assert rank_for(s, fro=math.sqrt(21 / 22)) == 3
    assert rank_for(s, fro=1.0) == 4
    # cumulative: smallest k with cumsum(S)/sum(S) >= p
    assert rank_for(s, cumulative=0.5) == 1 and rank_for(s, cumulative=0.75) == 2
    assert rank_for(s, cumulative=0.76) == 3
    # ratio: number of S_i > S_0 / p
    assert rank_for(s, ratio=2.0) == 1 and rank_for(s, ratio=2.5) == 2 and rank_for(s, ratio=100) == 4
    assert rank_for(s, fro=1.0, fixed=3) == 3
    assert rank_for(torch.zeros(3), fro=0.9) == 1
    with pytest.raises(ValueError):
        rank_for(s, fro=0.9, ratio=2.0)


# ---------------------------------------------------------------------------------------------
# 4. hostile / incomplete tensor sets
# ---------------------------------------------------------------------------------------------
HOSTILE = {
    "empty": {},
    "unknown": {"foo.weight": torch.zeros(2, 2)},
    "mixed kinds": {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 3), "hada_w1_a": torch.zeros(4, 2)},
    "lora missing down": {"lora_up.weight": torch.zeros(4, 2), "alpha": torch.tensor(1.0)},
    "lora rank mismatch": {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(3, 5)},
    "lora 1-D": {"lora_up.weight": torch.zeros(4), "lora_down.weight": torch.zeros(4)},
    "lora int factors": {"lora_up.weight": torch.zeros(4, 2, dtype=torch.int64), "lora_down.weight": torch.zeros(2, 3)},
    "lora extra tensor": {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 3), "scale": torch.tensor(1.0)},
    "lora bad mid": {"lora_up.weight": torch.zeros(4, 2, 1, 1), "lora_down.weight": torch.zeros(2, 3, 1, 1), "lora_mid.weight": torch.zeros(3, 3, 3, 3)},
    "lora alpha vector": {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 3), "alpha": torch.zeros(3)},
    "lora not a tensor": {"lora_up.weight": [[0.0]], "lora_down.weight": torch.zeros(2, 3)},
    "lora bad dora": {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 3), "dora_scale": torch.ones(5, 1)},
    "lora zero rank": {"lora_up.weight": torch.zeros(4, 0), "lora_down.weight": torch.zeros(0, 3)},
    "loha incomplete": {"hada_w1_a": torch.zeros(4, 2), "hada_w1_b": torch.zeros(2, 3), "hada_w2_a": torch.zeros(4, 2)},
    "loha half tucker": {
        "hada_w1_a": torch.zeros(2, 4), "hada_w1_b": torch.zeros(2, 3), "hada_w2_a": torch.zeros(2, 4),
        "hada_w2_b": torch.zeros(2, 3), "hada_t1": torch.zeros(2, 2, 3, 3),
    },
    "loha halves disagree": {
        "hada_w1_a": torch.zeros(4, 2), "hada_w1_b": torch.zeros(2, 3), "hada_w2_a": torch.zeros(5, 2), "hada_w2_b": torch.zeros(2, 3),
    },
    "lokr no w2": {"lokr_w1": torch.zeros(2, 2), "alpha": torch.tensor(1.0)},
    "lokr both w1 forms": {"lokr_w1": torch.zeros(2, 2), "lokr_w1_a": torch.zeros(2, 1), "lokr_w1_b": torch.zeros(1, 2), "lokr_w2": torch.zeros(3, 3)},
    "lokr t1": {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(3, 3), "lokr_t1": torch.zeros(1, 1, 3, 3)},
    "lokr bad tucker": {"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(3, 4), "lokr_w2_b": torch.zeros(2, 4), "lokr_t2": torch.zeros(2, 2, 3, 3)},
    "full diff_b mismatch": {"diff": torch.zeros(4, 3), "diff_b": torch.zeros(5)},
    "norm 2-D": {"w_norm": torch.zeros(4, 4)},
    "ia3 without on_input": {"weight": torch.zeros(4)},
    "ia3 bad weight": {"weight": torch.zeros(2, 4, 3, 1), "on_input": torch.tensor(0)},
    "glora shapes": {"a1.weight": torch.zeros(3, 4), "a2.weight": torch.zeros(5, 3), "b1.weight": torch.zeros(6, 2), "b2.weight": torch.zeros(2, 3)},
    "glora incomplete": {"a1.weight": torch.zeros(3, 4), "alpha": torch.tensor(1.0)},
    "oft 2-D blocks": {"oft_blocks": torch.zeros(4, 4)},
    "oft non-square": {"oft_blocks": torch.zeros(2, 4, 3)},
    "boft odd block": {"oft_blocks": torch.zeros(1, 4, 3, 3)},
    "boft too many stages": {"oft_blocks": torch.zeros(4, 2, 2, 2)},
    "oft bad rescale": {"oft_blocks": torch.zeros(2, 4, 4), "rescale": torch.ones(7, 1)},
    "only alpha": {"alpha": torch.tensor(1.0)},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_tensors_raise_format_error(case):
    with pytest.raises(FormatError) as exc:
        patch_from_tensors(HOSTILE[case])
    assert "\n" not in str(exc.value)


def test_weight_shape_mismatch_raises_format_error():
    good = {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 3)}
    assert patch_from_tensors(good, (4, 3)).shape == (4, 3)
    for shape in [(5, 3), (4, 4), (4, 3, 3, 3)]:
        with pytest.raises(FormatError):
            patch_from_tensors(good, shape)
    with pytest.raises(FormatError):
        patch_from_tensors({"weight": torch.zeros(4), "on_input": torch.tensor(1)}, (4, 5))
    with pytest.raises(FormatError):
        patch_from_tensors({"oft_blocks": torch.zeros(2, 4, 4)}, (16, 3))


def test_round_trip_every_kind():
    samples = [
        LoraPatch(up=_rn(6, 2), down=_rn(2, 5), alpha=1.0, bias=_rn(6), dora_scale=torch.rand(6, 1)),
        _loha(8, 6, k=3, tucker=True),
        _lokr(w1="lowrank", w2="tucker", conv=3),
        FullPatch(diff=_rn(4, 3), diff_b=_rn(4)),
        NormPatch(w_norm=_rn(4), b_norm=_rn(4)),
        IA3Patch(weight=_rn(1, 6, 1, 1), on_input=torch.tensor(0), weight_shape=(6, 4, 3, 3)),
        GloraPatch(a1=_rn(5, 2), a2=_rn(2, 5), b1=_rn(7, 2), b2=_rn(2, 5), alpha=1.0),
        OftPatch(oft_blocks=_rn(2, 4, 4), alpha=0.5, rescale=torch.ones(8, 1), weight_shape=(8, 3)),
        BoftPatch(oft_blocks=_rn(2, 4, 2, 2), alpha=0.0, weight_shape=(8, 4, 1, 1)),
    ]
    assert {p.kind for p in samples} == set(KINDS)
    for p in samples:
        shape = p.shape
        q = patch_from_tensors(p.tensors(), shape)
        assert type(q) is type(p) and q.shape == shape
        assert list(q.tensors()) == list(p.tensors())
        assert all(torch.equal(q.tensors()[k], v) for k, v in p.tensors().items())
        h = p.to(torch.float16)
        assert all(t.dtype == torch.float16 for t in h.tensors().values() if t.is_floating_point())


def test_adaptive_power_iterations_stop_at_a_gap_and_go_on_for_slow_decay():
    """svd(tol=): one power iteration where the spectrum has a gap at the rank (a low-rank fine-tune
    plus noise), more where it decays slowly; either way within 0.5% of the optimal error, where a
    fixed single iteration is 1% off on the slow spectrum."""
    import math

    from loradex.core import linalg

    torch.manual_seed(0)
    m, n, k = 1024, 512, 16
    u, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    calls = []
    real_qr = torch.linalg.qr

    def counting_qr(x, *a, **kw):
        calls.append(x.shape)
        return real_qr(x, *a, **kw)

    results = {}
    for name, sv in (("gap", torch.cat([torch.full((k,), 10.0), torch.full((n - k,), 0.3)]).double()),
                     ("slow", torch.exp(-torch.arange(n, dtype=torch.float64) / 40))):
        a = ((u * sv) @ v.T).float()
        opt = math.sqrt(float((sv[k:] ** 2).sum()))
        ratios = {}
        for label, kw in (("adaptive", {"tol": 1e-2, "power_iters": 4}), ("one", {"power_iters": 1})):
            calls.clear()
            torch.linalg.qr = counting_qr
            try:
                U, S, Vh = linalg.svd(a, k, exact=False, **kw)
            finally:
                torch.linalg.qr = real_qr
            err = float(torch.linalg.norm(a.double() - (U.double() * S.double()) @ Vh.double()))
            ratios[label] = (err / opt, len(calls))
        results[name] = ratios
    assert results["gap"]["adaptive"][1] == 3  # initial QR + one power iteration (2 QRs)
    assert results["slow"]["adaptive"][1] > 3
    assert results["gap"]["adaptive"][0] < 1.0001 and results["slow"]["adaptive"][0] < 1.005
    assert results["slow"]["one"][0] > results["slow"]["adaptive"][0]
