"""Metadata written with adapters: ModelSpec 1.0.1 (``modelspec.*``) and kohya's ``ss_*`` keys.

ModelSpec (Stability AI, v1.0.1): MUST ``sai_model_spec``, ``architecture``, ``implementation``,
``title``; we add ``date`` and keep any value the source already had. kohya tools read
``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha`` and ``ss_base_model_version``;
we fill them when the source had none. The architecture ids and base versions are the family
specs' (``core/archs``). ``loradex.arch`` / ``loradex.arch_spec`` name the arch the file was
written for (the spec: a derived arch's family and configs), read first by detection.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import re
from collections import Counter

from loradex.core.adapter import Adapter
from loradex.core.kinds.base import scalar

#: the base model's identity (registry REF, Hub id or path) an adapter was made against
BASE_KEY = "loradex.base_model"


def _arch(name: str | None):
    """The Arch of an adapter's arch name, or None when unknown (metadata is then generic)."""
    if not name:
        return None
    from loradex.core.archs import get_arch
    from loradex.errors import ArchError

    try:
        return get_arch(name)
    except ArchError:
        return None


def arch_record(name: str | None) -> dict[str, str]:
    """``loradex.arch`` (and, for an arch derived from a custom base, ``loradex.arch_spec``: its
    family and component configs as JSON) so the file names its base wherever it goes."""
    from loradex.core.archs import ARCH_KEY, ARCH_SPEC_KEY, builtin_names, tiny_names

    a = _arch(name)
    if a is None:
        return {}
    out = {ARCH_KEY: a.name}
    desc = a.descriptor()
    if desc is not None and a.name not in builtin_names() and a.name not in tiny_names():
        out[ARCH_SPEC_KEY] = json.dumps(desc, sort_keys=True, separators=(",", ":"))
    return out


def modelspec(adapter: Adapter, title: str, suffix: str | None = None) -> dict[str, str]:
    """ModelSpec keys for ``adapter``; existing ``modelspec.*`` values of the source are kept."""
    if suffix is None:
        kinds = set(adapter.kinds())
        suffix = "textual-inversion" if not kinds else ("lora" if kinds <= {"lora"} else "lycoris")
    a = _arch(adapter.arch)
    arch = a.family.modelspec_id(a) if a is not None else (adapter.arch or "unknown")
    out = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/{suffix}",
        "modelspec.implementation": a.family.modelspec_implementation if a is not None else "diffusers",
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    out.update({k: v for k, v in adapter.metadata.items() if k.startswith("modelspec.") and k != "modelspec.architecture"})
    out.update(arch_record(adapter.arch))
    if adapter.metadata.get(BASE_KEY):  # the base it was trained / extracted against (every writer keeps it)
        out[BASE_KEY] = adapter.metadata[BASE_KEY]
    return out


def kohya_ss(adapter: Adapter, title: str) -> dict[str, str]:
    """The ``ss_*`` keys kohya tools look for, keeping every ``ss_*`` value the source had."""
    ranks = Counter(p.rank for p in adapter.patches.values() if p.rank is not None)
    alphas = Counter(
        scalar(getattr(p, "alpha", None)) if scalar(getattr(p, "alpha", None)) else p.rank
        for p in adapter.patches.values()
        if p.rank is not None
    )
    kinds = set(adapter.kinds())
    out = {
        "ss_network_module": "networks.lora" if kinds <= {"lora"} else "lycoris.kohya",
        "ss_output_name": title,
    }
    if ranks:
        out["ss_network_dim"] = str(ranks.most_common(1)[0][0])
        a = alphas.most_common(1)[0][0]
        out["ss_network_alpha"] = str(int(a) if float(a).is_integer() else a)
    a = _arch(adapter.arch)
    version = a.family.kohya_base_version(a) if a is not None else None
    if version:
        out["ss_base_model_version"] = version
    out.update({k: v for k, v in adapter.metadata.items() if k.startswith("ss_")})
    return out


# ---- reading: what a file's metadata and keys say, for ``inspect`` ---------------------------------
#: ``ss_*`` keys that name the base model the adapter was trained on (shown under "base model")
BASE_FIELDS = (
    "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_base_model_version", "ss_v2",
    "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash", "modelspec.architecture", "modelspec.implementation",
    "modelspec.prediction_type", BASE_KEY, "loradex.arch",
)
#: ``ss_*`` keys about the training images (shown under "dataset"; ``ss_tag_frequency`` has its own table)
DATASET_FIELDS = (
    "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_datasets", "ss_num_train_images", "ss_num_reg_images",
    "ss_num_batches_per_epoch", "ss_bucket_info", "ss_enable_bucket", "ss_min_bucket_reso", "ss_max_bucket_reso",
    "ss_bucket_no_upscale", "ss_keep_tokens", "ss_shuffle_caption", "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate", "ss_flip_aug", "ss_color_aug",
    "ss_random_crop", "ss_face_crop_aug_range", "ss_resolution",
)
#: kohya's epoch-second timestamps, decoded to ISO 8601 (UTC)
TIMESTAMP_FIELDS = ("ss_training_started_at", "ss_training_finished_at")
_DIR_REPEATS = re.compile(r"^\d+_(.+)$")


