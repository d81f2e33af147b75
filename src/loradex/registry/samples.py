"""The sample images of a Hub push (``push --samples N``): the base a version was recorded with,
found here with its weights, and images the inference engine renders on it with the version.

Split from ``registry.hub``, which imports it; it uses the registry only through the ``Registry``
object it is given (``get``, ``checkout``), and the inference engine inside :func:`render_samples`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from loradex.errors import RegistryError
from loradex.hubcache import REPO_ID as _REPO_ID
from loradex.hubcache import hub_snapshot

#: sample images of a push go here, inside the upload folder
SAMPLES_DIR = "samples"


def recorded_base(v) -> tuple[str | None, str]:
    """The base the registry recorded for version ``v`` and what it is: ``(None, "none")`` when
    none; ``(value, "arch")`` when it is only the file's architecture id (ModelSpec
    ``architecture`` such as ``stable-diffusion-v1/lora``, or kohya's ``ss_base_model_version``,
    which the registry records when the file names nothing better: not a model, and not a Hub
    repo though it may look like one); else ``(value, "model")``: an identity (Hub id, registry
    REF, path, embedded model name) or kohya's ``ss_sd_model_name``."""
    b = (v.base_model or "").strip()
    if not b:
        return None, "none"
    meta = v.metadata
    if b in (str(meta.get("modelspec.architecture") or "").strip(), str(meta.get("ss_base_model_version") or "").strip()):
        return b, "arch"
    return b, "model"


@contextlib.contextmanager
def sample_source(reg, v) -> Iterator[tuple[object, list[tuple[str, float]]]]:
    """What ``push --samples`` renders with: ``(pipeline source for the engine, adapters)``. An
    adapter or embedding is rendered on the base the registry recorded for it, which must be here
    with weights: a folder or file, an embedded tiny model, a stored base (registry REF, checked
    out meanwhile) or a Hub repo in the local cache; a checkpoint is its own base. RegistryError
    (one line) when that base is unknown or not here. (The forms of ``loradex.bases``, which
    cannot be imported here: it imports the registry, which imports this module through hub.)"""
    from loradex.core.archs import ALIASES, tiny_names

    if v.artifact == "checkpoint":
        with reg.checkout(v) as path:
            yield path, []
        return
    b, what = recorded_base(v)
    if what != "model":
        only = f" (the file names only its architecture, {b})" if what == "arch" else ""
        raise RegistryError(f"push --samples: {v.ref} has no recorded base model to render samples on{only}; give "
                            "one with push --base BASE, or store it with one (loradex add FILE --name NAME --base BASE)")
    with contextlib.ExitStack() as stack:
        source = None
        if Path(b).expanduser().exists():
            source = Path(b).expanduser()
        elif ALIASES.get(b, b) in tiny_names():
            source = ALIASES.get(b, b)
        elif _REPO_ID.match(b):
            source = hub_snapshot(b)
        else:
            try:
                bv = reg.get(b)
            except RegistryError:
                bv = None
            if bv is not None:
                if bv.artifact != "checkpoint":
                    raise RegistryError(f"push --samples: the recorded base {b} of {v.ref} is a stored {bv.artifact}, "
                                        "not a base model")
                source = stack.enter_context(reg.checkout(bv))
        if source is None:
            hint = (" (download it into the Hugging Face cache first, e.g. `hf download " + b + "`)"
                    if _REPO_ID.match(b) else "")
            raise RegistryError(f"push --samples: the base {b} of {v.ref} is not here: not a file or folder, an "
                                f"embedded tiny model, a stored base or a Hub repo in the local cache{hint}")
        yield source, [(v.ref, 1.0)]


def render_samples(reg, folder: Path, source, adapters, prompts: list[str], n: int, device: str | None = None
                   ) -> list[dict]:
    """Render ``n`` images with the inference engine (:class:`loradex.inference.engine.Engine`) on
    ``source`` with ``adapters`` at their weights, cycling through ``prompts``, seeds 0..n-1, at the
    base's default size (the embedded tiny models: 64x64, 4 steps; others: 25 steps), into
    ``folder/samples/sample_<i>.png``. ``device``: ``auto`` (None) or a torch device. Returns one
    ``{"file", "prompt", "seed", "steps", "width", "height", "guidance_scale"}`` per image."""
    from loradex.core.archs import tiny_names
    from loradex.devices import resolve_device
    from loradex.inference.engine import Engine
    from loradex.inference.types import GenerateRequest

    engine = Engine(source, device=resolve_device(device), registry=reg)
    tiny = engine.arch.name in tiny_names() or (isinstance(source, str) and source in tiny_names())
    if tiny:
        steps, side = 4, 64
    else:
        denoiser = getattr(engine.pipe, "unet", None) or getattr(engine.pipe, "transformer", None)
        size = getattr(getattr(denoiser, "config", None), "sample_size", None)
        scale = getattr(engine.pipe, "vae_scale_factor", 8)
        side = size * scale if isinstance(size, int) and size * scale >= 256 else engine.arch.family.resolution
        steps = 25
    reqs = [GenerateRequest(prompts[i % len(prompts)], adapters=list(adapters), steps=steps, width=side, height=side,
                            seed=i).validate() for i in range(n)]
    images = []
    for i in range(0, n, engine.max_batch):
        images += engine.generate(reqs[i:i + engine.max_batch])
    (folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    out = []
    for i, (req, img) in enumerate(zip(reqs, images)):
        rel = f"{SAMPLES_DIR}/sample_{i}.png"
        img.save(folder / rel, format="PNG")
        out.append({"file": rel, "prompt": req.prompt, "seed": req.seed, "steps": req.steps, "width": req.width,
                    "height": req.height, "guidance_scale": req.guidance_scale})
    return out
