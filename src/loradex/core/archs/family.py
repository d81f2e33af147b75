"""Model families: everything loradex knows about one kind of base model, in one object.

A family (SD1, SD2, SDXL, FLUX.1, SD3, ...) is a :class:`Family` subclass in its own file of
``core/archs`` that registers one instance with :func:`register_family`. It owns:

* its components (:class:`ComponentSpec`: kohya prefix, ComfyUI / TI / single-file names) and the
  bundled configs of its published sizes (``builtins``) and of its embedded tiny model (``tiny``);
* the denoiser's *native* naming (SGM for UNets, BFL for FLUX, MMDiT for SD3) with fused and
  permuted rows, and whether kohya flattens native or diffusers paths;
* how to recognise it: diffusers pipeline classes and configs (:meth:`pipeline_score`), ModelSpec
  and kohya ``ss_base_model_version`` values, key substrings of adapter files and checkpoints, and
  how to rebuild component configs from a single-file checkpoint's header (:meth:`infer_configs`);
* what the ecosystem writes for it: ModelSpec architecture id and implementation, kohya base
  version, Hub base repo, tags and license;
* the LoRA Block Weight layout (:meth:`lbw_layouts`, :meth:`lbw_block`);
* training: default resolution, objective (``epsilon``/``v_prediction`` DDPM or ``flow``
  matching), LoRA targets, and how the pipeline's text encoders condition its denoiser
  (:meth:`encode_prompts`, :meth:`predict`).

Nothing outside ``core/archs`` branches on a family name: code asks the arch's family. An *arch*
(``core/archs/arch.py``) is a family plus concrete component configs (one size of the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from loradex.errors import ArchError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

if TYPE_CHECKING:
    from loradex.core.archs.arch import Arch, Part
    from loradex.core.archs.tables import Table


#: names of the embedded tiny archs: ``tiny-<family>``
TINY_PREFIX = "tiny-"


@dataclass(frozen=True)
class ComponentSpec:
    """One component of a family's pipelines.

    ``kohya_prefix``: what kohya sd-scripts puts in front of its flattened module names
    (``lora_unet``, ``lora_te``, ``lora_te1``...); ``kohya_aliases``: other prefixes trainers write for
    it (read only). ``comfy``: the names ComfyUI gives the text encoder in ``text_encoders.<name>.``
    LoRA keys and all-in-one checkpoints. ``ti_key``: the key of this encoder in multi-encoder
    textual-inversion files (``clip_l``/``clip_g``). ``checkpoint``: single-file key prefixes that
    hold this component, each with its layout: ``native`` (the denoiser's SGM/BFL/MMDiT names),
    ``clip`` / ``t5`` (transformers names, CLIP with or without ``text_model.``) or ``openclip``
    (OpenCLIP's ``transformer.resblocks`` with fused ``in_proj``). ``optional``: a base may lack it
    (FLUX/SD3 single files without text encoders, SD3 without T5)."""

    name: str
    kohya_prefix: str
    kohya_aliases: tuple[str, ...] = ()
    comfy: tuple[str, ...] = ()
    ti_key: str | None = None
    checkpoint: tuple[tuple[str, str], ...] = ()
    optional: bool = False


class Family:
    """The base of every family spec (see the module docstring). Subclasses set the class
    attributes and override the methods that differ; one instance is registered per family."""

    #: short id used in arch names and ``--arch`` (``sd1``, ``sdxl``, ``flux1``, ``sd3``)
    name: ClassVar[str] = "?"
    #: what users call it
    label: ClassVar[str] = "?"
    #: position in listings and detection order (older families first)
    order: ClassVar[int] = 100
    #: the denoising component: ``unet`` or ``transformer``
    denoiser: ClassVar[str] = "unet"
    #: diffusers classes of the denoiser
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[tuple[ComponentSpec, ...]] = ()
    #: published sizes: arch name -> {component: bundled config file}; the first is the default
    builtins: ClassVar[dict[str, dict[str, str]]] = {}
    #: the embedded tiny model of this family ({component: bundled config}); arch ``tiny-<name>``
    tiny: ClassVar[dict[str, str] | None] = None
    #: diffusers pipeline classes of the family (``model_index.json``); the first loads single files
    pipelines: ClassVar[tuple[str, ...]] = ()
    #: kohya flattens the denoiser's native (SGM/BFL/MMDiT) paths rather than diffusers paths
    kohya_native: ClassVar[bool] = False
    #: ModelSpec ``architecture`` written (``<id>/lora``) and prefixes recognised on reading
    modelspec_arch: ClassVar[str] = ""
    modelspec_aliases: ClassVar[tuple[str, ...]] = ()
    modelspec_implementation: ClassVar[str] = "diffusers"
    #: kohya ``ss_base_model_version`` written, and the values recognised on reading
    kohya_version: ClassVar[str | None] = None
    kohya_versions: ClassVar[tuple[str, ...]] = ()
    #: kohya's ``--v2`` flag (``ss_v2``): the SD2 text encoder and UNet
    kohya_v2: ClassVar[bool] = False
    #: the Hub repo of the base model (model cards' ``base_model``)
    hub_repo: ClassVar[str | None] = None
    #: the Hub repo of each published size where they differ (arch name -> repo; else ``hub_repo``)
    hub_repos: ClassVar[dict[str, str]] = {}
    #: Hub tags and the license written on model cards
    hub_tags: ClassVar[tuple[str, ...]] = ()
    license: ClassVar[str] = "other"
    #: substrings of adapter keys that only this family's naming produces
    key_hints: ClassVar[tuple[str, ...]] = ()
    #: single-file checkpoint keys (prefixes) that only this family has
    checkpoint_hints: ClassVar[tuple[str, ...]] = ()
    # training
    resolution: ClassVar[int] = 512
    #: ``epsilon`` | ``v_prediction`` (DDPM, from the scheduler config) | ``flow`` (flow matching)
    objective: ClassVar[str] = "epsilon"
    #: module-name suffixes a LoRA trains in the denoiser / the text encoders by default
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    te_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    #: module classes lycoris-lora wraps when training LoHa/LoKr on the denoiser (its attention)
    lycoris_modules: ClassVar[tuple[str, ...]] = ("Attention",)
    #: components diffusers' ``load_lora_weights`` loads for this family (None: every component)
    diffusers_lora_components: ClassVar[tuple[str, ...] | None] = None
    #: the embedded tiny pipeline: VAE overrides and the scheduler (class name, arguments)
    tiny_pipeline: ClassVar[tuple[dict, tuple[str, dict]]] = ({}, ("DDIMScheduler", {"num_train_timesteps": 1000}))
    #: named LBW presets of the family's layouts (block-weight vectors by name)
    lbw_presets: ClassVar[dict[str, tuple[float, ...]]] = {}

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ---- components ---------------------------------------------------------------------
    def component(self, name: str) -> ComponentSpec:
        """The spec of component ``name`` (``unet``, ``text_encoder_2``...); ArchError if the family
        has none."""
        for c in self.components:
            if c.name == name:
                return c
        raise ArchError(f"{self.label} has no component {name!r}")

    @property
    def component_names(self) -> tuple[str, ...]:
        """Canonical component names in spec order, denoiser included."""
        return tuple(c.name for c in self.components)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Every component but the denoiser, in spec order (``text_encoder``, ``text_encoder_2``...)."""
        return tuple(c.name for c in self.components if c.name != self.denoiser)

    def kohya_prefixes(self) -> dict[str, str]:
        """component -> the kohya prefix written for it (``{"unet": "lora_unet", "text_encoder":
        "lora_te1", ...}``); the read-only ``kohya_aliases`` are not included."""
        return {c.name: c.kohya_prefix for c in self.components}

    def comfy_component(self, enc: str) -> str | None:
        """The component ComfyUI's ``text_encoders.<enc>`` names in this family."""
        for c in self.components:
            if enc in c.comfy:
                return c.name
        return None

    # ---- naming -------------------------------------------------------------------------
    def native_names(self, component: str, table: Table) -> tuple[dict[str, str], dict[str, list[Part]]]:
        """``(canonical -> native path, native path -> parts)`` for a component whose native
        (original-code) naming differs from diffusers'; empty for the others. ``parts`` are
        ``(canonical, rows)`` (see ``core/archs/arch.py``: fused and permuted rows)."""
        return {}, {}

    # ---- what the ecosystem writes -----------------------------------------------------------
    def modelspec_id(self, arch: Arch) -> str:
        """ModelSpec ``architecture`` (before ``/lora``) for an arch of this family; the embedded
        tiny models are named as themselves (``tiny-sd1``) since no other tool knows them."""
        return arch.name if arch.name.startswith(TINY_PREFIX) else self.modelspec_arch

    def kohya_base_version(self, arch: Arch) -> str | None:
        """kohya ``ss_base_model_version`` for an arch of this family (None for tiny models)."""
        return None if arch.name.startswith(TINY_PREFIX) else self.kohya_version

    # ---- recognising ----------------------------------------------------------------------
    def pipeline_score(self, pipeline: str | None, configs: Mapping[str, Mapping]) -> int:
        """How well a pipeline (its ``model_index.json`` class, may be None) with these component
        configs fits the family: 0 = not at all. The default: the denoiser class must match;
        +1 for a matching pipeline class, +1 per other component present."""
        from loradex.core.archs.tables import class_name

        den = configs.get(self.denoiser)
        if den is None or class_name(den) not in self.denoiser_classes:
            return 0
        score = 1 + (pipeline in self.pipelines)
        return score + sum(1 for c in self.text_encoders if c in configs)

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        """The file's metadata names this family (ModelSpec architecture or kohya base version)."""
        spec = str(metadata.get("modelspec.architecture", "")).split("/", 1)[0]
        if spec and any(spec.startswith(p) for p in (self.modelspec_arch, *self.modelspec_aliases) if p):
            return True
        ver = str(metadata.get("ss_base_model_version", ""))
        return bool(ver) and ver in (self.kohya_version, *self.kohya_versions)

    def infer_configs(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict]:
        """Component configs rebuilt from a single-file checkpoint's keys and shapes (keys as
        stored, prefixes included). Components the file does not hold are left out."""
        raise ArchError(f"{self.label}: cannot read a single-file checkpoint's layout")

    # ---- block weights (LBW) ---------------------------------------------------------------
    def lbw_layouts(self, arch: Arch) -> dict[int, tuple[str, ...]]:
        """Accepted block-weight layouts: number of entries -> block ids (the full one last)."""
        raise ArchError(f"{self.label} has no block-weight layout")

    def lbw_block(self, arch: Arch, canonical: str) -> str | None:
        """The block id of a module (None: outside every block, weight 1)."""
        return None

    # ---- training -------------------------------------------------------------------------
    def encode_prompts(self, pipe, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The denoiser's text conditioning for ``prompts``, per prompt (dim 0), as the family's
        pipeline computes it. Gradients flow (text encoders and embeddings may be trained)."""
        raise ArchError(f"{self.label} pipelines are not trained by loradex")

    def predict(self, pipe, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]
                ) -> torch.Tensor:
        """The denoiser's prediction for latents ``noisy`` at ``timesteps`` (DDPM: integer steps;
        flow: sigmas in [0, 1]) with ``cond`` from :meth:`encode_prompts`."""
        raise ArchError(f"{self.label} pipelines are not trained by loradex")

    def latents(self, pipe, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of the VAE for images in [-1, 1] (unscaled)."""
        dist = pipe.vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def scale_latents(self, pipe, z: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser sees them: ``(z - shift) * scaling_factor``."""
        cfg = pipe.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z - shift) * cfg.scaling_factor


# ----------------------------------------------------------------------------------------------
# helpers shared by family specs
# ----------------------------------------------------------------------------------------------


def count_indices(keys, prefix: str) -> int:
    """How many numbered children ``prefix<N>.`` the keys have (the highest index + 1)."""
    best = -1
    n = len(prefix)
    for k in keys:
        if k.startswith(prefix):
            head = k[n:].split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
    return best + 1


def fused_native_names(
    table: Table, component: str, locate, swapped: Callable[[str], bool] = lambda path: False
) -> tuple[dict[str, str], dict[str, list[Part]]]:
    """``(canonical -> native path, native path -> parts)`` for a naming where several diffusers
    modules share one fused native Linear (FLUX/SD3 ``qkv``, FLUX ``linear1``).

    ``locate(path)`` gives a diffusers module path's ``(native path, index in the fused weight)``
    (index None: not fused) or None when the module has no native name; fused rows are stacked in
    index order, each member contributing its own output rows (from the table, so any width
    works). ``swapped(path)``: the native weight stores the module's two row halves swapped
    (BFL/MMDiT ``adaLN_modulation`` [shift | scale] vs diffusers [scale | shift])."""
    pre = component + "."
    to_native: dict[str, str] = {}
    grouped: dict[str, list[tuple[int, str]]] = {}
    for name in table:
        got = locate(name[len(pre):])
        if got is None:
            continue
        native, idx = got
        to_native[name] = native
        grouped.setdefault(native, []).append((idx or 0, name))
    parts: dict[str, list[Part]] = {}
    for native, members in grouped.items():
        members.sort()
        if len(members) == 1:
            name = members[0][1]
            if swapped(name[len(pre):]):
                rows = table[name].out_features
                half = rows // 2
                parts[native] = [(name, (half, rows)), (name, (0, half))]
            else:
                parts[native] = [(name, None)]
            continue
        start = 0
        lst: list[Part] = []
        for _, name in members:
            rows = table[name].out_features
            lst.append((name, (start, start + rows)))
            start += rows
        parts[native] = lst
    return to_native, parts


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make a family known (each family file calls this once for its instance)."""
    if not family.name or family.name == "?":
        raise ArchError("a family needs a name")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """name -> Family, in their ``order`` (the bundled ones are imported by ``core/archs``)."""
    return dict(sorted(_FAMILIES.items(), key=lambda kv: kv[1].order))


def get_family(name: str | Family) -> Family:
    """The registered family called ``name`` (a Family is returned as is); ArchError listing the
    known names otherwise."""
    if isinstance(name, Family):
        return name
    fam = _FAMILIES.get(name)
    if fam is None:
        raise ArchError(f"unknown model family {name!r} (known: {', '.join(_FAMILIES)})")
    return fam
