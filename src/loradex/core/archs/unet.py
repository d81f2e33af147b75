"""What every UNet family (SD1, SD2, SDXL) shares: the SGM ("ldm") naming of a
``UNet2DConditionModel``, its block-weight layouts, and rebuilding its config from a single-file
checkpoint.

SGM <-> diffusers UNet layout (facts from diffusers ``loaders/single_file_utils.py`` /
``scripts/convert_original_stable_diffusion_to_diffusers.py`` and ComfyUI ``comfy/utils.py``
``unet_to_diffusers``; code not copied): ``input_blocks.{1 + i*(L+1) + j}.0`` =
``down_blocks.i.resnets.j``, ``.1`` = its attention, ``input_blocks.{(i+1)*(L+1)}.0.op`` =
downsampler; ``output_blocks.{i*(L+1) + j}``; the upsampler sits in the last output block of a
level at index 1 (no attention) or 2; resnet internals ``in_layers.0/2``, ``emb_layers.1``,
``out_layers.0/3``, ``skip_connection``; ``time_embed.0/2``, ``label_emb.0.0/2``, ``out.0/2``.
Computed from the module list, so it holds for any UNet2DConditionModel config (distilled models
with fewer blocks, the tiny test models), not only SD1/SDXL.

Block weights (LBW, the sd-webui-lora-block-weight extension's ``BLOCKID*`` tables): the full
layout is ``BASE`` (every text-encoder module), one id per SGM input block ``IN00..``, ``M00``, one
per output block ``OUT00..``; the short layout lists only the blocks holding attention (where a
plain LoRA lives). For SD1/SD2 that gives the extension's 26 and 17 entries, for SDXL 20 and 12;
a UNet with other block counts gets its own layouts by the same rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from loradex.core.archs.family import Family, count_indices
from loradex.errors import ArchError

_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _sub_sgm(kind: str, rest: str | None) -> str | None:
    """Map the inside of a diffusers sub-block to SGM (None when it has no SGM name)."""
    if rest is None:
        return None
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        mapped = _RESNET_SGM.get(head)
        if mapped is None:
            return None
        return mapped + ("." + tail if tail else "")
    if kind == "downsamplers":
        return "op" if rest == "conv" else None
    if kind == "upsamplers":
        return "conv" if rest == "conv" else None
    return rest  # attentions: Transformer2DModel internals keep their names


def sgm_paths(paths: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module path -> SGM path, for the given module paths (no component prefix).

    The block indices are computed from the paths themselves (resnets per level, which levels
    down/upsample or have attention), so any UNet2DConditionModel layout works.
    """
    paths = list(paths)
    n_res: dict[tuple[str, int], set[int]] = {}
    has_down: set[int] = set()
    up_attn: set[int] = set()
    mid_attn = False
    for p in paths:
        m = _BLOCK_RE.match(p)
        if m:
            side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            if kind == "resnets":
                n_res.setdefault((side, i), set()).add(j)
            elif kind == "downsamplers":
                has_down.add(i)
            elif kind == "attentions" and side == "up_blocks":
                up_attn.add(i)
        elif p.startswith("mid_block.attentions."):
            mid_attn = True
    downs = sorted(i for s, i in n_res if s == "down_blocks")
    ups = sorted(i for s, i in n_res if s == "up_blocks")
    in_start: dict[int, int] = {}
    k = 1
    for i in downs:
        in_start[i] = k
        k += len(n_res[("down_blocks", i)]) + (1 if i in has_down else 0)
    out_start: dict[int, int] = {}
    k = 0
    for i in ups:
        out_start[i] = k
        k += len(n_res[("up_blocks", i)])

    out: dict[str, str] = {}
    for p in paths:
        if p in _TOP_SGM:
            out[p] = _TOP_SGM[p]
            continue
        m = _BLOCK_RE.match(p)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            sub = _sub_sgm(kind, rest)
            if sub is None or (side, i) not in n_res:
                continue
            nres = len(n_res[(side, i)])
            if side == "down_blocks":
                if kind == "downsamplers":
                    out[p] = f"input_blocks.{in_start[i] + nres}.0.{sub}"
                else:
                    out[p] = f"input_blocks.{in_start[i] + j}.{0 if kind == 'resnets' else 1}.{sub}"
            else:
                if kind == "upsamplers":
                    slot = 2 if i in up_attn else 1
                    out[p] = f"output_blocks.{out_start[i] + nres - 1}.{slot}.{sub}"
                else:
                    out[p] = f"output_blocks.{out_start[i] + j}.{0 if kind == 'resnets' else 1}.{sub}"
            continue
        m = _MID_RE.match(p)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            sub = _sub_sgm(kind, rest)
            if sub is None:
                continue
            idx = (2 * j if kind == "resnets" else 2 * j + 1) if mid_attn else j
            out[p] = f"middle_block.{idx}.{sub}"
    return out




