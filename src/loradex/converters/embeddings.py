"""Textual-inversion (TI) embeddings in every on-disk flavour, and the ``bundle_emb.*`` keys that
pivotal-tuning LoRA files carry.

An embedding is a new prompt token whose input-embedding rows (``[n_vectors, dim]``, one set per
text encoder) were learned. The ecosystem stores them in four layouts (FORMATS.md §4):

``a1111-ti``
    AUTOMATIC1111's ``.pt`` pickle ``{'string_to_token': {'*': 265}, 'string_to_param': {'*':
    tensor[n, d]}, 'name', 'step', 'sd_checkpoint', 'sd_checkpoint_name'}`` (A1111
    ``modules/textual_inversion``; 265 is the CLIP id of ``*``, which nothing reads back), and its
    flattened safetensors form with a single ``string_to_param.*`` key.
``kohya-ti``
    kohya sd-scripts: ``{'emb_params': tensor[n, 768|1024]}``; for SDXL ``{'clip_l': [n, 768],
    'clip_g': [n, 1280]}`` (``sdxl_train_textual_inversion.py``). A1111, ComfyUI and SwarmUI read
    both; SDXL has no other single-file layout, so an SDXL ``a1111-ti`` file is this one too.
``diffusers-ti``
    diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: tensor[n, d] or [d]}``.

**Token.** A1111 and kohya name an embedding after its *file* (the stem is what you type in a
prompt; A1111 ignores the ``name`` field), diffusers after the dict key. Readers follow that
convention (``token=`` overrides it); writers keep the token in the file where the layout has a
place for it and note when the file name will win instead.

**What diffusers' ``load_textual_inversion`` accepts** (0.42, ``loaders/textual_inversion.py``,
checked on the tiny pipeline in tests/test_embeddings.py): a path to a file (safetensors is tried
first, then a ``weights_only`` pickle) or an already-loaded object, which must be either a tensor
(``token=`` required), a one-key dict ``{token: tensor}`` (any single key: a kohya file therefore
loads as a token literally named ``emb_params`` unless ``token=`` is given), or a dict with
``string_to_param`` (A1111 ``.pt``; the token is the dict's ``name`` field, not the file name).
A ``[n, d]`` tensor adds the tokens ``tok, tok_1 ... tok_{n-1}``. It loads into *one* text encoder
(``text_encoder=`` / ``tokenizer=`` pick which), so an SDXL ``{clip_l, clip_g}`` file is rejected as
a whole; load it per encoder::

    sd = safetensors.torch.load_file(path)
    pipe.load_textual_inversion(sd["clip_l"], token=tok, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(sd["clip_g"], token=tok, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

(diffusers' own docstring example passes ``tokens=``, which is silently ignored: the keyword is
``token``). ``diffusers-ti`` therefore writes SDXL embeddings in that ``clip_l``/``clip_g`` layout by
default, or with ``sdxl_layout="split"`` as the pair diffusers' ``textual_inversion_sdxl.py``
training script writes, ``<stem>.safetensors`` (CLIP-L) and ``<stem>_2.safetensors`` (bigG), each
``{token: tensor}`` and each loadable by path with the matching ``text_encoder=``/``tokenizer=``.
Reading a ``diffusers-ti`` file picks up such a ``_2`` sibling.

**Case.** The CLIP tokenizer lowercases prompts. An added token with capitals still matches (added
tokens are matched after normalisation) but diffusers' multi-vector expansion looks the
lowercased piece up in the added-token table and misses, so only the first vector of ``MyTok`` is
used, silently. Writers put a warning in the report's notes, readers in ``Adapter.notes``.

Only ``safetensors_io`` opens files: safetensors headers are validated before any tensor is
read, pickles go through ``load_pickle`` (``weights_only``) with a size bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import pickle_io
from loradex.converters import safetensors_io as sio
from loradex.converters.common import ConversionReport, Converter, cast, register_format
from loradex.core.adapter import Adapter, Embedding
from loradex.core.kinds import kind_suffixes
from loradex.core.tensorspec import is_tensor
from loradex.errors import ArchError, ConversionError, FormatError, LoradexError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

BUNDLE_PREFIX = "bundle_emb."

#: File key of each SDXL encoder -> canonical component (FORMATS.md §4, Embedding docstring).
CLIP_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
COMPONENT_KEYS = {v: k for k, v in CLIP_KEYS.items()}

#: ``string_to_token`` value A1111 writes: CLIP's id for ``*`` (informational only).
A1111_STAR_TOKEN_ID = 265
#: Pickled embeddings larger than this (on disk, or once a zip archive is inflated) are refused.
#: Real ones are kilobytes: 75 vectors x 2048 floats is 600 KiB.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
#: A prompt has 77 positions, 75 of them usable: no real embedding has more vectors. Only used to
#: tell a one-tensor embedding file from other one-tensor files in ``detect``.
MAX_VECTORS = 77

#: ModelSpec 1.0.1 ``implementation`` per layout: kohya writes the SGM repository for TI (its
#: ``sai_model_spec.build_metadata``), and A1111's layout is the same SGM-style one; the
#: diffusers layout names diffusers.
IMPLEMENTATION = {
    "a1111-ti": "https://github.com/Stability-AI/generative-models",
    "kohya-ti": "https://github.com/Stability-AI/generative-models",
    "diffusers-ti": "diffusers",
}

#: Names ``diffusers-ti`` writes as a pickle: the readers that pick the container by name (kohya
#: sd-scripts' ``model_util.is_safetensors``, A1111, ComfyUI) ``torch.load`` all of these.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

#: A1111 ``.pt`` fields kept in ``Adapter.metadata`` under ``a1111.<field>``.
A1111_FIELDS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")


# ---- layouts -------------------------------------------------------------------------------
def _layout(keys: Mapping[str, object] | set[str]) -> str | None:
    """Which TI layout a (pickled or flattened safetensors) dict's top-level keys are, or None."""
    ks = set(keys)
    if ks == {"emb_params"} or ks == set(CLIP_KEYS):
        return "kohya-ti"
    if "string_to_param" in ks:  # the nested A1111 pickle
        return "a1111-ti"
    params = [k for k in ks if k.startswith("string_to_param.")]
    if len(params) == 1 and all(k.startswith(("string_to_param.", "string_to_token.")) for k in ks):
        return "a1111-ti"  # A1111 .pt flattened into safetensors
    if len(ks) == 1 and not next(iter(ks)).startswith(BUNDLE_PREFIX):
        return "diffusers-ti"
    return None


