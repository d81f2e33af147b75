"""What every training method shares: the ``Method`` interface the loop calls, the metadata a
trained file carries (kohya's ``ss_*`` keys), canonical text-encoder names, and the fp32/half
split of mixed precision.

Its own module (not the package's ``__init__``) so the methods import it without importing the
package that imports them.
"""

from __future__ import annotations

import math

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

    def begin_step(self, ctx, step: int) -> None:
        """Called before each step with the number of steps done (pivotal's TI-first phase)."""

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


def resolve_targets(ctx, targets) -> list[str]:
    """The denoiser module targets PEFT gets: each entry of ``targets`` as a module-name suffix in
    diffusers naming (``to_q``, ``attn.to_out.0``) when some Linear/Conv of the denoiser has it, else
    as a suffix of the family's native names (FLUX's BFL names as kohya and BFL write them:
    ``img_attn.qkv``, ``linear1``, ``img_mlp.0``; SDXL's SGM names), which becomes the exact paths
    of the diffusers modules that make up those native modules (``linear1`` -> the single blocks'
    ``attn.to_q/to_k/to_v`` and ``proj_mlp``). Call before anything is injected."""
    from loradex.errors import ArchError

    comp = ctx.arch.denoiser
    den = ctx.denoiser
    paths = [n[len(comp) + 1:] for n in ctx.arch.component_modules(comp)]
    paths = [p for p in paths if isinstance(den.get_submodule(p), (torch.nn.Linear, torch.nn.Conv2d))]
    out: list[str] = []
    for t in targets:
        if any(p == t or p.endswith("." + t) for p in paths):
            out.append(t)
            continue
        native = []
        for p in paths:
            try:
                name = ctx.arch.sgm_name(f"{comp}.{p}")
            except ArchError:
                continue
            if name == t or name.endswith("." + t):
                native.append(p)
        if not native:
            raise TrainingError(f"--targets {t!r}: no module of the {ctx.family.label} denoiser has that name "
                                "(diffusers names such as to_q, or the family's own such as FLUX's img_attn.qkv)")
        out.extend(n for n in native if n not in out)
    return out


def te_canonical(component: str, path: str) -> str:
    """Canonical name of a text-encoder module: CLIP names always carry ``text_model.``
    (transformers 5's CLIPTextModel dropped the level; core/adapter.py)."""
    return f"{component}.{path}" if path.startswith("text_model.") else f"{component}.text_model.{path}"


def run_facts(ctx, result) -> dict:
    """What kohya's viewers read about a run, as values (``training_metadata`` writes them as
    ``ss_*`` strings; the CLI records them in the registry's lineage): images with repeats,
    batches per epoch, the epoch reached and planned, steps, resolution, learning rate, the real
    optimizer and its arguments, the schedule, the dataset folders and tag frequencies, the
    trigger."""
    from loradex.training import captions

    cfg = ctx.cfg
    ex = result.examples
    per_epoch = getattr(result, "batches_per_epoch", 0) or max(1, math.ceil(captions.num_train_images(ex) / cfg.batch_size))
    return {
        "num_train_images": captions.num_train_images(ex),
        "num_batches_per_epoch": per_epoch,
        "epoch": math.ceil(result.steps_done / per_epoch),
        "num_epochs": math.ceil(cfg.steps / per_epoch),
        "max_train_steps": cfg.steps,
        "steps": result.steps_done,
        "resolution": [cfg.resolution, cfg.resolution],
        "learning_rate": cfg.learning_rate,
        "optimizer": getattr(result, "optimizer", None) or "torch.optim.adamw.AdamW",
        "lr_scheduler": cfg.lr_scheduler,
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "dataset_dirs": captions.dataset_dirs(ex),
        "tag_frequency": captions.tag_frequency(ex),
        "trigger": cfg.token,
    }


def training_metadata(ctx, result, network_module: str | None = None, network_args: dict | None = None) -> dict[str, str]:
    """kohya's ``ss_*`` training keys (train_network.py's names and its ``update_metadata`` for
    FLUX/SD3, kohya-ss/sd-scripts 48d368f) and ModelSpec extras (``modelspec.trigger_phrase``,
    ``resolution``, ``prediction_type``) describing the run. The writers add the structural ones
    (ModelSpec architecture/title/date); ``ss_network_dim``/``ss_network_alpha`` come with a
    ``network_module``."""
    import datetime as dt
    import json

    cfg = ctx.cfg
    now = dt.datetime.now(dt.timezone.utc)
    f = run_facts(ctx, result)
    flow = ctx.family.objective == "flow"
    v = cfg.v_parameterization or ctx.pipe.scheduler.config.get("prediction_type") == "v_prediction"
    md = {
        "ss_training_started_at": str(int(now.timestamp() - result.seconds)),
        "ss_training_finished_at": str(int(now.timestamp())),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_lr if cfg.text_lr is not None else cfg.learning_rate),
        "ss_num_train_images": str(f["num_train_images"]),
        "ss_num_reg_images": str(cfg.num_class_images if cfg.prior_preservation else 0),
        "ss_num_batches_per_epoch": str(f["num_batches_per_epoch"]),
        "ss_num_epochs": str(f["num_epochs"]),
        "ss_epoch": str(f["epoch"]),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(cfg.batch_size),
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(result.steps_done),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": "1",
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_cache_latents": "True",
        "ss_seed": str(cfg.seed),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_optimizer": f["optimizer"],
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_prior_loss_weight": str(cfg.prior_weight if cfg.prior_preservation else 0.0),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_multires_noise_iterations": str(cfg.multires_noise_iterations),
        "ss_multires_noise_discount": str(cfg.multires_noise_discount),
        "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
        "ss_v_parameterization": str(cfg.v_parameterization),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_training_comment": f"loradex train {cfg.method}",
        "ss_enable_bucket": "True",
        "ss_dataset_dirs": json.dumps(f["dataset_dirs"]),
        "ss_tag_frequency": json.dumps(f["tag_frequency"]),
        "modelspec.trigger_phrase": cfg.token,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        # FLUX/SD3 train a flow-matching velocity: neither epsilon nor v (ModelSpec has no standard
        # value for it; "flow" says what it is rather than a wrong "epsilon")
        "modelspec.prediction_type": "flow" if flow else "v" if v else "epsilon",
        "ss_loradex_train_config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if flow:  # kohya flux_train_network.py / sd3_train_network.py update_metadata
        guidance = cfg.guidance_scale if cfg.guidance_scale is not None else getattr(ctx.family, "train_guidance", None)
        md.update({"ss_timestep_sampling": cfg.timestep_sampling, "ss_sigmoid_scale": str(cfg.sigmoid_scale),
                   "ss_discrete_flow_shift": str(cfg.discrete_flow_shift),
                   "ss_model_prediction_type": cfg.model_prediction_type, "ss_weighting_scheme": cfg.weighting_scheme,
                   "ss_logit_mean": str(cfg.logit_mean), "ss_logit_std": str(cfg.logit_std),
                   "ss_mode_scale": str(cfg.mode_scale), "ss_guidance_scale": str(guidance)})
    if result.dataset is not None:
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
