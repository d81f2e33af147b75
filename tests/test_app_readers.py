"""Which app reads which ``--to``: the two rows tests/test_exact_paths.py left open.

1. kohya sd-scripts and textual-inversion files (``--to a1111-ti / kohya-ti / diffusers-ti``), read
   the way its generation scripts (``--textual_inversion_embeddings``) and its TI trainers
   (``--weights``) read them, ported from kohya-ss/sd-scripts at 48d368fa557731ad0488c07304dfeba8c07910eb
   (gen_img.py a9af5269, gen_img_diffusers.py be14c062, sdxl_gen_img.py da07e4c6,
   train_textual_inversion.py c149cf28, sdxl_train_textual_inversion.py 5462a6bb). The tokens and
   rows are then put into the tiny pipelines' own tokenizers and text encoders, as those scripts do.
2. OneTrainer and LoRA files (``--to kohya / lycoris / diffusers / peft``), ported from
   Nerogar/OneTrainer master 23df3832e8f213d64c337e39f9365ba46e99fed0: the loader of #1563
   (de1437cb, 2026-07-03: ``modules/util/load_lora_util.py``, ``convert_util.py``,
   ``LoRALoaderMixin``), the SD / SDXL model hooks (``StableDiffusion(XL)Model``: diffusers -> SGM
   body, ``lora_text_encoders``) and ``LoRAModuleWrapper`` / ``LoRAModule`` (55effbd0), which is
   where a loaded file meets the model: OneTrainer loads a LoRA to go on training it (and in its
   convert tool), and every module its training config selects must come from the file, strictly.
   Also the key sets OneTrainer used before #1563 (``modules/util/convert/lora``, the same code as
   ``omi_model_standards`` f14b1da until #1208; read at 1e0263b3). OneTrainer pins transformers
   5.5.4, whose CLIPTextModel still has the ``text_model`` level: its CLIP module names are the
   canonical ones of loradex's tables.

Only the logic is ported (in our own words), on the published SD1/SDXL module tables and the tiny
models; the deltas OneTrainer's modules compute are compared with loradex's own ``delta(W)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loradex
from loradex.core.adapter import Adapter
from loradex.core.archs import get_arch
from loradex.core.kinds import LoraPatch
from loradex.demo import make_lycoris_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# ==== 1. kohya sd-scripts: textual inversion ======================================================
def kohya_open(path: Path) -> dict:
    """How every sd-scripts TI reader opens a file: safetensors for a ``.safetensors`` name only
    (``library/model_util.is_safetensors`` is a suffix test), ``torch.load`` for any other name
    (torch >= 2.6: ``weights_only``)."""
    if path.suffix.lower() == ".safetensors":
        return load_file(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"weight file is not dict: {path}")
    return data


def kohya_gen_img_embedding(path: Path, is_sdxl: bool) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """``--textual_inversion_embeddings`` of gen_img.py (SD1/SD2 and SDXL), gen_img_diffusers.py
    (SD1/SD2) and sdxl_gen_img.py (SDXL): A1111's ``string_to_param`` is unwrapped; SDXL then takes
    ``clip_l`` and ``clip_g``, SD the first tensor of the dict. The token is the file's stem."""
    data = kohya_open(path)
    if "string_to_param" in data:
        data = data["string_to_param"]
    if is_sdxl:
        e1, e2 = data["clip_l"], data["clip_g"]
    else:
        e1, e2 = next(iter(data.values())), None
    if type(e1) is not torch.Tensor:
        raise ValueError("weight file does not contain a Tensor")
    return path.stem, e1, e2


def kohya_train_ti_weights(path: Path) -> list[torch.Tensor]:
    """``train_textual_inversion.py --weights`` (SD1/SD2): the first tensor (of ``string_to_param``
    in a pickle), a 1-D one made ``[1, d]``."""
    data = kohya_open(path)
    if path.suffix != ".safetensors" and "string_to_param" in data:
        data = data["string_to_param"]
    emb = next(iter(data.values()))
    if type(emb) is not torch.Tensor:
        raise ValueError("weight file does not contain a Tensor")
    return [emb.unsqueeze(0) if emb.dim() == 1 else emb]


def kohya_sdxl_train_ti_weights(path: Path) -> list[torch.Tensor | None]:
    """``sdxl_train_textual_inversion.py --weights``: ``clip_l`` and ``clip_g`` (one may be absent)."""
    data = kohya_open(path)
    emb_l, emb_g = data.get("clip_l"), data.get("clip_g")
    assert emb_l is not None or emb_g is not None, "weight file has no weights for text encoder 1 or 2"
    return [emb_l, emb_g]


def kohya_add_tokens(tokenizer, text_encoder, token: str, embeds: torch.Tensor) -> list[int]:
    """The scripts' token set-up: ``token, token1, token2...`` (one per vector) must all be new to
    the tokenizer and get consecutive ids at its end; the encoder is resized and the rows written."""
    strings = [token] + [f"{token}{i + 1}" for i in range(embeds.shape[0] - 1)]
    assert tokenizer.add_tokens(strings) == len(strings), "tokenizer has same word to token string (filename)"
    ids = tokenizer.convert_tokens_to_ids(strings)
    assert ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] == len(tokenizer) - 1
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight.data
    for i, e in zip(ids, embeds, strict=True):
        table[i] = e
    return ids


#: (--to, file name suffix) of every TI file loradex writes, in each container it can use
TI_FILES = [("a1111-ti", ".pt"), ("a1111-ti", ".safetensors"), ("kohya-ti", ".safetensors"), ("kohya-ti", ".pt"),
            ("diffusers-ti", ".bin"), ("diffusers-ti", ".safetensors"), ("diffusers-ti", ".pt")]


