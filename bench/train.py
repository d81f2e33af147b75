"""Training speed and memory: loradex's loop (``loradex.training.train``, method ``lora``) against a
reference loop written here with plain diffusers + peft, for SD1 and FLUX.1:

* SD1 (``--model tiny``, ``sd15``): the recipe of diffusers'
  ``examples/dreambooth/train_dreambooth_lora.py`` (re-implemented, not copied): ``unet.add_adapter``
  with a LoraConfig on to_q/to_k/to_v/to_out.0, per step: VAE-encode the batch and sample the
  latent, encode the prompt with the frozen text encoder, DDPM noise, MSE on epsilon, backward,
  clip_grad_norm 1.0, AdamW step;
* FLUX.1 (``--model tiny-flux1``): the recipe of ``train_dreambooth_lora_flux.py``:
  ``transformer.add_adapter`` on to_q/to_k/to_v/to_out.0, the prompt's T5 + CLIP embeddings
  computed once (the script precomputes them when the text encoders are frozen), per step:
  VAE-encode and sample, ``(z - shift) * scale``, uniform sigmas from the scheduler
  (``compute_density_for_timestep_sampling("none")``), pack 2x2, the transformer with guidance 3.5,
  unpack, MSE on ``noise - z0``, backward, clip 1.0, AdamW.

Same model, same images, same steps, rank, learning rate; each run in a fresh subprocess
(peak memory = the largest resident set, sampled every 2 ms, above the level reached once the
pipeline is built; on CUDA ``max_memory_allocated``). Medians of interleaved repeats; each ratio is
printed next to its goal (speed >= 1.0x, peak memory <= 1.0x).

    python bench/train.py [--model tiny,tiny-flux1] [--steps 40] [--repeats 3] [--resolution 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def make_images(root: Path, n: int, size: int) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    x = np.arange(size)
    for i in range(n):
        s = ((x + 2 * i) // max(1, size // 8)) % 2
        a = np.zeros((size, size, 3), np.uint8)
        a[:, :, 0] = (200 * s + 30)[None, :]
        a[:, :, 2] = (200 * (1 - s) + 30)[None, :]
        a[:, :, 1] = 40 + 10 * i
        Image.fromarray(a).save(root / f"img{i}.png")
    return root


def reference_lora_loop(pipe, data: Path, steps: int, rank: int, lr: float, resolution: int, seed: int,
                        device: str, prompt: str = "a photo of sks", mixed_precision: str = "no",
                        gradient_checkpointing: bool = False) -> list[float]:
    """The train_dreambooth_lora.py recipe with plain diffusers + peft (batch size 1)."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from PIL import Image

    torch.manual_seed(seed)
    dev = torch.device(device)
    wdt = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.to(dev, wdt)
    vae.to(dev, wdt)
    te.to(dev, wdt)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # cast_training_params
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(data.glob("*.png"))

    def pixels(path: Path) -> torch.Tensor:  # Resize + CenterCrop + ToTensor + Normalize([0.5], [0.5])
        im = Image.open(path).convert("RGB")
        s = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))),
                       Image.Resampling.BILINEAR)
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0

    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(dev)
    unet.train()
    losses = []
    ac = (torch.autocast("cuda", dtype=wdt) if dev.type == "cuda" and wdt != torch.float32
          else torch.autocast("cpu", enabled=False))
    for step in range(steps):
        x = pixels(files[step % len(files)])[None].to(dev, wdt)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=dev).long()
        zt = sched.add_noise(z0, noise, t)
        with torch.no_grad():
            h = te(ids)[0]
        with ac:
            pred = unet(zt, t, h).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def reference_flux_loop(pipe, data: Path, steps: int, rank: int, lr: float, resolution: int, seed: int,
                        device: str, prompt: str = "a photo of sks", mixed_precision: str = "no",
                        gradient_checkpointing: bool = False, cache_latents: bool = False) -> list[float]:
    """The train_dreambooth_lora_flux.py recipe with plain diffusers + peft (batch size 1);
    ``cache_latents``: the script's ``--cache_latents`` (each image's latent distribution encoded
    once, sampled every step)."""
    import copy

    import torch.nn.functional as F
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    torch.manual_seed(seed)
    dev = torch.device(device)
    wdt = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    tr, vae = pipe.transformer, pipe.vae
    for m in (tr, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
        m.to(dev, wdt)
    tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                              target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    sched = copy.deepcopy(pipe.scheduler)
    files = sorted(data.glob("*.png"))
    with torch.no_grad():
        hidden, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=dev, max_sequence_length=512)
    cls = type(pipe)
    vsf = pipe.vae_scale_factor
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    cache = None
    if cache_latents:
        with torch.no_grad():
            cache = [vae.encode(_pixels(f, resolution)[None].to(dev, wdt)).latent_dist for f in files]
    tr.train()
    losses = []
    for step in range(steps):
        with torch.no_grad():
            if cache is not None:
                z0 = (cache[step % len(files)].sample() - shift) * scale
            else:
                x = _pixels(files[step % len(files)], resolution)[None].to(dev, wdt)
                z0 = (vae.encode(x).latent_dist.sample() - shift) * scale
        b, c, h, w = z0.shape
        img_ids = cls._prepare_latent_image_ids(b, h // 2, w // 2, dev, wdt)
        noise = torch.randn_like(z0)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b)
        idx = (u * sched.config.num_train_timesteps).long()
        timesteps = sched.timesteps[idx].to(dev)
        s = sched.sigmas[idx].to(dev, z0.dtype).view(-1, 1, 1, 1)
        packed = cls._pack_latents((1.0 - s) * z0 + s * noise, b, c, h, w)
        guidance = torch.full((b,), 3.5, device=dev) if tr.config.guidance_embeds else None
        pred = tr(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        pred = cls._unpack_latents(pred, h * vsf, w * vsf, vsf)
        loss = F.mse_loss(pred.float(), (noise - z0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _pixels(path: Path, resolution: int) -> torch.Tensor:
    """Resize + CenterCrop + ToTensor + Normalize([0.5], [0.5]) (the scripts' transforms)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    s = resolution / min(im.size)
    im = im.resize((max(resolution, round(im.width * s)), max(resolution, round(im.height * s))),
                   Image.Resampling.BILINEAR)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


class PeakRSS:
    """Largest resident set size (bytes) seen by a 2 ms sampler between start() and stop()."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def start(self) -> PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())
        return self.peak - self.base


def build_pipe(kind: str):
    if kind == "tiny":
        from loradex.tiny import tiny_sd_pipeline

        return tiny_sd_pipeline()
    if kind.startswith("tiny-"):
        from loradex.tiny import tiny_pipeline

        return tiny_pipeline(kind)
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu import sd15_pipeline

    return sd15_pipeline()


def child(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    from loradex.log import quiet

    with quiet():
        pipe = build_pipe(args.model)
    # imports are a one-time cost of either side, not training memory: load them before measuring
    import diffusers.models.attention_processor  # noqa: F401
    import peft  # noqa: F401

    import loradex.training  # noqa: F401  (config, context, objective, checkpoint, output, loop)
    import loradex.training.data  # noqa: F401
    import loradex.training.methods.lora  # noqa: F401
    from loradex.training.data import check_dataset, load_examples

    # ... and the lazy first-use initialisation of PIL's decoders / numpy helpers (~3-6 MiB, once per
    # process, measured): warmed in both children alike, the trainer still reads and checks every image
    load_examples(check_dataset(args.data, resolution=args.resolution, min_size=1, blur_threshold=0, faces=False),
                  token="sks")

    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    mem = PeakRSS().start()
    t0 = time.perf_counter()
    with quiet():
        if args.which == "loradex":
            from loradex.training import TrainConfig, train

            cfg = TrainConfig(method="lora", steps=args.steps, rank=args.rank, lr=args.lr, resolution=args.resolution,
                              seed=0, curate=False, faces=False, mixed_precision=args.mixed_precision,
                              gradient_checkpointing=args.gradient_checkpointing)
            losses = train(args.data, cfg, pipe=pipe, device=dev).losses
        else:
            kw = dict(mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing)
            if args.model == "tiny-flux1":
                losses = reference_flux_loop(pipe, Path(args.data), args.steps, args.rank, args.lr, args.resolution, 0,
                                             dev, cache_latents=args.reference_cache_latents, **kw)
            else:
                losses = reference_lora_loop(pipe, Path(args.data), args.steps, args.rank, args.lr, args.resolution, 0,
                                             dev, **kw)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = stop = mem.stop()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_mem
    # after timing: the denoising loss on the training images with fixed noise (lower = learned)
    from loradex.training import evaluate_loss

    examples = load_examples(check_dataset(args.data, resolution=args.resolution, min_size=1, blur_threshold=0,
                                           faces=False), token="sks")
    with torch.autocast("cuda", enabled=False) if cuda else torch.no_grad():
        pipe.to(dtype=torch.float32)
        trained = evaluate_loss(pipe, examples, device=dev, repeats=4)
    print(json.dumps({"which": args.which, "seconds": secs, "steps_per_s": args.steps / secs, "peak": peak,
                      "rss_peak": stop, "loss_first": float(np.mean(losses[:5])),
                      "loss_last": float(np.mean(losses[-5:])), "eval_loss": trained}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: stable on a shared 2-core VM)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="tiny,tiny-flux1",
                    help="comma-separated: tiny (SD1), tiny-flux1, sd15 (SD1.5 shapes, for CUDA)")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--reference-cache-latents", action="store_true",
                    help="FLUX reference: the script's --cache_latents (off by default there, as here)")
    ap.add_argument("--child", choices=["loradex", "reference"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.which = args.child
        child(args)
        return
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in models if m not in ("tiny", "tiny-flux1", "sd15")]
    if bad:
        ap.error(f"--model {', '.join(bad)}: choose tiny, tiny-flux1 or sd15")
    for model in models:
        compare(args, model)


def compare(args: argparse.Namespace, model: str) -> None:
    """Interleaved runs of both loops on ``model``; prints the medians and each ratio with its goal."""
    with tempfile.TemporaryDirectory() as d:
        data = make_images(Path(d) / "data", args.images, args.resolution)
        runs: dict[str, list[dict]] = {"loradex": [], "reference": []}
        passthrough = ["--steps", str(args.steps), "--resolution", str(args.resolution), "--rank", str(args.rank),
                       "--lr", str(args.lr), "--threads", str(args.threads), "--device", args.device,
                       "--model", model, "--mixed-precision", args.mixed_precision, "--data", str(data)]
        if args.gradient_checkpointing:
            passthrough.append("--gradient-checkpointing")
        if args.reference_cache_latents:
            passthrough.append("--reference-cache-latents")
        for r in range(args.repeats):
            order = ("loradex", "reference") if r % 2 == 0 else ("reference", "loradex")
            for which in order:
                out = subprocess.run([sys.executable, __file__, "--child", which, *passthrough], capture_output=True,
                                     text=True, check=True)
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base_eval = None
    if model.startswith("tiny"):  # the untrained model's loss on the same images, for scale
        from loradex.log import quiet
        from loradex.training import evaluate_loss
        from loradex.training.data import check_dataset, load_examples

        with tempfile.TemporaryDirectory() as d:
            data = make_images(Path(d) / "data", args.images, args.resolution)
            ex = load_examples(check_dataset(data, resolution=args.resolution, min_size=1, blur_threshold=0,
                                             faces=False), token="sks")
            with quiet():
                base_eval = evaluate_loss(build_pipe(model), ex, repeats=4)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("steps_per_s", "peak", "loss_first", "loss_last", "eval_loss")}
           for w, rs in runs.items()}
    L, R = med["loradex"], med["reference"]
    mib = 1 << 20
    recipe = "train_dreambooth_lora_flux" if model == "tiny-flux1" else "train_dreambooth_lora"
    if model == "tiny-flux1" and args.reference_cache_latents:
        recipe += " --cache_latents"
    print(f"LoRA training, {model} model on {args.device}, {args.images} images at {args.resolution}px, "
          f"{args.steps} steps, rank {args.rank}, medians of {args.repeats} interleaved runs")
    print(f"  reference (diffusers + peft, {recipe} recipe): {R['steps_per_s']:.2f} steps/s, "
          f"peak {R['peak'] / mib:.1f} MiB, eval loss after {R['eval_loss']:.3f}")
    print(f"  loradex train lora: {L['steps_per_s']:.2f} steps/s, peak {L['peak'] / mib:.1f} MiB, "
          f"eval loss after {L['eval_loss']:.3f}")
    if base_eval is not None:
        print(f"  (untrained model: eval loss {base_eval:.3f})")
    speed, memory = L["steps_per_s"] / R["steps_per_s"], L["peak"] / max(R["peak"], 1)
    print(f"{model} speed: {speed:.2f}x the reference (goal >= 1.0x: {'met' if speed >= 1.0 else 'NOT met'})")
    print(f"{model} peak memory: {memory:.2f}x the reference (goal <= 1.0x: {'met' if memory <= 1.0 else 'NOT met'})")


if __name__ == "__main__":
    main()
