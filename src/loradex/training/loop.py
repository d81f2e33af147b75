"""One training loop for every method (``ti``, ``lora``, ``loha``, ``lokr``, ``pivotal``, ``dreambooth``).

``train(data, cfg)`` builds a ``Trainer`` and runs it. The Trainer's ``prepare()`` curates the data,
loads the base, applies the dtype policy, lets the method inject what learns, builds the optimizer,
caches latents and text, seeds the RNGs and, on ``--resume``, puts everything back where a
checkpoint left it; ``step()`` is one optimizer step; ``run()`` steps to ``cfg.steps`` with
samples and checkpoints on their schedule and returns a ``TrainResult``. The objective is in
``objective``, the base and its arch in ``context``, checkpoints in ``checkpoint``, writing the
result in ``output``; with prior preservation (DreamBooth, Ruiz et al. 2022) the loss adds
``prior_weight`` x the same loss on class images the base model generated.

What makes it cheap and exact:

* **cached latents**: each image is encoded once; the cache holds the posterior's mean and std, and
  every step draws ``mean + std * n`` from the loop's generator — the same distribution as encoding
  each step, without the VAE;
* **cached text embeddings** where the method leaves the text encoders frozen (``lora`` without
  ``--text-encoder``, ``loha``, ``lokr``, ``dreambooth`` without it);
* **one generator** (CPU ``torch.Generator``) draws the batch order, latents, noise and timesteps,
  and a checkpoint stores its state, the optimizer's state, the trainable tensors and the remaining
  batch order: ``--resume`` continues bit for bit on the CPU (tested). Resuming from the run's
  last checkpoint trains nothing and returns the result, so a run killed before its output was
  written still gets it written (``output.save_trained`` then marks the checkpoint complete);
* gradient checkpointing on request, SDPA attention (diffusers' ``AttnProcessor2_0``, torch's
  ``scaled_dot_product_attention``), mixed precision (fp16 with a GradScaler, or bf16) only on CUDA
  with the frozen weights in half precision and the trained ones in fp32.

kohya's options live in their rooms: the optimizer and LR schedule in ``optim`` (the schedule's
state is checkpointed), noise / timesteps / loss weights in ``objective``, caption shuffling and
dropout and the ``ss_*`` dataset facts in ``captions``, kohya repeat folders in ``data`` (an epoch
visits each image ``repeats`` times; ``--epochs`` sets the steps from that), sample grids in
``sampling``. A setting left at its default draws nothing from the generator, so default runs
are the runs loradex made before these options existed, bit for bit.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loradex.errors import TrainingError
from loradex.training.checkpoint import (
    checkpoint_name,
    find_checkpoint,
    load_checkpoint,
    mark_complete,
    save_checkpoint,
)
from loradex.training.config import DEFAULT_FORMAT, DEFAULT_LR, METHODS, TrainConfig
from loradex.training.context import Context, encode_prompts, load_base, pipeline_arch, precision
from loradex.training.objective import Objective, denoise_loss, evaluate_loss
from loradex.training.optim import build_optimizer, build_scheduler, restore_scheduler
from loradex.training.output import save_trained

# the names this module has always offered (tests, the CLI and users import them from here)
__all__ = ["DEFAULT_FORMAT", "DEFAULT_LR", "METHODS", "Context", "Objective", "TrainConfig", "TrainResult", "Trainer",
           "TrainingError", "encode_prompts", "evaluate_loss", "find_checkpoint", "load_base", "pipeline_arch",
           "save_trained", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run trained and how: the method (whose ``export`` gives the Adapter, or for
    dreambooth the pipeline), the context, every step's loss, the dataset report and examples,
    the seconds it took, the steps done (``started_step``: where a resumed run started), the
    samples and checkpoints written, and the run's last checkpoint (``final_checkpoint``: the one
    at ``cfg.steps``, which ``mark_complete`` marks once the output is written)."""

    method: object  # the Method instance (export() gives the Adapter or writes the pipeline)
    ctx: Context
    losses: list[float]
    dataset: object  # DatasetReport
    examples: list
    seconds: float
    steps_done: int
    started_step: int = 0
    samples: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    final_checkpoint: str | None = None
    optimizer: str = ""  # kohya's ss_optimizer: the optimizer's class and arguments
    batches_per_epoch: int = 0

    def export(self):
        """The trained result as the method gives it (an Adapter; dreambooth: the pipeline)."""
        return self.method.export(self.ctx, self)

    def mark_complete(self, outputs: list[str], **extra) -> bool:
        """Mark the run's last checkpoint complete: call it after the output is written (and
        stored), never before. False when the run has no last checkpoint (no ``checkpoint_every``)."""
        if self.final_checkpoint is None:
            return False
        mark_complete(self.final_checkpoint, self.steps_done, outputs, **extra)
        return True

    def facts(self) -> dict:
        """What kohya's viewers read about the run (``methods.common.run_facts``: images with
        repeats, epochs, steps, resolution, learning rate, optimizer, schedule, dataset folders, tag
        frequencies, trigger), for lineage records."""
        from loradex.training.methods.common import run_facts

        return run_facts(self.ctx, self)