def test_sd_scripts_reads_every_sd1_ti_file(bench, tmp_path):
    """sd-scripts (SD1): every TI file of loradex loads in gen_img / gen_img_diffusers and as
    ``train_textual_inversion.py --weights``, under the file's stem; the rows it writes into the
    tiny SD1 text encoder are loradex's vectors. A ``diffusers-ti`` file named ``.pt`` is a pickle
    (sd-scripts would ``torch.load`` safetensors bytes otherwise: fixed in converters/embeddings.py).
    An embedding image is no file these scripts open."""
    v = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    a = Adapter(embeddings={"tok": loradex.Embedding("tok", {"text_encoder": v})}, arch=bench.arch.name)
    pipe = bench.fresh_pipe()
    for i, (to, suffix) in enumerate(TI_FILES):
        p = tmp_path / f"emb{'abcdefgh'[i]}{suffix}"
        loradex.save(a, p, format=to)
        token, e1, e2 = kohya_gen_img_embedding(p, is_sdxl=False)
        assert token == p.stem and e2 is None
        ids = kohya_add_tokens(pipe.tokenizer, pipe.text_encoder, token, e1)
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], v), (to, suffix)
        (w,) = kohya_train_ti_weights(p)
        assert torch.equal(w, v), (to, suffix)
    png = tmp_path / "embpng.png"
    loradex.save(a, png, format="a1111-png")
    with pytest.raises(Exception):  # noqa: B017 - torch.load of an image
        kohya_open(png)


def test_sd_scripts_reads_sdxl_ti_files_but_the_split_pair(tmp_path):
    """sd-scripts (SDXL: gen_img / sdxl_gen_img, ``sdxl_train_textual_inversion.py --weights``):
    ``clip_l`` + ``clip_g`` is the layout, which loradex's SDXL ``a1111-ti``, ``kohya-ti`` and
    ``diffusers-ti`` (default ``sdxl_layout="clip"``) all write; the rows land in both tiny SDXL
    encoders. ``diffusers-ti`` with ``sdxl_layout="split"`` (two ``{token: tensor}`` files) has no
    ``clip_l``: refused (KeyError / "no weights for text encoder 1 or 2"). On the published SDXL
    widths the same files hold ``[n, 768]`` and ``[n, 1280]``."""
    from loradex.tiny import tiny_sdxl_text_encoders, tiny_tokenizer

    arch = get_arch("tiny-sdxl")
    g = torch.Generator().manual_seed(1)
    vec = {c: torch.randn(2, arch.text_encoder_width(c), generator=g) for c in arch.text_encoders}
    a = Adapter(embeddings={"tok": loradex.Embedding("tok", vec)}, arch=arch.name)
    tes = tiny_sdxl_text_encoders()
    toks = (tiny_tokenizer(), tiny_tokenizer())
    for i, (to, suffix) in enumerate(TI_FILES):
        p = tmp_path / f"xl{'abcdefgh'[i]}{suffix}"
        loradex.save(a, p, format=to)
        token, e1, e2 = kohya_gen_img_embedding(p, is_sdxl=True)
        for tok, te, e, want in zip(toks, tes, (e1, e2), vec.values(), strict=True):
            ids = kohya_add_tokens(tok, te, token, e)
            assert torch.equal(te.get_input_embeddings().weight[ids], want), (to, suffix)
        assert all(torch.equal(w, x) for w, x in zip(kohya_sdxl_train_ti_weights(p), vec.values(), strict=True))
    split = tmp_path / "split.safetensors"
    loradex.save(a, split, format="diffusers-ti", sdxl_layout="split")
    for f in (split, tmp_path / "split_2.safetensors"):
        with pytest.raises(KeyError):
            kohya_gen_img_embedding(f, is_sdxl=True)
        with pytest.raises(AssertionError, match="no weights"):
            kohya_sdxl_train_ti_weights(f)
    big = get_arch("sdxl")
    xl = {c: torch.randn(2, big.text_encoder_width(c), generator=g) for c in big.text_encoders}
    for to in ("a1111-ti", "kohya-ti", "diffusers-ti"):
        p = tmp_path / f"big-{to}.safetensors"
        loradex.save(Adapter(embeddings={"tok": loradex.Embedding("tok", xl)}), p, format=to)
        _, e1, e2 = kohya_gen_img_embedding(p, is_sdxl=True)
        assert (e1.shape[1], e2.shape[1]) == (768, 1280) and torch.equal(e2, xl["text_encoder_2"])


# ==== 2. OneTrainer: LoRA files ====================================================================
class OTRefused(Exception):
    """What OneTrainer raises where it cannot take a file (the message says where)."""


# -- layer 1: the model-independent pass (load_lora_util.normalize_various) ---------------------------
OT_SUFFIXES = ((".default.weight", ".weight"), (".lora_A.weight", ".lora_down.weight"),
               (".lora_B.weight", ".lora_up.weight"), (".lora.down.weight", ".lora_down.weight"),
               (".lora.up.weight", ".lora_up.weight"))
OT_PARAMS = ("lora_", "oft_", "hada_", "lokr_")  # convert_util SUPPORTED_PARAM_PREFIXES
OT_SCALARS = ("alpha", "dora_scale")


