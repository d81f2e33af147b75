"""``lora``: PEFT LoRA layers (``peft.inject_adapter_in_model``) on the denoiser's attention
projections and optionally the CLIP text encoder(s), DoRA on request.

Defaults follow diffusers' ``train_dreambooth_lora*.py`` (the family spec's ``lora_targets`` /
``te_targets``): UNet and transformer targets ``to_q, to_k, to_v, to_out.0``, text encoder
``q_proj, k_proj, v_proj, out_proj``, ``lora_alpha = rank``, PEFT's default init (A
Kaiming-uniform, B zero: the adapter starts as a no-op). ``peft.inject_adapter_in_model`` is used
instead of ``model.add_adapter`` because transformers 5 needs peft >= 0.22 for the latter on text
encoders. The trained factors are read straight from the PEFT layers into loradex ``LoraPatch``es
(``up = lora_B``, ``down = lora_A``, ``alpha = lora_alpha``; DoRA's ``lora_magnitude_vector`` becomes
``dora_scale``) and written by loradex's own writers (kohya, diffusers, ...).
"""

from __future__ import annotations

import torch

from loradex.training.methods.common import (
    Method,
    cast_frozen,
    resolve_targets,
    te_canonical,
    training_metadata,
)

ADAPTER = "default"


def inject_lora(model: torch.nn.Module, rank: int, alpha: float, targets, dora: bool) -> None:
    """PEFT LoRA (DoRA) layers on ``targets`` of ``model``; only their factors learn."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                     init_lora_weights=True, use_dora=dora)
    inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)


def lora_patches(model: torch.nn.Module, component: str) -> dict:
    """LoraPatches of every PEFT LoRA layer of ``model`` keyed by canonical module name."""
    from peft.tuners.lora import LoraLayer

    from loradex.core.kinds.dora import dora_scale_from_magnitude
    from loradex.core.kinds.lora import LoraPatch

    out = {}
    for path, m in model.named_modules():
        if not isinstance(m, LoraLayer) or ADAPTER not in m.lora_A:
            continue
        down = m.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        up = m.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        p = LoraPatch(up=up, down=down, alpha=torch.tensor(float(m.lora_alpha[ADAPTER])))
        mag = getattr(m, "lora_magnitude_vector", None)
        if mag is not None and ADAPTER in mag:
            p.dora_scale = dora_scale_from_magnitude(mag[ADAPTER].weight.detach().float().cpu().clone(), p.shape)
        name = te_canonical(component, path) if component.startswith("text_encoder") else f"{component}.{path}"
        out[name] = p
    return out


def denoiser_targets(ctx) -> list[str]:
    """``--targets`` resolved against the denoiser (diffusers or native names, ``resolve_targets``),
    or the family's ``lora_targets``."""
    cfg = ctx.cfg
    return resolve_targets(ctx, cfg.targets) if cfg.targets else list(ctx.family.lora_targets)


class LoraMethod(Method):
    """PEFT LoRA on the denoiser's attention projections (and the CLIP encoders with ``--text-encoder``)."""

    name = "lora"

    def setup(self, ctx) -> None:
        """Inject the LoRA layers (seeded by the loop: PEFT's Kaiming init draws from torch's RNG)."""
        cfg = ctx.cfg
        self.trains_text = cfg.text_encoder
        inject_lora(ctx.denoiser, cfg.rank, cfg.lora_alpha, denoiser_targets(ctx), cfg.dora)
        if cfg.text_encoder:
            for _, enc, _ in ctx.clip_encoders():
                inject_lora(enc, cfg.rank, cfg.lora_alpha, ctx.family.te_targets, cfg.dora)
        cast_frozen(ctx, [ctx.denoiser] + [e for _, e, _ in ctx.encoders()])

    def modules(self, ctx):
        return [ctx.denoiser] + ([e for _, e, _ in ctx.clip_encoders()] if self.trains_text else [])

    def param_groups(self, ctx) -> list[dict]:
        ps = [p for m in self.modules(ctx) for p in m.parameters() if p.requires_grad]
        return [{"params": ps, "lr": ctx.cfg.learning_rate, "weight_decay": 1e-2}]

    def patches(self, ctx) -> dict:
        """The trained factors as loradex LoraPatches by canonical module name."""
        out = lora_patches(ctx.denoiser, ctx.arch.denoiser)
        if self.trains_text:
            for comp, enc, _ in ctx.clip_encoders():
                out.update(lora_patches(enc, comp))
        return out

    def export(self, ctx, result):
        """An Adapter of the trained LoRA with kohya's ``ss_*`` training metadata."""
        from loradex.core.adapter import Adapter

        cfg = ctx.cfg
        args = {"algo": "lora", **({"dora_wd": True} if cfg.dora else {}),
                "targets": list(cfg.targets or ctx.family.lora_targets), "train_text_encoder": cfg.text_encoder}
        md = training_metadata(ctx, result, "networks.lora", args)
        return Adapter(patches=self.patches(ctx), metadata=md, arch=ctx.arch.name, source_format="loradex-train")
