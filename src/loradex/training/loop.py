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
    """``None``: the embedded tiny SD pipeline (offline); a diffusers folder or a single-file
    checkpoint (.safetensors/.ckpt) otherwise; only local files (no download)."""
    from loradex.tiny import quiet, tiny_sd_pipeline

    if base is None or base == "tiny":
        return tiny_sd_pipeline()
    if base == "tiny-sdxl":
        from loradex.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline()
    p = Path(base)
    if not p.exists():
        raise TrainingError(f"base {base!r}: no such folder or file (a diffusers folder or a single checkpoint file)")
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        with quiet():
            if p.is_dir():
                pipe = DiffusionPipeline.from_pretrained(str(p), local_files_only=True, safety_checker=None)
            else:
                try:
                    pipe = StableDiffusionXLPipeline.from_single_file(str(p), local_files_only=True)
                except Exception:
                    pipe = StableDiffusionPipeline.from_single_file(str(p), local_files_only=True)
    except Exception as e:
        raise TrainingError(f"base {base}: cannot load it as a diffusers pipeline ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
        raise TrainingError(f"base {base}: only UNet pipelines (SD1/SD2/SDXL) are trained")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_arch(pipe) -> str:
    """The registered arch name an adapter trained on ``pipe`` is written for: sd1/sd2/sdxl by the
    UNet's cross-attention width, ``tiny-sd1``/``tiny-sdxl`` for the embedded tiny models, else
    an arch built from the live models (kohya names follow the SD naming)."""
    from loradex.core.arch import arch_from_models, list_archs, register_arch

    cfg = pipe.unet.config
    xdim = cfg.cross_attention_dim
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if tuple(cfg.block_out_channels) == (320, 640, 1280, 1280) and xdim in (768, 1024) and not sdxl:
        return "sd1" if xdim == 768 else "sd2"
    if sdxl and tuple(cfg.block_out_channels) == (320, 640, 1280) and xdim == 2048:
        return "sdxl"
    from loradex.tiny import tiny_arch

    if not sdxl and tuple(cfg.block_out_channels) == (32, 64) and xdim == 32:
        return tiny_arch("sd1").name
    if sdxl and tuple(cfg.block_out_channels) == (16, 32) and xdim == 64:
        return tiny_arch("sdxl").name
    name = f"trained-{'sdxl' if sdxl else 'sd'}-{'-'.join(map(str, cfg.block_out_channels))}-{xdim}"
    if name not in list_archs():
        models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        if sdxl:
            models["text_encoder_2"] = pipe.text_encoder_2
        register_arch(arch_from_models(name, models, "sdxl" if sdxl else "sd"))
    return name


# ---- context shared with the methods -------------------------------------------------------------
@dataclass
class Context:
    pipe: object
    cfg: TrainConfig
    device: torch.device
    weight_dtype: torch.dtype = torch.float32

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    def encoders(self) -> list[tuple[str, object, object]]:
        """(component, text encoder, tokenizer) pairs."""
        out = [("text_encoder", self.pipe.text_encoder, self.pipe.tokenizer)]
        if self.sdxl:
            out.append(("text_encoder_2", self.pipe.text_encoder_2, self.pipe.tokenizer_2))
        return out


def encode_prompts(ctx: Context, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning as the pipelines compute it: SD1/2 the last hidden state of the CLIP text
    encoder; SDXL the penultimate hidden states of both encoders concatenated, plus the pooled
    (projected) output of the second (StableDiffusionXLPipeline.encode_prompt)."""
    hidden, pooled = [], None
    for comp, enc, tok in ctx.encoders():
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(ctx.device)
        if not ctx.sdxl:
            return enc(ids)[0], None
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if comp == "text_encoder_2":
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


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
    from diffusers import DDPMScheduler

    from loradex.tiny import quiet
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
    for m in (pipe.vae, *(e for _, e, _ in ctx.encoders()), pipe.unet):
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
    # SDPA attention everywhere (the default of diffusers on torch 2; made explicit)
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
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

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pred_type = sched.config.prediction_type
    if pred_type not in ("epsilon", "v_prediction"):
        raise TrainingError(f"prediction type {pred_type!r} is not trained (epsilon or v_prediction)")
    T = sched.config.num_train_timesteps

    # cached latents: posterior mean and std per image
    vae = pipe.vae
    sf = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        lat_mean, lat_std = [], []
        for ex in examples:
            dist = vae.encode(ex.pixels[None].to(dev, wdt)).latent_dist
            lat_mean.append(dist.mean.float())
            lat_std.append(dist.std.float())
    buckets = [tuple(ex.pixels.shape[1:]) for ex in examples]
    prompts = [method.prompt(ctx, ex.prompt) for ex in examples]

    text_cache: dict[str, tuple] = {}

    def conditioning(ps: list[str]):
        if method.trains_text:
            return encode_prompts(ctx, ps)
        missing = [p for p in dict.fromkeys(ps) if p not in text_cache]
        if missing:
            with torch.no_grad():
                h, pooled = encode_prompts(ctx, missing)
            for i, p in enumerate(missing):
                text_cache[p] = (h[i], pooled[i] if pooled is not None else None)
        h = torch.stack([text_cache[p][0] for p in ps])
        pooled = torch.stack([text_cache[p][1] for p in ps]) if ctx.sdxl else None
        return h, pooled

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
        z0 = (z0 - shift) * sf
        loss = _denoise_loss(ctx, sched, pred_type, T, z0, [prompts[i] for i in idx], conditioning, gen)
        if class_items is not None:
            j = torch.randint(0, len(class_items[0]), (len(idx),), generator=gen).tolist()
            c0 = torch.cat([class_items[0][k] + class_items[1][k] * torch.randn(class_items[0][k].shape, generator=gen)
                            .to(dev) for k in j])
            c0 = (c0 - shift) * sf
            loss = loss + cfg.prior_weight * _denoise_loss(ctx, sched, pred_type, T, c0,
                                                           [class_items[2]] * len(j), conditioning, gen)
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


def _denoise_loss(ctx: Context, sched, pred_type: str, T: int, z0: torch.Tensor, prompts: list[str],
                  conditioning, gen: torch.Generator) -> torch.Tensor:
    dev = ctx.device
    noise = torch.randn(z0.shape, generator=gen).to(dev)
    t = torch.randint(0, T, (z0.shape[0],), generator=gen).to(dev)
    zt = sched.add_noise(z0, noise, t)
    target = noise if pred_type == "epsilon" else sched.get_velocity(z0, noise, t)
    with _autocast(ctx):
        h, pooled = conditioning(prompts)
        kw = {}
        if ctx.sdxl:
            H, W = z0.shape[-2] * ctx.pipe.vae_scale_factor, z0.shape[-1] * ctx.pipe.vae_scale_factor
            ids = torch.tensor([[H, W, 0, 0, H, W]], device=dev, dtype=h.dtype).repeat(z0.shape[0], 1)
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
        pred = ctx.unet(zt.to(ctx.weight_dtype) if ctx.weight_dtype != torch.float32 else zt, t, h, **kw).sample
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
    the training data (lower = better). Prompts are used as the examples give them."""
    from diffusers import DDPMScheduler

    dev = torch.device(device or "cpu")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    T = sched.config.num_train_timesteps
    cfg = TrainConfig()
    ctx = Context(pipe, cfg, dev)
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for ex in examples:
        dist = pipe.vae.encode(ex.pixels[None].to(dev)).latent_dist
        h, pooled = encode_prompts(ctx, [ex.prompt])
        for r in range(repeats):
            z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(dev)) * pipe.vae.config.scaling_factor
            noise = torch.randn(z0.shape, generator=g).to(dev)
            t = torch.tensor([timesteps[r % len(timesteps)]] if timesteps else
                             [int(torch.randint(0, T, (1,), generator=g))], device=dev)
            zt = sched.add_noise(z0, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
            kw = {}
            if ctx.sdxl:
                H, W = z0.shape[-2] * pipe.vae_scale_factor, z0.shape[-1] * pipe.vae_scale_factor
                kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[H, W, 0, 0, H, W]],
                                                                                          dtype=h.dtype, device=dev)}
            pred = pipe.unet(zt, t, h, **kw).sample
            total += float(F.mse_loss(pred, target))
            n += 1
    return total / n


#: Default output format per method.
DEFAULT_FORMAT = {"lora": "kohya", "loha": "kohya", "lokr": "kohya", "pivotal": "kohya", "ti": "a1111-ti",
                  "dreambooth": "diffusers-pipeline"}


def save_trained(result: TrainResult, out: str | Path, format: str | None = None, title: str | None = None) -> dict:
    """Write what ``result`` trained to ``out`` with loradex's writers (ModelSpec + ss_* metadata).

    ``dreambooth``: a diffusers pipeline folder (written to a temporary sibling, then renamed).
    ``pivotal`` as ``diffusers``: the LoRA file plus ``<stem>_emb.safetensors`` (diffusers-ti),
    because diffusers' ``load_lora_weights`` rejects a file with ``bundle_emb`` keys; as kohya the
    embedding is bundled. Returns {"paths": [...], "format": ..., "report": ConversionReport dict}."""
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
        from loradex.tiny import quiet

        with quiet():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        from loradex.converters import safetensors_io as sio

        sio.write_text(json.dumps(result.method.metadata, indent=1, sort_keys=True), tmp / "loradex_training.json")
        os.replace(tmp, out)
        return {"paths": [str(out)], "format": "diffusers-pipeline", "report": None}
    adapter = result.export()
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
