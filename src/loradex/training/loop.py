"""One training loop for every method (``ti``, ``lora``, ``loha``, ``lokr``, ``pivotal``, ``dreambooth``).

The recipe is the denoising objective of DDPM (Ho et al. 2020) as diffusers' training examples use
it (``train_dreambooth_lora.py``): latents ``z0 = vae.encode(x).sample() * scaling_factor``,
``t ~ U{0..T-1}``, ``zt = sqrt(abar_t) z0 + sqrt(1-abar_t) eps`` (``DDPMScheduler.add_noise`` built
from the base pipeline's scheduler config, so the betas are the model's own), target ``eps``
(``prediction_type: epsilon``) or ``v = sqrt(abar_t) eps - sqrt(1-abar_t) z0`` (``v_prediction``,
``get_velocity``), loss = MSE(unet(zt, t, text), target); with prior preservation (DreamBooth, Ruiz et
al. 2022) plus ``prior_weight`` x the same loss on class images the base model generated.

What makes it cheap and exact:

* **cached latents**: each image is encoded once; the cache holds the posterior's mean and std, and
  every step draws ``mean + std * n`` from the loop's generator — the same distribution as encoding
  each step, without the VAE;
* **cached text embeddings** where the method leaves the text encoders frozen (``lora`` without
  ``--text-encoder``, ``loha``, ``lokr``, ``dreambooth`` without it);
* **one generator** (CPU ``torch.Generator``) draws the batch order, latents, noise and timesteps,
  and a checkpoint stores its state, the optimizer's state, the trainable tensors and the remaining
  batch order: ``--resume`` continues bit for bit on the CPU (tested);
* gradient checkpointing on request, SDPA attention (diffusers' ``AttnProcessor2_0``, torch's
  ``scaled_dot_product_attention``), mixed precision (fp16 with a GradScaler, or bf16) only on CUDA
  with the frozen weights in half precision and the trained ones in fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loradex.errors import LoradexError

METHODS = ("lora", "ti", "loha", "lokr", "pivotal", "dreambooth")
#: Learning rates that work for each method (diffusers' examples: LoRA 1e-4, TI 5e-4 x batch size,
#: DreamBooth 5e-6; tiny models tolerate more).
DEFAULT_LR = {"lora": 1e-4, "ti": 5e-3, "loha": 1e-4, "lokr": 1e-4, "pivotal": 1e-4, "dreambooth": 5e-6}


class TrainingError(LoradexError):
    """Bad training input: unknown method, base or resume folder, incompatible options."""


@dataclass
class TrainConfig:
    """Everything that decides the result (recorded in the output's metadata and lineage)."""

    method: str = "lora"
    token: str = "sks"
    class_word: str | None = None
    steps: int = 500
    lr: float | None = None
    text_lr: float | None = None  # ti / pivotal: the embedding rows' learning rate
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    rank: int = 4
    alpha: float | None = None  # default: rank (scale 1)
    targets: tuple[str, ...] | None = None
    text_encoder: bool = False  # lora: LoRA on the text encoder(s) too; dreambooth: fine-tune it
    dora: bool = False
    num_vectors: int = 1
    init_word: str | None = None
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 8
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (CUDA only)
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    sample_every: int = 0
    sample_prompt: str | None = None
    sample_steps: int = 20
    # dataset curation (the cleaned view of loradex.training.data)
    curate: bool = True
    min_size: int | None = None  # default resolution // 2
    blur_threshold: float = 100.0
    dup_distance: int = 6
    faces: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1 or self.num_vectors < 1:
            raise TrainingError("steps, batch size, rank and vectors must be positive")
        if self.resolution < 8 or self.resolution % 8:
            raise TrainingError(f"resolution {self.resolution} must be a positive multiple of 8")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed precision {self.mixed_precision!r}: choose no, fp16 or bf16")
        if self.prior_preservation and not self.class_word:
            raise TrainingError("prior preservation needs --class-word (the class images' prompt)")
        if self.targets is not None:
            self.targets = tuple(self.targets)
        if not self.token or any(c.isspace() for c in self.token):
            raise TrainingError(f"token {self.token!r} must be one word")
        if self.method in ("ti", "pivotal") and self.token != self.token.lower():
            # the CLIP tokenizer lowercases prompts; diffusers then misses the extra vectors (FORMATS.md §3)
            raise TrainingError(f"token {self.token!r}: use lower case (CLIP lowercases prompts)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr"] = self.learning_rate
        d["alpha"] = self.lora_alpha
        d["targets"] = list(self.targets) if self.targets else None
        return d


# ---- the base model ------------------------------------------------------------------------------
def load_base(base: str | None):
    """``None``/``tiny``: the embedded tiny SD pipeline (offline); ``tiny-<family>`` another
    embedded one; a diffusers folder or a single-file checkpoint otherwise (local files only)."""
    from loradex.converters.pipeline import load_pipeline

    if isinstance(base, str) and not Path(base).exists() and not base.startswith("tiny"):
        raise TrainingError(f"base {base!r}: no such folder or file (a diffusers folder or a single checkpoint file)")
    try:
        pipe = load_pipeline(base)
    except LoradexError as e:
        raise TrainingError(str(e)) from None
    if not hasattr(pipe, "vae"):
        raise TrainingError(f"base {base}: a pipeline without a VAE is not trained here")
    return pipe


def pipeline_arch(pipe):
    """The arch an adapter trained on ``pipe`` is written for, derived from the pipeline's own
    component configs (a built-in or embedded name when the modules are one's, else a derived arch
    that later commands resolve from the cache or the file's metadata). Call it before adapter
    layers are injected."""
    from loradex.converters.pipeline import pipeline_components
    from loradex.core.archs import arch_from_models
    from loradex.errors import ArchError

    try:
        return arch_from_models(pipeline_components(pipe), pipeline=type(pipe).__name__)
    except ArchError as e:
        raise TrainingError(f"{type(pipe).__name__}: {e}") from None


# ---- context shared with the methods -------------------------------------------------------------
@dataclass
class Context:
    pipe: object
    cfg: TrainConfig
    device: torch.device
    weight_dtype: torch.dtype = torch.float32
    arch: object = None  # the base's Arch (pipeline_arch), set before anything is injected

    def __post_init__(self) -> None:
        if self.arch is None:
            self.arch = pipeline_arch(self.pipe)

    @property
    def family(self):
        return self.arch.family

    @property
    def denoiser(self):
        """The UNet or transformer."""
        return getattr(self.pipe, self.arch.denoiser)

    def encoders(self) -> list[tuple[str, object, object]]:
        """(component, text encoder, tokenizer) of every text encoder the pipeline has."""
        return [(c, getattr(self.pipe, c), getattr(self.pipe, c.replace("text_encoder", "tokenizer"), None))
                for c in self.arch.text_encoders if getattr(self.pipe, c, None) is not None]

    def clip_encoders(self) -> list[tuple[str, object, object]]:
        """The CLIP text encoders (what textual inversion and text-encoder LoRAs train; T5 is left alone)."""
        return [e for e in self.encoders() if self.arch.component_kind(e[0]) == "clip"]


def encode_prompts(ctx: Context, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text conditioning as the family's pipeline computes it (``Family.encode_prompts``)."""
    return ctx.family.encode_prompts(ctx.pipe, prompts, ctx.device)


class Objective:
    """What the denoiser learns to predict. DDPM families (SD1/SD2/SDXL): ``t ~ U{0..T-1}``,
    ``zt = sqrt(abar_t) z0 + sqrt(1-abar_t) eps`` with the base scheduler's own betas, target ``eps``
    (``epsilon``) or ``v = sqrt(abar_t) eps - sqrt(1-abar_t) z0`` (``v_prediction``). Flow-matching
    families (FLUX, SD3; rectified flow as their trainers use it): ``sigma = sigmoid(n)``, ``n ~ N(0,1)``
    (the ``logit_normal`` timestep sampling of diffusers' SD3 script and kohya's ``sigmoid``),
    ``zt = (1 - sigma) z0 + sigma eps``, target the velocity ``eps - z0`` (no output
    preconditioning). Both draw from the loop's one generator, noise first."""

    def __init__(self, ctx: Context) -> None:
        from diffusers import DDPMScheduler

        self.flow = ctx.family.objective == "flow"
        if self.flow:
            self.T = 1000
            return
        self.sched = DDPMScheduler.from_config(ctx.pipe.scheduler.config)
        self.pred_type = self.sched.config.prediction_type
        if self.pred_type not in ("epsilon", "v_prediction"):
            raise TrainingError(f"prediction type {self.pred_type!r} is not trained (epsilon or v_prediction)")
        self.T = self.sched.config.num_train_timesteps

    @property
    def name(self) -> str:
        return "flow" if self.flow else self.pred_type

    def sample(self, z0: torch.Tensor, gen: torch.Generator, t: torch.Tensor | None = None):
        """``(zt, timesteps, target)`` for clean latents ``z0`` (``t``: fixed integer steps in [0, T))."""
        dev = z0.device
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        if t is None:
            if self.flow:
                t = torch.sigmoid(torch.randn((z0.shape[0],), generator=gen)).to(dev)
            else:
                t = torch.randint(0, self.T, (z0.shape[0],), generator=gen).to(dev)
        elif self.flow:
            t = t.to(dev).float() / self.T
        if self.flow:
            s = t.view(-1, *([1] * (z0.dim() - 1)))
            return (1 - s) * z0 + s * noise, t, noise - z0
        zt = self.sched.add_noise(z0, noise, t)
        target = noise if self.pred_type == "epsilon" else self.sched.get_velocity(z0, noise, t)
        return zt, t, target


# ---- checkpoints ---------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, gen: torch.Generator,
                     queue: list[list[int]], losses: list[float], cfg: TrainConfig, scaler=None) -> None:
    """A checkpoint folder: trainable.safetensors, optimizer.safetensors (every state tensor as
    ``<param index>.<key>``) and state.json (step, batch order, losses, param groups, config). Only
    safetensors and JSON: nothing is unpickled on --resume. Written to a temporary folder and
    renamed, so a crash never leaves half a checkpoint."""
    from loradex.converters import safetensors_io as sio

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sio.save({k: v.detach().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    osd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    tensors["__generator__"] = gen.get_state()
    tensors["__torch_rng__"] = torch.get_rng_state()
    sio.save(tensors, tmp / "optimizer.safetensors")
    state = {"step": step, "queue": queue, "losses": losses, "param_groups": osd["param_groups"],
             "scalars": scalars, "config": cfg.to_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None}
    sio.write_text(json.dumps(state), tmp / "state.json")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint folder, else its newest ``checkpoint-N`` child."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    if p.is_dir():
        cks = sorted((c for c in p.glob("checkpoint-*") if (c / "state.json").is_file()),
                     key=lambda c: int(c.name.rsplit("-", 1)[1]) if c.name.rsplit("-", 1)[1].isdigit() else -1)
        if cks:
            return cks[-1]
    raise TrainingError(f"--resume {path}: not a checkpoint folder (no state.json) nor a folder of checkpoint-N")


def _load_checkpoint(folder: Path, cfg: TrainConfig):
    from loradex.converters import safetensors_io as sio

    try:
        state = sio.read_json(folder / "state.json")
        trainable = sio.load(folder / "trainable.safetensors")
        opt = sio.load(folder / "optimizer.safetensors")
    except (OSError, LoradexError, ValueError) as e:
        raise TrainingError(f"--resume {folder}: unreadable checkpoint ({e})") from None
    saved = state.get("config", {})
    mine = cfg.to_dict()
    differ = [k for k in ("method", "rank", "alpha", "targets", "text_encoder", "dora", "num_vectors", "token",
                          "batch_size", "resolution", "seed") if saved.get(k) != mine.get(k)]
    if differ:
        raise TrainingError(f"--resume {folder}: the checkpoint was made with other settings ({', '.join(differ)})")
    return state, trainable, opt


# ---- the loop ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
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

    def export(self):
        return self.method.export(self.ctx, self)


def _batches(order: list[int], buckets: list[tuple[int, int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """An epoch's batches: ``order`` split per bucket (same shape within a batch), then shuffled."""
    per: dict[tuple[int, int], list[int]] = {}
    for i in order:
        per.setdefault(buckets[i], []).append(i)
    out = [idx[k:k + batch_size] for idx in per.values() for k in range(0, len(idx), batch_size)]
    perm = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in perm]


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", file=sys.stderr, leave=False)


def _autocast(ctx: Context):
    if ctx.device.type == "cuda" and ctx.cfg.mixed_precision != "no":
        return torch.autocast("cuda", dtype=torch.float16 if ctx.cfg.mixed_precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def train(data: str | Path, cfg: TrainConfig, base: str | None = None, pipe=None, work_dir: str | Path | None = None,
          resume: str | Path | None = None, device: str | None = None, progress: bool = False,
          examples: list | None = None) -> TrainResult:
    """Train ``cfg.method`` on the cleaned view of the images in ``data`` (or on ``examples``).

    ``work_dir`` receives ``checkpoint-N`` folders, ``samples/`` and the cached class images;
    ``resume``: a checkpoint folder (or a work dir: its newest checkpoint)."""
    from loradex.log import quiet
    from loradex.training.data import check_dataset, load_examples
    from loradex.training.methods import get_method

    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.mixed_precision != "no" and dev.type != "cuda":
        cfg.mixed_precision = "no"  # mixed precision only on CUDA (CPU autocast is slower and inexact)
    if (cfg.checkpoint_every or cfg.sample_every or cfg.prior_preservation) and work_dir is None:
        raise TrainingError("checkpoints, samples and class images need a work folder (--work-dir)")
    work = Path(work_dir) if work_dir is not None else None
    report = None
    if examples is None:
        report = check_dataset(data, resolution=cfg.resolution, min_size=cfg.min_size or cfg.resolution // 2,
                               blur_threshold=cfg.blur_threshold if cfg.curate else 0.0,
                               dup_distance=cfg.dup_distance if cfg.curate else -1, faces=cfg.faces)
        if not cfg.curate:
            for i in report.images:
                i.issues = [x for x in i.issues if x == "unreadable"]
        examples = load_examples(report, cfg.token, cfg.class_word, cfg.resolution)
    if pipe is None:
        pipe = load_base(base)
    wdt = torch.float32
    if dev.type == "cuda" and cfg.mixed_precision != "no":
        wdt = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    ctx = Context(pipe, cfg, dev, wdt)
    pipe.to(dev)
    for m in (pipe.vae, *(e for _, e, _ in ctx.encoders()), ctx.denoiser):
        m.requires_grad_(False)
    method = get_method(cfg.method)
    class_items = None
    if cfg.prior_preservation:  # generated by the base model (full precision), before anything is trained
        from loradex.training.methods.dreambooth import class_images

        class_items = class_images(ctx, work)
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
    groups = method.param_groups(ctx)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise TrainingError(f"{cfg.method}: nothing to train")
    opt_kw = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, **opt_kw)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and cfg.mixed_precision == "fp16" else None

    objective = Objective(ctx)

    # cached latents: posterior mean and std per image
    with torch.no_grad():
        lat_mean, lat_std = [], []
        for ex in examples:
            mean, std = ctx.family.latents(pipe, ex.pixels[None].to(dev, wdt))
            lat_mean.append(mean.float())
            lat_std.append(std.float())
    buckets = [tuple(ex.pixels.shape[1:]) for ex in examples]
    prompts = [method.prompt(ctx, ex.prompt) for ex in examples]

    text_cache: dict[str, dict[str, torch.Tensor]] = {}

    def conditioning(ps: list[str]) -> dict[str, torch.Tensor]:
        if method.trains_text:
            return encode_prompts(ctx, ps)
        missing = [p for p in dict.fromkeys(ps) if p not in text_cache]
        if missing:
            with torch.no_grad():
                cond = encode_prompts(ctx, missing)
            for i, p in enumerate(missing):
                text_cache[p] = {k: v[i] for k, v in cond.items()}
        return {k: torch.stack([text_cache[p][k] for p in ps]) for k in text_cache[ps[0]]}

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    step, queue, losses = 0, [], []
    if resume is not None:
        ck = find_checkpoint(resume)
        state, tensors, ostate = _load_checkpoint(ck, cfg)
        method.load_state(ctx, tensors)
        osd = {"param_groups": state["param_groups"], "state": {}}
        for k, v in ostate.items():
            if k.startswith("__"):
                continue
            idx, key = k.split(".", 1)
            osd["state"].setdefault(int(idx), {})[key] = v
        for k, v in state["scalars"].items():
            idx, key = k.split(".", 1)
            osd["state"].setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict(osd)
        gen.set_state(ostate["__generator__"])
        torch.set_rng_state(ostate["__torch_rng__"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, queue, losses = state["step"], state["queue"], list(state["losses"])
        if step >= cfg.steps:
            raise TrainingError(f"--resume {ck}: already at step {step} of {cfg.steps}")
    started = step
    samples, checkpoints = [], []
    bar = _progress(progress, cfg.steps, step)
    optimizer.zero_grad(set_to_none=True)
    trainables = list(method.modules(ctx))
    for m in trainables:
        m.train()
    while step < cfg.steps:
        if not queue:
            queue = _batches(torch.randperm(len(examples), generator=gen).tolist(), buckets, cfg.batch_size, gen)
        idx = queue.pop(0)
        z0 = torch.cat([lat_mean[i] + lat_std[i] * torch.randn(lat_mean[i].shape, generator=gen).to(dev)
                        for i in idx])
        z0 = ctx.family.scale_latents(pipe, z0)
        loss = _denoise_loss(ctx, objective, z0, [prompts[i] for i in idx], conditioning, gen)
        if class_items is not None:
            j = torch.randint(0, len(class_items[0]), (len(idx),), generator=gen).tolist()
            c0 = torch.cat([class_items[0][k] + class_items[1][k] * torch.randn(class_items[0][k].shape, generator=gen)
                            .to(dev) for k in j])
            c0 = ctx.family.scale_latents(pipe, c0)
            loss = loss + cfg.prior_weight * _denoise_loss(ctx, objective, c0, [class_items[2]] * len(j),
                                                           conditioning, gen)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        method.after_backward(ctx)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # before the next forward: no stale grads held through it
        method.after_step(ctx)
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise TrainingError(f"step {step}: the loss is {lv} (lower --lr, or --mixed-precision bf16)")
        losses.append(lv)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}")
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            samples.append(str(_sample(ctx, method, work, step)))
            for m in trainables:
                m.train()
        # the last step too, so that a finished run can be extended (--resume with more --steps)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            ck = work / f"checkpoint-{step}"
            _save_checkpoint(ck, step, method.state(ctx), optimizer, gen, queue, losses, cfg, scaler)
            checkpoints.append(str(ck))
    if bar is not None:
        bar.close()
    for m in trainables:
        m.eval()
    return TrainResult(method, ctx, losses, report, examples, time.perf_counter() - t0, step, started,
                       samples, checkpoints)


def _denoise_loss(ctx: Context, objective: Objective, z0: torch.Tensor, prompts: list[str], conditioning,
                  gen: torch.Generator) -> torch.Tensor:
    zt, t, target = objective.sample(z0, gen)
    with _autocast(ctx):
        cond = conditioning(prompts)
        zin = zt.to(ctx.weight_dtype) if ctx.weight_dtype != torch.float32 else zt
        pred = ctx.family.predict(ctx.pipe, zin, t, cond)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _sample(ctx: Context, method, work: Path, step: int) -> Path:
    """One image with the adapter as trained so far, to ``work/samples/step-N.png`` (its own fixed
    generator: sampling does not disturb the training randomness)."""
    cfg = ctx.cfg
    prompt = method.prompt(ctx, cfg.sample_prompt or f"a photo of {cfg.token}"
                           + (f" {cfg.class_word}" if cfg.class_word else ""))
    (work / "samples").mkdir(parents=True, exist_ok=True)
    path = work / "samples" / f"step-{step:06d}.png"
    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    with torch.no_grad(), _autocast(ctx):
        img = ctx.pipe(prompt, num_inference_steps=cfg.sample_steps, generator=g, height=cfg.resolution,
                       width=cfg.resolution).images[0]
    from loradex.converters.safetensors_io import atomic_path

    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


@torch.no_grad()
def evaluate_loss(pipe, examples: list, seed: int = 1234, repeats: int = 8, timesteps: list[int] | None = None,
                  device: str | None = None) -> float:
    """The denoising loss of ``pipe`` on ``examples`` with fixed noise, timesteps and latent samples:
    the measure that says whether an adapter loaded in a consumer pipeline moved the model towards
    the training data (lower = better). Prompts are used as the examples give them; ``timesteps``
    are integer steps in [0, 1000) (flow-matching families: sigma = t / 1000)."""
    dev = torch.device(device or "cpu")
    ctx = Context(pipe, TrainConfig(), dev)
    objective = Objective(ctx)
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for ex in examples:
        mean, std = ctx.family.latents(pipe, ex.pixels[None].to(dev))
        cond = encode_prompts(ctx, [ex.prompt])
        for r in range(repeats):
            z0 = ctx.family.scale_latents(pipe, mean + std * torch.randn(mean.shape, generator=g).to(dev))
            t = torch.tensor([timesteps[r % len(timesteps)]]) if timesteps else None
            zt, t, target = objective.sample(z0, g, t)
            pred = ctx.family.predict(pipe, zt, t, cond)
            total += float(F.mse_loss(pred.float(), target.float()))
            n += 1
    return total / n


#: Default output format per method.
DEFAULT_FORMAT = {"lora": "kohya", "loha": "kohya", "lokr": "kohya", "pivotal": "kohya", "ti": "a1111-ti",
                  "dreambooth": "diffusers-pipeline"}


def save_trained(result: TrainResult, out: str | Path, format: str | None = None, title: str | None = None,
                 base_model: str | None = None) -> dict:
    """Write what ``result`` trained to ``out`` with loradex's writers (ModelSpec + ss_* metadata).

    ``dreambooth``: a diffusers pipeline folder (written to a temporary sibling, then renamed).
    ``pivotal`` as ``diffusers``: the LoRA file plus ``<stem>_emb.safetensors`` (diffusers-ti),
    because diffusers' ``load_lora_weights`` rejects a file with ``bundle_emb`` keys; as kohya the
    embedding is bundled. ``base_model``: the base's identity (registry REF, Hub id or path),
    recorded as ``loradex.base_model``. Returns {"paths": [...], "format": ..., "report": ConversionReport dict}."""
    import shutil

    import loradex

    cfg = result.ctx.cfg
    fmt = (format or DEFAULT_FORMAT[cfg.method]).lower()
    out = Path(out)
    if cfg.method == "dreambooth":
        if fmt not in ("diffusers-pipeline", "diffusers"):
            raise TrainingError(f"dreambooth writes a diffusers pipeline folder, not {fmt!r} "
                                "(extract a LoRA from it with loradex extract)")
        pipe = result.export()
        if out.exists():
            raise TrainingError(f"{out} exists: dreambooth writes a new folder")
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        from loradex.log import quiet

        with quiet():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        from loradex.converters import safetensors_io as sio

        sio.write_text(json.dumps(result.method.metadata, indent=1, sort_keys=True), tmp / "loradex_training.json")
        os.replace(tmp, out)
        return {"paths": [str(out)], "format": "diffusers-pipeline", "report": None}
    adapter = result.export()
    if base_model:
        adapter.metadata["loradex.base_model"] = base_model
    title = title or out.stem
    if cfg.method == "ti" and fmt in ("kohya", "diffusers", "a1111"):
        fmt = {"kohya": "kohya-ti", "diffusers": "diffusers-ti", "a1111": "a1111-ti"}[fmt]
    paths = [str(out)]
    if cfg.method == "pivotal" and fmt in ("diffusers", "peft"):
        from loradex.core.adapter import Adapter

        emb = Adapter(embeddings=adapter.embeddings, metadata=dict(adapter.metadata), arch=adapter.arch)
        emb_path = out.with_name(f"{out.stem}_emb.safetensors")
        loradex.save(emb, emb_path, format="diffusers-ti", title=title)
        paths.append(str(emb_path))
        adapter.embeddings = {}
    report = loradex.save(adapter, out, format=fmt, title=title)
    return {"paths": paths, "format": fmt, "report": report}
