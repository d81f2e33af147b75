"""``Arch``: one size of one model family — its module tables and the name maps between tools.

Adapter files name the modules they patch in at least five spellings, and two of them cannot be
parsed without knowing the model:

* kohya / A1111 / ComfyUI flatten the module path with ``_`` (``lora_unet_down_blocks_0_...``), and
  module names themselves contain ``_`` (``to_q``, ``transformer_blocks``), so the flat name can only
  be un-flattened by looking it up in the model's module list;
* some families' kohya files use the layout of the model's original code (SDXL: SGM
  ``input_blocks.4.1``; FLUX: BFL ``double_blocks.0.img_attn.qkv``; SD3: MMDiT
  ``joint_blocks.0.x_block.attn.qkv``), where one fused Linear holds what diffusers splits.

An ``Arch`` holds the tables (built per component on first use, from configs on the meta device or
from live models) and the maps canonical <-> kohya <-> native. The family (``arch.family``) supplies
the native naming and every other per-family fact.

Fused and permuted rows
-----------------------
``from_kohya``/``from_sgm``/``kohya_fusions`` return ``(canonical, (start, stop))`` parts: rows
``start:stop`` of the stored (fused) weight belong to ``canonical``; a canonical module's rows are the
concatenation, *in list order*, of the row slices listed for it. A canonical may appear more than once:
that is a row permutation (FLUX ``final_layer.adaLN_modulation.1`` -> ``[(norm_out.linear, (D, 2D)),
(norm_out.linear, (0, D))]``). ``Arch.split_rows`` / ``Arch.fuse_rows`` implement exactly this
convention; use them rather than slicing by hand.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from loradex.core.archs.family import Family, get_family
from loradex.core.archs.tables import ModuleInfo, Table, text_kind
from loradex.errors import ArchError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

Part = tuple[str, "tuple[int, int] | None"]
#: A component's table source: returns ``(kind, table)``; kind is ``clip`` | ``t5`` | ``other``.
Loader = Callable[[], "tuple[str, Table]"]


class _Component:
    """One component's table and name maps, built on first use (thread-safe)."""

    def __init__(self, arch: Arch, name: str, loader: Loader):
        self.arch = arch
        self.name = name
        self._loader = loader
        self._lock = threading.Lock()
        self.kind: str | None = None
        self.table: Table | None = None
        # native = SGM (unet) / BFL (flux) / MMDiT (sd3): canonical -> native path; native path -> parts
        self.native: dict[str, str] = {}
        self.native_parts: dict[str, list[Part]] = {}
        self.kohya_path: dict[str, str] = {}  # canonical -> path kohya flattens (no component)
        self.flat: dict[str, list[Part]] = {}  # flat (no prefix) -> parts, native + alternates
        self.flat_lower: dict[str, list[Part]] = {}

    def ensure(self) -> _Component:
        if self.table is None:
            with self._lock:
                if self.table is None:
                    kind, table = self._loader()
                    self._index(kind, table)
                    self.kind, self.table = kind, table
        return self

    def _index(self, kind: str, table: Table) -> None:
        pre = self.name + "."
        paths = {n: n[len(pre) :] for n in table}
        family = self.arch.family
        self.native, self.native_parts = family.native_names(self.name, table)
        use_native = family.kohya_native and bool(self.native)
        flat: dict[str, list[Part]] = {}
        for n, p in paths.items():
            kp = self.native.get(n, p) if use_native else p
            self.kohya_path[n] = kp
            f = kp.replace(".", "_")
            if f not in flat:
                flat[f] = self.native_parts[kp] if use_native and kp in self.native_parts else [(n, None)]
        # Alternate spellings, accepted on reading only (never shadow a native name):
        for n, p in paths.items():
            flat.setdefault(p.replace(".", "_"), [(n, None)])  # diffusers path (lycoris, OneTrainer, ...)
            if kind == "clip" and p.startswith("text_model."):
                flat.setdefault(p[len("text_model.") :].replace(".", "_"), [(n, None)])  # transformers 5
        if not use_native:
            for nat, parts in self.native_parts.items():
                flat.setdefault(nat.replace(".", "_"), parts)  # e.g. SGM-named SD1 files
        self.flat = flat
        lower: dict[str, list[Part]] = {}
        for f, parts in flat.items():
            lower.setdefault(f.lower(), parts)
        self.flat_lower = lower