def ot_normalize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``_aux.``; ``lycoris_`` -> ``lora_unet_``; strip PEFT's ``base_model.model.`` and
    ``.default``; diffusers/PEFT suffixes -> ``lora_down``/``lora_up``; the DoRA magnitude spellings
    -> ``dora_scale``; refuse any parameter OneTrainer does not train (anything but lora_*, oft_*,
    hada_*, lokr_*, alpha, dora_scale: full diffs, (IA)^3, GLoRA, norms...); then every LoRA module
    without an alpha gets ``alpha = rank`` (scale 1: diffusers' folded convention)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("_aux."):
            continue
        if k.startswith("lycoris_"):
            k = "lora_unet_" + k[len("lycoris_"):]
        k = k.removeprefix("base_model.model.")
        for old, new in OT_SUFFIXES:
            if k.endswith(old):
                k = k[: -len(old)] + new
        if k.endswith(".lora_magnitude_vector.weight"):
            k = k[: -len(".lora_magnitude_vector.weight")] + ".dora_scale"
            v = v.reshape(v.shape[0], 1) if v.dim() == 1 else v.reshape(v.shape[1], *([1] * (v.dim() - 1)))
        elif k.endswith(".magnitude"):
            k = k[: -len(".magnitude")] + ".dora_scale"
        out[k] = v
    for k in out:
        if k.startswith("bundle_emb"):
            continue
        seg = k.split(".")
        param = seg[-2] if k.endswith((".weight", ".scaled_oft")) and len(seg) > 1 else seg[-1]
        if not (param in OT_SCALARS or param.startswith(OT_PARAMS)):
            raise OTRefused(f"adapter type OneTrainer can't load (key '{k}')")
    for k, v in list(out.items()):
        if k.endswith(".lora_up.weight"):
            out.setdefault(k[: -len(".lora_up.weight")] + ".alpha", v.new_tensor(float(v.shape[1])))
    return out


def ot_split(key: str) -> tuple[str, str]:
    """``_split_value_suffix``: (module path, value suffix); a key it cannot split is all module."""
    if key.endswith((".alpha", ".dora_scale")):
        i = key.rfind(".")
        return key[:i], key[i:]
    if key.endswith((".weight", ".scaled_oft")):
        i = key[: key.rfind(".")].rfind(".")
        return (key[:i], key[i:]) if i >= 0 else (key, "")
    i = key.rfind(".")
    if i >= 0 and key[i + 1:].startswith(("hada_", "lokr_")):
        return key[:i], key[i:]
    return key, ""


# -- layer 2: the SD / SDXL namespaces (to_canonical with the model's hooks) -----------------------------
OT_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
             "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}


def ot_unet_rules(sdxl: bool) -> list[tuple[str, str, bool]]:
    """``StableDiffusion(XL)Model.diffusers_to_original``: (diffusers block, SGM block, is a resnet
    whose leaves are renamed too). SD1: 4 levels, attention in down 0-2 / up 1-3; SDXL: 3 levels,
    attention in down 1-2 / up 0-1, plus ``add_embedding``."""
    levels = 3 if sdxl else 4
    down_attn, up_attn = ({1, 2}, {0, 1}) if sdxl else ({0, 1, 2}, {1, 2, 3})
    rules = [("conv_in", "input_blocks.0.0", False), ("time_embedding.linear_1", "time_embed.0", False),
             ("time_embedding.linear_2", "time_embed.2", False), ("conv_norm_out", "out.0", False), ("conv_out", "out.2", False)]
    if sdxl:
        rules += [("add_embedding.linear_1", "label_emb.0.0", False), ("add_embedding.linear_2", "label_emb.0.2", False)]
    for i in range(levels):
        for j in range(2):
            rules.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{3 * i + j + 1}.0", True))
            if i in down_attn:
                rules.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{3 * i + j + 1}.1", False))
        if i < levels - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{3 * i + 3}.0.op", False))
    rules += [("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
              ("mid_block.resnets.1", "middle_block.2", True)]
    for i in range(levels):
        for j in range(3):
            rules.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{3 * i + j}.0", True))
            if i in up_attn:
                rules.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{3 * i + j}.1", False))
        if i < levels - 1:
            rules.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{3 * i + 2}.{2 if i in up_attn else 1}.conv", False))
    return rules


def ot_rename(path: str, rules, forward: bool) -> str | None:
    """One module path through the body (diffusers -> SGM, or back); None where no rule applies
    (OneTrainer's strict conversion raises there)."""
    leaves = OT_RESNET if forward else {v: k for k, v in OT_RESNET.items()}
    for d, s, resnet in rules:
        src, dst = (d, s) if forward else (s, d)
        if path == src or path.startswith(src + "."):
            rest = path[len(src):]
            if resnet:
                leaf = leaves.get(rest[1:])
                return None if leaf is None else f"{dst}.{leaf}"
            return dst + rest
    return None


def lora_modules(arch, comp: str) -> dict[str, tuple[int, ...]]:
    """``lora_module_names``: the component's Linear/Conv2d paths (component-relative) -> shape."""
    return {m.partition(".")[2]: tuple(i.shape) for m, i in arch.modules.items()
            if m.startswith(comp + ".") and i.type in ("linear", "conv")}


def ot_to_canonical(sd: dict[str, torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """Layer 1, then ``to_canonical`` for SD (kohya body: none) / SDXL (kohya body: SGM names):
    the namespace is sniffed from the prefixes (``unet.`` dotted; ``lora_unet_``/``lora_te*``
    flattened; else bare, which is re-prefixed when its modules are the UNet's own), flattened
    names are matched against the model's modules (an unknown one raises), and the result is
    canonical: ``unet.<diffusers path>``, ``text_encoder[_2].<CLIP path>`` + value suffix."""
    sd = ot_normalize(sd)
    sdxl = "text_encoder_2" in arch.components
    rules = ot_unet_rules(sdxl)
    unet = lora_modules(arch, "unet")
    tes = [("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")] if sdxl else [("text_encoder", "lora_te")]
    passthrough = tuple(c + "." for c, _ in tes) + ("bundle_emb",)
    if any(k.startswith("unet.") for k in sd):
        family = "component"
    elif any(k.startswith("diffusion_model.") for k in sd):
        raise NotImplementedError("ComfyUI-prefixed files: loradex writes none")
    elif any(k.startswith(("lora_unet_", "lora_te")) for k in sd):
        family = "kohya"
    else:
        family = "bare"
        if {ot_split(k)[0] for k in sd if not k.startswith(passthrough)} & set(unet):
            sd = {(k if k.startswith(passthrough) else "unet." + k): v for k, v in sd.items()}
            family = "component"
    if family == "component":
        mods = {ot_split(k[5:])[0] for k in sd if k.startswith("unet.")}
        if mods <= set(unet):
            return sd
        out = {}
        for k, v in sd.items():  # native (SGM) names under unet.: renamed where a rule applies
            m, suf = ot_split(k)
            new = ot_rename(m[5:], rules, forward=False) if k.startswith("unet.") else None
            out[k if new is None else f"unet.{new}{suf}"] = v
        return out
    if family == "bare":  # ORIGINAL: SGM names without a prefix; strict
        out = {}
        for k, v in sd.items():
            if k.startswith(passthrough):
                out[k] = v
                continue
            m, suf = ot_split(k)
            new = ot_rename(m, rules, forward=False)
            if new is None:
                raise OTRefused(f"No conversion found for key unet.{k}")
            out[f"unet.{new}{suf}"] = v
        return out
    flat = {}
    flat_of = {m: m.replace(".", "_") for m in unet}
    if sdxl:  # the file's body: SGM (sd-scripts) or diffusers names (mixture / lycoris), SGM on a tie
        native = {m: "lora_unet_" + ot_rename(m, rules, forward=True).replace(".", "_") for m in unet}
        identity = {m: "lora_unet_" + f for m, f in flat_of.items()}
        file_mods = [ot_split(k)[0] for k in sd]
        hits = [sum(x in set(names.values()) for x in file_mods) for names in (native, identity)]
        chosen = native if hits[0] >= hits[1] else identity
    else:
        chosen = {m: "lora_unet_" + f for m, f in flat_of.items()}
    flat.update({f: "unet." + m for m, f in chosen.items()})
    te_prefixes = list(tes)
    if not sdxl and any(k.startswith("lora_te1_") for k in sd):
        te_prefixes.append(("text_encoder", "lora_te1"))
    for comp, pre in te_prefixes:
        flat.update({f"{pre}_{m.replace('.', '_')}": f"{comp}.{m}" for m in lora_modules(arch, comp)})
    out = {}
    for k, v in sd.items():
        if k.startswith("bundle_emb."):
            out[k] = v
            continue
        m, suf = ot_split(k)
        if m not in flat:
            raise OTRefused(f"No conversion found for key {k}")
        out[flat[m] + suf] = v
    return out


# -- the wrapper: LoRAModuleWrapper / LoRAModule / LoHaModule / LoKrModule, strict loading ---------------
@dataclass
class OTConfig:
    """The TrainConfig fields the wrapper builds its modules from (OneTrainer's defaults)."""

    peft_type: str = "LORA"  # LORA (DoRA: lora_decompose), LOHA, LOKR
    lora_rank: int = 16
    lora_decompose: bool = False
    lora_decompose_output_axis: bool = False
    lora_decompose_norm_epsilon: bool = True
    lokr_dim: int = 16
    lokr_decompose_factor: int = -1
    lokr_decompose_both: bool = False
    lokr_full_matrix: bool = False
    layer_filter: str = ""  # presets for SD/SDXL: "" full, "attentions" attn-mlp, "attn" attn-only
    train_text_encoders: bool = False


def ot_factorization(dim: int, factor: int) -> tuple[int, int]:
    """``lokr_utils.factorization`` (LyCORIS' own), smaller factor first."""
    if factor > 0 and dim % factor == 0:
        return tuple(sorted((factor, dim // factor)))
    factor = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def ot_module_params(cfg: OTConfig, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The state-dict entries (and shapes) of the module OneTrainer makes for a Linear/Conv2d of
    ``shape``: LoRA ``lora_down`` as the layer (r, in[, kh, kw]) and ``lora_up`` a 1x1 (out, r[, 1,
    1]); LoHa the same two shapes for ``hada_w?_b`` / ``hada_w?_a``; LoKr by its factorization."""
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    ones = (1,) * len(k)
    if cfg.peft_type in ("LORA", "LOHA"):
        r = cfg.lora_rank
        down, up = (r, inn, *k), (out, r, *ones)
        if cfg.peft_type == "LOHA":
            return {"hada_w1_a": up, "hada_w1_b": down, "hada_w2_a": up, "hada_w2_b": down, "alpha": ()}
        p = {"lora_down.weight": down, "lora_up.weight": up, "alpha": ()}
        if cfg.lora_decompose:
            p["dora_scale"] = (out, 1, *ones) if cfg.lora_decompose_output_axis else (1, inn, *ones)
        return p
    d = cfg.lokr_dim
    in_m, in_n = ot_factorization(inn, cfg.lokr_decompose_factor)
    out_l, out_k = ot_factorization(out, cfg.lokr_decompose_factor)
    p = {"alpha": ()}
    if cfg.lokr_decompose_both and d < max(out_l, in_m) / 2:
        p |= {"lokr_w1_a": (out_l, d), "lokr_w1_b": (d, in_m)}
    else:
        p["lokr_w1"] = (out_l, in_m)
    if cfg.lokr_full_matrix or d >= max(out_k, in_n) / 2:
        p["lokr_w2"] = (out_k, in_n, *k)
    else:
        p |= {"lokr_w2_a": (out_k, d), "lokr_w2_b": (d, in_n * math.prod(k))}
    return p


def ot_load(canon: dict[str, torch.Tensor], arch, cfg: OTConfig) -> tuple[dict[str, dict], set[str]]:
    """The SD/SDXL LoRA setup: a wrapper per text encoder the file (or the config) has, one for the
    UNet with the layer filter (substrings; one that matches nothing raises); every selected module
    loads its keys strictly (missing, unexpected or mis-shaped: error). Returns module -> its
    tensors, and the modules only kept as dummies (a leftover ``alpha``: saved again, never applied)."""
    loaded: dict[str, dict] = {}
    dummies: set[str] = set()
    for comp in arch.components:
        sub = {k: v for k, v in canon.items() if k.startswith(comp + ".")}
        if comp != "unet" and not (sub or cfg.train_text_encoders):
            continue
        mods = lora_modules(arch, comp)
        if comp == "unet":
            pats = [p.strip() for p in cfg.layer_filter.split(",")]
            if any(p and not any(p in m for m in mods) for p in pats):
                raise OTRefused("Custom layer filters: no modules were matched by the custom filter(s)")
            mods = {m: s for m, s in mods.items() if any(p == "" or p in m for p in pats)}
        by_module: dict[str, dict] = {}  # each module's keys: those that start with its path and a '.'
        for k, v in sub.items():
            rest = k[len(comp) + 1:]
            for i in (i for i, c in enumerate(rest) if c == "."):
                if rest[:i] in mods:
                    by_module.setdefault(rest[:i], {})[rest[i + 1:]] = v
        used = set()
        for m, shape in mods.items():
            pre = f"{comp}.{m}."
            got = by_module.get(m, {})
            want = ot_module_params(cfg, shape)
            if set(got) != set(want):
                raise OTRefused(f"Error during loading of module key {pre!r}: missing {sorted(set(want) - set(got))}, "
                                f"unexpected {sorted(set(got) - set(want))}")
            bad = {k: (tuple(got[k].shape), want[k]) for k in want if tuple(got[k].shape) != want[k]}
            if bad:
                raise OTRefused(f"Error during loading of module key {pre!r}: size mismatch {bad}")
            loaded[f"{comp}.{m}"] = got
            used |= {pre + k for k in got}
        dummies |= {k[: -len(".alpha")] for k in sub if k not in used and k.endswith(".alpha")}
    return loaded, dummies


def ot_delta(cfg: OTConfig, t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change OneTrainer's module makes (float64): LoRA ``up @ down * alpha / rank`` with
    the *configured* rank; DoRA ``dora_scale * (W + dW) / ||W + dW||`` (+ float32 eps) minus W;
    LoHa ``(w1a @ w1b) * (w2a @ w2b) * alpha / rank``; LoKr ``kron(w1, w2) * alpha / dim``."""
    f = {k: v.double() for k, v in t.items()}
    shape = weight.shape
    if cfg.peft_type == "LORA":
        d = (f["lora_up.weight"].flatten(1) @ f["lora_down.weight"].flatten(1)).reshape(shape) * (f["alpha"] / cfg.lora_rank)
        if not cfg.lora_decompose:
            return d
        w = weight.double()
        wp = w + d
        ones = [1] * (wp.dim() - 1)
        if cfg.lora_decompose_output_axis:
            norm = wp.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *ones)
        else:
            norm = wp.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(shape[1], *ones).transpose(0, 1)
        eps = torch.finfo(torch.float32).eps if cfg.lora_decompose_norm_epsilon else 0.0
        return f["dora_scale"] * wp / (norm + eps) - w
    if cfg.peft_type == "LOHA":
        w1 = f["hada_w1_a"].flatten(1) @ f["hada_w1_b"].flatten(1)
        w2 = f["hada_w2_a"].flatten(1) @ f["hada_w2_b"].flatten(1)
        return (w1 * w2).reshape(shape) * (f["alpha"] / cfg.lora_rank)
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (f["alpha"] / cfg.lokr_dim)


def ot_open(path: Path) -> dict[str, torch.Tensor]:
    """``LoRALoaderMixin._load``: an OneTrainer backup folder (``meta.json``), a ``.ckpt`` through
    ``torch.load(weights_only=True)``, else ``load_file``; anything else: "could not load LoRA"."""
    if (path / "meta.json").exists():
        return load_file(path / "lora" / "lora.safetensors")
    try:
        if path.name.endswith(".ckpt"):
            return torch.load(path, weights_only=True)
        return load_file(path)
    except Exception as e:
        raise OTRefused(f"could not load LoRA: {path}") from e


# -- tests -----------------------------------------------------------------------------------------
KOHYA_TARGETS = re.compile(
    r"^unet\..*(\.attentions\.\d+\.(?!.*norm)|\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$|samplers\.0\.conv$)"
    r"|^text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)$")


def targets_lora(arch_name: str, rank: int = 1, alpha: float = 0.5, pattern: re.Pattern | None = KOHYA_TARGETS,
                 seed: int = 0) -> Adapter:
    """A LoRA of ``rank`` and ``alpha`` on the modules ``pattern`` picks (default: kohya's default
    targets, as in test_exact_paths; None: every Linear/Conv2d) of an arch's table."""
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for n, info in get_arch(arch_name).modules.items():
        if info.type not in ("linear", "conv") or (pattern is not None and not pattern.search(n)):
            continue
        shp = info.shape
        up = torch.randn(shp[0], rank, *([1] * (len(shp) - 2)), generator=g)
        patches[n] = LoraPatch(up=up, down=torch.randn(rank, *shp[1:], generator=g), alpha=torch.tensor(alpha))
    return Adapter(patches, arch=arch_name)


def write(adapter: Adapter, to: str, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``loradex.save`` as ``to``; returns each file written (a PEFT folder: one per component)."""
    loradex.save(adapter, path, to, arch=adapter.arch)
    if path.is_dir():
        return {f.parent.name: load_file(f) for f in sorted(path.rglob("adapter_model.safetensors"))}
    return {path.name: load_file(path)}


def canonical_modules(canon) -> dict[str, float]:
    """module -> the alpha OneTrainer holds for it."""
    return {k[: -len(".alpha")]: float(v) for k, v in canon.items() if k.endswith(".alpha")}


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_onetrainer_key_names(tmp_path, arch_name):
    """OneTrainer (master 23df3832, loader of #1563) on the published tables, kohya's default
    targets (UNet + every text encoder), rank 1, alpha 0.5: ``--to kohya`` (SDXL: SGM names, as
    sd-scripts writes them) maps every key to its module, alphas kept; ``--to lycoris`` (UNet) the
    same through ``lycoris_`` -> ``lora_unet_``; ``--to diffusers`` maps every module but its alphas
    are not read (``lora_adapter_metadata`` is ignored: alpha = rank, scale 1 instead of 0.5).
    ``--to peft`` is a folder, which OneTrainer does not open; its UNet ``adapter_model.safetensors``
    alone maps (alphas lost), a text encoder's does not (its bare CLIP paths are taken for UNet
    names and refused)."""
    arch = get_arch(arch_name)
    a = targets_lora(arch_name)
    unet = {n for n in a.patches if n.startswith("unet.")}
    (kohya,) = write(a, "kohya", tmp_path / "k.safetensors").values()
    if arch_name == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
    got = canonical_modules(ot_to_canonical(kohya, arch))
    assert got == {n: 0.5 for n in a.patches}
    (lyco,) = write(Adapter({n: a.patches[n] for n in unet}, arch=arch_name), "lycoris", tmp_path / "l.safetensors").values()
    assert canonical_modules(ot_to_canonical(lyco, arch)) == {n: 0.5 for n in unet}
    (diff,) = write(a, "diffusers", tmp_path / "d.safetensors").values()
    assert canonical_modules(ot_to_canonical(diff, arch)) == {n: 1.0 for n in a.patches}
    peft = write(a, "peft", tmp_path / "peft")
    with pytest.raises(OTRefused, match="could not load"):
        ot_open(tmp_path / "peft")
    assert canonical_modules(ot_to_canonical(ot_open(tmp_path / "peft" / "unet" / "adapter_model.safetensors"), arch)) \
        == {n: 1.0 for n in unet}
    for comp in set(peft) - {"unet"}:
        with pytest.raises(OTRefused, match="No conversion found"):
            ot_to_canonical(peft[comp], arch)


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_onetrainer_loads_only_into_a_matching_training_config(tmp_path, arch_name):
    """OneTrainer loads a LoRA to go on training it: ``LoRAModuleWrapper`` loads every module its
    config selects strictly, so the file must be of the configured kind and rank and cover every
    selected module. kohya's default targets (attention blocks + resnet convs + CLIP) load under
    the "attn-mlp" preset (filter ``attentions``), the resnet convs then only kept as dummies (never
    applied); "full" needs conv_in, time embedding... too; another rank is a size mismatch. SDXL:
    the text_encoder_2 wrapper covers ``text_projection``, which sd-scripts does not train, so an
    SDXL file with bigG LoRA loads only with it (a UNet + CLIP-L file loads as is)."""
    arch = get_arch(arch_name)
    a = targets_lora(arch_name)
    attn = OTConfig(lora_rank=1, layer_filter="attentions")
    canon = ot_to_canonical(write(a, "kohya", tmp_path / "k.safetensors")["k.safetensors"], arch)
    if arch_name == "sdxl":
        with pytest.raises(OTRefused, match=r"text_encoder_2\.text_projection"):
            ot_load(canon, arch, attn)
        proj = targets_lora(arch_name, pattern=re.compile(r"^text_encoder_2\.text_projection$"), seed=1)
        a = Adapter({**a.patches, **proj.patches}, arch=arch_name)
        canon = ot_to_canonical(write(a, "kohya", tmp_path / "k2.safetensors")["k2.safetensors"], arch)
        no_big = Adapter({n: p for n, p in a.patches.items() if not n.startswith("text_encoder_2.")}, arch=arch_name)
        canon3 = ot_to_canonical(write(no_big, "kohya", tmp_path / "k3.safetensors")["k3.safetensors"], arch)
        assert set(ot_load(canon3, arch, attn)[0]) == {n for n in no_big.patches if ".attentions." in n or not n.startswith("unet.")}
    loaded, dummies = ot_load(canon, arch, attn)
    assert set(loaded) == {n for n in a.patches if ".attentions." in n or not n.startswith("unet.")}
    assert dummies == set(a.patches) - set(loaded) and dummies
    for n, t in loaded.items():  # loradex's factors, and its scale (alpha / the configured rank)
        p = a.patches[n]
        assert torch.equal(t["lora_up.weight"], p.up) and torch.equal(t["lora_down.weight"], p.down), n
        assert float(t["alpha"]) / attn.lora_rank == p.scale, n
    with pytest.raises(OTRefused, match="missing"):
        ot_load(canon, arch, replace(attn, layer_filter=""))
    with pytest.raises(OTRefused, match="size mismatch"):
        ot_load(canon, arch, replace(attn, lora_rank=16))


def kind_files(bench, label: str, tmp_path: Path, *targets: str) -> tuple[Adapter, list[dict[str, torch.Tensor]]]:
    """A lycoris-made ``label`` adapter on the tiny SD1 UNet, as loradex reads it, and the files it
    converts it to (one per target)."""
    ref = make_lycoris_reference(bench, label, tmp_path)
    files = []
    for to in targets:
        out = tmp_path / f"{label}-{to}.safetensors"
        loradex.convert(ref.path, out, to=to, arch=bench.arch)
        files.append(load_file(out))
    return loradex.load(ref.path, arch=bench.arch), files


#: kind -> the OneTrainer config that matches lycoris' reference (dim 4, alpha 2, LoKr factor 4)
OT_KIND_CONFIG = {
    "lora": OTConfig(lora_rank=4),
    "dora": OTConfig(lora_rank=4, lora_decompose=True, lora_decompose_output_axis=True),
    "loha": OTConfig(peft_type="LOHA", lora_rank=4, layer_filter="attn"),
    "lokr": OTConfig(peft_type="LOKR", lokr_dim=4, lokr_decompose_factor=4),
}


def test_onetrainer_kinds_and_deltas(bench, tmp_path):
    """lycoris-made adapters on every Linear/Conv2d of the tiny SD1 UNet, ``--to kohya``, loaded as
    OneTrainer would with the matching config: LoRA/LoCon, DoRA (with "decompose output axis": the
    default input axis is a size mismatch), LoKr (same dim and factor) load whole and their deltas
    are loradex's; LoHa only on Linear layers (OneTrainer keeps conv LoHa factors 4-D, LyCORIS 2-D:
    here filter ``attn``); ``--to lycoris`` reads the same. Refused: Tucker LoCon (``lora_mid``),
    full / (IA)^3 / GLoRA (not trained by OneTrainer), Diag-OFT / BOFT (``oft_blocks``: no OFT
    module name OneTrainer knows). ``--to diffusers`` LoRA loads at scale 1 (alpha 2 of rank 4 lost)
    and its DoRA magnitude (``lora_magnitude_vector``) is no ``dora_scale`` there."""
    unet = bench.pipe.unet
    for label, cfg in OT_KIND_CONFIG.items():
        targets = ("kohya", "lycoris", "diffusers") if label in ("lora", "dora") else ("kohya", "lycoris")
        a, (sd, lyco, *diff) = kind_files(bench, label, tmp_path, *targets)
        canon = ot_to_canonical(sd, bench.arch)
        if label == "loha":
            with pytest.raises(OTRefused, match="size mismatch"):
                ot_load(canon, bench.arch, replace(cfg, layer_filter=""))
        if label == "dora":
            with pytest.raises(OTRefused, match="size mismatch"):
                ot_load(canon, bench.arch, replace(cfg, lora_decompose_output_axis=False))
        loaded, dummies = ot_load(canon, bench.arch, cfg)
        assert set(loaded) | dummies == set(a.patches) and (label == "loha") == bool(dummies), label
        for n, t in loaded.items():
            w = unet.get_submodule(n.partition(".")[2]).weight.detach()
            want = a.patches[n].delta(w.float()).double().reshape(w.shape)
            assert torch.allclose(ot_delta(cfg, t, w), want, rtol=1e-4, atol=1e-6), (label, n)
        assert ot_to_canonical(lyco, bench.arch).keys() == canon.keys(), label
        if label == "lora":  # diffusers: alpha = rank, scale 1 instead of 2 / 4
            loaded, _ = ot_load(ot_to_canonical(diff[0], bench.arch), bench.arch, cfg)
            n, t = next(iter(loaded.items()))
            w = torch.zeros(bench.arch.modules[n].shape)
            assert torch.allclose(ot_delta(cfg, t, w), 2 * a.patches[n].delta(w).double().reshape(w.shape), atol=1e-6)
        if label == "dora":
            with pytest.raises(OTRefused, match="lora_magnitude_vector"):
                ot_load(ot_to_canonical(diff[0], bench.arch), bench.arch, cfg)
    _, (sd,) = kind_files(bench, "locon-tucker", tmp_path, "kohya")
    with pytest.raises(OTRefused, match=r"unexpected \['lora_mid.weight'\]"):
        ot_load(ot_to_canonical(sd, bench.arch), bench.arch, OTConfig(lora_rank=4))
    for label in ("full", "ia3", "glora"):
        with pytest.raises(OTRefused, match="adapter type"):
            ot_to_canonical(kind_files(bench, label, tmp_path, "kohya")[1][0], bench.arch)
    for label in ("diag-oft", "boft"):
        with pytest.raises(OTRefused, match=r"No conversion found for key .*\.oft_blocks"):
            ot_to_canonical(kind_files(bench, label, tmp_path, "kohya")[1][0], bench.arch)


def test_onetrainer_sdxl_deltas_on_tiny_sdxl(tmp_path):
    """A LoRA (rank 2, alpha 1) on every Linear/Conv2d of tiny SDXL (UNet, CLIP-L, bigG with its
    ``text_projection``): ``--to kohya`` (SGM UNet names) and ``--to lycoris`` (UNet, diffusers
    names, picked over the SGM body by OneTrainer's key count) load whole in the "full" preset and
    every delta is loradex's; ``--to diffusers`` loads at scale 1 instead of 0.5."""
    arch = get_arch("tiny-sdxl")
    a = targets_lora("tiny-sdxl", rank=2, alpha=1.0, pattern=None)
    cfg = OTConfig(lora_rank=2)
    for to in ("kohya", "lycoris", "diffusers"):
        ad = Adapter({n: p for n, p in a.patches.items() if n.startswith("unet.")}, arch=arch.name) if to == "lycoris" else a
        (sd,) = write(ad, to, tmp_path / f"{to}.safetensors").values()
        loaded, dummies = ot_load(ot_to_canonical(sd, arch), arch, cfg)
        assert set(loaded) == set(ad.patches) and not dummies, to
        for n, t in loaded.items():
            w = torch.zeros(arch.modules[n].shape)
            want = ad.patches[n].delta(w).double().reshape(w.shape) * (2 if to == "diffusers" else 1)
            assert torch.allclose(ot_delta(cfg, t, w), want, rtol=1e-6, atol=1e-6), (to, n)
    # --uniform-alpha on diffusers: alpha / r folded into lora_B, exact in OneTrainer too
    folded = tmp_path / "folded.safetensors"
    loradex.save(a, folded, "diffusers", arch=a.arch, uniform_alpha=True)
    loaded, _ = ot_load(ot_to_canonical(load_file(folded), arch), arch, cfg)
    assert set(loaded) == set(a.patches)
    for n, t in loaded.items():
        w = torch.zeros(arch.modules[n].shape)
        want = a.patches[n].delta(w).double().reshape(w.shape)
        assert torch.allclose(ot_delta(cfg, t, w), want, rtol=1e-6, atol=1e-6), n
    back = loradex.load(folded)  # and loradex (like diffusers, through the metadata) reads the same update
    for n, p in a.patches.items():
        w = torch.zeros(arch.modules[n].shape)
        assert torch.allclose(back.patches[n].delta(w), p.delta(w), rtol=1e-6, atol=1e-7), n


# -- OneTrainer before #1563 (key sets of modules/util/convert/lora, = omi_model_standards f14b1da) --------
OT_OLD_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
OT_OLD_CLIP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj")


def ot_old_key_sets(sdxl: bool) -> list[tuple[str, str]]:
    """``convert_sd_lora_key_sets`` / ``convert_sdxl_lora_key_sets``: (OMI name, OneTrainer name)
    per module: ``unet.<SGM path>`` / ``lora_unet.<diffusers path>``, CLIP ``clip_l.``/``clip_g.`` /
    ``lora_te.`` (SDXL ``lora_te1.``/``lora_te2.``); the third naming, "legacy", is the OneTrainer
    name with every '.' an '_'. Transformer blocks: SD1 0 only, SDXL 0-99; CLIP layers 0-99."""
    pairs = [("bundle_emb", "bundle_emb")]
    for d, s, resnet in ot_unet_rules(sdxl):
        if resnet:
            leaves = [(v, k) for k, v in OT_RESNET.items() if not k.startswith("norm")]
        elif ".attentions." in d:
            blocks = range(100) if sdxl else range(1)
            leaves = [(x, x) for x in ("proj_in", "proj_out")]
            leaves += [(f"transformer_blocks.{t}.{x}", f"transformer_blocks.{t}.{x}") for t in blocks for x in OT_OLD_ATTN]
        else:
            pairs.append((f"unet.{s}", f"lora_unet.{d}"))
            continue
        pairs += [(f"unet.{s}.{sl}", f"lora_unet.{d}.{dl}") for sl, dl in leaves]
    clips = [("clip_l", "lora_te1"), ("clip_g", "lora_te2")] if sdxl else [("clip_l", "lora_te")]
    for omi, ot in clips:
        pairs.append((f"{omi}.text_projection", f"{ot}.text_projection"))
        pairs += [(f"{omi}.text_model.encoder.layers.{i}.{x}", f"{ot}.text_model.encoder.layers.{i}.{x}")
                  for i in range(100) for x in OT_OLD_CLIP]
    return pairs


def ot_old_to_diffusers(sd: dict[str, torch.Tensor], sdxl: bool) -> dict[str, torch.Tensor]:
    """``convert_to_diffusers``: the naming is the one most keys start with (strictly; none: every
    key goes through the first key set, ``bundle_emb``); each key takes the first key set whose
    prefix it starts with, keys of none are dropped."""
    pairs = ot_old_key_sets(sdxl)
    namings = {"omi": [p[0] for p in pairs], "diffusers": [p[1] for p in pairs],
               "legacy": [p[1].replace(".", "_") for p in pairs]}
    index = {n: {pre: i for i, pre in reversed(list(enumerate(names)))} for n, names in namings.items()}
    counts = {n: sum(k[:j] in idx for k in sd for j in range(1, len(k) + 1)) for n, idx in index.items()}
    source = next((n for n, c in counts.items() if all(c > o for m, o in counts.items() if m != n)), "")
    if not source:
        return {pairs[0][1] + k: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        hits = [index[source][k[:j]] for j in range(1, len(k) + 1) if k[:j] in index[source]]
        if hits:
            i = min(hits)
            out[pairs[i][1] + k[len(namings[source][i]):]] = v
    return out


@pytest.mark.parametrize("arch_name", ["sd1", "sdxl"])
def test_onetrainer_before_1563_read_sd1_kohya_files_only(tmp_path, arch_name):
    """OneTrainer before #1563 (1e0263b3, 2026-07-02; these key sets since 2025-03): ``--to kohya``
    SD1 files map whole (``lora_unet.<diffusers path>``, ``lora_te.<CLIP path>``: its wrappers'
    names); SDXL ones lose every UNet key (its flattened names are diffusers', sd-scripts' are SGM),
    so the strict UNet wrapper refuses them; diffusers and lycoris names match no key set at all."""
    sdxl = arch_name == "sdxl"
    a = targets_lora(arch_name)
    tes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"} if sdxl else {"text_encoder": "lora_te"}
    want = {(("lora_unet" if c == "unet" else tes[c]) + "." + p) for c, _, p in (n.partition(".") for n in a.patches)}
    (kohya,) = write(a, "kohya", tmp_path / "k.safetensors").values()
    got = {ot_split(k)[0] for k in ot_old_to_diffusers(kohya, sdxl)}
    if sdxl:
        assert got == {m for m in want if not m.startswith("lora_unet.")}
    else:
        assert got == want
    unet = Adapter({n: p for n, p in a.patches.items() if n.startswith("unet.")}, arch=arch_name)
    for to in ("diffusers", "lycoris"):
        (sd,) = write(unet, to, tmp_path / f"{to}.safetensors").values()
        assert all(k.startswith("bundle_emb") for k in ot_old_to_diffusers(sd, sdxl)), to
