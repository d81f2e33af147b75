"""``pivotal``: a UNet LoRA and a new token's embedding trained together (pivotal tuning as in
diffusers' advanced DreamBooth LoRA script and cloneofsimo's lora, which train both at once with
their own learning rates). ``--ti-steps N`` first trains the embedding alone for N steps (the
"pivot" of cloneofsimo's ``lora_pti``: invert the token first, then tune the weights around it),
then both: during that phase the LoRA's gradients are dropped before the optimizer step, so its
factors and optimizer state stay exactly at their initial values (AdamW skips parameters without
a gradient). The result is one kohya-style file: the LoRA keys plus the embedding as
``bundle_emb.<token>.string_to_param.*`` (A1111 / kohya convention, FORMATS.md §4), or a diffusers
LoRA file plus a separate ``learned_embeds`` file.
"""

from __future__ import annotations

from loradex.training.config import DEFAULT_LR
from loradex.training.methods.common import Method, training_metadata
from loradex.training.methods.lora import denoiser_targets, inject_lora, lora_patches
from loradex.training.methods.ti import TextualInversion


class Pivotal(Method):
    """A denoiser LoRA and a new token's embedding, each with its own learning rate."""

    name = "pivotal"
    trains_text = True

    def setup(self, ctx) -> None:
        """Inject the LoRA, then add the token (TI's setup)."""
        cfg = ctx.cfg
        inject_lora(ctx.denoiser, cfg.rank, cfg.lora_alpha, denoiser_targets(ctx), cfg.dora)
        self.lora = [p for p in ctx.denoiser.parameters() if p.requires_grad]
        self.ti_phase = False
        self.ti = TextualInversion()
        self.ti.setup(ctx)  # also casts the frozen weights for mixed precision

    def modules(self, ctx):
        return [ctx.denoiser] + self.ti.modules(ctx)

    def param_groups(self, ctx) -> list[dict]:
        cfg = ctx.cfg
        lora = self.lora
        emb_lr = cfg.text_lr if cfg.text_lr is not None else DEFAULT_LR["ti"]
        return [{"params": lora, "lr": cfg.learning_rate, "weight_decay": 1e-2},
                {"params": self.ti.embedding_weights(ctx), "lr": emb_lr, "weight_decay": 0.0}]

    def prompt(self, ctx, prompt: str) -> str:
        return self.ti.prompt(ctx, prompt)

    def begin_step(self, ctx, step: int) -> None:
        """The embedding-only phase lasts while ``step < ti_steps``."""
        self.ti_phase = step < ctx.cfg.ti_steps

    def after_backward(self, ctx) -> None:
        """TI's row mask; in the embedding-only phase the LoRA's gradients are dropped."""
        self.ti.after_backward(ctx)
        if self.ti_phase:
            for p in self.lora:
                p.grad = None

    def export(self, ctx, result):
        """One Adapter holding the LoRA patches and the embedding."""
        from loradex.core.adapter import Adapter

        cfg = ctx.cfg
        md = training_metadata(ctx, result, "networks.lora",
                               {"algo": "lora", "pivotal": True, "targets": list(cfg.targets or ctx.family.lora_targets),
                                "ti_steps": cfg.ti_steps})
        md["ss_num_vectors_per_token"] = str(cfg.num_vectors)
        return Adapter(patches=lora_patches(ctx.denoiser, ctx.arch.denoiser), embeddings={cfg.token: self.ti.embedding(ctx)},
                       metadata=md, arch=ctx.arch.name, source_format="loradex-train")