_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.|^middle_block\.")


class UNetFamily(Family):
    """The shared half of the SD1, SD2 and SDXL specs: SGM native names, LBW, single-file configs."""

    denoiser = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    key_hints = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")
    #: the single-file prefix of the UNet
    unet_prefix = "model.diffusion_model."

    def native_names(self, component, table):
        if component != "unet":
            return {}, {}
        pre = component + "."
        paths = {n: n[len(pre):] for n in table}
        sgm = sgm_paths(paths.values())
        native = {n: sgm[p] for n, p in paths.items() if p in sgm}
        return native, {v: [(n, None)] for n, v in native.items()}

    # ---- LBW ------------------------------------------------------------------------------
    def _blocks(self, arch) -> tuple[list[int], bool, list[int], set[str]]:
        ins, outs, mid = set(), set(), False
        attn: set[str] = set()
        for n in arch.component_modules("unet"):
            try:
                nat = arch.sgm_name(n)
            except ArchError:
                continue
            b = _block_id(nat)
            if b is None:
                continue
            if b.startswith("IN"):
                ins.add(int(b[2:]))
            elif b.startswith("OUT"):
                outs.add(int(b[3:]))
            else:
                mid = True
            if ".attentions." in n:
                attn.add(b)
        return sorted(ins), mid, sorted(outs), attn

    #: the extension's layouts of the family's published UNet (entries -> block ids, full last)
    lbw_fixed: dict[int, tuple[str, ...]] = {}

    def lbw_layouts(self, arch):
        """The extension's layouts when the arch's blocks fit them (any size of the published
        topology, distilled models with blocks removed); else layouts derived by the same rule."""
        ins, mid, outs, attn = self._blocks(arch)
        full = ("BASE", *(f"IN{i:02d}" for i in ins), *(("M00",) if mid else ()), *(f"OUT{i:02d}" for i in outs))
        if self.lbw_fixed and set(full) <= set(self.lbw_fixed[max(self.lbw_fixed)]):
            return dict(sorted(self.lbw_fixed.items()))
        short = tuple(b for b in full if b == "BASE" or b in attn)
        return {len(short): short, len(full): full} if len(short) != len(full) else {len(full): full}

    def lbw_block(self, arch, canonical):
        if canonical.split(".", 1)[0] != "unet":
            return "BASE"
        try:
            return _block_id(arch.sgm_name(canonical))
        except ArchError:
            return None

    # ---- single files -----------------------------------------------------------------------
    def infer_configs(self, shapes):
        pre = self.unet_prefix
        unet = {k[len(pre):]: s for k, s in shapes.items() if k.startswith(pre)}
        out: dict[str, dict] = {}
        if unet:
            out["unet"] = unet_config_from_sgm(unet)
        out.update(self.infer_text_configs(shapes))
        return out

    def infer_text_configs(self, shapes) -> dict[str, dict]:
        """The text encoders' configs from a single file (the family's checkpoint prefixes)."""
        from loradex.core.archs.text import text_config_from_checkpoint

        out = {}
        for spec in self.components:
            for prefix, layout in spec.checkpoint:
                if layout == "native":
                    continue
                sub = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
                if sub:
                    out[spec.name] = text_config_from_checkpoint(sub, layout, self.openclip_drop_last)
                    break
        return out

    #: diffusers ships SD2's OpenCLIP-H without its last layer (the penultimate layer conditions it)
    openclip_drop_last = False

    # ---- training ---------------------------------------------------------------------------
    def encode_prompts(self, pipe, prompts, device):
        """StableDiffusionPipeline.encode_prompt: the last hidden state of the CLIP text encoder."""
        tok = pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return {"hidden": pipe.text_encoder(ids)[0]}

    def predict(self, pipe, noisy, timesteps, cond):
        return pipe.unet(noisy, timesteps, cond["hidden"]).sample


