"""Hugging Face Hub: publish a registry version with a model card, and pull a repo into the registry.

Everything goes through huggingface_hub: ``HfApi.create_repo`` + ``HfApi.create_commit`` to push,
``snapshot_download`` to pull (so a populated local cache with ``HF_HUB_OFFLINE=1`` works, and a
pull records the resolved commit). The token is huggingface_hub's own business (``HF_TOKEN``, the
saved login, or ``token=``): loradex never prints, logs or stores it.

What is pushed (``push --dry-run -o DIR`` writes exactly this folder):
* a LoRA / LyCORIS adapter: ``pytorch_lora_weights.safetensors`` (``to="diffusers"``, the default,
  what ``pipe.load_lora_weights(repo_id)`` finds) or ``<name>.safetensors`` in kohya naming
  (``to="kohya"``: every LyCORIS kind, for A1111 / ComfyUI / kohya);
* a textual-inversion embedding: ``learned_embeds.safetensors`` (diffusers) or ``<name>.safetensors``
  (kohya ``emb_params`` / ``clip_l``+``clip_g``);
* a checkpoint: its bytes as stored (one file, or the diffusers folder);
* ``samples/sample_<i>.png`` with ``samples=N`` (``push --samples N``): images the inference
  engine renders on the version's recorded base (it must be here), listed in the card's ``widget``;
* ``README.md``: the model card, YAML front matter per FORMATS.md §5 (``base_model`` only when the
  recorded base is a Hub repo, ``base_model_relation``, ``library_name: diffusers`` only when
  diffusers loads the upload, ``license``, ``instance_prompt``, ``widget``, ``tags``) rendered with
  huggingface_hub's ``ModelCardData``, then a body with the base, trigger words, a usage snippet
  that runs as written, samples, identities and lineage.

Dependency direction: hub depends on the registry, never the reverse at import time. Its functions
take a ``Registry`` (``reg``) and use its public methods (``get``, ``load``, ``export``, ``info``,
``show``, ``add``); at module level it imports only the registry's lower rooms (``refs`` for name
validation, ``scan`` for what a snapshot holds, ``samples`` for ``push --samples``: the base and the
images the inference engine renders on it). ``Registry.push``/``pull`` import this module
inside the method, as a convenience, so there is no import cycle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loradex.errors import LoradexError, RegistryError
from loradex.registry.refs import validate_name, validate_tag
from loradex.registry.samples import recorded_base, render_samples, sample_source
from loradex.registry.scan import WEIGHT_SUFFIXES, is_folder_artifact


def _family_facts(arch_name: str | None) -> tuple[str | None, tuple[str, ...], str]:
    """(Hub base repo, tags, license) of an arch from its family spec: the published base and its
    license only for a built-in size (a custom or tiny base is not that repo), the family's tags
    for any size."""
    from loradex.core.archs import builtin_names, get_arch
    from loradex.errors import ArchError

    if not arch_name:
        return None, (), "other"
    try:
        a = get_arch(arch_name)
    except ArchError:
        return None, (), "other"
    fam = a.family
    if a.name in builtin_names():
        return fam.hub_repos.get(a.name, fam.hub_repo), fam.hub_tags, fam.license
    return None, fam.hub_tags, "other"


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PUSH_TARGETS = ("diffusers", "kohya")


def _hub_error(e: Exception, what: str) -> RegistryError:
    msg = " ".join(str(e).split())
    return RegistryError(f"{what}: {type(e).__name__}: {msg[:300]}")


def _check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise RegistryError(f"bad repo id {repo_id!r}: {' '.join(str(e).split())[:200]}") from None
    return repo_id


def base_repo(v, reg=None) -> str | None:
    """The card's ``base_model``: the Hub repo id of the base the registry recorded for the version
    (recorded as a Hub id, or a stored base that was pulled from the Hub, found through ``reg``);
    None when no base was recorded, only an architecture id was, or it is not on the Hub. Never
    the family's usual base: that guess is wrong for every fine-tune and custom model."""
    b, what = recorded_base(v)
    if what != "model":
        return None
    if _REPO_ID.match(b) and not os.path.exists(b):
        return b
    if reg is None or "/" in b or os.path.isabs(b):
        return None
    try:  # a registry REF of a stored base: its Hub origin when it came from a pull
        parents = reg.show(reg.get(b))["parents"]
    except LoradexError:
        return None
    for e in parents:
        repo = (e.get("params") or {}).get("repo_id") if e["operation"] == "pull" else None
        if isinstance(repo, str) and _REPO_ID.match(repo):
            return repo
    return None


