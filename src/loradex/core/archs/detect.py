"""Which base model an adapter file is for: from its metadata first, then its keys and shapes.

Clues, strongest first:

1. what the file says about its base: ``loradex.arch`` (+ ``loradex.arch_spec``, the descriptor of
   a derived arch, so files loradex wrote for a custom base resolve anywhere), ModelSpec
   ``modelspec.architecture`` (``stable-diffusion-xl-v1-base/lora``, ``tiny-sd1/lora``...) and
   kohya ``ss_base_model_version``; each is only taken when the file's tensors fit the arch;
2. archs derived or registered in this process (a ``--base`` the user named), when they explain
   every key;
3. the built-in sizes, narrowed by the families' key hints: every key is resolved against each
   candidate arch and every tensor's shape checked against its module — LoRA factors by rows and
   columns (cross-attention 768/1024/2048, text encoders 768/1024/1280), LoKr halves by their
   Kronecker product, and every other kind ((IA)^3, GLoRA, OFT, BOFT, norms, Tucker factors) by
   its own shape rules (``core.kinds``); the arch whose modules explain the most keys without
   contradiction wins, a tie is "unsure";
4. textual-inversion files by their widths (``emb_params``, ``clip_l``/``clip_g``,
   ``string_to_param.*``, diffusers ``{token: [n, d]}``).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from loradex.core.archs.arch import Arch, Part
from loradex.core.archs.family import families
from loradex.core.archs.lookup import (
    arch_from_descriptor,
    builtin_names,
    get_arch,
    registered_archs,
    tiny_names,
)
from loradex.core.kinds import factor_roles
from loradex.errors import ArchError, LoradexError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

_COMPONENT_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")
_TI_KEYS = ("emb_params", "clip_l", "clip_g")
#: metadata keys naming the arch loradex wrote a file for, and its descriptor (derived archs)
ARCH_KEY = "loradex.arch"
ARCH_SPEC_KEY = "loradex.arch_spec"


def _is_ti_key(key: str) -> bool:
    return key in _TI_KEYS or key.startswith(("string_to_param.", "bundle_emb."))


def _resolve_dotted(arch: Arch, comp: str, dotted: str, sgm: bool) -> tuple[list[Part], str] | None:
    """Longest module-name prefix of ``dotted`` (the rest is the tensor suffix)."""
    segs = dotted.split(".")
    c = arch._comp(comp)
    for i in range(len(segs) - 1, max(0, len(segs) - 5), -1):
        head, suffix = ".".join(segs[:i]), ".".join(segs[i:])
        if sgm:
            parts = c.native_parts.get(head)
            if parts is not None:
                return list(parts), suffix
        else:
            try:
                return [(arch.canonical(head, comp), None)], suffix
            except ArchError:
                continue
    return None


_OLD_ATTN_LORA = re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.")


def _old_diffusers_spelling(comp_kind: str | None, dotted: str) -> str:
    """Rewrite pre-peft diffusers LoRA names (``attn1.processor.to_q_lora.down.weight``) to module paths."""
    if "_lora." not in dotted and ".processor." not in dotted:
        return dotted
    dotted = dotted.replace(".processor.", ".")

    def sub(m: re.Match) -> str:
        which = m.group(1)
        if comp_kind == "clip":
            return ".out_proj.lora." if which == "to_out" else f".{which[-1]}_proj.lora."
        return ".to_out.0.lora." if which == "to_out" else f".{which}.lora."

    return _OLD_ATTN_LORA.sub(sub, dotted)


def _resolve_key(arch: Arch, key: str) -> tuple[list[Part], str] | None:
    """Which modules of ``arch`` a tensor key of any supported adapter format addresses."""
    comps = arch.components
    den = arch.family.denoiser if arch.family.denoiser in comps else None
    if key.startswith("lycoris_"):
        flat, _, suffix = key.partition(".")
        for comp in comps:
            try:
                return arch.resolve_flat(comp, flat[len("lycoris_") :]), suffix
            except ArchError:
                continue
        return None
    if key.startswith("lora_"):
        flat, _, suffix = key.partition(".")
        try:
            return arch.from_kohya(flat), suffix
        except ArchError:
            return None
    for p in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(p):
            return None if den is None else _resolve_dotted(arch, den, key[len(p) :], sgm=True)
    if key.startswith("text_encoders."):
        _, enc, rest = key.split(".", 2) if key.count(".") >= 2 else ("", "", "")
        target = arch.family.comfy_component(enc)
        if target is None or target not in comps:
            return None
        if rest.startswith("transformer."):
            rest = rest[len("transformer.") :]
        return _resolve_dotted(arch, target, rest, sgm=False)
    if key.startswith("base_model.model."):
        rest = key[len("base_model.model.") :]
        for comp in comps:
            got = _resolve_dotted(
                arch, comp, _old_diffusers_spelling(arch.component_kind(comp), rest), sgm=False
            )
            if got is not None:
                return got
        return None
    for p in _COMPONENT_PREFIXES:
        if key.startswith(p):
            comp = p[:-1]
            if comp not in comps:
                return None
            rest = _old_diffusers_spelling(arch.component_kind(comp), key[len(p) :])
            return _resolve_dotted(arch, comp, rest, sgm=False)
    return None


def _shape_verdict(arch: Arch, parts: list[Part], suffix: str, shape: tuple[int, ...]) -> int:
    """+1 when the tensor's shape fits the module, -1 when it cannot belong to it, 0 when unknown.
    Which axis holds the module's inputs or outputs is the kind's own fact (``Patch.FACTOR_ROLES``,
    other tools' spellings included: ``core.kinds.factor_roles``)."""
    role = factor_roles().get(suffix)
    if role is None:
        return 0
    info = arch.module(parts[0][0])
    if info.type not in ("linear", "conv") or not shape:
        return 0
    ranges = [r for _, r in parts if r is not None]
    out = max(r[1] for r in ranges) if ranges else info.out_features
    inn = info.in_features
    k = math.prod(info.kernel) if info.kernel else 1
    if role == "in":
        if len(shape) < 2:
            return -1
        ok = shape[1] == inn or math.prod(shape[1:]) in (inn, inn * k)
    elif role in ("out", "out*"):
        # "out*": the outputs may also be the second axis (LoHa's Tucker layout stores w_a as (r, out))
        ok = shape[0] == out or (role == "out*" and len(shape) == 2 and shape[1] == out)
    else:  # "full": a dense update shaped like the weight
        ok = shape[0] == out and math.prod(shape) == out * inn * k
    return 1 if ok else -1


def _kind_verdict(arch: Arch, parts: list[Part], tensors: Mapping[str, tuple[int, ...]]) -> int:
    """Whether a module's tensors of any kind fit its weight, by the kind's own shape rules
    (``core.kinds``): +1 fits, -1 cannot belong, 0 unknown. Tensors no kind owns are left out
    (readers report them; they are no evidence either way), so are modules whose tensors name no
    kind or several, and modules malformed whatever the weight (those fail without a weight shape
    too). See :func:`_kind_fits` for how the patch is built from shapes alone."""
    info = arch.module(parts[0][0])
    ranges = [r for _, r in parts if r is not None]
    shape = (max(r[1] for r in ranges), *info.shape[1:]) if ranges else tuple(info.shape)
    return _kind_fits(tuple(sorted((s, tuple(t)) for s, t in tensors.items())), shape)


@functools.lru_cache(maxsize=8192)
def _kind_fits(tensors: tuple[tuple[str, tuple[int, ...]], ...], weight_shape: tuple[int, ...]) -> int:
    """:func:`_kind_verdict` for a module's ``(suffix, shape)`` pairs and its weight shape. The
    patch is built from **tensor descriptions** of the stored shapes (``core.tensorspec``, meta-like,
    no torch; integer ones -- ``on_input``, the sparse residual's indices and size -- with an
    integer dtype; torch meta tensors where a kind asks more of them than a description tells),
    first without the weight shape (a FormatError there is the module's own fault: 0), then with it
    (a FormatError now is a real shape mismatch: -1). Kinds run their shape checks before anything
    that reads values and skip value checks on meta tensors; anything else a kind cannot do on them
    gives 0, never a false contradiction. Cached: the answer depends only on these shapes, and a
    file repeats a few module signatures many times over every candidate arch."""
    from loradex.core.kinds import INTEGER_SUFFIXES
    from loradex.core.tensorspec import NeedsTorch, TensorSpec

    try:
        return _patch_fits({s: TensorSpec(t, "int64" if s in INTEGER_SUFFIXES else "float32", meta=True)
                            for s, t in tensors}, weight_shape)
    except NeedsTorch:
        return _patch_fits({s: torch.empty(t, device="meta", dtype=torch.int64 if s in INTEGER_SUFFIXES else
                                           torch.float32) for s, t in tensors}, weight_shape)


def _patch_fits(sd: dict, weight_shape: tuple[int, ...]) -> int:
    """:func:`_kind_fits` on a module's suffix dictionary of meta tensors or meta-like descriptions."""
    from loradex.core.kinds import KINDS, split_kind
    from loradex.errors import FormatError

    try:
        kind, own, _ = split_kind(sd)
    except FormatError:
        return 0  # several kinds mixed in one module: malformed whatever the arch
    if kind is None:
        return 0
    cls = KINDS[kind]
    try:
        cls.from_tensors(own, None)
    except (LoradexError, RuntimeError, ValueError, TypeError, NotImplementedError, IndexError):
        return 0
    try:
        cls.from_tensors(own, weight_shape)
    except FormatError:
        return -1
    except (LoradexError, RuntimeError, ValueError, TypeError, NotImplementedError, IndexError):
        return 0
    return 1


def _score(arch: Arch, shapes: Mapping[str, tuple[int, ...]], keys: list[str]) -> tuple[int, int, int, int]:
    """(keys resolved, shape contradictions, shape confirmations, keys of uncontradicted modules).

    Scored per module: one tensor whose shape cannot belong to a module discredits all the keys of
    that module (its ``alpha`` included), so a wrong arch does not score on shape-less keys. A
    module none of whose tensors the factor roles can judge (LoKr halves, (IA)^3, OFT...) is judged by its kind."""
    per_mod: dict[tuple, list[int]] = {}
    tensors: dict[tuple, dict[str, tuple[int, ...]]] = {}
    for key in keys:
        got = _resolve_key(arch, key)
        if got is None:
            continue
        parts, suffix = got
        mod = tuple(parts)
        rec = per_mod.setdefault(mod, [0, 0, 0])
        rec[0] += 1
        tensors.setdefault(mod, {})[suffix] = tuple(shapes[key])
    for mod, ts in tensors.items():
        rec = per_mod[mod]
        verdicts = [_shape_verdict(arch, list(mod), s, t) for s, t in ts.items()]
        if not any(verdicts):
            verdicts = [_kind_verdict(arch, list(mod), ts)]
        rec[1] += sum(1 for v in verdicts if v < 0)
        rec[2] += sum(1 for v in verdicts if v > 0)
    matched = sum(r[0] for r in per_mod.values())
    contra = sum(r[1] for r in per_mod.values())
    confirm = sum(r[2] for r in per_mod.values() if r[1] == 0)
    ok = sum(r[0] for r in per_mod.values() if r[1] == 0)
    return matched, contra, confirm, ok


def _ti_widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Text-encoder widths named by a textual-inversion file: {"clip_l": 768, "clip_g": 1280} / {"te": d}."""
    out: dict[str, int] = {}
    for k, s in shapes.items():
        if not s:
            continue
        leaf = k.rsplit(".", 1)[-1] if k.startswith("bundle_emb.") else k
        if leaf in ("clip_l", "clip_g"):
            out[leaf] = s[-1]
        elif k == "emb_params" or "string_to_param" in k:
            out["te"] = s[-1]
    return out


def _ti_candidates(n_encoders: int) -> list[Arch]:
    """Registered archs, then built-in and embedded ones of families with that many text encoders
    (no other family's tables are built)."""
    out = list(registered_archs())
    for name in (*builtin_names(), *tiny_names()):
        a = get_arch(name)
        if len(a.family.text_encoders) == n_encoders:
            out.append(a)
    return out


def _embedding_fits(a: Arch, widths: Mapping[str, int]) -> bool:
    return (set(widths) <= set(a.components) and len(a.text_encoders) == len(widths)
            and all(a.component_kind(c) == "clip" and a.text_encoder_width(c) == w for c, w in widths.items()))


def match_embedding(widths: Mapping[str, int], metadata: Mapping[str, str] | None = None) -> str | None:
    """The arch a textual-inversion embedding is for, from its widths per text encoder
    (``{"text_encoder": 768}``, SDXL ``{"text_encoder": 768, "text_encoder_2": 1280}``): archs its
    metadata names first, then the registered, built-in and embedded ones with exactly these CLIP
    encoders (the first that fits: SD1 for 768, SD2 for 1024)."""
    if not widths:
        return None
    for a in [*archs_named_by(metadata), *_ti_candidates(len(widths))]:
        try:
            if _embedding_fits(a, widths):
                return a.name
        except ArchError:
            continue
    return None


def _file_widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Widths per component of a TI file's keys (``clip_l``/``clip_g`` or one set of vectors);
    a diffusers ``{token: [n, d]}`` file (any key names) counts as one set."""
    w = _ti_widths(shapes)
    if "clip_l" in w or "clip_g" in w:
        keyed = {c.ti_key: c.name for fam in families().values() for c in fam.components if c.ti_key}
        return {keyed[k]: v for k, v in w.items() if k in keyed}
    if "te" in w:
        return {"text_encoder": w["te"]}
    if shapes and all(len(s) in (1, 2) for s in shapes.values()):
        d = {s[-1] for s in shapes.values() if s}
        if len(d) == 1:
            return {"text_encoder": d.pop()}
    return {}


def _fits(a: Arch, shapes: Mapping[str, tuple[int, ...]], module_keys: list[str]) -> bool:
    """Every module key resolves in ``a`` with no contradicting shape (textual inversion: the
    widths fit)."""
    if module_keys:
        matched, contra, _, _ = _score(a, shapes, module_keys)
        return matched == len(module_keys) and contra == 0
    widths = _file_widths(shapes)
    return bool(widths) and _embedding_fits(a, widths)


def archs_named_by(metadata: Mapping[str, str] | None) -> list[Arch]:
    """The archs a file's metadata names, most specific first: loradex's own record (with the
    descriptor of a derived arch), a ModelSpec architecture that is an arch name (``tiny-sd1/lora``),
    then the built-in sizes of the families whose ModelSpec id or kohya base version it carries."""
    if not metadata:
        return []
    out: list[Arch] = []
    name = str(metadata.get(ARCH_KEY, "") or "")
    spec = metadata.get(ARCH_SPEC_KEY)
    if spec:
        try:
            out.append(arch_from_descriptor(json.loads(spec), name=name or None))
        except (ValueError, LoradexError):
            pass
    for cand in (name, str(metadata.get("modelspec.architecture", "")).split("/", 1)[0]):
        if cand:
            try:
                out.append(get_arch(cand))
            except ArchError:
                pass
    for fam in families().values():
        if fam.matches_metadata(metadata):
            # the size the metadata names first (an SD3.5 Medium file touching only modules SD3
            # Medium shares stays SD3.5 Medium), then the family's other sizes
            sizes = [get_arch(n) for n in fam.builtins]
            spec = str(metadata.get("modelspec.architecture", "")).split("/", 1)[0]
            ver = str(metadata.get("ss_base_model_version", ""))
            sizes.sort(key=lambda a, f=fam: not (f.modelspec_id(a) == spec or (ver and f.kohya_base_version(a) == ver)))
            out.extend(sizes)
    seen: set[str] = set()
    return [a for a in out if not (a.name in seen or seen.add(a.name))]


def detect_arch(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> str | None:
    """Name the arch an adapter file is for; None when unsure (see the module docstring).

    Reads every supported naming: kohya (``lora_unet_``, ``lora_te``/``te1``/``te2``/``te3``, native
    SGM/BFL/MMDiT names), lycoris' ``lycoris_``, diffusers (``unet.``, ``text_encoder.``,
    ``transformer.``), peft (``base_model.model.``), ComfyUI (``diffusion_model.``,
    ``text_encoders.clip_l.``), and textual-inversion files.
    """
    keys = [k for k in shapes if k != "__metadata__"]
    if not keys:
        return None
    module_keys = [k for k in keys if not _is_ti_key(k)]

    for a in archs_named_by(metadata):
        try:
            if _fits(a, shapes, module_keys):
                return a.name
        except ArchError:
            continue

    if not module_keys:
        return match_embedding(_file_widths(shapes))

    # Archs derived or registered in this process first: one that explains every key, with shapes
    # that confirm it.
    customs = registered_archs()
    perfect = []
    for a in customs:
        matched, contra, confirm, _ = _score(a, shapes, module_keys)
        if matched == len(module_keys) and contra == 0 and confirm > 0:
            perfect.append(a.name)
    if len(perfect) == 1:
        return perfect[0]
    if len(perfect) > 1:
        return None  # several archs share these modules (e.g. the same tiny CLIP)

    text = " ".join(module_keys)
    hinted = [fam for fam in families().values() if any(h in text for h in fam.key_hints)]
    names = [n for fam in (hinted or families().values()) for n in fam.builtins]
    names += [n for n in tiny_names() if n not in {a.name for a in customs}]
    scored = sorted(
        ((_score(a, shapes, module_keys)[3], -i, a.name) for i, a in enumerate([get_arch(n) for n in names] + customs)),
        reverse=True,
    )
    top = scored[0][0] if scored else 0
    if top > 0:
        if top * 2 < len(module_keys):
            return None  # most keys are not modules of any arch we know
        ties = [s for s in scored if s[0] == top]
        if len(ties) > 1:
            a0 = get_arch(ties[0][2])
            # sizes of one family with the same modules for these keys (SD3 / SD3.5 Medium): the
            # family's first built-in reads and writes them alike
            if not all(get_arch(t[2]).family is a0.family and t[2] in a0.family.builtins for t in ties):
                return None  # a tie: the keys fit several archs equally well
        return scored[0][2]
    # No key is a module anywhere: maybe a diffusers TI file {token: [n, d]} (any key names).
    return match_embedding(_file_widths({k: shapes[k] for k in keys}))
