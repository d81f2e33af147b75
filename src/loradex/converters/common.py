"""Shared pieces of the converters: suffix tables, key grouping, the converter interface, the
kind-fitting step every writer runs (a target that cannot hold a kind gets the exact LoRA form,
else a truncated SVD at the requested rank, and the report says which modules were exact), and
the bookkeeping of source keys nothing explains (``Adapter.unexplained``: every reader names each
such key with its reason instead of dropping it, the way ComfyUI logs ``lora key not loaded``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from loradex.core.adapter import Adapter
from loradex.core.kinds import kind_suffixes
from loradex.core.kinds.base import Patch, scalar
from loradex.errors import ArchError, ConversionError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

#: PEFT / diffusers LoRA suffixes -> the kohya/LyCORIS suffix of the same tensor.
PEFT_TO_LYCORIS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_B.bias": "lora_B.bias",
    "lora_magnitude_vector": "dora_scale",
    "alpha": "alpha",
}
PEFT_SUFFIXES = tuple(sorted(PEFT_TO_LYCORIS, key=len, reverse=True))


def adapter_suffixes() -> tuple[str, ...]:
    """Every tensor suffix an adapter module may have in any format: the kinds' own (derived from
    the kind registry, ``core.kinds.kind_suffixes``) and the PEFT/diffusers spellings, longest
    first so that ``split_key`` picks ``lora_down.weight`` before ``weight``."""
    return tuple(sorted(set(kind_suffixes()) | set(PEFT_TO_LYCORIS), key=lambda x: (-len(x), x)))


def split_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``'a.b.lora_A.weight'`` -> ``('a.b', 'lora_A.weight')``; None when no suffix matches."""
    for s in suffixes:
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return None