def _block_id(native: str) -> str | None:
    m = _SGM_BLOCK.match(native)
    if m is None:
        return None
    if m.group(1) is None:
        return "M00"
    return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"


def _divisor(values: Iterable[int], most: int) -> int:
    """The largest d <= most dividing every value (1 at worst)."""
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    for d in range(min(most, g or 1), 0, -1):
        if g % d == 0:
            return d
    return 1


def unet_config_from_sgm(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """A ``UNet2DConditionModel`` config whose module table matches an SGM state dict's shapes
    (keys without ``model.diffusion_model.``). Block counts, widths, attention placement,
    transformer depth, cross-attention width, linear/conv projections, the time and SDXL
    ``label_emb`` embeddings are read from the shapes; what weights do not show (head counts,
    norm groups) is chosen so that every width divides."""

    def shape(k: str) -> tuple[int, ...]:
        if k not in shapes:
            raise ArchError(f"an SGM UNet without {k}")
        return tuple(shapes[k])

    conv_in = shape("input_blocks.0.0.weight")
    c0, in_ch = conv_in[0], conv_in[1]
    n_in = count_indices(shapes, "input_blocks.")
    levels: list[dict] = [{"res": 0, "attn": None, "ch": c0}]
    for k in range(1, n_in):
        if f"input_blocks.{k}.0.op.weight" in shapes:
            levels[-1]["down"] = True
            levels.append({"res": 0, "attn": None, "ch": levels[-1]["ch"]})
            continue
        lv = levels[-1]
        lv["res"] += 1
        lv["ch"] = shape(f"input_blocks.{k}.0.out_layers.3.weight")[0]
        if lv["attn"] is None and f"input_blocks.{k}.1.proj_in.weight" in shapes:
            lv["attn"] = f"input_blocks.{k}.1"
    levels = [lv for lv in levels if lv["res"]]
    if not levels:
        raise ArchError("an SGM UNet without resnet blocks")
    xdims, linear = set(), None
    depth: list[int] = []
    for lv in levels:
        a = lv["attn"]
        if a is None:
            depth.append(1)
            continue
        depth.append(count_indices(shapes, f"{a}.transformer_blocks."))
        xdims.add(shape(f"{a}.transformer_blocks.0.attn2.to_k.weight")[1])
        linear = len(shape(f"{a}.proj_in.weight")) == 2
    chans = [lv["ch"] for lv in levels]
    has_mid = any(k.startswith("middle_block.") for k in shapes)
    mid_attn = "middle_block.1.proj_in.weight" in shapes
    if mid_attn:
        xdims.add(shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1])
        linear = len(shape("middle_block.1.proj_in.weight")) == 2
    if len(xdims) > 1:
        raise ArchError(f"an SGM UNet with several cross-attention widths {sorted(xdims)}")
    n_out = count_indices(shapes, "output_blocks.")
    up_res, k = [], 0
    for _ in levels:  # output blocks: each level's resnets, deepest level first
        n = 0
        while k < n_out and f"output_blocks.{k}.0.in_layers.2.weight" in shapes:
            n += 1
            k += 1
            if f"output_blocks.{k - 1}.1.conv.weight" in shapes or f"output_blocks.{k - 1}.2.conv.weight" in shapes:
                break
        up_res.append(n)
    lpb = [lv["res"] for lv in levels]
    if up_res != [n + 1 for n in reversed(lpb)]:
        raise ArchError(f"an SGM UNet whose up levels ({up_res}) do not mirror its down levels ({lpb})")
    temb = shape("time_embed.0.weight")[0]
    heads = _divisor(chans, 8)
    cfg: dict = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": in_ch,
        "out_channels": shape("out.2.weight")[0],
        "block_out_channels": chans,
        "layers_per_block": lpb[0] if len(set(lpb)) == 1 else lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attn"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["attn"] else "UpBlock2D" for lv in reversed(levels)],
        "mid_block_type": ("UNetMidBlock2DCrossAttn" if mid_attn else "UNetMidBlock2D") if has_mid else None,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "cross_attention_dim": xdims.pop() if xdims else 768,
        "use_linear_projection": bool(linear),
        "attention_head_dim": heads,
        "norm_num_groups": _divisor(chans, 32),
    }
    if temb != 4 * c0:
        cfg["time_embedding_dim"] = temb
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text + 6 time ids
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = shape("label_emb.0.0.weight")[1]
        cfg["addition_time_embed_dim"] = 256
    return cfg
