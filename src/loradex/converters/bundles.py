"""Textual-inversion embeddings bundled inside LoRA files (pivotal tuning): the
``bundle_emb.<token>.<...>`` keys A1111 and kohya/LyCORIS bundling tools write, read into
``Embedding`` objects and written back. Split from ``converters.embeddings`` (the TI file formats),
whose vector checks and key tables it uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from loradex.converters.embeddings import BUNDLE_PREFIX, CLIP_KEYS, COMPONENT_KEYS, check_vectors
from loradex.core.adapter import Embedding
from loradex.errors import ConversionError, FormatError

if TYPE_CHECKING:
    import torch

#: Entries of a bundled embedding that *are* the embedding, by layout (A1111 ``string_to_param.*``,
#: kohya ``emb_params``; ``clip_l``/``clip_g`` are handled as a pair).
_BUNDLE_VECTORS = ("string_to_param.", "emb_params")


def read_bundle(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Embedding], dict[str, str]]:
    """Embeddings from the ``bundle_emb.<name>.<...>`` keys of a LoRA file (pivotal tuning), and
    the bundle keys that hold none (file key -> reason, for ``Adapter.unexplained``).

    Convention (A1111 ``extensions-builtin/Lora/networks.py``, kohya/LyCORIS bundling tools): the
    name is the second dot-separated part (so it cannot contain a dot) and becomes the token; the
    rest is the embedding's own file layout flattened: ``string_to_param.*`` (A1111), ``emb_params``
    (kohya), ``clip_l``/``clip_g`` (SDXL), or any single tensor (A1111 treats a lone tensor as the
    embedding). ``string_to_token.*`` entries are A1111's informational token ids (265, CLIP's
    ``*``), which nothing reads: they are understood and skipped. Everything else is reported, not
    dropped: a key without ``<name>.<tensor>``, entries next to a recognised embedding, and the
    entries of a bundle where no single embedding can be told apart. Vectors of the wrong shape
    are a malformed file: FormatError."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unexplained: dict[str, str] = {}
    for key, t in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        parts = key.split(".", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            unexplained[key] = "bad bundled embedding key: expected bundle_emb.<name>.<tensor>"
            continue
        if parts[2].startswith("string_to_token."):
            continue
        groups.setdefault(parts[1], {})[parts[2]] = (key, t)
    out: dict[str, Embedding] = {}
    for name, entries in groups.items():
        where = f"bundled embedding {name!r}"
        if set(CLIP_KEYS) <= set(entries):
            used = list(CLIP_KEYS)
        else:
            used = [e for e in entries if e.startswith(_BUNDLE_VECTORS)]
            if not used and len(entries) == 1:
                used = list(entries)
            if len(used) != 1:
                why = f"{where}: cannot tell the embedding among {sorted(entries)}"
                unexplained.update({k: why for k, _ in entries.values()})
                continue
        for e, (k, _) in entries.items():
            if e not in used:
                unexplained[k] = f"{where}: '{e}' is not part of the embedding (read from {', '.join(used)})"
        if used == list(CLIP_KEYS):
            raw = {CLIP_KEYS[e]: entries[e][1] for e in used}
        else:
            raw = {"text_encoder": entries[used[0]][1]}
        out[name] = Embedding(name, check_vectors(raw, where))
    return out, unexplained


def parse_bundle(tensors: Mapping[str, torch.Tensor]) -> dict[str, Embedding]:
    """:func:`read_bundle` that refuses (FormatError) any bundle key it cannot explain."""
    out, unexplained = read_bundle(tensors)
    if unexplained:
        key, why = next(iter(unexplained.items()))
        raise FormatError(f"{why} ({key})")
    return out


def bundle_tensors(embeddings: Mapping[str, Embedding]) -> dict[str, torch.Tensor]:
    """The inverse of ``parse_bundle``: ``bundle_emb.<token>.string_to_param.*`` for one-encoder
    embeddings (what A1111 and kohya bundle), ``bundle_emb.<token>.clip_l``/``.clip_g`` for SDXL."""
    out: dict[str, torch.Tensor] = {}
    for emb in embeddings.values():
        tok = emb.token
        if not tok or "." in tok:
            raise ConversionError(
                f"embedding token {tok!r} cannot be bundled: bundle_emb names cannot contain '.'"
            )
        vectors = check_vectors(emb.vectors, f"embedding {tok!r}")
        if set(vectors) == {"text_encoder"}:
            out[f"{BUNDLE_PREFIX}{tok}.string_to_param.*"] = vectors["text_encoder"]
        elif set(vectors) == set(COMPONENT_KEYS):
            for comp, t in vectors.items():
                out[f"{BUNDLE_PREFIX}{tok}.{COMPONENT_KEYS[comp]}"] = t
        else:
            raise ConversionError(f"embedding {tok!r}: components {sorted(vectors)} have no bundle layout")
    return out

__all__ = ["bundle_tensors", "parse_bundle", "read_bundle"]