def group_by_module(
    keys: list[str], suffixes: tuple[str, ...], flat: bool = False
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group file keys by module: ``{module: {suffix: key}}`` and the keys that fit nothing.

    ``flat``: kohya-style names that contain no dot, so the split is at the first ``.``."""
    groups: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for k in keys:
        if flat:
            mod, _, suf = k.partition(".")
            ok = suf in suffixes
        else:
            sp = split_key(k, suffixes)
            ok = sp is not None
            mod, suf = sp if sp else ("", "")
        if ok:
            groups.setdefault(mod, {})[suf] = k
        else:
            rest.append(k)
    return groups, rest


@dataclass
class ConversionReport:
    """What a write did to each module: kept as is, converted exactly, approximated (with the
    relative Frobenius error of the dense update), or dropped (with the reason)."""

    target: str = ""
    kept: list[str] = field(default_factory=list)
    exact: dict[str, str] = field(default_factory=dict)  # module -> "loha->lora r=16"
    approximated: dict[str, float] = field(default_factory=dict)  # module -> rel. error
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: keys of the *source* file that no patch kind, module or embedding explained (key -> reason):
    #: they were never read, so nothing of them is in the output (``loradex.convert`` fills it)
    unexplained: dict[str, str] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest relative Frobenius error ``||dW - dW'|| / ||dW||`` among the approximated
        modules; 0.0 when every module was kept or converted exactly."""
        return max(self.approximated.values(), default=0.0)

    def to_dict(self) -> dict:
        """The report as JSON-ready data (``--json``). ``kept`` is a count, not the module list;
        ``exact``/``approximated``/``dropped``/``unexplained`` stay keyed by module or key."""
        return {
            "target": self.target,
            "kept": len(self.kept),
            "exact": self.exact,
            "approximated": self.approximated,
            "max_error": self.max_error,
            "dropped": self.dropped,
            "unexplained": dict(self.unexplained),
            "notes": self.notes,
        }

    def summary(self) -> str:
        """One line for the CLI: ``"12 modules kept as is, 4 converted exactly, ..."``; the parts
        with nothing in them are left out (the kept count always shows)."""
        parts = [f"{len(self.kept)} modules kept as is"]
        if self.exact:
            parts.append(f"{len(self.exact)} converted exactly")
        if self.approximated:
            parts.append(f"{len(self.approximated)} approximated by SVD (max rel. error {self.max_error:.3g})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped")
        if self.unexplained:
            parts.append(f"{len(self.unexplained)} source keys not understood (left out)")
        return ", ".join(parts)


def describe_unexplained(unexplained: dict[str, str], first: int = 3) -> str:
    """``"N keys: k1 (why); k2 (why); k3 (why); ..."`` -- the count and the first keys of an
    ``Adapter.unexplained`` map, for one-line errors (``strict``) and summaries."""
    items = list(unexplained.items())
    shown = "; ".join(f"{k} ({why})" for k, why in items[:first])
    more = f"; ... and {len(items) - first} more" if len(items) > first else ""
    return f"{len(items)} key{'s' if len(items) != 1 else ''}: {shown}{more}"


def check_strict(adapter: Adapter, path) -> Adapter:
    """FormatError when ``adapter`` has keys nothing explains (the ``strict`` option of
    ``converters.read`` / ``loradex.load`` / ``loradex.convert``); the adapter otherwise."""
    if adapter.unexplained:
        raise FormatError(
            f"{path}: {describe_unexplained(adapter.unexplained)} (strict: no key may go unread; "
            "read without strict to keep the rest and get the full list in the report)"
        )
    return adapter


def live_path(canonical: str, arch=None) -> str:
    """The module path (component removed) as the live transformers 5 model names it: a
    ``CLIPTextModel`` has no ``text_model`` level, a ``CLIPTextModelWithProjection`` keeps it
    (SDXL's ``text_encoder_2``, both of SD3's CLIPs). The arch's config says which class a component
    is; without configs, the ``text_encoder`` of SD1/SD2/SDXL/FLUX is a ``CLIPTextModel``. Used where
    a format is loaded by matching module names of the live model (PEFT folders, the lycoris_ wrapper)."""
    comp, _, path = canonical.partition(".")
    if not path.startswith("text_model."):
        return path
    cfg = (getattr(arch, "configs", None) or {}).get(comp)
    if cfg is not None:
        from loradex.core.archs.tables import class_name

        plain = class_name(cfg) == "CLIPTextModel"
    else:
        plain = comp == "text_encoder"
    return path[len("text_model.") :] if plain else path


def fit_kinds(
    adapter: Adapter,
    allowed: frozenset[str] | None,
    rank: int | None,
    report: ConversionReport,
    dora_ok: bool | str = True,
    tucker_ok: bool = True,
    residual_ok: bool = True,
) -> Adapter:
    """Return an adapter whose patches are all of an ``allowed`` kind.

    Patches of other kinds become plain LoRA: exactly where the algebra allows (LoHa, LoKr, Tucker
    LoRA), otherwise by SVD at ``rank`` (error reported). Kinds whose update depends on the base
    weight ((IA)^3, GLoRA, OFT, BOFT) cannot be converted without it: they are an error unless
    the target holds them. DoRA on an additive kind (LoHa, LoKr, Tucker or sparse-residual LoRA)
    in a target that holds LoRA + DoRA becomes the exact LoRA of its update with the *same*
    magnitude (see :func:`_dora_exact_lora`): DoRA normalises ``V = W + dW``, and the exact LoRA
    form leaves ``dW``, hence ``V``, unchanged.

    A LoRA carrying LyCORIS' sparse weight residual (``bias_*``) in a target without one
    (``residual_ok=False``: diffusers/PEFT ``lora_A``/``lora_B`` have no sparse term, and their
    ``lora_B.bias`` is a bias change, not a weight residual) is folded into the factors exactly
    (``LoraPatch.to_lora``: the rank grows by the residual's non-zero rows or columns); with
    ``rank`` below that exact rank, the optimal truncation of the exact factors, error reported."""
    if allowed is None:
        report.kept.extend(adapter.patches)
        return adapter
    out: dict[str, Patch] = {}
    for name, p in adapter.patches.items():
        has_dora = getattr(p, "dora_scale", None) is not None
        tucker = getattr(p, "mid", None) is not None or getattr(p, "hada_t1", None) is not None
        residual = getattr(p, "has_residual", False)
        # PEFT-family targets hold DoRA only as one magnitude per output row (lycoris' default)
        dora_fits = dora_ok is True or (dora_ok == "row" and getattr(p, "dora_on_output", False))
        if (p.kind in allowed and (dora_fits or not has_dora) and (tucker_ok or not tucker)
                and (residual_ok or not residual)):
            out[name] = p
            report.kept.append(name)
            continue
        if "lora" not in allowed:
            raise ConversionError(f"{report.target} cannot hold {p.kind} patches ({name})")
        if has_dora and type(p).exact_lora and dora_ok and not p.always_needs_base:
            out[name] = _dora_exact_lora(name, p, dora_ok, rank, report)
            continue
        if p.needs_base:
            what = "DoRA" if has_dora else p.kind
            raise ConversionError(
                f"{name}: a {what} patch depends on the base weights and {report.target} cannot hold it; "
                "bake it into the base model instead, or convert to kohya/lycoris"
            )
        if residual:
            try:
                lora, err = p.to_lora(rank)
            except ValueError as e:  # DoRA on top: the fold needs the base weight
                raise ConversionError(f"{name}: {report.target} cannot hold this patch's sparse residual ({e})") from None
            out[name] = lora
            nnz = int(p.residual_values.numel())
            if err == 0.0:
                report.exact[name] = (f"lora+sparse residual ({nnz} entries)->lora r={lora.rank} "
                                      f"(was r={p.rank}; --rank N truncates)")
            else:
                report.approximated[name] = err
            continue
        try:
            try:  # the exact form first (LoHa -> r1*r2, LoKr -> rank product, Tucker folded)
                lora, err = p.to_lora()
            except ValueError:
                lora, err = p.to_lora(rank)
        except ValueError as e:
            raise ConversionError(
                f"{name}: {report.target} cannot hold a {p.kind} patch and it has no exact LoRA form; "
                f"pass --rank N for an SVD approximation ({e})"
            ) from None
        out[name] = lora
        if err == 0.0:
            report.exact[name] = f"{p.kind}->lora r={lora.rank}"
        else:
            report.approximated[name] = err
    return Adapter(out, dict(adapter.embeddings), dict(adapter.metadata), adapter.arch, adapter.source_format,
                   list(adapter.notes), dict(adapter.unexplained))


def _dora_exact_lora(name: str, p: Patch, dora_ok: bool | str, rank: int | None, report: ConversionReport) -> Patch:
    """A DoRA patch of an additive kind as an exact LoRA carrying the same ``dora_scale``.

    DoRA (lycoris-lora 4.1.3 ``weight_decompose``, PEFT 0.21 ``DoraLinearLayer``, see
    ``core/kinds/dora.py``) computes ``W' = s * V / ||V||`` with ``V = W + dW``: the magnitude ``s``
    multiplies whatever ``dW`` is, so re-expressing a LoHa's ``(w1a@w1b)*(w2a@w2b)`` (or a LoKr's
    Kronecker product, a Tucker core, a sparse residual) as the exact factors ``up @ down`` of the
    same ``dW`` changes nothing in ``V`` and the result is exact for every base weight. At
    multiplier 1 lycoris, PEFT/diffusers and ComfyUI agree (up to lycoris' eps in the norm).

    ``dora_ok == "row"`` (diffusers/PEFT: ``lora_magnitude_vector`` is one magnitude per output
    row): a per-input-column ``dora_scale`` (lycoris ``wd_on_output=False``) has no such form and
    is refused, naming why. The DoRA module keeps its exact rank: truncating ``dW`` at ``--rank``
    would change ``V`` and so the norm, by an amount only the base weight can tell."""
    if dora_ok == "row" and not getattr(p, "dora_on_output", False):
        raise ConversionError(
            f"{name}: its dora_scale holds one magnitude per input column (lycoris wd_on_output=False) and "
            f"{report.target} holds DoRA only as one magnitude per output row (PEFT's lora_magnitude_vector); "
            "re-expressing it needs the base weights: convert to kohya/lycoris or bake it into the base model"
        )
    plain = replace(p, dora_scale=None)
    lora, err = plain.to_lora()
    if err:  # pragma: no cover - to_lora() without a rank is exact for every additive kind
        raise ConversionError(f"{name}: no exact LoRA form for this {p.kind} + DoRA patch")
    lora = replace(lora, dora_scale=p.dora_scale)
    if rank is not None and rank < lora.rank:
        report.notes.append(f"{name}: DoRA module kept at its exact rank {lora.rank} (--rank {rank} would change "
                            "the DoRA norm by an amount only the base weight tells)")
    report.exact[name] = f"{p.kind}+dora->lora+dora r={lora.rank} (same magnitude: W + dW unchanged)"
    return lora


def dora_all_or_none(patches: dict[str, Patch], component: str, target: str) -> bool:
    """PEFT's ``use_dora`` is one flag per config: DoRA on every module of a component, or on none.
    A module without DoRA next to DoRA ones would need ``||W + dW||`` as its magnitude: the base."""
    flags = {getattr(p, "dora_scale", None) is not None for p in patches.values()}
    if flags == {True, False}:
        raise ConversionError(
            f"{target}: {component} mixes DoRA and plain modules, which one PEFT config cannot hold; "
            "convert to kohya/lycoris or bake it into the base model"
        )
    return flags == {True}


#: Writer options every format takes (``title`` goes where the format has a metadata field for it
#: and nowhere else: PEFT folders have none).
COMMON_OPTIONS = frozenset({"dtype", "rank", "arch", "title"})


class Converter:
    """One on-disk format. ``detect`` must be cheap (header only); ``read`` builds an Adapter;
    ``write`` runs ``fit_kinds`` for ``kinds`` then serializes atomically.

    A format is one module in ``converters/`` whose class is decorated with :func:`register_format`;
    everything the rest of loradex knows about formats (detection order, ``--to`` names and their
    help text, which formats hold LoRA modules or embeddings, the options each writer takes) is
    read from these class attributes, never listed again elsewhere."""

    name: ClassVar[str] = "?"
    #: Detection order: ``detect(path)`` asks the formats from the lowest priority up, so a format
    #: whose keys are a special case of another's (PEFT folders before diffusers) asks first.
    priority: ClassVar[int] = 50
    #: Other ``--to`` names for this writer (``a1111``/``comfy`` write kohya keys, which both load).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: Accepted ``--to`` names that are not listed in help texts (spellings people type).
    hidden_aliases: ClassVar[tuple[str, ...]] = ()
    #: Names that mean this format when the adapter holds only embeddings (``a1111`` -> ``.pt`` TI).
    embedding_aliases: ClassVar[tuple[str, ...]] = ()
    #: Kinds the format can hold; None = every kind.
    kinds: ClassVar[frozenset[str] | None] = None
    #: Does the format hold DoRA's magnitude vector? (``"row"``: one magnitude per output row only)
    dora: ClassVar[bool | str] = True
    #: Does it hold a LoRA's Tucker core (``lora_mid``)?
    tucker: ClassVar[bool] = True
    #: Does it hold textual-inversion embeddings (kohya's ``bundle_emb``, the TI formats)?
    embeddings: ClassVar[bool] = False
    #: Does it hold adapter modules? (False: embeddings only.)
    modules: ClassVar[bool] = True
    #: Can loradex write it? (A read-only format's name may still be a writer's alias.)
    writes: ClassVar[bool] = True
    #: Writes a folder rather than one file.
    folder: ClassVar[bool] = False
    #: File name endings the writer produces (the first is added to a name without one); ``-o`` with
    #: another weights ending is refused by the CLI (safetensors bytes under a ``.ckpt`` name).
    suffixes: ClassVar[tuple[str, ...]] = (".safetensors",)
    #: Writer options beyond :data:`COMMON_OPTIONS`; anything else is a ConversionError.
    options: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    def detect(self, path: Path) -> bool:  # pragma: no cover - interface
        """Whether ``path`` holds this format, from the header (or a folder's listing) only, never
        the tensors. A file of another format is False. A FormatError (a broken file) stops
        ``converters.detect`` unless the file looks like a pickle (the next format is then asked);
        an UnsafeFileError always does. Folders are only shown to formats with ``folder = True``."""
        raise NotImplementedError

    def read(self, path: Path, arch: str | None = None) -> Adapter:  # pragma: no cover - interface
        """Load ``path`` as an :class:`Adapter` with canonical module names. ``arch`` (a family name
        or an Arch) overrides detection from metadata, keys and shapes. Keys no patch kind,
        module or embedding explains go to ``Adapter.unexplained`` with their reason, not dropped."""
        raise NotImplementedError

    def write(self, adapter: Adapter, path: Path, report: ConversionReport, **options) -> None:  # pragma: no cover
        """Write ``adapter`` to ``path`` atomically, first fitting it to what the format holds
        (module formats: :func:`fit_kinds`; embedding formats: the one embedding), recording in
        ``report`` what was kept, converted exactly, approximated or dropped.

        ``options``: :data:`COMMON_OPTIONS` (``dtype`` already a ``torch.dtype`` or None, ``rank``,
        ``arch``, ``title``) plus the format's :attr:`options`; ``converters.write`` refuses any
        other option (ConversionError) before calling this."""
        raise NotImplementedError


#: format name -> converter instance, filled by :func:`register_format` as each format's module is
#: imported (``converters/__init__.py`` imports the built-in ones).
FORMATS: dict[str, Converter] = {}


def register_format(cls: type[Converter]) -> type[Converter]:
    """Class decorator: make ``cls`` (a :class:`Converter`) a format ``detect`` asks, ``read`` and
    ``write`` dispatch to and ``--to`` accepts. A new format is one file with this decorator plus
    its module name in ``converters.BUILTIN`` (or an import of the file). Registering a name again
    replaces the format."""
    if not cls.name or cls.name == "?":
        raise ValueError(f"{cls.__name__}: a format needs a name (class attribute 'name')")
    FORMATS[cls.name] = cls()
    return cls


def unregister_format(name: str) -> None:
    """Remove a format (tests that register a toy format clean up with this)."""
    FORMATS.pop(name, None)


@dataclass
class PeftPatterns:
    """The rank/alpha part of a PEFT config (diffusers' ``lora_adapter_metadata`` is one too):
    the most common rank and alpha as ``r``/``lora_alpha``, and a pattern for every module that
    differs. PEFT's scale is ``alpha / r`` with r read from the tensors' shapes, so only alpha
    must be exact per module; ``rank_pattern`` is written so PEFT builds layers of the right size."""

    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    targets: list[str]


def peft_patterns(patches: dict[str, Patch], target: Callable[[str], str], pattern: Callable[[str], str]
                  ) -> PeftPatterns:
    """``target(name)`` is the module's ``target_modules`` entry, ``pattern(target)`` the regex PEFT
    matches it with (diffusers: a suffix at a ``.`` boundary; PEFT folders anchor with ``^``).
    Missing or zero alpha means alpha = rank (kohya's convention, which PEFT scale 1 matches)."""
    ranks = {n: p.rank for n, p in patches.items()}
    alphas = {n: scalar(getattr(p, "alpha", None)) or float(p.rank) for n, p in patches.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    out = PeftPatterns(r0, a0, {}, {}, [])
    for n in patches:
        key = target(n)
        out.targets.append(key)
        if ranks[n] != r0:
            out.rank_pattern[pattern(key)] = ranks[n]
        if alphas[n] != a0:
            out.alpha_pattern[pattern(key)] = alphas[n]
    out.targets.sort()
    return out


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` (None: unchanged). Only floating tensors are cast: integer/bool ones
    (step counters, masks) keep their dtype; ``t`` itself is returned when nothing changes."""
    return t if dtype is None or not t.is_floating_point() or t.dtype == dtype else t.to(dtype)


def require(cond: bool, msg: str) -> None:
    """Raise FormatError(``msg``) unless ``cond``: the readers' check of a malformed file."""
    if not cond:
        raise FormatError(msg)


def resolve_arch(arch, shapes: dict[str, tuple[int, ...]], required: bool, path: Path,
                 metadata: dict[str, str] | None = None):
    """``arch`` (a name, an Arch, or None to detect from the file's metadata, keys and shapes) -> Arch
    (None when it cannot be told and ``required`` is false)."""
    from loradex.core.archs import Arch, detect_arch, get_arch

    if isinstance(arch, Arch):
        return arch
    if arch is None:
        arch = detect_arch(shapes, metadata)
        if arch is None:
            if required:
                raise ArchError(f"{path}: {UNKNOWN_BASE}")
            return None
    return get_arch(arch)


#: The one message for an adapter whose base model cannot be told.
UNKNOWN_BASE = ("cannot tell which base model this is for; name it with --base (a diffusers folder, a "
                "checkpoint, a registry REF or a Hub id) or --arch (sd1, sd2, sdxl, flux1, sd3, tiny, ...)")


def conform(patch: Patch, shape: tuple[int, ...] | None) -> Patch:
    """Make LoRA factors match the module's weight rank: a LoRA on a 1x1 conv must be 4-D (diffusers
    rejects 2-D factors there), one on a Linear 2-D. SD2's proj_in/proj_out are Linear in diffusers
    but 1x1 convs in some tools' files, so both spellings occur in the wild."""
    from loradex.core.kinds.lora import LoraPatch

    if shape is None or not isinstance(patch, LoraPatch) or patch.mid is not None:
        return patch
    # dataclasses.replace keeps every other field (bias, DoRA, the sparse residual, whose
    # (out, in*kh*kw) size is the same for both spellings)
    if len(shape) == 4 and patch.down.ndim == 2 and tuple(shape[2:]) == (1, 1):
        return replace(patch, up=patch.up[:, :, None, None], down=patch.down[:, :, None, None])
    if len(shape) == 2 and patch.down.ndim == 4 and tuple(patch.down.shape[2:]) == (1, 1):
        return replace(patch, up=patch.up.flatten(1), down=patch.down.flatten(1))
    return patch
