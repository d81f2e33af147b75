"""Spellings written by ComfyUI, OneTrainer and friends (read only; ComfyUI loads kohya keys, so
``--to comfy`` writes the kohya format).

* ``diffusion_model.<ldm path>.<suffix>``: ComfyUI's own naming (SGM/ldm paths for SD/SDXL,
  BFL paths for FLUX), with kohya (``lora_up``) or PEFT (``lora_A``) suffixes and every LyCORIS kind.
* ``text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.<transformers path>.<suffix>``.
* ``lora_transformer_<flattened diffusers path>`` (OneTrainer's FLUX/SD3 files).

Keys outside these spellings, with a tensor suffix no kind knows, or of modules the arch lacks are
named in ``Adapter.unexplained`` (see ``kohya.read_patches``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import pickle_io
from loradex.converters.common import (
    PEFT_TO_LYCORIS,
    Converter,
    adapter_suffixes,
    register_format,
    resolve_arch,
    split_key,
)
from loradex.converters.kohya import nothing_read, read_patches
from loradex.core.adapter import Adapter
from loradex.errors import ArchError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

PREFIXES = ("diffusion_model.", "text_encoders.", "lora_transformer_")
_CLIP = {
    "clip_l": "text_encoder",
    "clip_h": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5xxl": "text_encoder_2",
}


@register_format
class Comfy(Converter):
    """Reader of the ComfyUI / OneTrainer key spellings (see the module docstring). Not a
    writer: ``--to comfy`` is an alias of the kohya writer, whose keys ComfyUI loads."""

    name = "comfy"
    priority = 40
    writes = False  # "--to comfy" is the kohya writer's alias: ComfyUI loads kohya keys
    description = "ComfyUI / OneTrainer spellings (diffusion_model., text_encoders., lora_transformer_); read only"

    def detect(self, path: Path) -> bool:
        """True for a file (safetensors, or a ``weights_only`` pickle) where any key starts with
        ``diffusion_model.``, ``text_encoders.`` or ``lora_transformer_``. Priority 40: after kohya
        (20) and lycoris (30), before diffusers (80), whose ``lora_A``/``lora_B`` test would
        otherwise take ``diffusion_model.*.lora_A.weight`` keys."""
        if not path.is_file():
            return False
        return any(k.startswith(PREFIXES) for k in pickle_io.read_tensor_header(path).tensors)

    def read(self, path: Path, arch=None) -> Adapter:
        """Map each spelling to canonical modules: ``diffusion_model.<path>`` through the arch's
        kohya name map (the ldm/BFL path flattened), else its SGM names (with or without
        ``model.diffusion_model.``); ``text_encoders.<enc>.transformer.<path>`` by encoder name
        (``clip_l``/``clip_h`` -> ``text_encoder``, ``clip_g`` -> ``text_encoder_2``, the family's own
        mapping first: SD3's ``t5xxl`` is ``text_encoder_3``); ``lora_transformer_<flat>`` against
        the arch's flattened ``transformer.*`` names. PEFT suffixes become kohya/LyCORIS ones.
        The arch is required (given, or detected from metadata, keys and shapes)."""
        h = pickle_io.read_tensor_header(path)
        a = resolve_arch(arch, h.shapes(), required=True, path=path, metadata=dict(h.metadata))
        sgm: dict[str, str] | None = None
        flat_tr: dict[str, str] | None = None
        groups: dict[str, dict[str, str]] = {}
        unexplained: dict[str, str] = pickle_io.pickled_extras(path)  # a pickle's non-tensor entries
        suffixes = adapter_suffixes()
        for k in h.tensors:
            if not k.startswith(PREFIXES):
                unexplained[k] = f"not a ComfyUI/OneTrainer key ({', '.join(p + '...' for p in PREFIXES)})"
                continue
            sp = split_key(k, suffixes)
            if sp is None:
                # dotted module paths: without a known tensor suffix the module cannot be told
                unexplained[k] = "no patch kind has a tensor named like this (unknown suffix)"
                continue
            mod, suf = sp
            suf = PEFT_TO_LYCORIS.get(suf, suf)
            if suf == "lora_B.bias":  # PEFT's lora_B bias is loradex's lora_up.bias (same scale)
                suf = "lora_up.bias"
            groups.setdefault(mod, {})[suf] = k
        if not groups:
            raise FormatError(f"{path}: no ComfyUI/OneTrainer LoRA keys found")

        def unflatten(mod: str):
            nonlocal sgm, flat_tr
            if mod.startswith("diffusion_model."):
                path_ = mod[len("diffusion_model.") :]
                try:  # SDXL and FLUX: kohya names are the ldm/BFL paths flattened
                    return a.from_kohya(a.kohya_prefixes[a.components[0]] + "_" + path_.replace(".", "_"))
                except ArchError:
                    if sgm is None:
                        sgm = {}
                        for n in a.modules:
                            try:
                                sgm[a.sgm_name(n)] = n
                            except ArchError:
                                pass
                    for cand in (path_, "model.diffusion_model." + path_):
                        if cand in sgm:
                            return [(sgm[cand], None)]
                    raise
            if mod.startswith("text_encoders."):
                _, enc, rest = mod.split(".", 2)
                rest = rest[len("transformer.") :] if rest.startswith("transformer.") else rest
                comp = a.family.comfy_component(enc) or _CLIP.get(enc)  # SD3: t5xxl is text_encoder_3
                if comp is None:
                    raise ArchError(mod)
                return [(a.canonical(f"{comp}.{rest}"), None)]
            if mod.startswith("lora_transformer_"):
                if flat_tr is None:
                    flat_tr = {n.partition(".")[2].replace(".", "_"): n for n in a.modules if n.startswith("transformer.")}
                f = mod[len("lora_transformer_") :]
                if f in flat_tr:
                    return [(flat_tr[f], None)]
            raise ArchError(mod)

        tensors: dict[str, torch.Tensor] = pickle_io.load_tensors(path, header=h)
        patches, notes, more = read_patches(groups, tensors, a, unflatten, path)
        unexplained.update(more)
        if not patches:
            raise nothing_read(path, unexplained)
        return Adapter(patches, {}, dict(h.metadata), a.name, self.name, notes, unexplained)
