"""What every training method shares: the ``Method`` interface the loop calls, the metadata a
trained file carries (kohya's ``ss_*`` keys), canonical text-encoder names, and the fp32/half
split of mixed precision.

Its own module (not the package's ``__init__``) so the methods import it without importing the
package that imports them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loradex.errors import TrainingError


class Method:
    """The interface the loop calls: a method decides what learns (``setup``, ``param_groups``),
    how prompts read (``prompt``), what a checkpoint holds (``state``/``load_state``) and what the
    result is (``export``); the loop owns everything else. Defaults: nothing learns in the text
    encoders."""

    name = "?"
    #: True when text conditioning must be recomputed each step (text encoder or embeddings learn).
    trains_text = False

    def setup(self, ctx) -> None:
        """Inject adapters / mark what learns (every base weight arrives frozen)."""
        raise NotImplementedError

    def param_groups(self, ctx) -> list[dict]:
        """The optimizer's parameter groups (each with its ``lr`` and ``weight_decay``)."""
        raise NotImplementedError

    def modules(self, ctx) -> list[torch.nn.Module]:
        """Modules switched to train() while training (dropout, checkpointing)."""
        return [ctx.denoiser]

    def prompt(self, ctx, prompt: str) -> str:
        """The prompt as the text encoder sees it (TI expands a multi-vector token)."""
        return prompt

    def after_backward(self, ctx) -> None:
        """Called between backward and the optimizer step (TI zeroes the frozen rows' gradients)."""

    def after_step(self, ctx) -> None:
        """Called after each optimizer step."""

    def named_trainable(self, ctx) -> dict[str, torch.Tensor]:
        """Every parameter that learns, by ``<component>.<parameter name>`` (stable across runs of
        the same config, so a checkpoint's tensors find their parameters)."""
        out = {}
        for comp, mod in [(ctx.arch.denoiser, ctx.denoiser)] + [(c, e) for c, e, _ in ctx.encoders()]:
            for n, p in mod.named_parameters():
                if p.requires_grad:
                    out[f"{comp}.{n}"] = p
        return out

    def state(self, ctx) -> dict[str, torch.Tensor]:
        """The trainable tensors by name, for checkpoints."""
        return {k: v.detach() for k, v in self.named_trainable(ctx).items()}

    def load_state(self, ctx, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's trainable tensors into this run's parameters (same names required)."""
        mine = self.named_trainable(ctx)
        if set(mine) != set(tensors):
            raise TrainingError("the checkpoint's trainable tensors do not match this run's")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(tensors[k].to(p.device, p.dtype))

    def export(self, ctx, result):
        """The trained result: an Adapter (or, for dreambooth, the pipeline)."""
        raise NotImplementedError


def te_canonical(component: str, path: str) -> str:
    """Canonical name of a text-encoder module: CLIP names always carry ``text_model.``
    (transformers 5's CLIPTextModel dropped the level; core/adapter.py)."""
    return f"{component}.{path}" if path.startswith("text_model.") else f"{component}.text_model.{path}"


def training_metadata(ctx, result, network_module: str | None = None, network_args: dict | None = None) -> dict[str, str]:
    """kohya's ``ss_*`` training keys (train_network.py's names) and ModelSpec extras
    (``modelspec.trigger_phrase``, ``resolution``, ``prediction_type``) describing the run. The
    writers add the structural ones (ModelSpec architecture/title/date, ss_network_dim/alpha)."""
    import datetime as dt
    import json

    cfg = ctx.cfg
    now = dt.datetime.now(dt.timezone.utc)
    n_img = len(result.examples)
    per_epoch = max(1, math.ceil(n_img / cfg.batch_size))
    md = {
        "ss_training_started_at": str(int(now.timestamp() - result.seconds)),
        "ss_training_finished_at": str(int(now.timestamp())),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_lr if cfg.text_lr is not None else cfg.learning_rate),
        "ss_num_train_images": str(n_img),
        "ss_num_reg_images": str(cfg.num_class_images if cfg.prior_preservation else 0),
        "ss_num_batches_per_epoch": str(per_epoch),
        "ss_num_epochs": str(math.ceil(result.steps_done / per_epoch)),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(result.steps_done),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": "1",
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_cache_latents": "True",
        "ss_seed": str(cfg.seed),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_optimizer": "torch.optim.AdamW(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.01)",
        "ss_lr_scheduler": "constant",
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_prior_loss_weight": str(cfg.prior_weight if cfg.prior_preservation else 0.0),
        "ss_training_comment": f"loradex train {cfg.method}",
        "ss_enable_bucket": "True",
        "modelspec.trigger_phrase": cfg.token,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        # FLUX/SD3 train a flow-matching velocity: neither epsilon nor v (ModelSpec has no standard
        # value for it; "flow" says what it is rather than a wrong "epsilon")
        "modelspec.prediction_type": "flow" if ctx.family.objective == "flow"
        else "v" if ctx.pipe.scheduler.config.get("prediction_type") == "v_prediction" else "epsilon",
        "ss_loradex_train_config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if result.dataset is not None:
        md["ss_dataset_dirs"] = json.dumps({Path(result.dataset.root).name: {"n_repeats": 1, "img_count": n_img}})
        md["ss_loradex_dataset_sha256"] = result.dataset.fingerprint()
    if network_module:
        md["ss_network_module"] = network_module
        md["ss_network_dim"] = str(cfg.rank)
        md["ss_network_alpha"] = str(int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha)
    if network_args:
        md["ss_network_args"] = json.dumps(network_args)
    return md


def cast_frozen(ctx, modules) -> None:
    """Mixed precision (CUDA only): frozen weights to the half dtype, trained ones kept in fp32
    (diffusers' ``cast_training_params``); a no-op in fp32."""
    if ctx.weight_dtype == torch.float32:
        return
    for m in modules:
        m.to(dtype=ctx.weight_dtype)
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