def build_folder(reg, v, folder: Path, repo_id: str, to: str | None = None, license: str | None = None,
                 arch=None, samples: int = 0, sample_prompts: Iterable[str] = (), device: str | None = None) -> list[str]:
    """Write the files of a push into ``folder`` (which must be empty or new); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise RegistryError(f"{folder} is not empty: give a new or empty folder")
    if samples < 0:
        raise RegistryError(f"--samples must be 0 or more, not {samples}")
    if v.artifact != "checkpoint":  # before anything is rendered or written
        to = (to or "diffusers").lower()
        if to not in PUSH_TARGETS:
            raise RegistryError(f"--to must be one of {', '.join(PUSH_TARGETS)}, not {to!r}")
    elif to is not None:
        raise RegistryError(f"{v.ref} is a checkpoint: it is pushed as stored (--to is for adapters)")
    with contextlib.ExitStack() as stack:
        # samples need the base: an unknown or missing one fails before anything is written
        source = stack.enter_context(sample_source(reg, v)) if samples else None
        if v.artifact == "checkpoint":
            reg.export(v, folder)
            weights = v.filename if v.layout == "file" else None
            uploaded = {"diffusers": v.layout == "folder"}
        else:
            if v.artifact == "embedding":
                weights, fmt = ("learned_embeds.safetensors", "diffusers-ti") if to == "diffusers" else (
                    f"{v.name}.safetensors", "kohya-ti")
            else:
                weights, fmt = ("pytorch_lora_weights.safetensors", "diffusers") if to == "diffusers" else (
                    f"{v.name}.safetensors", "kohya")
            written = _write_reproducible(reg, v, folder / weights, fmt, to, arch)
            uploaded = uploaded_facts(folder / weights, arch=written.arch)
        rendered = []
        if source is not None:
            prompts = [p for p in sample_prompts if p] or [card_prompt(reg.info(v.name), v)[0] or "a photo"]
            rendered = render_samples(reg, folder, source[0], source[1], prompts, samples, device=device)
    card = model_card(reg, v, repo_id, weights, license=license, push_format=to, uploaded=uploaded, samples=rendered)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _write_reproducible(reg, v, path: Path, fmt: str, to: str, arch=None):
    """The weights of a push, the same bytes every time for the same version: ModelSpec's date is
    the version's creation time and the header is written in a canonical order."""
    import datetime as _dt

    from loradex import api
    from loradex.converters import safetensors_io as sio

    adapter = reg.load(v, arch=arch)
    created = _dt.datetime.fromisoformat(v.created).replace(microsecond=0).isoformat()
    adapter.metadata.setdefault("modelspec.date", created)
    try:
        api.save(adapter, path, fmt)
    except LoradexError as e:
        hint = " (try --to kohya, which holds every LyCORIS kind)" if to == "diffusers" else ""
        raise RegistryError(f"{v.ref} cannot be written as {fmt}: {e}{hint}") from None
    sio.canonicalize_header(path)
    return adapter


