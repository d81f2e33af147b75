"""AUTOMATIC1111's generation parameters ("infotext") in PNG images: written into every PNG that
``loradex generate`` and the HTTP server make, read back by ``loradex inspect IMAGE.png``.

A1111 stores one ``tEXt`` chunk ``parameters`` (Pillow's ``PngInfo.add_text``) holding::

    <prompt>
    Negative prompt: <negative prompt>            (only when there is one)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Lora hashes: "alice: 0123456789ab, bob: ba9876543210", Version: v1.10.1

as written by AUTOMATIC1111/stable-diffusion-webui, checked against these files and commits:

* ``modules/processing.py`` ``create_infotext`` (commit 9a224a5cb83cbcf75ab0108c03196b8519d29ab6):
  the fields in the order Steps, Sampler, CFG scale, Seed, Size (``WxH``), Model hash, Model, then
  the extra generation params (where the Lora extension puts ``Lora hashes``); each
  written ``k if k == v else f"{k}: {quote(v)}"`` for the values that are not None, joined with
  ``", "``; the text is ``f"{prompt}{negative}\\n{params}".strip()`` with
  ``negative = "\\nNegative prompt: " + neg`` when there is a negative prompt.
* ``modules/infotext_utils.py`` (commit c19d04436496ab29ddca4758a792831ae41b31de): ``quote``
  (a value holding ``,``, ``\\n`` or ``:`` becomes ``json.dumps(value, ensure_ascii=False)``),
  ``unquote``, and ``parse_generation_parameters``: the last line is the parameter line when
  ``re_param`` finds at least 3 ``key: value`` pairs in it; lines before ``Negative prompt:``
  are the prompt, the rest the negative prompt.
* ``extensions-builtin/Lora/extra_networks_lora.py`` (commit 1b90460a3f3dc2874285f72fb3cb91d0a0afae19):
  ``Lora hashes`` = ``", ".join(f"{alias}: {shorthash}")`` with ``:`` and ``,`` removed from each
  alias (the name the prompt's ``<lora:NAME:W>`` used); ``extensions-builtin/Lora/network.py``
  (commit f2844bd024ff3cf7ee712153a514afd9085980db): ``shorthash`` = the first 12 hex digits of
  the header's ``sshs_model_hash``, else of the file's sha256 -- for a ``.safetensors`` file the
  "addnet" hash of the bytes after the header (= AutoV3), for any other file the whole file's.
* ``modules/sd_models.py`` ``CheckpointInfo`` (commit 5929ece1f3dc11fabe5ef4f30db43657c63e5ed4):
  ``Model hash`` = the first 10 hex digits of the checkpoint file's sha256 (= AutoV2, lowercase);
  ``Model`` = the file name without its extension.

loradex writes the adapters of a request as A1111 would have run them: each adapter with modules
as a ``<lora:NAME:W>`` tag appended to the prompt and a ``Lora hashes`` entry; an adapter that only
holds embeddings as a ``TI hashes`` entry per token the prompts use (the embedding file's whole
sha256, 12 digits: ``Embedding.set_hash`` in ``modules/textual_inversion/textual_inversion.py``,
commit 22ecb78b51f7e6f0234cbc0efbde4ee9a2dc466f; the ``TI hashes`` field as A1111's
``sd_hijack_clip.py`` writes it, ``name: hash`` joined with ``", "``). ``Sampler`` is A1111's
name for the pipeline's scheduler (``DDIM``, ``Euler``, ``Euler a``, ``DPM++ 2M``...). A diffusers
folder has no single file to hash: its ``Model hash`` is left out (A1111 leaves out every None
field) and ``Model`` is its folder name (a Hub id for a Hub snapshot, the registry REF for a
stored base). Last comes ``Version: loradex X.Y.Z`` (one more ``key: value`` field to A1111's
parser), so an image says which tool made it.

Reading needs no imaging library (``converters.a1111_png.png_text_chunks``); writing uses Pillow's
``PngInfo`` (Pillow comes with diffusers).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from loradex.errors import FormatError

#: the PNG text chunk keyword A1111 writes and reads
PARAMETERS_KEY = "parameters"
#: A1111's ``re_param`` (infotext_utils.py): one ``key: value`` pair, a value quoted or up to a comma
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
#: ``<lora:NAME:W>`` (A1111's extra-network syntax; further ``:args`` are allowed and ignored)
RE_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")

#: diffusers scheduler class -> A1111's sampler name (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py)
SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ 2S a",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "DDPMScheduler": "DDPM",
    "FlowMatchEulerDiscreteScheduler": "Euler",
}


# ---- the text ------------------------------------------------------------------------------------
def quote(value) -> str:
    """A1111's ``quote``: the value as text, JSON-quoted when it holds ``,``, a newline or ``:``."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's ``unquote``: a ``"..."`` value JSON-decoded; anything else as it is."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def alias(name: str) -> str:
    """A name as A1111 writes it in a hash list: ``:`` and ``,`` removed."""
    return str(name).replace(":", "").replace(",", "")


