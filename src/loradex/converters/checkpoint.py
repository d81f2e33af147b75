"""Full models (DreamBooth / fine-tuned checkpoints): recognised from their header or folder layout.

Only detection lives here for now (the registry stores checkpoints as artifacts; reading their
weights lazily belongs to extract/bake): nothing is loaded, a safetensors header or a diffusers
``model_index.json`` is all that is read, and a pickled ``.ckpt`` is recognised by its container
magic without being unpickled.

* single-file safetensors: LDM/SGM names (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``, ``conditioner.embedders.*``) or BFL FLUX names (``double_blocks.N.*``
  weights without adapter suffixes);
* single-file pickle (``.ckpt``/``.pt``/``.bin`` with the torch zip or pickle magic): format
  ``ckpt``, never opened;
* diffusers folder: a ``model_index.json`` naming the pipeline class.
"""

from __future__ import annotations

from pathlib import Path

from loradex.converters import safetensors_io as sio
from loradex.errors import FormatError

_PIPELINE_ARCH = {
    "StableDiffusionPipeline": "sd1",  # SD2 uses the same class: told apart by its text encoder below
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux1",
}
_ADAPTER_SUFFIXES = (".alpha", ".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".hada_w1_a",
                     ".hada_w1_b", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a", ".oft_blocks", ".diff", ".diff_b",
                     ".on_input", ".w_norm")
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: below this a pickle is an embedding or an adapter, not a full model
MIN_CKPT_BYTES = 50 * 1024 * 1024


def _arch_from_keys(keys: list[str], metadata: dict[str, str]) -> str | None:
    spec = metadata.get("modelspec.architecture", "")
    for prefix, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"),
                         ("stable-diffusion-v1", "sd1"), ("flux-1", "flux1")):
        if spec.startswith(prefix):
            return arch
    text = " ".join(keys[:50000])
    if "conditioner.embedders.1" in text:
        return "sdxl"
    if "cond_stage_model.model." in text:
        return "sd2"
    if "cond_stage_model.transformer." in text or "model.diffusion_model." in text:
        return "sd1"
    if "double_blocks." in text:
        return "flux1"
    return None


def describe_checkpoint(path: str | Path) -> dict | None:
    """``{"format", "arch", "metadata", "layout"}`` when ``path`` is a full model, else None.

    ``layout`` is ``"file"`` or ``"folder"``; ``format`` is ``checkpoint`` (single-file
    safetensors), ``ckpt`` (a pickle, never opened) or ``diffusers-pipeline``."""
    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            return None
        try:
            info = sio.read_json(index)
        except FormatError:
            return None
        cls = str(info.get("_class_name", ""))
        arch = _PIPELINE_ARCH.get(cls)
        if arch == "sd1" and (p / "text_encoder" / "config.json").is_file():
            try:
                te = sio.read_json(p / "text_encoder" / "config.json")
                if te.get("hidden_size") == 1024:
                    arch = "sd2"
            except FormatError:
                pass
        meta = {"diffusers.pipeline": cls, "diffusers.version": str(info.get("_diffusers_version", ""))}
        return {"format": "diffusers-pipeline", "arch": arch, "metadata": meta, "layout": "folder"}
    if not p.is_file():
        return None
    if sio.looks_like_pickle(p):
        if p.suffix.lower() in CKPT_SUFFIXES and p.stat().st_size >= MIN_CKPT_BYTES:
            return {"format": "ckpt", "arch": None, "metadata": {}, "layout": "file"}
        return None
    try:
        h = sio.read_header(p)
    except FormatError:
        return None
    keys = list(h.tensors)
    if not keys or any(k.endswith(_ADAPTER_SUFFIXES) for k in keys):
        return None
    ldm = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
    if any(k.startswith(ldm) for k in keys) or any(k.startswith("double_blocks.") for k in keys):
        return {"format": "checkpoint", "arch": _arch_from_keys(keys, h.metadata), "metadata": dict(h.metadata),
                "layout": "file"}
    return None