def model_card(reg, v, repo_id: str, weights: str | None, license: str | None = None,
               push_format: str | None = None, uploaded: dict | None = None, samples: list[dict] | None = None) -> str:
    """README.md text: YAML front matter (huggingface_hub's ModelCardData) and a body.

    ``base_model`` is the Hub id of the base the registry recorded (:func:`base_repo`), never a
    guess: an unknown base is said so in the text and the field is left out (with
    ``base_model_relation``). ``library_name`` is ``diffusers`` only where diffusers loads the
    upload (``uploaded["diffusers"]``; a kohya file of plain LoRA does, LyCORIS kinds do not).
    ``instance_prompt`` comes from the trigger words, else ModelSpec's trigger phrase, else the
    top of kohya's ``ss_tag_frequency``; ``widget`` lists ``samples`` (:func:`render_samples`)."""
    from huggingface_hub import ModelCard, ModelCardData

    info = reg.info(v.name)
    uploaded = uploaded or {}
    samples = samples or []
    prompt, origin, tags_seen = card_prompt(info, v)
    fam = _family(v.arch)
    hub_base = base_repo(v, reg)
    loads_in_diffusers = bool(uploaded.get("diffusers"))
    kinds = set(uploaded.get("kinds") or v.kinds)
    if v.artifact == "checkpoint":
        kind_tags = ["dreambooth"]
    elif v.artifact == "embedding":
        kind_tags = ["textual-inversion"]
    else:
        lycoris = sorted(kinds - {"lora"})
        kind_tags = ["lora"] + (["lycoris", *lycoris] if lycoris else []) + ["template:sd-lora"]
    tags = ["text-to-image", *(["diffusers"] if loads_in_diffusers else []), *kind_tags]
    tags += [t for t in _family_facts(v.arch)[1] if t not in tags]
    tags += [t for t in info["labels"] if t not in tags] + ["loradex"]
    if samples:
        widget = [{"text": s["prompt"], "output": {"url": s["file"]}} for s in samples]
    else:
        widget = [{"text": prompt}] if prompt else None
    relation = None
    if hub_base:
        relation = "adapter" if v.artifact != "checkpoint" else ("merge" if _made_by(reg, v) == "bake" else "finetune")
    data = ModelCardData(
        base_model=hub_base,
        base_model_relation=relation,
        library_name="diffusers" if loads_in_diffusers else None,
        license=license or _family_facts(v.arch)[2],
        tags=tags,
        instance_prompt=prompt,
        widget=widget,
    )
    what = _what(v, kinds)
    lines = [f"# {v.name}", ""]
    if samples:
        lines += ["<Gallery />", ""]
    lines += [info["description"] or f"**{v.name}**: {what} for {fam.label if fam else 'an unknown base model'}, "
              "published with loradex.", ""]
    lines += ["## Base model", "", _base_text(v, hub_base, fam), ""]
    lines += _prompt_lines(prompt, origin, tags_seen)
    lines += ["## Use it", ""]
    lines += _usage_lines(v, repo_id, weights, push_format, hub_base, fam, prompt, uploaded)
    if samples:
        s0 = samples[0]
        seeds = sorted({s["seed"] for s in samples})
        on = "with this model" if v.artifact == "checkpoint" else "on the base above, this at weight 1"
        lines += ["## Samples", "",
                  f"Rendered by loradex's inference engine {on}: "
                  f"{s0['steps']} steps, {s0['width']}x{s0['height']}, guidance {s0['guidance_scale']:g}, "
                  f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}.", ""]
        lines += [f"- `{s['file']}`: {s['prompt']!r} (seed {s['seed']})" for s in samples] + [""]
    lines += ["## Details", "", "| | |", "|---|---|", f"| architecture | {v.arch or 'unknown'} |",
              f"| format (stored) | {v.format} |"]
    if push_format:
        lines.append(f"| format (this upload) | {push_format} (`{weights}`) |")
    if v.kinds:
        lines.append(f"| kinds | {', '.join(f'{k} x{n}' for k, n in v.kinds.items())} |")
    if v.ranks:
        lines.append(f"| ranks | {', '.join(f'{r} x{n}' for r, n in v.ranks.items())} |")
    lines.append(f"| sha256 (stored file) | `{v.sha256}` |")
    if v.hashes.get("autov3"):
        lines.append(f"| Civitai AutoV2 / AutoV3 (stored file) | `{v.hashes['autov2']}` / `{v.hashes['autov3']}` |")
    parents = reg.show(v)["parents"]
    if parents:
        lines += ["", "## How it was made", ""]
        for e in parents:
            origin_ = e["parent"] or (Path(e["source"]).name if e["source"] and os.path.exists(e["source"]) else e["source"])
            lines.append(f"- {e['operation']} from `{origin_}`" + (f" ({e['params']})" if e["params"] else ""))
    lines.append("")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