class LatentCache:
    """Per image, the VAE posterior's mean and std, encoded once. ``draw`` samples
    ``mean + std * n`` with ``n`` from the loop's generator: the distribution of encoding every
    step, without running the VAE again."""

    def __init__(self, means: list[torch.Tensor], stds: list[torch.Tensor]) -> None:
        self.means, self.stds = means, stds

    @classmethod
    @torch.no_grad()
    def encode(cls, ctx: Context, pixels: list[torch.Tensor]) -> LatentCache:
        """Encode each (3, H, W) image in [-1, 1] with the pipeline's VAE (in the frozen dtype)."""
        means, stds = [], []
        for x in pixels:
            mean, std = ctx.family.latents(ctx.pipe, x[None].to(ctx.device, ctx.weight_dtype))
            means.append(mean.float())
            stds.append(std.float())
        return cls(means, stds)

    def __len__(self) -> int:
        return len(self.means)

    def draw(self, indices: list[int], gen: torch.Generator, device: torch.device) -> torch.Tensor:
        """One latent sample per index, concatenated into a batch (drawn in index order)."""
        return torch.cat([self.means[i] + self.stds[i] * torch.randn(self.means[i].shape, generator=gen).to(device)
                          for i in indices])


class TextCache:
    """Text conditioning by prompt. While the method leaves the text encoders frozen each prompt
    is encoded once (without gradients) and reused; when it trains text (TI, pivotal, a text
    encoder LoRA) the prompts are encoded on every call, with gradients."""

    def __init__(self, ctx: Context, method, keep: bool = True) -> None:
        self.ctx, self.method, self.keep = ctx, method, keep
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The family's text inputs for a batch of prompts (``keep=False``: shuffled captions, whose
        variants are too many to keep, are encoded each time without gradients)."""
        if self.method.trains_text:
            return encode_prompts(self.ctx, prompts)
        if not self.keep:
            with torch.no_grad():
                return encode_prompts(self.ctx, prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                cond = encode_prompts(self.ctx, missing)
            for i, p in enumerate(missing):
                self.cache[p] = {k: v[i] for k, v in cond.items()}
        return {k: torch.stack([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}


def batches_per_epoch(pool: list[int], buckets: list[tuple[int, int]], batch_size: int) -> int:
    """How many batches ``batches`` makes of an epoch over ``pool`` (example indices with repeats)."""
    per: dict[tuple[int, int], int] = {}
    for i in pool:
        per[buckets[i]] = per.get(buckets[i], 0) + 1
    return sum(math.ceil(n / batch_size) for n in per.values())


def batches(order: list[int], buckets: list[tuple[int, int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """An epoch's batches: ``order`` split per bucket (same shape within a batch), then shuffled."""
    per: dict[tuple[int, int], list[int]] = {}
    for i in order:
        per.setdefault(buckets[i], []).append(i)
    out = [idx[k:k + batch_size] for idx in per.values() for k in range(0, len(idx), batch_size)]
    perm = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in perm]