def hash_list(items: Iterable[tuple[str, str]]) -> str | None:
    """``"name: hash, name: hash"`` (A1111's ``Lora hashes`` / ``TI hashes`` value); None when empty."""
    parts = [f"{alias(n)}: {h}" for n, h in items if n and h]
    return ", ".join(parts) or None


def parse_hash_list(text: str | None) -> dict[str, str]:
    """``"a: 0123, b: 4567"`` -> ``{"a": "0123", "b": "4567"}``."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        name, sep, h = part.partition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


def _fmt_number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def generation_params(*, steps: int, sampler: str | None, cfg_scale: float, seed: int, width: int, height: int,
                      model_hash: str | None = None, model: str | None = None,
                      lora_hashes: Iterable[tuple[str, str]] = (), ti_hashes: Iterable[tuple[str, str]] = (),
                      extra: Mapping[str, object] | None = None, version: str | None = None) -> dict[str, object]:
    """The parameter line's fields in A1111's order (``create_infotext``): Steps, Sampler, CFG
    scale, Seed, Size, Model hash, Model, ``extra``, Lora hashes, TI hashes, Version. None values
    are kept here and left out when written."""
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as _dist_version

        try:
            version = f"loradex {_dist_version('loradex')}"
        except PackageNotFoundError:  # pragma: no cover - a source tree without its metadata
            version = "loradex"
    return {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": _fmt_number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
        **dict(extra or {}),
        "Lora hashes": hash_list(lora_hashes),
        "TI hashes": hash_list(ti_hashes),
        "Version": version,
    }


def infotext(prompt: str, params: Mapping[str, object], negative_prompt: str = "") -> str:
    """The ``parameters`` text, laid out as A1111's ``create_infotext`` lays it out."""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse(text: str) -> dict:
    """A ``parameters`` text read the way A1111's ``parse_generation_parameters`` reads it:
    ``prompt``, ``negative_prompt`` and ``params`` (every ``key: value`` of the parameter line,
    unquoted, in order), plus the fields typed: ``steps``, ``sampler``, ``cfg_scale``, ``seed``,
    ``width``/``height``, ``model_hash``, ``model``, ``lora_hashes`` / ``ti_hashes`` (name ->
    hash), ``loras`` (the prompt's ``<lora:NAME:W>`` tags) and ``version``."""
    if not isinstance(text, str):
        raise FormatError("generation parameters must be text")
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done = True
            line = line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    params: dict[str, str] = {}
    for k, v in RE_PARAM.findall(last):
        params[k] = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
    out: dict = {"prompt": prompt, "negative_prompt": negative, "params": params}

    def number(key: str, kind):
        try:
            return kind(params[key])
        except (KeyError, ValueError):
            return None

    out["steps"] = number("Steps", int)
    out["sampler"] = params.get("Sampler")
    out["cfg_scale"] = number("CFG scale", float)
    out["seed"] = number("Seed", int)
    m = RE_IMAGESIZE.match(params.get("Size", ""))
    out["width"], out["height"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    out["model_hash"] = params.get("Model hash")
    out["model"] = params.get("Model")
    out["lora_hashes"] = parse_hash_list(params.get("Lora hashes"))
    out["ti_hashes"] = parse_hash_list(params.get("TI hashes"))
    loras = []
    for name, w in RE_LORA_TAG.findall(prompt):
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = None
        loras.append({"name": name, "weight": weight, "hash": out["lora_hashes"].get(alias(name))})
    out["loras"] = loras
    out["version"] = params.get("Version")
    return out


# ---- PNG files -------------------------------------------------------------------------------------
def png_info(text: str | None):
    """A Pillow ``PngInfo`` carrying ``text`` as the ``parameters`` chunk (None: an empty one)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text(PARAMETERS_KEY, text)
    return info


def png_bytes(image, text: str | None = None) -> bytes:
    """``image`` (PIL) as PNG bytes, with ``text`` as its ``parameters`` chunk."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(text))
    return buf.getvalue()


def save_png(image, path: str | os.PathLike, text: str | None = None) -> None:
    """Write ``image`` as a PNG at ``path`` (atomically) with ``text`` as its ``parameters`` chunk."""
    from loradex.converters.safetensors_io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(text))