_KIND_LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full-weight diff", "ia3": "(IA)^3",
                "glora": "GLoRA", "oft": "OFT", "boft": "BOFT", "norm": "norm"}


def _family(arch_name: str | None):
    """The family object of an arch name, or None when it is unknown here."""
    from loradex.core.archs import get_arch
    from loradex.errors import ArchError

    if not arch_name:
        return None
    try:
        return get_arch(arch_name).family
    except ArchError:
        return None


def _made_by(reg, v) -> str | None:
    parents = reg.show(v)["parents"]
    return parents[0]["operation"] if parents else None


def _what(v, kinds: set[str]) -> str:
    if v.artifact == "checkpoint":
        return "a fine-tuned checkpoint"
    if v.artifact == "embedding":
        return "a textual-inversion embedding"
    names = [_KIND_LABELS.get(k, k) for k in sorted(kinds, key=lambda k: (k != "lora", k))] or ["LoRA"]
    return ("a " if names[0][0] not in "AEIO(" else "an ") + " + ".join(names) + " adapter" + (
        " (LyCORIS)" if set(kinds) - {"lora"} else "")


def top_tags(tag_frequency, limit: int = 10) -> list[tuple[str, int]]:
    """kohya's ``ss_tag_frequency`` (JSON text or dict: ``{dataset folder: {tag: count}}``) summed
    over the folders: ``(tag, count)`` pairs, most frequent first (ties in the order first seen),
    at most ``limit``. Malformed values give ``[]``."""
    if isinstance(tag_frequency, str):
        try:
            tag_frequency = json.loads(tag_frequency)
        except ValueError:
            return []
    if not isinstance(tag_frequency, dict):
        return []
    total: dict[str, int] = {}
    for counts in tag_frequency.values():
        if not isinstance(counts, dict):
            continue
        for tag, n in counts.items():
            if isinstance(tag, str) and tag.strip() and isinstance(n, (int, float)) and not isinstance(n, bool):
                total[tag.strip()] = total.get(tag.strip(), 0) + int(n)
    return sorted(total.items(), key=lambda kv: -kv[1])[:limit]