def _progress(enabled: bool, total: int, initial: int):
    """A tqdm bar on a terminal's stderr, else None (quiet when piped or under --json)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", file=sys.stderr, leave=False)


class Trainer:
    """One run of ``cfg.method`` on the cleaned view of the images in ``data`` (or on
    ``examples``): ``prepare()`` once, then ``step()`` until ``done``, or ``run()`` for both plus
    samples, checkpoints and the ``TrainResult``.

    ``work_dir`` receives ``checkpoint-N`` folders, ``samples/`` and the cached class images;
    ``resume``: a checkpoint folder (or a work dir: its newest checkpoint). A run's randomness
    comes from one generator seeded with ``cfg.seed`` and is checkpointed with it, which is what
    makes a resumed run equal an uninterrupted one."""

    def __init__(self, data: str | Path, cfg: TrainConfig, base: str | None = None, pipe=None,
                 work_dir: str | Path | None = None, resume: str | Path | None = None, device: str | None = None,
                 progress: bool = False, examples: list | None = None) -> None:
        if (cfg.checkpoint_every or cfg.sample_every or cfg.prior_preservation) and work_dir is None:
            raise TrainingError("checkpoints, samples and class images need a work folder (--work-dir)")
        self.data, self.cfg, self.base, self.pipe = data, cfg, base, pipe
        self.work = Path(work_dir) if work_dir is not None else None
        self.resume_from, self.device_name, self.progress = resume, device, progress
        self.examples, self.report = examples, None
        self.prepared = False
        self.step_no, self.started = 0, 0
        self.queue: list[list[int]] = []
        self.losses: list[float] = []
        self.samples: list[str] = []
        self.checkpoints: list[str] = []
        self.final_checkpoint: str | None = None
        self.prior: LatentCache | None = None
        self.prior_prompt = ""

    @property
    def done(self) -> bool:
        """True once ``cfg.steps`` steps are done (at once when resumed from the last checkpoint)."""
        return self.step_no >= self.cfg.steps

    # ---- prepare ---------------------------------------------------------------------------------
    def prepare(self) -> Trainer:
        """Everything before the first step, in the order the random streams depend on (the method's
        initialisation is seeded; the loop's generator is seeded after the caches are built)."""
        if self.prepared:
            return self
        from loradex.log import quiet
        from loradex.training.methods import get_method

        cfg = self.cfg
        self._t0 = time.perf_counter()
        dev, wdt = precision(cfg, self.device_name)
        if cfg.resolution is not None:  # curate before loading a (large) base: a bad folder fails fast
            self._curate()
        if self.pipe is None:
            self.pipe = load_base(self.base)
        pipe = self.pipe
        ctx = self.ctx = Context(pipe, cfg, dev, wdt)
        if cfg.resolution is None:  # the family's training resolution (SD1 512, SD2 768, SDXL/SD3/FLUX 1024)
            cfg.resolution = ctx.family.resolution
            self._curate()
        self._epochs()
        pipe.to(dev)
        for m in (pipe.vae, *(e for _, e, _ in ctx.encoders()), ctx.denoiser):
            m.requires_grad_(False)
        method = self.method = get_method(cfg.method)
        if cfg.prior_preservation:  # generated by the base model (full precision), before anything is trained
            from loradex.training.methods.dreambooth import class_images

            means, stds, self.prior_prompt = class_images(ctx, self.work)
            self.prior = LatentCache(means, stds)
        self._scheduler_options()
        if wdt != torch.float32:
            with quiet():
                pipe.vae.to(dtype=wdt)
        torch.manual_seed(cfg.seed)  # adapter initialisation (PEFT's Kaiming init, lycoris) is seeded too
        with quiet():
            method.setup(ctx)
        # attention: diffusers' default processors on torch 2 (scaled_dot_product_attention, SDPA)
        if cfg.gradient_checkpointing:
            ctx.denoiser.enable_gradient_checkpointing()
            if method.trains_text:
                for _, enc, _ in ctx.encoders():
                    enc.gradient_checkpointing_enable()
        self._optimizer()
        self.objective = Objective(ctx)
        self.latents = LatentCache.encode(ctx, [ex.pixels for ex in self.examples])
        self.prompts = [method.prompt(ctx, ex.prompt) for ex in self.examples]
        self.text = TextCache(ctx, method, keep=not cfg.prompts_vary)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if self.resume_from is not None:
            self._resume()
        self.started = self.step_no
        self.optimizer.zero_grad(set_to_none=True)
        self.trainables = list(method.modules(ctx))
        for m in self.trainables:
            m.train()
        self.prepared = True
        return self

    def _curate(self) -> None:
        """The examples: the curated view of ``data`` (unless they were given)."""
        if self.examples is not None:
            return
        from loradex.training.data import check_dataset, load_examples

        cfg = self.cfg
        report = check_dataset(self.data, resolution=cfg.resolution, min_size=cfg.min_size or cfg.resolution // 2,
                               blur_threshold=cfg.blur_threshold if cfg.curate else 0.0,
                               dup_distance=cfg.dup_distance if cfg.curate else -1, faces=cfg.faces)
        if not cfg.curate:
            for i in report.images:
                i.issues = [x for x in i.issues if x == "unreadable"]
        self.examples = load_examples(report, cfg.token, cfg.class_word, cfg.resolution)
        self.report = report

    def _epochs(self) -> None:
        """The epoch's pool (each example index ``repeats`` times), the batches per epoch and, with
        ``epochs``, the steps they make (kohya's ``--max_train_epochs`` overrides the steps)."""
        cfg = self.cfg
        self.buckets = [tuple(ex.pixels.shape[1:]) for ex in self.examples]
        self.pool = [i for i, ex in enumerate(self.examples) for _ in range(max(1, getattr(ex, "repeats", 1)))]
        self.per_epoch = batches_per_epoch(self.pool, self.buckets, cfg.batch_size)
        if cfg.epochs:
            cfg.steps = cfg.epochs * self.per_epoch
        if cfg.ti_steps and cfg.ti_steps >= cfg.steps:
            raise TrainingError(f"--ti-steps {cfg.ti_steps} leaves no step of the {cfg.steps} for the LoRA")

    def _scheduler_options(self) -> None:
        """``v_parameterization`` / ``zero_terminal_snr`` also go into the pipeline's scheduler, so
        samples (and a DreamBooth folder) are drawn the way the result is meant to be used;
        ``guidance_scale`` needs a denoiser with a guidance embedding."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.guidance_scale is not None and not getattr(ctx.denoiser.config, "guidance_embeds", False):
            raise TrainingError(f"--guidance-scale: this {ctx.family.label} denoiser has no guidance embedding "
                                "(FLUX.1-dev has one; schnell and SD3 do not)")
        over = {}
        if cfg.v_parameterization:
            over["prediction_type"] = "v_prediction"
        if cfg.zero_terminal_snr:
            over["rescale_betas_zero_snr"] = True
        if over and ctx.family.objective != "flow":
            from loradex.log import quiet

            sched = ctx.pipe.scheduler
            with quiet():
                ctx.pipe.scheduler = type(sched).from_config(sched.config, **over)

    def _optimizer(self) -> None:
        """The optimizer over the method's parameter groups (``optim``: AdamW fused on CUDA and
        foreach on the CPU by default), its LR schedule, and a GradScaler for fp16."""
        cfg, dev = self.cfg, self.ctx.device
        groups = self.method.param_groups(self.ctx)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise TrainingError(f"{cfg.method}: nothing to train")
        self.optimizer, self.optimizer_desc = build_optimizer(cfg, groups, dev)
        self.lr_scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and cfg.mixed_precision == "fp16" else None

    def _resume(self) -> None:
        """Put the trained tensors, optimizer, RNGs, batch order and losses back where the
        checkpoint left them. A checkpoint at ``cfg.steps`` (the run's last) leaves nothing to
        train: it becomes the result, so its output can still be written."""
        cfg = self.cfg
        folder = find_checkpoint(self.resume_from)
        ck = load_checkpoint(folder, cfg)
        self.method.load_state(self.ctx, ck.trainable)
        ck.restore(self.optimizer, self.gen, self.scaler)
        restore_scheduler(self.lr_scheduler, ck.lr_scheduler, ck.step)
        self.step_no, self.queue, self.losses = ck.step, ck.queue, ck.losses
        if ck.step > cfg.steps:
            raise TrainingError(f"--resume {folder}: already at step {ck.step} of {cfg.steps}")
        if ck.step == cfg.steps:
            self.final_checkpoint = str(folder)
            done = ck.completion()
            logger.info("%s is the run's last step (%d): nothing left to train%s", folder, ck.step,
                        f"; it already wrote {', '.join(done.get('outputs', []))}" if done else
                        "; its output was not written yet")
        else:
            logger.info("resuming from %s at step %d of %d", folder, ck.step, cfg.steps)

    # ---- step / run ------------------------------------------------------------------------------
    def step(self) -> float:
        """One optimizer step on the next batch of the epoch's order (a new shuffled order when
        the last one is used up); returns the batch's loss. A non-finite loss stops the run."""
        self.prepare()
        cfg, ctx, gen, dev = self.cfg, self.ctx, self.gen, self.ctx.device
        if self.done:
            raise TrainingError(f"already at step {self.step_no} of {cfg.steps}")
        self.method.begin_step(ctx, self.step_no)
        if not self.queue:  # a new epoch: every example ``repeats`` times, shuffled, then batched per bucket
            perm = torch.randperm(len(self.pool), generator=gen).tolist()
            self.queue = batches([self.pool[i] for i in perm], self.buckets, cfg.batch_size, gen)
        idx = self.queue.pop(0)
        prompts = [self._prompt(i) for i in idx]
        z0 = ctx.family.scale_latents(ctx.pipe, self.latents.draw(idx, gen, dev))
        loss = denoise_loss(ctx, self.objective, z0, prompts, self.text, gen)
        if self.prior is not None:
            j = torch.randint(0, len(self.prior), (len(idx),), generator=gen).tolist()
            c0 = ctx.family.scale_latents(ctx.pipe, self.prior.draw(j, gen, dev))
            loss = loss + cfg.prior_weight * denoise_loss(ctx, self.objective, c0, [self.prior_prompt] * len(j),
                                                          self.text, gen)
        lv = float(loss.detach())
        if not math.isfinite(lv):  # before the update: a NaN step must not reach the weights
            raise TrainingError(f"step {self.step_no + 1}: the loss is {lv} (lower --lr, or --mixed-precision bf16)")
        self._update(loss)
        self.step_no += 1
        self.losses.append(lv)
        return lv

    def _prompt(self, i: int) -> str:
        """Example ``i``'s prompt for this step: as prepared, or (``shuffle_caption`` /
        ``caption_dropout_rate``) drawn anew from the loop's generator (``captions.process``)."""
        cfg = self.cfg
        if not cfg.prompts_vary:
            return self.prompts[i]
        from loradex.training.captions import process

        text = process(self.examples[i].prompt, self.gen, cfg.shuffle_caption, cfg.keep_tokens,
                       cfg.caption_dropout_rate)
        return self.method.prompt(self.ctx, text)

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, the method's gradient hook, clipping and the optimizer step (through the
        GradScaler with fp16); gradients are freed before the next forward."""
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        self.method.after_backward(self.ctx)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # before the next forward: no stale grads held through it
        self.method.after_step(self.ctx)

    def run(self) -> TrainResult:
        """Prepare, step to ``cfg.steps`` (samples and checkpoints on their schedule; with
        ``checkpoint_every`` the last step is always checkpointed, so a finished run can be extended
        or its output written again) and return the result. The trained modules are left in eval
        mode."""
        self.prepare()
        cfg = self.cfg
        bar = _progress(self.progress, cfg.steps, self.step_no)
        try:
            while not self.done:
                lv = self.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.4f}")
                if cfg.sample_every and (self.step_no % cfg.sample_every == 0 or self.step_no == cfg.steps):
                    self.samples.append(str(self.sample()))
                if cfg.checkpoint_every and (self.step_no % cfg.checkpoint_every == 0 or self.step_no == cfg.steps):
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
        for m in self.trainables:
            m.eval()
        return TrainResult(self.method, self.ctx, self.losses, self.report, self.examples,
                           time.perf_counter() - self._t0, self.step_no, self.started, self.samples, self.checkpoints,
                           self.final_checkpoint, self.optimizer_desc, self.per_epoch)

    def checkpoint(self) -> Path:
        """Write ``work/checkpoint-<step>`` (the run's last one is remembered as ``final_checkpoint``)."""
        folder = self.work / checkpoint_name(self.step_no)
        save_checkpoint(folder, self.step_no, self.method.state(self.ctx), self.optimizer, self.gen, self.queue,
                        self.losses, self.cfg, self.scaler, self.lr_scheduler)
        self.checkpoints.append(str(folder))
        if self.step_no == self.cfg.steps:
            self.final_checkpoint = str(folder)
        return folder

    def sample(self) -> Path:
        """The sample prompts (``sample_prompts``, else ``sample_prompt``, else the instance prompt)
        rendered with the adapter as trained so far, as one grid to ``work/samples/step-N.png``
        (``sampling.render``: fixed generators per prompt, so sampling does not disturb the
        training randomness)."""
        from loradex.training.sampling import render

        ctx = self.ctx
        prompts = [self.method.prompt(ctx, p) for p in self.cfg.sampling_prompts]
        return render(ctx, prompts, self.work / "samples" / f"step-{self.step_no:06d}.png", self.trainables)


def train(data: str | Path, cfg: TrainConfig, base: str | None = None, pipe=None, work_dir: str | Path | None = None,
          resume: str | Path | None = None, device: str | None = None, progress: bool = False,
          examples: list | None = None) -> TrainResult:
    """Train ``cfg.method`` on the cleaned view of the images in ``data`` (or on ``examples``).

    ``base``: what ``load_base`` loads (default: the embedded tiny model), unless ``pipe`` is given;
    ``work_dir`` receives ``checkpoint-N`` folders, ``samples/`` and the cached class images;
    ``resume``: a checkpoint folder (or a work dir: its newest checkpoint). The thin public face of
    ``Trainer`` (use it directly to step a run yourself)."""
    return Trainer(data, cfg, base=base, pipe=pipe, work_dir=work_dir, resume=resume, device=device,
                   progress=progress, examples=examples).run()