def read_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text chunk of a PNG file (``tEXt``, ``zTXt`` or ``iTXt``), or None."""
    from loradex.converters.a1111_png import png_text_chunks

    return png_text_chunks(path).get(PARAMETERS_KEY)


def _png_size(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) == 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def describe_image(path: str | os.PathLike) -> dict:
    """``inspect`` of a PNG with generation parameters: ``format`` ``png``, ``image``
    (``{width, height}``), ``parameters`` (the text as stored), ``generation`` (:func:`parse`),
    ``size`` and ``sha256``. FormatError when the PNG has no ``parameters`` chunk."""
    p = Path(path)
    text = read_parameters(p)
    if text is None:
        raise FormatError(f"{p}: a PNG image without generation parameters (no '{PARAMETERS_KEY}' text chunk)")
    size = _png_size(p)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {
        "path": str(p),
        "format": "png",
        "image": {"width": size[0], "height": size[1]} if size else None,
        "parameters": text,
        "generation": parse(text),
        "size": p.stat().st_size,
        "sha256": h.hexdigest(),
    }


# ---- what a request ran: model, sampler, adapters ------------------------------------------------
_CACHE_LOCK = threading.Lock()
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, how) -> hash, this process


def _cache_file() -> Path | None:
    from loradex.core.archs.tables import cache_root

    root = cache_root()
    return root / "file-hashes.json" if root is not None else None


def file_sha256(path: str | os.PathLike, after_header: bool = False) -> str:
    """sha256 (hex) of a file, or with ``after_header`` of the bytes after a safetensors header
    (kohya's / A1111's "addnet" hash); cached by path, size and mtime in this process and in
    ``$LORADEX_CACHE/file-hashes.json`` (A1111 keeps its ``cache.json`` the same way), so a
    multi-GB checkpoint is hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, "data" if after_header else "file")
    skey = "|".join(map(str, key))
    with _CACHE_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    cache = _cache_file()
    stored: dict = {}
    if cache is not None:
        try:
            stored = json.loads(cache.read_text())
        except (OSError, ValueError):
            stored = {}
        if isinstance(stored, dict) and isinstance(stored.get(skey), str):
            with _CACHE_LOCK:
                _HASHES[key] = stored[skey]
            return stored[skey]
    from loradex.registry.hashes import file_hashes

    hashes = file_hashes(p)
    value = hashes["sshs_model_hash"] if after_header else hashes["sha256"]
    with _CACHE_LOCK:
        _HASHES[key] = value
    if cache is not None and value:
        try:
            stored = stored if isinstance(stored, dict) else {}
            stored[skey] = value
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache: hashed again next time, still right
    return value


def sampler_name(scheduler) -> str | None:
    """A1111's sampler name for a diffusers scheduler (its class name when A1111 has none)."""
    if scheduler is None:
        return None
    name = type(scheduler).__name__
    return SAMPLERS.get(name, name)


def _hub_id(p: Path) -> str | None:
    """``org/name`` of a Hugging Face cache snapshot folder (``models--org--name/snapshots/<rev>``)."""
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name[len("models--"):].replace("--", "/", 1)
    return None


def model_fields(source, name: str | None = None, sha256: str | None = None) -> dict[str, str | None]:
    """``{"Model hash", "Model"}`` for a base: ``source`` is what the pipeline was loaded from (a
    single-file checkpoint: A1111's ``sha256[:10]`` and file stem; a diffusers folder: no hash, its
    folder name or Hub id; an embedded tiny name: that name). ``name`` / ``sha256`` (a registry
    REF and its stored bytes' sha256, a Hub id) override what the path says."""
    model, digest = name, sha256
    if isinstance(source, (str, os.PathLike)) and source:
        p = Path(source)
        if p.is_file():
            model = model or p.stem
            if digest is None:
                try:
                    digest = file_sha256(p)
                except OSError:
                    digest = None
        elif p.is_dir():
            model = model or _hub_id(p) or p.name
        else:
            model = model or str(source)
    return {"Model hash": digest[:10] if digest else None, "Model": model}