def _lone_module_tensor(keys: Mapping[str, object] | set[str]) -> bool:
    """Whether a one-tensor file is named like a module's weight rather than a token: ``x.weight``,
    ``x.bias``, ``x.diff``, ``x.lora_up.weight`` (any kind's suffix)."""
    return len(keys) == 1 and next(iter(keys)).endswith((".bias", *(f".{s}" for s in kind_suffixes())))


def _plausible(shape: tuple[int, ...], is_float: bool) -> bool:
    return (
        is_float
        and len(shape) in (1, 2)
        and all(d > 0 for d in shape)
        and (len(shape) == 1 or shape[0] <= MAX_VECTORS)
    )


def _tensor_entries(layout: str, obj: Mapping) -> dict[str, object]:
    """The embedding entries of a layout (file key -> value), for checks."""
    if layout == "a1111-ti" and "string_to_param" in obj:
        sp = obj["string_to_param"]
        return dict(sp) if isinstance(sp, Mapping) else {"string_to_param": sp}
    return {k: v for k, v in obj.items() if not k.startswith("string_to_token.")}


def detect_embedding_format(path: str | Path) -> str | None:
    """``"a1111-ti"``, ``"kohya-ti"``, ``"diffusers-ti"`` or None.

    Safetensors: the validated header only. Pickles: loaded with ``weights_only`` (and only when
    small enough to be an embedding); a pickle that needs code raises ``UnsafeFileError`` rather
    than answering None, so a hostile file is reported as such, not as "unknown format"."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        if pickle_io.looks_like_pickle(p):
            if p.stat().st_size > MAX_PICKLE_BYTES:
                return None
            obj = pickle_io.load_pickle(p, max_bytes=MAX_PICKLE_BYTES)
            if isinstance(obj, torch.Tensor):
                return "diffusers-ti" if _plausible(tuple(obj.shape), obj.is_floating_point()) else None
            if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
                return None
            layout = _layout(obj)
            if layout is None or (layout == "diffusers-ti" and _lone_module_tensor(obj)):
                return None
            entries = _tensor_entries(layout, obj)
            ok = len(entries) >= 1 and all(
                isinstance(v, torch.Tensor) and _plausible(tuple(v.shape), v.is_floating_point())
                for v in entries.values()
            )
            return layout if ok else None
        h = sio.read_header(p)
    except FormatError:
        return None
    layout = _layout(set(h.tensors))
    if layout is None or (layout == "diffusers-ti" and _lone_module_tensor(set(h.tensors))):
        return None
    infos = {k: v for k, v in h.tensors.items() if not k.startswith("string_to_token.")}
    floats = {"F64", "F32", "F16", "BF16"}
    return layout if all(_plausible(i.shape, i.dtype in floats) for i in infos.values()) else None


# ---- validation and architecture -----------------------------------------------------------
def check_vectors(vectors: Mapping[str, object], where: str) -> dict[str, torch.Tensor]:
    """Validate one embedding's tensors (component -> tensor) and return them as ``[n, d]``.

    1-D tensors (diffusers' single-vector files) get a leading axis; everything else must be a
    2-D floating tensor, with the same number of vectors in every encoder."""
    if not vectors:
        raise FormatError(f"{where}: no embedding tensors")
    out: dict[str, torch.Tensor] = {}
    for comp, t in vectors.items():
        # name the encoder by its file key where there are several (clip_l / clip_g)
        label = COMPONENT_KEYS.get(comp, comp) if len(vectors) > 1 else "the embedding"
        if not is_tensor(t):  # (a described file's tensors too, without importing torch)
            raise FormatError(f"{where}: {label} is a {type(t).__name__}, not a tensor")
        t = t.detach()  # a Parameter (a trainer's live embedding) as a plain tensor
        if not t.is_floating_point():
            raise FormatError(f"{where}: {label} has dtype {t.dtype}; embeddings are floating point")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise FormatError(f"{where}: {label} has shape {list(t.shape)}; expected [n_vectors, dim]")
        out[comp] = t.detach()
    counts = {COMPONENT_KEYS.get(c, c): t.shape[0] for c, t in out.items()}
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"{k} {n}" for k, n in counts.items())
        raise FormatError(f"{where}: encoders disagree on the number of vectors ({desc})")
    return out


def _widths(vectors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {c: int(t.shape[-1]) for c, t in vectors.items()}


def guess_arch(vectors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str | None:
    """The arch of an embedding from its widths per encoder (SD1 768, SD2 1024, SDXL CLIP-L 768 +
    bigG 1280, the tiny models, archs derived or named in the metadata); None otherwise."""
    from loradex.core.archs import match_embedding

    return match_embedding(_widths(vectors), metadata)


def _resolve_arch(arch, vectors: Mapping[str, torch.Tensor], where: str,
                  metadata: Mapping[str, str] | None = None) -> str | None:
    """``arch`` (name or Arch) checked against the embedding's widths, or guessed when None."""
    if arch is None:
        return guess_arch(vectors, metadata)
    from loradex.core.archs import get_arch

    a = get_arch(arch)
    widths = _widths(vectors)
    want = {c: a.text_encoder_width(c) if c in a.components else None for c in widths}
    if widths != want or len(widths) != len(a.text_encoders):
        got = ", ".join(f"{COMPONENT_KEYS.get(c, c)} {w}" for c, w in widths.items())
        exp = ", ".join(f"{COMPONENT_KEYS.get(c, c)} {a.text_encoder_width(c)}" for c in a.text_encoders)
        raise ArchError(f"{where}: embedding widths ({got}) do not fit {a.name} ({exp})")
    return a.name


def token_notes(token: str) -> list[str]:
    """Warnings about a token the CLIP tokenizer will not handle as written (see the module doc)."""
    if token != token.lower():
        return [
            f"token {token!r} has uppercase letters: the CLIP tokenizer lowercases prompts, so "
            f"diffusers uses only the first vector of a multi-vector {token!r}; prefer {token.lower()!r}"
        ]
    return []


# ---- reading -------------------------------------------------------------------------------
def _a1111_metadata(obj: Mapping) -> dict[str, str]:
    meta = {}
    for f in A1111_FIELDS:
        v = obj.get(f)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            meta[f"a1111.{f}"] = str(v)
    return meta


def _extract(obj: object, layout: str, where: str) -> tuple[dict[str, object], str | None, dict[str, str]]:
    """(component -> raw tensor, the token the file names itself or None, extra metadata)."""
    if is_tensor(obj):  # a bare tensor (diffusers accepts it with token=)
        return {"text_encoder": obj}, None, {}
    assert isinstance(obj, Mapping)
    if layout == "kohya-ti":
        if "emb_params" in obj:
            return {"text_encoder": obj["emb_params"]}, None, {}
        return {CLIP_KEYS[k]: obj[k] for k in CLIP_KEYS}, None, {}
    if layout == "a1111-ti":
        if "string_to_param" in obj:
            sp = obj["string_to_param"]
            if not isinstance(sp, Mapping) or len(sp) != 1:
                n = len(sp) if isinstance(sp, Mapping) else type(sp).__name__
                raise FormatError(f"{where}: string_to_param must hold exactly one tensor (found {n})")
            return {"text_encoder": next(iter(sp.values()))}, None, _a1111_metadata(obj)
        key = next(k for k in obj if k.startswith("string_to_param."))
        return {"text_encoder": obj[key]}, None, {}
    (key,) = obj.keys()
    return {"text_encoder": obj[key]}, str(key), {}


def _sibling_2(path: Path) -> Path:
    return path.with_name(f"{path.stem}_2{path.suffix}")


def read_embedding(path: str | Path, token: str | None = None, arch: str | None = None) -> Adapter:
    """Read any TI file into an ``Adapter`` holding one embedding (and no patches).

    ``token`` overrides the file's own (the dict key for diffusers files, else the file stem);
    ``arch`` overrides the guess from the widths and is checked against them."""
    p = Path(path)
    where = str(p)
    meta: dict[str, str] = {}
    if pickle_io.looks_like_pickle(p):
        obj = pickle_io.load_pickle(p, max_bytes=MAX_PICKLE_BYTES)
        if isinstance(obj, torch.Tensor):
            layout = "diffusers-ti"
        elif isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
            layout = _layout(obj)
        else:
            layout = None
    else:
        h = sio.read_header(p)
        layout = _layout(set(h.tensors))
        if layout is not None:
            obj = pickle_io.load_tensors(p, header=h)  # sio.load (descriptions in converters.described)
            meta.update(h.metadata)
    if layout is None:
        raise FormatError(
            f"{where}: not a textual-inversion file (no string_to_param, emb_params, clip_l/clip_g or single token)"
        )
    raw, file_token, extra = _extract(obj, layout, where)
    meta.update(extra)
    vectors = check_vectors(raw, where)
    notes: list[str] = []
    if layout == "diffusers-ti" and set(vectors) == {"text_encoder"}:
        vectors, pair_note = _join_pair(p, file_token, vectors)
        if pair_note:
            notes.append(pair_note)
    tok = token or file_token or p.stem
    if layout == "a1111-ti" and meta.get("a1111.name", p.stem) != p.stem:
        notes.append(
            f"the file's name field is {meta['a1111.name']!r}: diffusers loads it under that token, A1111 as {p.stem!r}"
        )
    notes.extend(token_notes(tok))
    return Adapter(
        embeddings={tok: Embedding(tok, vectors)},
        metadata=meta,
        arch=_resolve_arch(arch, vectors, where, meta),
        source_format=layout,
        notes=notes,
    )


def _join_pair(
    path: Path, token: str | None, vectors: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """diffusers' SDXL script writes ``<stem>.safetensors`` (CLIP-L) + ``<stem>_2.safetensors``
    (bigG) with the same token: join them into one SDXL embedding when both are there."""
    sib = _sibling_2(path)
    if token is None or path.stem.endswith("_2") or not sib.is_file():
        return vectors, None
    try:
        if detect_embedding_format(sib) != "diffusers-ti":
            return vectors, None
        other = read_embedding(sib)
    except LoradexError:
        return vectors, None
    emb = other.embeddings.get(token)
    if emb is None or emb.num_vectors != vectors["text_encoder"].shape[0]:
        return vectors, None
    return {"text_encoder": vectors["text_encoder"], "text_encoder_2": emb.vectors["text_encoder"]}, (
        f"joined {sib.name} as the second text encoder (diffusers' SDXL pair)"
    )


# ---- writing -------------------------------------------------------------------------------
def _pick(adapter: Adapter, token: str | None, report: ConversionReport) -> Embedding:
    """The one embedding a TI file holds; everything else is reported as dropped."""
    target = report.target
    if not adapter.embeddings:
        raise ConversionError(f"{target}: the adapter has no textual-inversion embedding to write")
    if token is not None:
        found = [e for k, e in adapter.embeddings.items() if token in (k, e.token)]
        if not found:
            raise ConversionError(
                f"{target}: no embedding named {token!r} (have {', '.join(adapter.embeddings)})"
            )
        emb = found[0]
    elif len(adapter.embeddings) == 1:
        emb = next(iter(adapter.embeddings.values()))
    else:
        raise ConversionError(
            f"{target}: a textual-inversion file holds one embedding and the adapter has "
            f"{len(adapter.embeddings)} ({', '.join(adapter.embeddings)}); pass token=NAME"
        )
    for k, e in adapter.embeddings.items():
        if e is not emb:
            report.dropped[f"embedding {k}"] = f"{target} holds one embedding"
    for name in adapter.patches:
        report.dropped[name] = f"{target} holds embeddings only"
    if adapter.patches:
        report.notes.append(f"{len(adapter.patches)} patches dropped: write them with a LoRA format")
    report.notes.extend(token_notes(emb.token))
    return emb


def _tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """ModelSpec ``hash_sha256``: sha256 of the tensor bytes after the header, ``0x``-prefixed.
    The data section does not depend on the metadata, so it can be computed before writing."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()})
    n = int.from_bytes(blob[:8], "little")
    return "0x" + hashlib.sha256(blob[8 + n :]).hexdigest()


def _metadata(
    adapter: Adapter,
    emb: Embedding,
    arch: str | None,
    layout: str,
    title: str | None,
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, str]:
    """ModelSpec 1.0.1 keys (shared with the LoRA writers via ``metadata.modelspec``), with the
    implementation of this layout and a fresh ``hash_sha256``."""
    from loradex.converters.metadata import modelspec

    t = title or adapter.metadata.get("modelspec.title") or emb.token
    view = Adapter(embeddings={emb.token: emb}, metadata=dict(adapter.metadata), arch=arch)
    meta = modelspec(view, t, suffix="textual-inversion")
    src_arch = adapter.metadata.get("modelspec.architecture", "")
    if arch is not None and src_arch.endswith("/textual-inversion"):
        from loradex.core.archs import get_arch

        fam = get_arch(arch).family
        if src_arch != meta["modelspec.architecture"] and fam.matches_metadata({"modelspec.architecture": src_arch}):
            meta["modelspec.architecture"] = src_arch  # keep the source's variant (SD2 512 / 768-v)
    meta["modelspec.implementation"] = IMPLEMENTATION[layout]
    meta["modelspec.title"] = t
    meta["modelspec.hash_sha256"] = _tensor_hash(tensors)
    return meta


def _write_pickle(obj: object, path: Path) -> None:
    """``torch.save`` into a temp file, then the atomic rename of ``safetensors_io.atomic_path``."""
    with sio.atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except Exception as e:
            raise FormatError(f"{path}: cannot write: {e}") from None


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A compact copy: ``torch.save`` writes a view's *whole* storage (a token's rows sliced out of
    the 49408-row embedding matrix would drag the whole matrix into the file)."""
    return t.detach().contiguous().clone()


class _TIConverter(Converter):
    kinds = frozenset()
    dora = False
    modules = False
    embeddings = True
    options = frozenset({"token"})

    def detect(self, path: Path) -> bool:
        """True when :func:`detect_embedding_format` names this layout: the keys (and their
        plausible ``[n <= 77, d]`` float shapes) of the safetensors header or of a small
        ``weights_only`` pickle; a pickle that needs code raises UnsafeFileError."""
        return detect_embedding_format(path) == self.name

    def read(self, path: Path, arch: str | None = None, token: str | None = None) -> Adapter:
        """:func:`read_embedding`: an Adapter with one embedding and no patches, whichever of the
        three layouts the file is. ``token`` overrides the file's own name for it."""
        return read_embedding(path, token=token, arch=arch)

    def _prepare(self, adapter: Adapter, path: Path, report: ConversionReport, token, dtype, arch):
        report.target = report.target or self.name
        emb = _pick(adapter, token, report)
        where = f"embedding {emb.token!r}"
        vectors = {c: cast(t, dtype) for c, t in check_vectors(emb.vectors, where).items()}
        emb = Embedding(emb.token, vectors)
        a = _resolve_arch(arch or adapter.arch, vectors, where)
        if set(vectors) not in ({"text_encoder"}, set(COMPONENT_KEYS)):
            raise ConversionError(f"{where}: components {sorted(vectors)} have no {self.name} layout")
        report.kept.append(f"embedding {emb.token}")
        return emb, a

    @staticmethod
    def _stem_note(path: Path, token: str, report: ConversionReport) -> None:
        if path.stem != token:
            report.notes.append(
                f"A1111, ComfyUI and kohya call this embedding {path.stem!r} (the file name), not {token!r}"
            )


@register_format
class A1111Embedding(_TIConverter):
    """AUTOMATIC1111's layout. ``.pt`` (default): the pickle A1111 itself saves, loadable with
    ``torch.load(weights_only=True)``; its ``name`` is the token (diffusers reads it), ``step`` and
    ``sd_checkpoint*`` come back from ``a1111.*`` metadata. ``.safetensors``: the flattened form
    ``{'string_to_param.*': tensor}`` with ModelSpec metadata. SDXL: ``{clip_l, clip_g}`` (A1111's
    only SDXL layout) in either container."""

    name = "a1111-ti"
    suffixes = (".pt", ".safetensors")
    priority = 50
    embedding_aliases = ("a1111",)
    description = "AUTOMATIC1111 textual inversion (.pt string_to_param, or .safetensors)"

    def write(self, adapter, path, report, dtype=None, title=None, token=None, arch=None, rank=None):
        """Write the one embedding ``token`` picks (or the only one; patches and other embeddings
        are reported as dropped). By the suffix of ``path``: ``.safetensors`` ->
        ``{'string_to_param.*': [n, d]}`` (SDXL ``{clip_l, clip_g}``) with ModelSpec metadata;
        anything else -> A1111's pickle ``{string_to_token: {'*': 265}, string_to_param: {'*': ...},
        name: token, step, sd_checkpoint, sd_checkpoint_name}`` (the last three from ``a1111.*``
        metadata; SDXL ``{clip_l, clip_g}``). ``rank`` is accepted and ignored."""
        path = Path(path)
        emb, a = self._prepare(adapter, path, report, token, dtype, arch)
        self._stem_note(path, emb.token, report)
        sdxl = "text_encoder_2" in emb.vectors
        if path.suffix.lower() == ".safetensors":
            if sdxl:
                out = {COMPONENT_KEYS[c]: t for c, t in emb.vectors.items()}
            else:
                out = {"string_to_param.*": emb.vectors["text_encoder"]}
            sio.save(out, path, _metadata(adapter, emb, a, self.name, title, out))
            return
        if sdxl:
            obj: dict[str, object] = {COMPONENT_KEYS[c]: _owned(t) for c, t in emb.vectors.items()}
            report.notes.append("SDXL: written as {clip_l, clip_g}, the layout A1111 reads for SDXL")
        else:
            m = adapter.metadata
            step = m.get("a1111.step")
            obj = {
                "string_to_token": {"*": A1111_STAR_TOKEN_ID},
                "string_to_param": {"*": _owned(emb.vectors["text_encoder"])},
                "name": emb.token,
                "step": int(step) if step is not None and step.lstrip("-").isdigit() else None,
                "sd_checkpoint": m.get("a1111.sd_checkpoint"),
                "sd_checkpoint_name": m.get("a1111.sd_checkpoint_name"),
            }
        _write_pickle(obj, path)


@register_format
class KohyaEmbedding(_TIConverter):
    """kohya sd-scripts' layout: ``{'emb_params': [n, d]}``, SDXL ``{'clip_l', 'clip_g'}``;
    safetensors with ModelSpec metadata (a ``.pt`` name gets the same dict pickled, as kohya does)."""

    name = "kohya-ti"
    suffixes = (".safetensors", ".pt")
    priority = 60
    description = "kohya sd-scripts textual inversion (emb_params; clip_l/clip_g for SDXL)"

    def write(self, adapter, path, report, dtype=None, title=None, token=None, arch=None, rank=None):
        """Write the one embedding ``token`` picks as ``{'emb_params': [n, d]}`` (SDXL
        ``{'clip_l': [n, 768], 'clip_g': [n, 1280]}``): safetensors with ModelSpec metadata for a
        ``.safetensors`` name, the same dict pickled otherwise. The token is not stored: kohya and
        A1111 use the file stem, and the report notes when the two differ. ``rank`` is ignored."""
        path = Path(path)
        emb, a = self._prepare(adapter, path, report, token, dtype, arch)
        self._stem_note(path, emb.token, report)
        if "text_encoder_2" in emb.vectors:
            out = {COMPONENT_KEYS[c]: t for c, t in emb.vectors.items()}
        else:
            out = {"emb_params": emb.vectors["text_encoder"]}
        if path.suffix.lower() == ".safetensors":
            sio.save(out, path, _metadata(adapter, emb, a, self.name, title, out))
        else:
            _write_pickle({k: _owned(v) for k, v in out.items()}, path)


@register_format
class DiffusersEmbedding(_TIConverter):
    """diffusers' ``learned_embeds``: ``{token: [n, d]}`` (pickle names, :data:`PICKLE_SUFFIXES`,
    get a pickle, anything else safetensors with ModelSpec metadata). SDXL, ``sdxl_layout``: ``"clip"`` (default) one file
    ``{clip_l, clip_g}``, loaded per encoder from the state dict; ``"split"`` the training script's
    pair ``<stem>`` (CLIP-L) + ``<stem>_2`` (bigG), each ``{token: tensor}`` and loadable by path
    (see the module docstring)."""

    name = "diffusers-ti"
    suffixes = (".safetensors", ".bin")
    priority = 70
    hidden_aliases = ("ti",)
    options = frozenset({"token", "sdxl_layout"})
    description = "diffusers learned_embeds {token: tensor} (SDXL: clip_l/clip_g, or a _2 file pair)"

    def write(
        self, adapter, path, report, dtype=None, title=None, token=None, arch=None, sdxl_layout="clip", rank=None
    ):
        """Write the one embedding ``token`` picks as ``{token: [n, d]}``: a pickle for a pickle
        name (``.bin``, ``.pt``, ``.pth``, ``.ckpt``: kohya sd-scripts, A1111 and ComfyUI
        ``torch.load`` every name but ``.safetensors``; diffusers reads either container under any
        name), safetensors with ModelSpec metadata otherwise. SDXL by ``sdxl_layout``: ``"clip"``
        one ``{clip_l, clip_g}`` file; ``"split"`` ``<stem>_2`` (bigG, written first so a reader that
        finds the first file finds its partner) then ``path`` (CLIP-L). ``rank`` is ignored."""
        path = Path(path)
        emb, a = self._prepare(adapter, path, report, token, dtype, arch)
        files: list[tuple[Path, dict[str, torch.Tensor]]] = []
        if "text_encoder_2" not in emb.vectors:
            files.append((path, {emb.token: emb.vectors["text_encoder"]}))
        elif sdxl_layout == "clip":
            files.append((path, {COMPONENT_KEYS[c]: t for c, t in emb.vectors.items()}))
            report.notes.append(
                "SDXL: diffusers loads clip_l and clip_g separately: load_textual_inversion(sd['clip_l'], "
                "token=..., text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer), then clip_g with "
                "text_encoder_2/tokenizer_2"
            )
        elif sdxl_layout == "split":
            # the second file first: whoever finds the first file finds its partner too
            files.append((_sibling_2(path), {emb.token: emb.vectors["text_encoder_2"]}))
            files.append((path, {emb.token: emb.vectors["text_encoder"]}))
            report.notes.append(f"SDXL: text_encoder_2 written to {_sibling_2(path).name}")
        else:
            raise ConversionError(f"sdxl_layout must be 'clip' or 'split', not {sdxl_layout!r}")
        for p, out in files:
            if p.suffix.lower() in PICKLE_SUFFIXES:
                _write_pickle({k: _owned(v) for k, v in out.items()}, p)
            else:
                sio.save(out, p, _metadata(adapter, emb, a, self.name, title, out))


CONVERTERS: tuple[type[_TIConverter], ...] = (A1111Embedding, KohyaEmbedding, DiffusersEmbedding)

__all__ = [
    "BUNDLE_PREFIX",
    "CLIP_KEYS",
    "CONVERTERS",
    "A1111Embedding",
    "DiffusersEmbedding",
    "KohyaEmbedding",
    "check_vectors",
    "detect_embedding_format",
    "guess_arch",
    "read_embedding",
    "token_notes",
]
