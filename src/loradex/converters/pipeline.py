"""Loading a whole diffusers pipeline (for inference and training): from a diffusers folder, a
single-file ``.safetensors`` checkpoint (the pipeline class its family names), or an embedded
tiny model (``tiny``, ``tiny-<family>``). Local files only: nothing is downloaded."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from loradex.errors import FormatError, LoradexError, UnsafeFileError


def load_pipeline(base, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A diffusers pipeline from ``base``: a pipeline object (returned as is), an embedded tiny
    arch name, a diffusers folder or a single-file ``.safetensors`` checkpoint; moved to
    ``device``/``dtype`` when given. FormatError when it cannot be loaded."""
    from loradex.log import quiet

    if base is None:
        base = "tiny"
    if isinstance(base, str) and not os.path.exists(base):
        from loradex.core.archs import ALIASES, tiny_names

        name = ALIASES.get(base, base)
        if name in tiny_names():
            from loradex.tiny import tiny_pipeline

            pipe = tiny_pipeline(name)
            return pipe.to(torch.device(device)) if device is not None else pipe
    if not isinstance(base, (str, os.PathLike)):
        pipe = base
    else:
        p = Path(base)
        from diffusers import DiffusionPipeline

        try:
            if p.is_dir():
                if not (p / "model_index.json").is_file():
                    raise FormatError(f"{p}: not a diffusers pipeline folder (no model_index.json)")
                with quiet():
                    pipe = DiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
            elif p.is_file():
                pipe = _from_single_file(p, dtype)
            else:
                raise FormatError(f"{p}: no such base model (a diffusers folder or a .safetensors checkpoint)")
        except LoradexError:
            raise
        except Exception as e:  # diffusers raises many types for unusable folders/files
            raise FormatError(f"{p}: cannot load the base pipeline ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None
    with contextlib.suppress(Exception):
        pipe.set_progress_bar_config(disable=True)
    if device is None and dtype is None:
        return pipe
    with quiet():  # diffusers warns about casting modules it would keep in fp32
        dev = torch.device(device) if device is not None else None
        return pipe.to(dev, dtype) if dtype is not None else pipe.to(dev)


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    """The components of a pipeline that adapters patch (denoiser and text encoders), by name."""
    from loradex.core.adapter import COMPONENTS

    return {c: m for c in COMPONENTS if isinstance(m := getattr(pipe, c, None), torch.nn.Module)}


def _from_single_file(p: Path, dtype):
    import diffusers

    from loradex.converters.checkpoint import describe_checkpoint
    from loradex.core.archs import get_arch
    from loradex.log import quiet

    if p.suffix.lower() != ".safetensors":
        raise UnsafeFileError(f"{p}: a single-file base must be .safetensors (pickles are not loaded)")
    desc = describe_checkpoint(p)
    if not desc or desc.get("format") != "checkpoint":
        raise FormatError(f"{p}: not a single-file diffusion checkpoint")
    if desc.get("arch") is None:
        raise FormatError(f"{p}: {desc.get('arch_error') or 'no model family loradex knows fits it'}")
    from loradex.core.archs import builtin_names

    arch = get_arch(desc["arch"])
    if arch.name not in builtin_names():
        # from_single_file builds the published configs of the family (and their tokenizers and VAE)
        raise FormatError(f"{p}: a {arch.family.label} checkpoint of a size diffusers does not publish ({arch.name}); "
                          "diffusers loads single files only at the published sizes: use the base's diffusers folder "
                          "(inspect, convert, bake, extract, merge and add take the single file)")
    cls = getattr(diffusers, arch.family.pipelines[0])  # the family's text-to-image pipeline
    with quiet():
        return cls.from_single_file(str(p), torch_dtype=dtype, local_files_only=True)