def adapter_hash(source) -> str | None:
    """A1111's short hash of an adapter (12 hex digits): its header's ``sshs_model_hash``, else the
    sha256 of the bytes after the header for a ``.safetensors`` file, else the whole file's.
    ``source``: a file path or a registry ``Version`` (its recorded hashes and metadata)."""
    if hasattr(source, "sha256") and hasattr(source, "hashes"):  # a registry Version
        meta = getattr(source, "metadata", {}) or {}
        safetensors = str(getattr(source, "filename", "") or "").lower().endswith(".safetensors")
        h = meta.get("sshs_model_hash") if safetensors else None
        h = h or (source.hashes.get("sshs_model_hash") if safetensors else None) or source.sha256
        return h[:12] if h else None
    p = Path(source)
    if not p.is_file():
        return None
    if p.suffix.lower() == ".safetensors":
        from loradex.converters import safetensors_io as sio

        try:
            h = sio.read_header(p).metadata.get("sshs_model_hash")
        except Exception:
            h = None
        return (h or file_sha256(p, after_header=True) or file_sha256(p))[:12]
    return file_sha256(p)[:12]


_ENTRIES: dict[tuple[str, str], tuple] = {}  # (adapter id, ref) -> _adapter_entry's answer
_MAX_ENTRIES = 4096


def _adapter_entry(engine, ref: str):
    """``(name, hash, has_modules, tokens)`` of one adapter REF or path of a request, remembered per
    adapter id (``Engine.resolve``: a stored version's sha256, a file's path, size and mtime)."""
    aid = None
    if callable(getattr(engine, "resolve", None)):
        try:
            aid = engine.resolve(ref)
        except Exception:
            aid = None
    with _CACHE_LOCK:
        hit = _ENTRIES.get((aid, ref)) if aid is not None else None
    if hit is not None:
        return hit
    p = Path(ref).expanduser()
    version = None
    registry = getattr(engine, "registry", None)
    if registry is not None:
        # the engine's lock: its registry connection is shared by the engine's threads
        with getattr(engine, "_lock", None) or contextlib.nullcontext():
            try:
                version = registry.get(ref)
            except Exception:
                version = None
    if version is not None:
        name, h = version.name, adapter_hash(version)
    elif p.is_file():
        name, h = p.stem, adapter_hash(p)
    else:
        name, h = (p.stem if p.exists() else ref), None
    modules, tokens = True, []
    if callable(getattr(engine, "ready", None)):
        try:
            r = engine.ready(ref)
            modules = bool(getattr(r, "factors", None) or getattr(r, "patches", None))
            tokens = sorted(getattr(r, "embeddings", {}) or {})
        except Exception:
            pass
    if not modules and version is None and p.is_file():
        h = file_sha256(p)[:12]  # A1111 hashes an embedding's whole file
    elif not modules and version is not None:
        h = version.sha256[:12]
    entry = (name, h, modules, tokens)
    if aid is not None:
        with _CACHE_LOCK:
            if len(_ENTRIES) >= _MAX_ENTRIES:
                _ENTRIES.pop(next(iter(_ENTRIES)))
            _ENTRIES[(aid, ref)] = entry
    return entry


def request_infotext(engine, request, model: Mapping[str, str | None] | None = None) -> str:
    """The ``parameters`` text of one ``GenerateRequest`` run by ``engine`` (an inference Engine, or
    anything with ``pipe`` / ``registry`` / ``ready``): ``model`` is :func:`model_fields` of its
    base (derived from the pipeline's ``name_or_path`` when None)."""
    pipe = getattr(engine, "pipe", None)
    if model is None:
        model = model_fields(getattr(pipe, "name_or_path", None) or getattr(getattr(engine, "arch", None), "name", None))
    prompt = request.prompt
    loras, tis = [], []
    for ref, weight in request.adapters:
        name, h, modules, tokens = _adapter_entry(engine, ref)
        if modules:
            prompt = f"{prompt} <lora:{alias(name)}:{weight:g}>" if prompt else f"<lora:{alias(name)}:{weight:g}>"
            loras.append((name, h))
        else:
            used = [t for t in tokens if t in request.prompt or t in request.negative_prompt]
            tis += [(t, h) for t in used]
    params = generation_params(
        steps=request.steps, sampler=sampler_name(getattr(pipe, "scheduler", None)),
        cfg_scale=float(request.guidance_scale), seed=request.seed, width=request.width, height=request.height,
        model_hash=model.get("Model hash"), model=model.get("Model"), lora_hashes=loras, ti_hashes=tis,
    )
    return infotext(prompt, params, request.negative_prompt)


__all__ = [
    "PARAMETERS_KEY", "adapter_hash", "describe_image", "file_sha256", "generation_params", "hash_list", "infotext",
    "model_fields", "parse", "parse_hash_list", "png_bytes", "png_info", "quote", "read_parameters",
    "request_infotext", "sampler_name", "save_png", "unquote",
]
