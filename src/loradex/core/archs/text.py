"""Text encoders every family shares: CLIP (transformers names), OpenCLIP (Stability's single-file
layout) and T5, as single-file checkpoints store them, and their configs rebuilt from the shapes.

OpenCLIP <-> transformers CLIP (facts from diffusers ``loaders/single_file_utils.py``
``convert_open_clip_checkpoint`` and ComfyUI ``comfy/sd2_clip``; code not copied):
``transformer.resblocks.N`` = ``text_model.encoder.layers.N`` with ``attn.in_proj_weight/bias`` rows
[q | k | v], ``attn.out_proj`` = ``self_attn.out_proj``, ``ln_1/ln_2`` = ``layer_norm1/2``,
``mlp.c_fc/c_proj`` = ``mlp.fc1/fc2``; ``token_embedding``, ``positional_embedding`` (a bare
parameter), ``ln_final`` = ``final_layer_norm``, and ``text_projection`` stored transposed
(``x @ P`` vs ``Linear``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from loradex.core.archs.family import count_indices
from loradex.errors import ArchError

OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
OPENCLIP_SUB = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}
#: OpenCLIP top-level tensors -> (transformers module path, parameter)
OPENCLIP_TOP = {"token_embedding.weight": ("text_model.embeddings.token_embedding", "weight"),
                "positional_embedding": ("text_model.embeddings.position_embedding", "weight"),
                "ln_final.weight": ("text_model.final_layer_norm", "weight"),
                "ln_final.bias": ("text_model.final_layer_norm", "bias"),
                "text_projection": ("text_projection", "weight")}


def _heads(width: int, head_dim: int = 64) -> int:
    """Attention heads for a width (64-wide heads as in CLIP-L/H/G; a divisor for toy widths).
    Heads do not change any weight shape: only the constructor needs a count that divides."""
    if width % head_dim == 0:
        return width // head_dim
    for h in (4, 2, 1):
        if width % h == 0:
            return h
    return 1


def _get(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ArchError(f"a text encoder checkpoint without {key}")
    return tuple(shapes[key])


def clip_config(hidden: int, layers: int, intermediate: int, vocab: int, positions: int,
                projection: int | None) -> dict:
    """A transformers CLIP text config (``CLIPTextModelWithProjection`` when ``projection``)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": _heads(hidden),
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "projection_dim": projection or hidden,
    }


def text_config_from_checkpoint(shapes: Mapping[str, tuple[int, ...]], layout: str,
                                drop_last: bool = False, projection: bool | None = None) -> dict:
    """The config of a text encoder stored in a single file (keys without the file's prefix).

    ``layout``: ``clip`` (transformers names, ``text_model.`` optional), ``openclip`` or ``t5``.
    ``drop_last``: diffusers' SD2 text encoder is OpenCLIP-H without its last layer.
    ``projection``: force (True/False) a ``CLIPTextModelWithProjection``; default: when the file
    has a text projection."""
    if layout == "t5":
        return t5_config(shapes)
    if layout == "openclip":
        vocab, hidden = _get(shapes, "token_embedding.weight")
        layers = count_indices(shapes, "transformer.resblocks.")
        inter = _get(shapes, "transformer.resblocks.0.mlp.c_fc.weight")[0]
        positions = _get(shapes, "positional_embedding")[0]
        proj = shapes.get("text_projection")
        proj_dim = proj[1] if proj is not None and len(proj) == 2 else None
    elif layout == "clip":
        pre = "text_model." if any(k.startswith("text_model.") for k in shapes) else ""
        vocab, hidden = _get(shapes, f"{pre}embeddings.token_embedding.weight")
        layers = count_indices(shapes, f"{pre}encoder.layers.")
        inter = _get(shapes, f"{pre}encoder.layers.0.mlp.fc1.weight")[0]
        positions = _get(shapes, f"{pre}embeddings.position_embedding.weight")[0]
        proj = shapes.get("text_projection.weight")
        proj_dim = proj[0] if proj is not None else None
    else:
        raise ArchError(f"unknown text encoder layout {layout!r}")
    if drop_last:
        layers -= 1
    if projection is False:
        proj_dim = None
    elif projection and proj_dim is None:
        proj_dim = hidden
    return clip_config(hidden, layers, inter, vocab, positions, proj_dim)


def t5_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """A ``T5EncoderModel`` config from transformers-named shapes (v1.1: gated-GELU when ``wi_0``)."""
    vocab, d_model = _get(shapes, "shared.weight") if "shared.weight" in shapes else _get(
        shapes, "encoder.embed_tokens.weight")
    inner = _get(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = _get(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = _get(shapes, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": count_indices(shapes, "encoder.block."),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "vocab_size": vocab,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "tie_word_embeddings": False,
    }


def openclip_parts(rest: str, shape: tuple[int, ...]) -> tuple[list[tuple[str, tuple[int, int] | None]], str, bool] | None:
    """Where an OpenCLIP tensor goes: ``(parts, param, transposed)`` with module paths relative to
    the component (``text_model.encoder.layers.N.self_attn.q_proj`` ...), or None for tensors no
    adapter patches. The fused ``in_proj`` rows split into q, k, v."""
    if rest in OPENCLIP_TOP:
        mod, param = OPENCLIP_TOP[rest]
        return [(mod, None)], param, rest == "text_projection"
    m = OPENCLIP_LAYER.match(rest)
    if not m:
        return None
    layer = f"text_model.encoder.layers.{m.group(1)}"
    sub = m.group(2)
    if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
        n = shape[0] // 3
        parts = [(f"{layer}.self_attn.{x}_proj", (i * n, (i + 1) * n)) for i, x in enumerate("qkv")]
        return parts, "weight" if sub.endswith("weight") else "bias", False
    mod, _, param = sub.rpartition(".")
    if mod in OPENCLIP_SUB and param in ("weight", "bias"):
        return [(f"{layer}.{OPENCLIP_SUB[mod]}", None)], param, False
    return None