def _value(key: str, text: str):
    """One metadata value decoded: JSON objects/arrays parsed, kohya timestamps as ISO 8601 UTC;
    anything else (numbers included) stays the string the file holds."""
    s = text.strip() if isinstance(text, str) else text
    if isinstance(s, str) and s[:1] in "{[":
        try:
            return json.loads(s)
        except (ValueError, RecursionError):
            return text
    if key in TIMESTAMP_FIELDS:
        try:
            t = float(s)
            return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).replace(microsecond=0).isoformat()
        except (TypeError, ValueError, OverflowError, OSError):
            return text
    return text


def tag_frequency(meta: dict[str, str]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` (``{dataset dir: {tag: count}}``), each dir's tags sorted by
    count (most used first), then by tag; ``{}`` when absent or not the JSON kohya writes."""
    raw = meta.get("ss_tag_frequency")
    try:
        obj = json.loads(raw) if raw else {}
    except (TypeError, ValueError, RecursionError):
        return {}
    if not isinstance(obj, dict):
        return {}
    out: dict[str, dict[str, int]] = {}
    for d, tags in obj.items():
        if not isinstance(tags, dict):
            continue
        counts = {str(t).strip(): int(c) for t, c in tags.items()
                  if isinstance(c, (int, float)) and not isinstance(c, bool) and str(t).strip()}
        out[str(d)] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def top_tags(meta: dict[str, str], n: int | None = 10) -> list[tuple[str, int]]:
    """The ``n`` most used caption tags over every dataset dir of ``ss_tag_frequency``
    (``(tag, count)``, most used first; all of them when ``n`` is None)."""
    total: Counter = Counter()
    for tags in tag_frequency(meta).values():
        total.update(tags)
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranked if n is None else ranked[:n]


def trigger(meta: dict[str, str], n: int = 3) -> str | None:
    """The words that call up the adapter: ModelSpec's ``trigger_phrase``, else the ``n`` most used
    caption tags (comma-separated), else None."""
    phrase = (meta.get("modelspec.trigger_phrase") or "").strip()
    return phrase or ", ".join(t for t, _ in top_tags(meta, n)) or None


def summary(meta: dict[str, str]) -> dict:
    """The few metadata facts ``inspect`` shows on one line (``describe``'s ``metadata``)."""
    return {
        "keys": len(meta),
        "title": meta.get("modelspec.title") or meta.get("ss_output_name"),
        "network_module": meta.get("ss_network_module"),
        "base_model": meta.get("ss_base_model_version") or meta.get("modelspec.architecture"),
        "training_steps": meta.get("ss_steps"),
        "trigger": trigger(meta),
    }


def decode(meta: dict[str, str]) -> dict:
    """Every metadata field of a file, decoded and grouped for reading (``inspect --metadata``):

    * ``base_model``: what it was trained on (``ss_sd_model_name``, ``ss_base_model_version``,
      ``modelspec.architecture``...); ``training``: every other ``ss_*`` setting (learning rates,
      optimizer, network dim/alpha/args, epochs, steps, timestamps as ISO 8601...);
    * ``dataset``: dataset dirs (repeats, image counts), image counts, bucketing and caption
      options; ``tag_frequency``: ``{dir: [[tag, count], ...]}``, most used first; ``triggers``: ModelSpec's
      trigger phrase, the most used tags, and the names of the kohya dataset dirs (``10_sks dog``
      -> ``sks dog``);
    * ``hashes``: ``sshs_*`` and ``modelspec.hash_*``; ``modelspec``: the other ``modelspec.*``
      fields; ``other``: every remaining key (nothing is left out).

    JSON values are parsed; other values stay the strings the file holds."""
    sections: dict[str, dict] = {k: {} for k in ("base_model", "training", "dataset", "hashes", "modelspec", "other")}
    for key in sorted(meta):
        value = _value(key, meta[key])
        if key == "ss_tag_frequency":
            continue
        if key in BASE_FIELDS:
            sections["base_model"][key] = value
        elif key.startswith("sshs_") or key.startswith("modelspec.hash_"):
            sections["hashes"][key] = value
        elif key in DATASET_FIELDS:
            sections["dataset"][key] = value
        elif key.startswith("ss_"):
            sections["training"][key] = value
        elif key.startswith("modelspec."):
            sections["modelspec"][key] = value
        else:
            sections["other"][key] = value
    freq = tag_frequency(meta)
    if "ss_tag_frequency" in meta and not freq and meta["ss_tag_frequency"].strip() not in ("", "{}"):
        sections["other"]["ss_tag_frequency"] = meta["ss_tag_frequency"]  # not kohya's JSON: shown as is
    dirs = sections["dataset"].get("ss_dataset_dirs")
    names = [m.group(1) for d in (dirs if isinstance(dirs, dict) else freq) if (m := _DIR_REPEATS.match(str(d)))]
    # pairs, not a mapping: the order (most used first) survives JSON writers that sort keys
    sections["tag_frequency"] = {d: [[t, c] for t, c in tags.items()] for d, tags in freq.items()}
    sections["triggers"] = {
        "trigger_phrase": meta.get("modelspec.trigger_phrase") or None,
        "top_tags": [[t, c] for t, c in top_tags(meta, 10)],
        "dataset_dir_names": sorted(set(names)),
    }
    return sections


def _group_of(module: str) -> str:
    """The leading part of a module name that says which model part it patches:
    ``lora_unet`` / ``lora_te1`` for kohya's flat names, else the first dotted segment."""
    if "." not in module and module.startswith(("lora_", "lycoris_")):
        return "_".join(module.split("_")[:2])
    return module.split(".", 1)[0]


def structure(path) -> dict:
    """What a safetensors file or pickle of tensors holds, read without any architecture: its keys
    grouped by module (each key split at the longest suffix some kind or PEFT/diffusers spelling
    owns), each module's kind (``core.kinds.split_kind``), rank and alpha, the tensors' shapes and
    dtypes, and the keys that belong to no module. Reads the header and the scalar tensors only
    (``safetensors_io.structure_only``), plus a NaN/Inf scan. FormatError / UnsafeFileError for a
    file that is neither (the containers' own checks)."""
    from pathlib import Path

    from loradex.converters import pickle_io
    from loradex.converters import safetensors_io as sio
    from loradex.converters.common import PEFT_TO_LYCORIS, adapter_suffixes, split_key
    from loradex.core.kinds import KINDS, split_kind
    from loradex.errors import FormatError

    p = Path(path)
    pickled = pickle_io.looks_like_pickle(p)
    header = pickle_io.read_tensor_header(p)
    spellings = dict(PEFT_TO_LYCORIS)
    for cls in KINDS.values():
        spellings.update(getattr(cls, "SPELLINGS", {}) or {})
    suffixes = tuple(sorted(set(adapter_suffixes()) | set(spellings), key=lambda x: (-len(x), x)))
    groups: dict[str, dict[str, str]] = {}
    other: dict[str, dict] = {}
    for key, info in header.tensors.items():
        sp = split_key(key, suffixes)
        if sp is None:
            other[key] = {"shape": list(info.shape), "dtype": info.dtype}
        else:
            groups.setdefault(sp[0], {})[sp[1]] = key
    with sio.structure_only():
        tensors = pickle_io.load_tensors(p, header)
    bad = set(pickle_io.nonfinite_keys(p))
    table: dict[str, dict] = {}
    kinds: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    comps: Counter = Counter()
    dtypes: Counter = Counter()
    notes: list[str] = []
    for mod in sorted(groups):
        keys = groups[mod]
        by_suffix = {spellings.get(s, s): tensors[k] for s, k in keys.items() if k in tensors}
        kind = rank = alpha = None
        try:
            kind, own, _rest = split_kind(by_suffix)
        except FormatError as e:
            notes.append(f"{mod}: {e}")
            own = {}
        if kind is not None:
            try:
                patch = KINDS[kind].from_tensors(own, None)
                rank = patch.rank
                alpha = scalar(getattr(patch, "alpha", None))
            except Exception as e:  # a malformed module is shown, not fatal for the view
                notes.append(f"{mod}: {kind} tensors do not fit together ({' '.join(str(e).split())[:120]})")
        if alpha is None and "alpha" in by_suffix and by_suffix["alpha"].device.type != "meta":
            with contextlib.suppress(Exception):
                alpha = float(by_suffix["alpha"].float().reshape(-1)[0])
        kinds[kind or "none"] += 1
        comps[_group_of(mod)] += 1
        if rank is not None:
            ranks[rank] += 1
        if alpha is not None:
            alphas[alpha] += 1
        entry = {
            "kind": kind,
            "rank": rank,
            "alpha": alpha,
            "dora": "dora_scale" in by_suffix,
            "tensors": {s: {"key": k, "shape": list(header.tensors[k].shape), "dtype": header.tensors[k].dtype}
                        for s, k in sorted(keys.items())},
        }
        if any(k in bad for k in keys.values()):
            entry["nonfinite"] = True
        table[mod] = entry
        dtypes.update(header.tensors[k].dtype for k in keys.values())
    dtypes.update(t["dtype"] for t in other.values())
    return {
        "container": "pickle" if pickled else "safetensors",
        "tensors": len(header.tensors),
        "parameters": int(sum(math.prod(t.shape) for t in header.tensors.values())),
        "modules": len(table),
        "components": dict(sorted(comps.items())),
        "kinds": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "dora": sum(e["dora"] for e in table.values()),
        "dtype": ", ".join(d for d, _ in dtypes.most_common()) or None,
        "module_table": table,
        "other_keys": other,
        "nonfinite": sorted(m for m, e in table.items() if e.get("nonfinite")) + sorted(k for k in other if k in bad),
        "adapter_like": any(e["kind"] for e in table.values()),
        "metadata": dict(header.metadata),
        "pickle_extras": dict(pickle_io.pickled_extras(p)) if pickled else {},
        "notes": notes,
    }
