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
* ``README.md``: the model card, YAML front matter per FORMATS.md §5 (``base_model``,
  ``library_name: diffusers``, ``license``, ``instance_prompt``, ``widget``, ``tags``) rendered with
  huggingface_hub's ``ModelCardData``, then a body with usage, identities and lineage.

Dependency direction: hub depends on the registry, never the reverse at import time. Its functions
take a ``Registry`` (``reg``) and use its public methods (``get``, ``load``, ``export``, ``info``,
``show``, ``add``); at module level it imports only the registry's lower rooms (``refs`` for name
validation, ``scan`` for what a snapshot holds). ``Registry.push``/``pull`` import this module
inside the method, as a convenience, so there is no import cycle.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loradex.errors import LoradexError, RegistryError
from loradex.registry.refs import validate_name, validate_tag
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


def base_repo(v) -> str | None:
    """The card's ``base_model``: the version's own base when it is a Hub repo id, else the usual
    base of its architecture, else none."""
    b = v.base_model or ""
    if _REPO_ID.match(b) and not os.path.exists(b):
        return b
    return _family_facts(v.arch)[0]


def build_folder(reg, v, folder: Path, repo_id: str, to: str | None = None, license: str | None = None,
                 arch=None) -> list[str]:
    """Write the files of a push into ``folder`` (which must be empty or new); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise RegistryError(f"{folder} is not empty: give a new or empty folder")
    if v.artifact == "checkpoint":
        if to is not None:
            raise RegistryError(f"{v.ref} is a checkpoint: it is pushed as stored (--to is for adapters)")
        reg.export(v, folder)
        weights = v.filename if v.layout == "file" else None
    else:
        to = (to or "diffusers").lower()
        if to not in PUSH_TARGETS:
            raise RegistryError(f"--to must be one of {', '.join(PUSH_TARGETS)}, not {to!r}")
        if v.artifact == "embedding":
            weights, fmt = ("learned_embeds.safetensors", "diffusers-ti") if to == "diffusers" else (
                f"{v.name}.safetensors", "kohya-ti")
        else:
            weights, fmt = ("pytorch_lora_weights.safetensors", "diffusers") if to == "diffusers" else (
                f"{v.name}.safetensors", "kohya")
        _write_reproducible(reg, v, folder / weights, fmt, to, arch)
    card = model_card(reg, v, repo_id, weights, license=license, push_format=to)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _write_reproducible(reg, v, path: Path, fmt: str, to: str, arch=None) -> None:
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


def model_card(reg, v, repo_id: str, weights: str | None, license: str | None = None,
               push_format: str | None = None) -> str:
    """README.md text: YAML front matter (huggingface_hub's ModelCardData) and a short body."""
    from huggingface_hub import ModelCard, ModelCardData

    info = reg.info(v.name)
    triggers = [t for t in info["trigger_words"] if t]
    prompt = ", ".join(triggers) if triggers else None
    kinds = set(v.kinds)
    if v.artifact == "checkpoint":
        kind_tags = ["dreambooth"]
    elif v.artifact == "embedding":
        kind_tags = ["textual-inversion"]
    else:
        kind_tags = ["lora"] + (["lycoris"] if kinds - {"lora"} else []) + ["template:sd-lora"]
    tags = ["text-to-image", "diffusers", *kind_tags]
    tags += [t for t in _family_facts(v.arch)[1] if t not in tags]
    tags += [t for t in info["labels"] if t not in tags] + ["loradex"]
    data = ModelCardData(
        base_model=base_repo(v),
        library_name="diffusers",
        license=license or _family_facts(v.arch)[2],
        tags=tags,
        instance_prompt=prompt,
        widget=[{"text": prompt}] if prompt else None,
    )
    title = info["description"].split("\n", 1)[0] if info["description"] else v.name
    lines = [f"# {v.name}", "", info["description"] or f"{title}: a {v.artifact} stored and published with loradex.", ""]
    if triggers:
        lines += ["## Trigger words", "", "Use " + ", ".join(f"`{t}`" for t in triggers) + " in the prompt.", ""]
    lines += ["## Use it", ""]
    if v.artifact == "checkpoint":
        lines += ["```python", "from diffusers import DiffusionPipeline",
                  f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")' if v.layout == "folder"
                  else f'# single-file checkpoint: DiffusionPipeline.from_single_file("https://huggingface.co/{repo_id}/blob/main/{weights}")',
                  "```", ""]
    elif v.artifact == "embedding":
        lines += ["```python", f'pipe.load_textual_inversion("{repo_id}", weight_name="{weights}")', "```", ""]
    elif push_format == "kohya":
        lines += [f"`{weights}` uses kohya / A1111 naming: put it in `models/Lora` (A1111, ComfyUI).", ""]
    else:
        lines += ["```python", f'pipe.load_lora_weights("{repo_id}", weight_name="{weights}")', "```", ""]
    lines += ["## Details", "", "| | |", "|---|---|", f"| architecture | {v.arch or 'unknown'} |",
              f"| format (stored) | {v.format} |"]
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
            origin = e["parent"] or (Path(e["source"]).name if e["source"] and os.path.exists(e["source"]) else e["source"])
            lines.append(f"- {e['operation']} from `{origin}`" + (f" ({e['params']})" if e["params"] else ""))
    lines.append("")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def push(reg, ref, repo_id: str, *, private: bool = False, to: str | None = None, dry_run: bool = False,
         out_dir=None, license: str | None = None, token: str | None = None, commit_message: str | None = None,
         arch=None) -> dict:
    v = reg.get(ref)
    _check_repo_id(repo_id)
    if dry_run:
        if out_dir is None:
            raise RegistryError("push --dry-run needs -o DIR: the folder that would be uploaded is written there")
        folder = Path(out_dir)
        files = build_folder(reg, v, folder, repo_id, to=to, license=license, arch=arch)
        return {"dry_run": True, "ref": v.ref, "repo_id": repo_id, "folder": str(folder), "files": files,
                "private": private}
    from huggingface_hub import CommitOperationAdd, HfApi

    scratch = None if getattr(reg, "readonly", False) else reg.tmp  # a read-only home: the system's tmp
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-push-", dir=scratch) as d:
        folder = Path(d) / "upload"
        files = build_folder(reg, v, folder, repo_id, to=to, license=license, arch=arch)
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