def card_prompt(info: dict, v) -> tuple[str | None, str, list[tuple[str, int]]]:
    """``(instance prompt, where it came from, top tags)``: the registry's trigger words
    (``"trigger"``), else the file's ModelSpec ``trigger_phrase`` (``"modelspec"``), else the tags
    tied for the top of ``ss_tag_frequency``, at most 3 (``"tags"``), else an embedding's token
    (``"token"``); ``(None, "", tags)`` when there is none."""
    tags = top_tags(v.metadata.get("ss_tag_frequency"))
    triggers = [t for t in info.get("trigger_words") or [] if t]
    if triggers:
        return ", ".join(triggers), "trigger", tags
    phrase = str(v.metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        return phrase, "modelspec", tags
    if tags:
        return ", ".join(t for t, n in tags[:3] if n == tags[0][1]), "tags", tags
    if v.artifact == "embedding" and v.embeddings:
        return v.embeddings[0], "token", tags
    return None, "", tags


def _base_text(v, hub_base: str | None, fam) -> str:
    if hub_base:
        return f"[`{hub_base}`](https://huggingface.co/{hub_base})"
    family = f" (a {fam.label} model)" if fam else ""
    recorded, what = recorded_base(v)
    if what == "none":
        return f"unknown{family}: no base was recorded for this version."
    if what == "arch":
        return f"unknown{family}: the file names only its architecture (`{recorded}`), not a model."
    local = Path(recorded).name if os.path.isabs(recorded) else recorded
    return f"unknown on the Hub{family}: made for `{local}`, a model that is not a Hub repository."


def _prompt_lines(prompt: str | None, origin: str, tags: list[tuple[str, int]]) -> list[str]:
    out: list[str] = []
    if origin in ("trigger", "modelspec"):
        out += ["## Trigger words", "", f"Use `{prompt}` in the prompt.", ""]
    elif origin == "token":
        out += ["## Trigger words", "", f"Use the token `{prompt}` in the prompt.", ""]
    elif origin == "tags":
        out += ["## Trigger words", "",
                f"None were recorded; `{prompt}` {'is' if ',' not in prompt else 'are'} the most frequent "
                "caption tag(s) of its training set, used as the prompt here.", ""]
    if tags:
        out += ["Most frequent training tags (kohya `ss_tag_frequency`): "
                + ", ".join(f"`{t}` ({n})" for t, n in tags) + ".", ""]
    return out


def _setup_lines(base: str | None, fam, single_file: str | None = None) -> list[str]:
    """The pipeline set-up of a usage snippet: the base (or a marked placeholder), on CUDA in half
    precision when there is one (bf16 for the flow-matching families), else on the CPU in fp32."""
    half = "torch.bfloat16" if fam is not None and fam.objective == "flow" else "torch.float16"
    if single_file:
        load = f'pipe = DiffusionPipeline.from_single_file("{single_file}")'
    elif base:
        load = f'pipe = DiffusionPipeline.from_pretrained("{base}")'
    else:
        what = f"the {fam.label} model" if fam else "the model"
        load = f'pipe = DiffusionPipeline.from_pretrained("BASE_MODEL")  # unknown base: {what} it was made for'
    return ["import torch", "from diffusers import DiffusionPipeline", "",
            'device = "cuda" if torch.cuda.is_available() else "cpu"', load,
            f'pipe = pipe.to(device, {half} if device == "cuda" else torch.float32)']


def _usage_lines(v, repo_id: str, weights: str | None, push_format: str | None, hub_base: str | None, fam,
                 prompt: str | None, uploaded: dict) -> list[str]:
    text = (prompt or "a photo").replace("\\", "\\\\").replace('"', '\\"')
    run = [f'image = pipe("{text}").images[0]', f'image.save("{v.name}.png")', "```", ""]
    if v.artifact == "checkpoint":
        single = None if v.layout == "folder" else f"https://huggingface.co/{repo_id}/blob/main/{weights}"
        return ["```python", *_setup_lines(repo_id, fam, single), *run]
    if v.artifact == "embedding":
        token = (v.embeddings or uploaded.get("embeddings") or [prompt or "<token>"])[0]  # (a clip_l/clip_g file names no token)
        lines = ["```python", *_setup_lines(hub_base, fam)]
        if uploaded.get("two_encoders"):
            lines += ["from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file", "",
                      f'state = load_file(hf_hub_download("{repo_id}", "{weights}"))',
                      f'pipe.load_textual_inversion(state["clip_l"], token="{token}", text_encoder=pipe.text_encoder, '
                      "tokenizer=pipe.tokenizer)",
                      f'pipe.load_textual_inversion(state["clip_g"], token="{token}", text_encoder=pipe.text_encoder_2, '
                      "tokenizer=pipe.tokenizer_2)"]
        else:
            lines.append(f'pipe.load_textual_inversion("{repo_id}", weight_name="{weights}", token="{token}")')
        return lines + run
    kohya = push_format == "kohya"
    elsewhere = (f"`{weights}` uses kohya naming: it also loads as is in ComfyUI (Load LoRA), A1111 / Forge "
                 f"(`models/Lora`, `<lora:{Path(weights or v.name).stem}:1>` in the prompt) and kohya sd-scripts.")
    if uploaded.get("diffusers"):
        lines = ["```python", *_setup_lines(hub_base, fam),
                 f'pipe.load_lora_weights("{repo_id}", weight_name="{weights}")', *run]
        return lines + ([elsewhere, ""] if kohya else [])
    why = ", ".join(uploaded.get("blockers") or ["LyCORIS modules"])
    return [f"diffusers' `load_lora_weights` does not read this file ({why}). " + elsewhere,
            "In Python, loradex loads it, and writes an exact diffusers LoRA where one exists:", "", "```bash",
            f"loradex pull {repo_id} --name {v.name}",
            f"loradex export {v.name} -o {v.name}_diffusers.safetensors --to diffusers",
            "```", ""]


def uploaded_facts(path: Path, arch=None) -> dict:
    """What an uploaded adapter or embedding file holds, read back with loradex's readers:
    ``kinds`` (kind -> modules), ``embeddings`` (tokens), ``two_encoders`` (an SDXL-style
    embedding), and ``diffusers``: whether diffusers loads it as is (``load_lora_weights`` reads
    kohya files of plain LoRA/LoCon, not LoHa/LoKr/... nor Tucker, DoRA or bundled embeddings)."""
    from loradex import api

    a = api.load(path, arch=arch)
    fmt = (a.source_format or "").lower()
    embeddings = list(a.embeddings)
    two = any("text_encoder_2" in e.vectors for e in a.embeddings.values())
    blockers = [_KIND_LABELS.get(k, k) + " modules" for k in sorted(set(a.kinds()) - {"lora"})]
    blockers += ["Tucker (mid) factors"] * any(getattr(p, "mid", None) is not None for p in a.patches.values())
    blockers += ["DoRA"] * any(getattr(p, "dora_scale", None) is not None for p in a.patches.values())
    blockers += ["bundled embeddings"] * bool(a.patches and embeddings)
    if a.patches:
        loads = fmt in ("diffusers", "peft") or (fmt == "kohya" and not blockers)
    else:
        loads = bool(embeddings)
    return {"kinds": dict(a.kinds()), "embeddings": embeddings, "two_encoders": two, "diffusers": loads,
            "format": a.source_format, "blockers": blockers}


def push(reg, ref, repo_id: str, *, private: bool = False, to: str | None = None, dry_run: bool = False,
         out_dir=None, license: str | None = None, token: str | None = None, commit_message: str | None = None,
         arch=None, samples: int = 0, sample_prompts: Iterable[str] = (), device: str | None = None,
         base_model: str | None = None) -> dict:
    """Publish version ``ref`` to the Hub model repo ``repo_id`` (created when missing, ``private``
    only applies then) as one commit of the folder :func:`build_folder` makes: the weights in
    format ``to`` (``diffusers`` by default, or ``kohya``; a checkpoint goes as stored) and
    ``README.md``; ``samples`` images rendered on the recorded base (``sample_prompts``, else the
    card's prompt; ``device``: None is ``auto``). ``base_model`` (``push --base``'s identity) stands
    for the base the registry recorded, for the card and the samples. ``dry_run``: nothing is
    uploaded, the folder is written to ``out_dir`` (required). Returns ``{"dry_run", "ref", "repo_id", "files", "private"}`` plus ``folder``
    (dry run) or ``url``, ``commit``, ``commit_url``. Hub and network errors are one-line
    RegistryErrors; ``token`` (else huggingface_hub's own login) is never printed or stored."""
    v = reg.get(ref)
    _check_repo_id(repo_id)
    if base_model:
        v = dataclasses.replace(v, base_model=base_model)
    if dry_run:
        if out_dir is None:
            raise RegistryError("push --dry-run needs -o DIR: the folder that would be uploaded is written there")
        folder = Path(out_dir)
        files = build_folder(reg, v, folder, repo_id, to=to, license=license, arch=arch, samples=samples,
                             sample_prompts=sample_prompts, device=device)
        return {"dry_run": True, "ref": v.ref, "repo_id": repo_id, "folder": str(folder), "files": files,
                "private": private}
    from huggingface_hub import CommitOperationAdd, HfApi

    scratch = None if getattr(reg, "readonly", False) else reg.tmp  # a read-only home: the system's tmp
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-push-", dir=scratch) as d:
        folder = Path(d) / "upload"
        files = build_folder(reg, v, folder, repo_id, to=to, license=license, arch=arch, samples=samples,
                             sample_prompts=sample_prompts, device=device)
        api = HfApi(token=token)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            info = api.create_commit(repo_id, ops, commit_message=commit_message or f"Upload {v.ref} with loradex",
                                     repo_type="model")
        except Exception as e:  # huggingface_hub / network errors: one line, never the token
            raise _hub_error(e, f"push {v.ref} to {repo_id}") from None
    return {"dry_run": False, "ref": v.ref, "repo_id": repo_id, "url": str(repo_url),
            "commit": getattr(info, "oid", None), "commit_url": getattr(info, "commit_url", None), "files": files,
            "private": private}


def split_repo(repo: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"owner/name@rev"`` -> ``("owner/name", "rev")``; an explicit ``revision`` wins over (and
    leaves in place) an ``@`` part. The repo id is validated (RegistryError); no revision is None."""
    if revision is None and "@" in repo:
        repo, _, revision = repo.partition("@")
    return _check_repo_id(repo), revision or None


def pull(reg, repo: str, name: str, *, revision: str | None = None, filename: str | None = None,
         tags: Iterable[str] = (), arch: str | None = None, token: str | None = None):
    """Download with ``snapshot_download`` and add the artifact it holds as ``name``."""
    from huggingface_hub import snapshot_download

    validate_name(name)
    tags = [validate_tag(t) for t in tags]
    repo_id, rev = split_repo(repo, revision)
    ignore = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.gguf", "*.mlmodel", ".gitattributes"]
    allow = [filename, f"{filename}/*", "README.md"] if filename else None
    try:
        folder = Path(snapshot_download(repo_id, revision=rev, token=token, allow_patterns=allow,
                                        ignore_patterns=ignore))
    except Exception as e:
        raise _hub_error(e, f"pull {repo_id}" + (f"@{rev}" if rev else "")) from None
    commit = folder.name
    target = pick_artifact(folder, filename)
    card = _read_card(folder / "README.md")
    try:
        reg.info(name)
        is_new = False
    except RegistryError:
        is_new = True
    rel = "." if target == folder else target.relative_to(folder).as_posix()
    kw = {}
    if is_new:
        kw = {"description": card.get("description"), "labels": card.get("tags"),
              "trigger_words": [card["instance_prompt"]] if card.get("instance_prompt") else None}
    # a snapshot is made of symlinks into the cache's blobs/ folder: follow them out of the snapshot
    return reg.add(target, name, tags=tags, arch=arch, operation="pull", base_model=card.get("base_model"),
                   source=f"hf://{repo_id}@{commit}", follow_links=True,
                   params={"repo_id": repo_id, "revision": rev or "main", "commit": commit, "file": rel}, **kw)


def pick_artifact(folder: Path, filename: str | None) -> Path:
    """What a pulled snapshot holds: ``folder/filename`` when given; the snapshot itself when it
    is a folder artifact (a PEFT folder, a diffusers pipeline); else its one weights file that
    loradex recognises, preferring ``pytorch_lora_weights.safetensors`` then
    ``learned_embeds.safetensors`` when there are several. RegistryError when none, or several
    without a preferred name, are found."""
    from loradex import converters

    if filename:
        p = folder / filename
        if not p.exists():
            raise RegistryError(f"the snapshot has no {filename}")
        return p
    if is_folder_artifact(folder):
        return folder
    found = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES:
            try:
                converters.detect(p)
                found.append(p)
            except LoradexError:
                from loradex.converters.checkpoint import describe_checkpoint

                if describe_checkpoint(p):
                    found.append(p)
    if not found:
        raise RegistryError(f"{folder.name}: no adapter, embedding or checkpoint loradex recognises in the repo")
    if len(found) == 1:
        return found[0]
    for preferred in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors"):
        for p in found:
            if p.name == preferred:
                return p
    names = ", ".join(p.relative_to(folder).as_posix() for p in found[:10])
    raise RegistryError(f"the repo holds several weight files ({names}); choose one with --file")


def _read_card(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        card = ModelCard.load(path)
    except Exception:
        return {}
    data = card.data.to_dict() if card.data else {}
    base = data.get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    text = (card.text or "").strip()
    para = next((b.strip() for b in text.split("\n\n") if b.strip() and not b.lstrip().startswith(("#", "```", "|"))),
                "")
    tags = [t for t in (data.get("tags") or []) if isinstance(t, str)]
    return {"base_model": base, "instance_prompt": data.get("instance_prompt"), "tags": tags[:20],
            "description": para[:2000] or None, "license": data.get("license")}