class Arch:
    """The modules of one model (a family at one size) and the name maps between tools.

    Build archs with :func:`get_arch` (built-in, embedded tiny, or derived names),
    :func:`arch_from_configs` or :func:`arch_from_models` rather than by hand. ``components`` maps
    each component to a loader returning ``(kind, table)``; ``configs`` (component -> config dict),
    when given, make the arch rebuildable anywhere (``descriptor``). ``kohya_prefixes`` defaults to
    the family's.
    """

    def __init__(
        self,
        name: str,
        family: Family | str,
        components: Mapping[str, Loader],
        kohya_prefixes: Mapping[str, str] | None = None,
        configs: Mapping[str, Mapping] | None = None,
    ) -> None:
        self.name = name
        self.family: Family = get_family(family)
        self.components: tuple[str, ...] = tuple(components)
        prefixes = dict(kohya_prefixes) if kohya_prefixes is not None else self.family.kohya_prefixes()
        missing = [c for c in self.components if c not in prefixes]
        if missing:
            raise ArchError(f"arch {name!r}: {self.family.label} has no component(s) {', '.join(missing)}")
        self.kohya_prefixes: dict[str, str] = {c: prefixes[c] for c in self.components}
        self.configs: dict[str, dict] | None = {c: dict(v) for c, v in configs.items()} if configs else None
        self._comps = {c: _Component(self, c, loader) for c, loader in components.items()}
        # prefix (native or alias) -> component, longest first so "lora_te1" never reads as "lora_te"
        pmap = {p: c for c, p in self.kohya_prefixes.items()}
        for spec in self.family.components:
            if spec.name in self._comps:
                for alias in spec.kohya_aliases:
                    pmap.setdefault(alias, spec.name)
        self._prefix_order = sorted(pmap.items(), key=lambda kv: -len(kv[0]))
        self._modules: dict[str, ModuleInfo] | None = None

    def __repr__(self) -> str:
        return f"Arch({self.name!r}, family={self.family.name!r}, components={self.components})"

    # ---- identity -------------------------------------------------------------------------
    def descriptor(self) -> dict | None:
        """``{"family", "components": {component: config}}``: everything needed to rebuild this
        arch anywhere (None for archs built from tables alone)."""
        if self.configs is None:
            return None
        return {"family": self.family.name, "components": self.configs}

    def signature(self) -> str:
        """sha256 of the family and every module's name, type, shape and bias: two archs with the
        same signature read and write every adapter identically."""
        h = hashlib.sha256(self.family.name.encode())
        for c in self.components:
            for n, i in sorted(self.component_modules(c).items()):
                h.update(json.dumps([n, i.type, list(i.shape), i.has_bias]).encode())
        return h.hexdigest()

    # ---- tables ---------------------------------------------------------------------------
    def _comp(self, component: str) -> _Component:
        c = self._comps.get(component)
        if c is None:
            raise ArchError(
                f"arch {self.name!r} has no component {component!r} ({', '.join(self.components)})"
            )
        return c.ensure()

    def component_modules(self, component: str) -> dict[str, ModuleInfo]:
        """The table of one component (builds only that one)."""
        return self._comp(component).table  # type: ignore[return-value]

    def component_kind(self, component: str) -> str:
        """``clip`` | ``t5`` | ``other`` (the denoiser)."""
        return self._comp(component).kind  # type: ignore[return-value]

    @property
    def modules(self) -> dict[str, ModuleInfo]:
        """Canonical name -> ModuleInfo for every component (builds all of them)."""
        if self._modules is None:
            allm: dict[str, ModuleInfo] = {}
            for c in self.components:
                allm.update(self.component_modules(c))
            self._modules = allm
        return self._modules

    @property
    def denoiser(self) -> str:
        """The component that denoises: ``unet`` or ``transformer``."""
        if self.family.denoiser in self._comps:
            return self.family.denoiser
        raise ArchError(f"arch {self.name!r} has no {self.family.denoiser} component")

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """This arch's components other than the denoiser, in order (an arch from a single file
        may lack the family's optional encoders)."""
        return tuple(c for c in self.components if c != self.family.denoiser)

    def text_encoder_width(self, component: str) -> int | None:
        """Width of a text encoder's token embeddings (768 CLIP-L, 1024 OpenCLIP-H, 1280 bigG, 4096 T5)."""
        for n, info in self.component_modules(component).items():
            if info.type == "embedding" and (
                n.endswith("embeddings.token_embedding") or n.endswith(".shared")
            ):
                return info.shape[1]
        return None

    def module(self, canonical: str) -> ModuleInfo:
        """The ModuleInfo of a canonical name; ArchError if the arch has no such module."""
        comp = canonical.split(".", 1)[0]
        if comp in self._comps:
            info = self.component_modules(comp).get(canonical)
            if info is not None:
                return info
        raise ArchError(f"{canonical!r} is not a module of {self.name}")

    def canonical(self, name: str, component: str | None = None) -> str:
        """Normalise a dotted module name as other tools spell it to the canonical name.

        Accepts CLIP names with or without ``text_model.``, and strips peft's ``.base_layer``. With
        ``component`` the name may omit the component (``down_blocks.0...`` + ``component="unet"``).
        """
        n = name
        while n.endswith(".base_layer"):
            n = n[: -len(".base_layer")]
        n = n.replace(".base_layer.", ".")
        if component is not None and not n.startswith(component + "."):
            n = f"{component}.{n}"
        comp, _, rest = n.partition(".")
        if comp in self._comps:
            c = self._comp(comp)
            if n in c.table:  # type: ignore[operator]
                return n
            if c.kind == "clip" and not rest.startswith("text_model."):
                alt = f"{comp}.text_model.{rest}"
                if alt in c.table:  # type: ignore[operator]
                    return alt
        raise ArchError(f"{name!r} is not a module of {self.name}")

    # ---- kohya ----------------------------------------------------------------------------
    def kohya_name(self, canonical: str) -> str:
        """The flat kohya name (prefix included) kohya sd-scripts would write for this module.

        For a module that kohya stores fused (FLUX/SD3 q/k/v, FLUX single-block linear1) or
        permuted (the final adaLN modulation) this is the fused module's name.
        """
        comp = canonical.split(".", 1)[0]
        c = self._comp(comp) if comp in self._comps else None
        if c is None or canonical not in c.kohya_path:
            raise ArchError(f"{canonical!r} is not a module of {self.name}")
        return f"{self.kohya_prefixes[comp]}_{c.kohya_path[canonical].replace('.', '_')}"

    def _split_prefix(self, flat: str) -> tuple[str, str]:
        for p, comp in self._prefix_order:
            if flat.startswith(p + "_"):
                return comp, flat[len(p) + 1 :]
        raise ArchError(
            f"{flat!r} has no kohya prefix of {self.name} ({', '.join(self.kohya_prefixes.values())})"
        )

    def resolve_flat(self, component: str, flat: str) -> list[Part]:
        """Un-flatten a module name without prefix (``down_blocks_0_..._to_q``) for one component.

        Accepts the native kohya spelling and the alternates other tools write: diffusers paths
        (lycoris' standalone ``lycoris_`` names, files from other trainers), native paths for
        families whose kohya names are diffusers paths, CLIP names without ``text_model_``, any case.
        """
        c = self._comp(component)
        parts = c.flat.get(flat) or c.flat_lower.get(flat.lower())
        if parts is None:
            raise ArchError(f"{flat!r} is not a {component} module of {self.name}")
        return list(parts)

    def from_kohya(self, flat: str) -> list[Part]:
        """Flat kohya name (prefix included, no ``.lora_down.weight`` suffix) -> canonical parts.

        Each part is ``(canonical, rows)``; ``rows`` is the ``(start, stop)`` slice of the stored
        weight's rows that belongs to it, or None when the name is not fused. See the module
        docstring for the convention when a canonical appears twice (a row permutation).
        """
        comp, rest = self._split_prefix(flat)
        try:
            return self.resolve_flat(comp, rest)
        except ArchError:
            raise ArchError(f"{flat!r} is not a module of {self.name}") from None

    def kohya_fusions(self) -> dict[str, list[tuple[str, tuple[int, int]]]]:
        """Fused (or row-permuted) flat kohya name -> its ordered parts. Empty where kohya names
        are diffusers paths (SD1/SD2) or the native layout fuses nothing (SDXL)."""
        if not self.family.kohya_native:
            return {}
        comp = self.denoiser
        c = self._comp(comp)
        return {
            f"{self.kohya_prefixes[comp]}_{nat.replace('.', '_')}": list(parts)  # type: ignore[misc]
            for nat, parts in c.native_parts.items()
            if parts[0][1] is not None
        }

    # ---- native (SGM / BFL / MMDiT) ---------------------------------------------------------
    def sgm_name(self, canonical: str) -> str:
        """The original-layout name of a denoiser module, without ``model.diffusion_model.``.

        UNet archs: SGM/"ldm" (``input_blocks.4.1.transformer_blocks.0.attn2.to_k``), as in single-file
        checkpoints (``model.diffusion_model.`` + this) and ComfyUI LoRA keys (``diffusion_model.`` +
        this). FLUX: the BFL name (``double_blocks.0.img_attn.qkv``); SD3: the MMDiT name
        (``joint_blocks.0.x_block.attn.qkv``), fused/permuted like kohya's. Text encoder modules
        have no such name here (ArchError).
        """
        comp = canonical.split(".", 1)[0]
        if comp in self._comps:
            c = self._comp(comp)
            if canonical in c.native:
                return c.native[canonical]
        raise ArchError(f"{canonical!r} has no SGM/BFL name in {self.name}")

    def from_sgm(self, name: str) -> list[Part]:
        """Native module name (with or without ``model.diffusion_model.``/``diffusion_model.``) -> parts."""
        n = name
        for p in ("model.diffusion_model.", "diffusion_model."):
            if n.startswith(p):
                n = n[len(p) :]
                break
        c = self._comp(self.denoiser)
        parts = c.native_parts.get(n)
        if parts is None:
            raise ArchError(f"{name!r} is not an SGM/BFL module name of {self.name}")
        return list(parts)

    # ---- fused rows -----------------------------------------------------------------------
    @staticmethod
    def split_rows(parts: list[Part], tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a stored (fused/permuted) tensor's rows into the canonical modules' rows.

        ``parts`` is what ``from_kohya``/``from_sgm``/``kohya_fusions`` return. Works for anything
        whose dim 0 is the output rows (weights, biases, LoRA ``up``). Not fused -> ``{name: tensor}``.
        """
        out: dict[str, list[torch.Tensor]] = {}
        for name, rows in parts:
            out.setdefault(name, []).append(tensor if rows is None else tensor[rows[0] : rows[1]])
        return {n: (ts[0] if len(ts) == 1 else torch.cat(ts, 0)) for n, ts in out.items()}

    @staticmethod
    def fuse_rows(parts: list[Part], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of ``split_rows``: assemble the stored tensor from per-canonical tensors."""
        if len(parts) == 1 and parts[0][1] is None:
            return tensors[parts[0][0]]
        offsets: dict[str, int] = {}
        pieces: list[tuple[int, torch.Tensor]] = []
        for name, rows in parts:
            assert rows is not None
            n = rows[1] - rows[0]
            off = offsets.get(name, 0)
            t = tensors[name]
            if off + n > t.shape[0]:
                raise ArchError(f"{name}: {t.shape[0]} rows, parts need {off + n}")
            pieces.append((rows[0], t[off : off + n]))
            offsets[name] = off + n
        pieces.sort(key=lambda p: p[0])
        return torch.cat([p[1] for p in pieces], 0)


def config_loader(component: str, cfg: Mapping, label: str | None = None) -> Loader:
    """A component loader that builds (or reads from the cache) the table of ``cfg``."""
    from loradex.core.archs.tables import class_name, config_table, prefixed

    def load() -> tuple[str, Table]:
        return text_kind(class_name(cfg)) or "other", prefixed(component, config_table(cfg, label))

    return load
