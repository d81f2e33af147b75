"""The GPU benchmark in one call: SD1.5- and SDXL-size UNets with random weights (the bundled configs
``core/configs/sd15_unet.json`` and ``sdxl_base_unet.json``, ``UNet2DConditionModel(**config)``,
fp16 on CUDA; no download), the inference engine against diffusers, and LoRA training against a
plain diffusers + peft loop.

Sections (each guarded by a timeout: one that fails or runs out of time reports its error and the
rest still run; a global ``--budget`` skips what would start after it):

* ``sd15`` / ``sdxl`` -- on a pipeline holding only the UNet (the text encoders and the VAE play no
  part in these numbers), random LoRAs of rank ``--rank`` on every attention to_q/to_k/to_v/to_out.0
  written as diffusers files:

  - swap latency p50 / p99: the engine from its CPU tier (``activate``: resolve, cache lookup, copy
    into a slot, device synced; slots emptied between iterations, untimed) and from disk (cache
    cold), vs diffusers ``load_lora_weights`` + ``set_adapters`` and ``load_lora_weights(...,
    hotswap=True)`` after ``enable_lora_hotswap`` (on a fresh UNet of the same size);
  - images/s of the denoiser: ``--steps`` UNet calls on a batch of ``--batch`` latents with
    ``--batch`` different adapters (one forward pass per step) vs the same requests one by one
    (each with its adapter) vs the batch without adapters; the largest difference between a row of
    the mixed batch and the same request alone (fp16 noise expected on CUDA);
  - patch mode: a LoHa whose exact LoRA rank exceeds the slots (so the engine adds
    ``delta(W)`` to the weights for the batch, computed on the device, and restores them after):
    apply and restore p50, and whether the weights came back bit-identical;
  - peak memory (``torch.cuda.max_memory_allocated``; on the CPU the process's peak RSS).
* ``compile`` -- ``torch.compile`` of the SD1.5-size denoiser through the engine (``compile=True``,
  inductor): compile time, then ``--compile-swaps`` swaps (a batch of 2 with 2 different adapters, 4
  adapters through 2 slots: every call copies one into a slot) with the number of graphs dynamo
  compiled after the warm-up (goal: 0 recompiles), compiled vs eager forward time.
* ``train`` -- ``bench/train.py``'s two loops (loradex ``train`` and the diffusers + peft
  ``train_dreambooth_lora`` recipe), each in a fresh process on an SD1.5-size pipeline (UNet, CLIP
  ViT-L/14 text tower, the SD VAE; random weights) at ``--train-resolution`` px, fp16 mixed
  precision: steps/s and peak memory, and their ratios.

``--cpu-smoke`` runs the same code paths on the CPU in float32 with the tiny UNets (tiny_sd1_unet /
tiny_sdxl_unet configs), few iterations, the compile section with dynamo's ``eager`` backend (the
recompile count is dynamo's, whatever the backend; inductor is not run on the CPU) and the training
section on the tiny pipeline: it checks the script (CI runs it), its numbers mean nothing.

    python bench/gpu.py [--json] [--out result.json] [--sections sd15,sdxl,compile,train] [--budget 540]
    python bench/gpu.py --cpu-smoke --json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")
SECTIONS = ("sd15", "sdxl", "compile", "train")
#: size -> (UNet config on CUDA, UNet config in the CPU smoke run, pipeline class, image size on CUDA)
SIZES = {
    "sd15": ("sd15_unet.json", "tiny_sd1_unet.json", "StableDiffusionPipeline", 512),
    "sdxl": ("sdxl_base_unet.json", "tiny_sdxl_unet.json", "StableDiffusionXLPipeline", 1024),
}

#: AutoencoderKL of SD 1.x (runwayml/stable-diffusion-v1-5 vae/config.json, as published).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- models ------------------------------------------------------------------------------------

def _config(name: str) -> dict:
    from loradex.core.archs.tables import load_config

    return {k: v for k, v in load_config(name).items() if not k.startswith("_") and k != "architectures"}


def build_unet(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``UNet2DConditionModel(**config)`` with random weights, initialised on ``device`` (fast on a
    GPU) and cast to ``dtype``, in eval mode."""
    from diffusers import UNet2DConditionModel

    from loradex.log import quiet

    torch.manual_seed(seed)
    with quiet():
        with torch.device(device):
            unet = UNet2DConditionModel(**_config(config))
        unet = unet.to(dtype)  # (diffusers warns about casting a model it did not load)
    return unet.eval().requires_grad_(False)


def unet_pipeline(unet, cls_name: str):
    """A pipeline holding only ``unet`` (no text encoder, tokenizer or VAE): what the engine wraps
    and what diffusers' ``load_lora_weights`` loads into."""
    import diffusers

    from loradex.log import quiet

    kw = dict(vae=None, text_encoder=None, tokenizer=None, unet=unet,
              scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False))
    if cls_name == "StableDiffusionXLPipeline":
        kw.update(text_encoder_2=None, tokenizer_2=None)
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with quiet():
        pipe = getattr(diffusers, cls_name)(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(unet, batch: int, size: int, device, dtype, seed: int = 0) -> tuple[tuple, dict]:
    """Random denoiser inputs for ``batch`` images of ``size`` px: latents, timesteps, 77 context
    tokens (and SDXL's pooled text + 6 time ids)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    lat = size // 8
    x = torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    kw: dict = {"encoder_hidden_states": ctx}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
                                   "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch,
                                                            dtype=dtype, device=device)}
    return (x, t), kw


def rows(args: tuple, kw: dict, sl: slice) -> tuple[tuple, dict]:
    """The inputs of rows ``sl`` of a batch made by :func:`unet_inputs`."""
    cut = {"encoder_hidden_states": kw["encoder_hidden_states"][sl]}
    if "added_cond_kwargs" in kw:
        cut["added_cond_kwargs"] = {k: v[sl] for k, v in kw["added_cond_kwargs"].items()}
    return (args[0][sl], args[1][sl]), cut


def sd15_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5 shapes and random weights, on the CPU (the tiny
    byte-level tokenizer: its ids fit CLIP's 49408-row embedding). bench/train.py's ``--model sd15``."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loradex.log import quiet
    from loradex.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    with quiet():
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**_config("clip_vit_l14_text.json"))),
            tokenizer=tiny_tokenizer(), unet=UNet2DConditionModel(**_config("sd15_unet.json")),
            scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- adapters ----------------------------------------------------------------------------------

def attention_modules(arch) -> dict:
    return {n: i for n, i in arch.modules.items() if n.startswith("unet.") and n.endswith(ATTN) and i.type == "linear"}


def make_loras(arch, out: Path, n: int, rank: int, dtype: torch.dtype, seed: int = 0) -> list[str]:
    """``n`` random LoRA files (diffusers format) of rank ``rank`` on the UNet's attention."""
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    mods = attention_modules(arch)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        patches = {name: LoraPatch(up=(torch.randn(info.shape[0], rank, generator=g) * 0.02).to(dtype),
                                   down=(torch.randn(rank, info.shape[1], generator=g) * 0.02).to(dtype),
                                   alpha=float(rank))
                   for name, info in mods.items()}
        p = out / f"lora{i:03d}.safetensors"
        loradex.save(Adapter(patches=patches, arch=arch.name), p, "diffusers", arch=arch)
        paths.append(str(p))
    return paths


def make_loha(arch, out: Path, rank: int, dtype: torch.dtype, seed: int = 1) -> str:
    """A LoHa (kohya/LyCORIS file) on the UNet's attention whose exact LoRA rank ``rank**2`` exceeds the
    slots: the engine applies it by weight patching."""
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.loha import LohaPatch

    g = torch.Generator().manual_seed(seed)

    def f(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    patches = {name: LohaPatch(hada_w1_a=f(info.shape[0], rank), hada_w1_b=f(rank, info.shape[1]),
                               hada_w2_a=f(info.shape[0], rank), hada_w2_b=f(rank, info.shape[1]), alpha=float(rank))
               for name, info in attention_modules(arch).items()}
    p = out / "loha.safetensors"
    loradex.save(Adapter(patches=patches, arch=arch.name), p, "kohya", arch=arch)
    return str(p)


# ---- measuring ---------------------------------------------------------------------------------

class SectionTimeout(Exception):
    """A section ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM; between Python bytecodes,
    so a long kernel finishes first)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def ms(xs: list[float]) -> dict:
    """p50 / p99 in milliseconds of durations in seconds."""
    return {"p50": pct(xs, 50) * 1e3, "p99": pct(xs, 99) * 1e3, "n": len(xs)}


class Run:
    """Device, dtype and settings of one invocation, and the helpers every section uses."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.float16
        self.t0 = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_bytes": torch.cuda.max_memory_allocated(), "what": "torch.cuda.max_memory_allocated"}
        return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "what": "peak RSS of the process (CPU smoke run)"}

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def timed(self, fn, *a, **kw) -> float:
        self.sync()
        t = time.perf_counter()
        fn(*a, **kw)
        self.sync()
        return time.perf_counter() - t


def engine_for(run: Run, pipe, slots: int, **kw):
    from loradex.inference.engine import Engine

    return Engine(pipe, device=run.device, dtype=run.dtype, max_rank=run.args.rank, slots=slots, ti_tokens=0,
                  exact_batches=False, **kw)


def size_section(run: Run, size: str, work: Path, res: dict) -> None:
    """Swap latency, images/s, patch mode and peak memory at one UNet size (see the module docstring);
    fills ``res`` as it goes, so a timeout keeps what was measured."""
    a = run.args
    cfg_gpu, cfg_cpu, cls_name, px = SIZES[size]
    config = cfg_cpu if run.smoke else cfg_gpu
    px = 64 if run.smoke else px
    res.update(config=config, image_px=px, batch=a.batch, steps=a.steps, rank=a.rank, dtype=str(run.dtype))
    run.free()
    t = time.perf_counter()
    unet = build_unet(config, run.device, run.dtype)
    res["build_s"] = time.perf_counter() - t
    run.free()
    run.reset_peak()  # (after the float32 initialisation)
    res["params"] = sum(p.numel() for p in unet.parameters())
    res["model_bytes"] = sum(p.numel() * p.element_size() for p in unet.parameters())
    t = time.perf_counter()
    eng = engine_for(run, unet_pipeline(unet, cls_name), slots=a.batch)
    res["engine_init_s"] = time.perf_counter() - t
    res["slot_bytes"] = eng.bank.nbytes()
    res["slot_layers"] = len(eng.bank.layers)
    log(f"{size}: {res['params'] / 1e6:.0f} M parameters ({config}), {res['slot_layers']} slot layers, "
        f"slots {res['slot_bytes'] / 2**20:.0f} MiB")

    t = time.perf_counter()
    n_files = a.batch + a.cold
    fdt = torch.float32 if run.smoke else torch.float16
    files = make_loras(eng.arch, work, n_files, a.rank, fdt)
    loha = make_loha(eng.arch, work, rank=max(8, a.rank), dtype=fdt)
    res["adapter_files"] = {"loras": n_files, "lora_modules": len(attention_modules(eng.arch)),
                            "lora_file_bytes": os.path.getsize(files[0]), "write_s": time.perf_counter() - t}
    hot, cold = files[:a.batch], files[a.batch:]
    eng.prefetch(hot)
    swaps: dict = {}
    res["swap_ms"] = swaps

    # ---- swap latency: CPU tier -> slot, and disk -> slot ----
    def swap_times(refs: list[str], n: int) -> list[float]:
        out = []
        for i in range(n):
            for s in range(eng.slots):
                eng.bank.clear_slot(s)
            run.sync()
            t0 = time.perf_counter()
            with eng.activate([[(refs[i % len(refs)], 1.0)]]):
                run.sync()
                out.append(time.perf_counter() - t0)
        return out

    swap_times(hot, 2)  # warm-up
    swaps["engine_cpu_tier"] = ms(swap_times(hot, a.swaps))
    swaps["engine_from_disk"] = ms(swap_times(cold, len(cold)))
    st = eng.stats()
    swaps["engine_slot_copy"] = {"p50": st["swap_latency_p50_s"] * 1e3, "p99": st["swap_latency_p99_s"] * 1e3}
    log(f"{size}: engine swap p50 {swaps['engine_cpu_tier']['p50']:.2f} ms")

    # ---- images/s: mixed batch vs one by one vs no adapters (the denoiser's steps) ----
    unet = eng.pipe.unet
    args, kw = unet_inputs(unet, a.batch, px, run.device, run.dtype)
    mixed = [[(f, 1.0)] for f in hot]

    def steps(inputs: tuple[tuple, dict]) -> None:
        for _ in range(a.steps):
            unet(*inputs[0], **inputs[1])

    with torch.inference_mode():  # (as the engine runs its pipeline)
        with eng.activate(mixed):
            y_mixed = unet(*args, **kw).sample.float()
            t_mixed = run.timed(steps, (args, kw))
        diff, t_one = 0.0, 0.0
        for i, f in enumerate(hot):
            one = rows(args, kw, slice(i, i + 1))
            with eng.activate([[(f, 1.0)]]):
                y1 = unet(*one[0], **one[1]).sample.float()
                diff = max(diff, float((y1[0] - y_mixed[i]).abs().max()))
                t_one += run.timed(steps, one)
        with eng.activate([[] for _ in hot]):
            unet(*args, **kw)
            t_plain = run.timed(steps, (args, kw))
    ips = {"mixed_batch": a.batch / t_mixed, "one_by_one": a.batch / t_one, "no_adapter_batch": a.batch / t_plain}
    res["images_per_s"] = ips
    res["images_per_s_note"] = f"denoiser only: {a.steps} UNet calls per image, no CFG, no text encoder / VAE"
    res["mixed_vs_alone_max_abs_diff"] = diff
    log(f"{size}: images/s mixed {ips['mixed_batch']:.2f}, one by one {ips['one_by_one']:.2f}, "
        f"no adapters {ips['no_adapter_batch']:.2f}")

    # ---- patch mode: deltas on the device, pristine weights restored ----
    ready = eng.ready(loha)
    patch: dict = {"mode": ready.mode, "modules": len(ready.patches), "reason": ready.reason}
    res["patch_mode"] = patch
    name = next(iter(ready.patches))
    before = eng.modules[name].weight.detach().clone()
    applies, restores = [], []
    for i in range(a.patch_reps + 1):
        run.sync()
        t0 = time.perf_counter()
        with eng.activate([[(loha, 0.8)]]):
            run.sync()
            t1 = time.perf_counter()
            if i == 0:
                patch["changed"] = not torch.equal(eng.modules[name].weight, before)
        run.sync()
        t2 = time.perf_counter()
        if i == 0:
            patch["first_apply_ms"] = (t1 - t0) * 1e3
        else:
            applies.append(t1 - t0)
            restores.append(t2 - t1)
    patch.update(apply_ms=ms(applies), restore_ms=ms(restores),
                 restored_exact=bool(torch.equal(eng.modules[name].weight, before)),
                 factors_on_device_bytes=eng.on_device.nbytes)
    log(f"{size}: patch mode apply p50 {patch['apply_ms']['p50']:.1f} ms, restore p50 {patch['restore_ms']['p50']:.1f} ms")
    res["memory"] = run.peak()
    res["memory"]["during"] = "engine: swaps, mixed batch, one by one, patch mode"

    # ---- diffusers on a fresh UNet of the same size ----
    eng = unet = y_mixed = args = kw = None  # (the closures above hold these names)
    run.free()
    from loradex.log import quiet

    pipe = unet_pipeline(build_unet(config, run.device, run.dtype), cls_name)
    run.free()
    run.reset_peak()
    times = []
    with quiet():
        for i in range(a.baseline_swaps):
            name = f"adapter_{i}"
            run.sync()
            t0 = time.perf_counter()
            pipe.load_lora_weights(files[i % len(files)], adapter_name=name)
            pipe.set_adapters([name], [1.0])
            run.sync()
            times.append(time.perf_counter() - t0)
            pipe.delete_adapters(name)
        swaps["diffusers_load_set"] = ms(times)
        pipe.unload_lora_weights()
        pipe.enable_lora_hotswap(target_rank=a.rank)
        pipe.load_lora_weights(files[0], adapter_name="hot")
        times = []
        for i in range(a.baseline_swaps):
            run.sync()
            t0 = time.perf_counter()
            pipe.load_lora_weights(files[(i + 1) % len(files)], adapter_name="hot", hotswap=True)
            run.sync()
            times.append(time.perf_counter() - t0)
        swaps["diffusers_hotswap"] = ms(times)
    res["memory_diffusers"] = run.peak()
    res["memory_diffusers"]["during"] = "diffusers: load_lora_weights + set_adapters, hotswap (one adapter loaded)"
    del pipe
    run.free()
    e = swaps["engine_cpu_tier"]["p50"]
    res["ratios"] = {
        "swap_vs_load_set": swaps["diffusers_load_set"]["p50"] / e,
        "swap_vs_hotswap": swaps["diffusers_hotswap"]["p50"] / e,
        "mixed_vs_one_by_one": ips["mixed_batch"] / ips["one_by_one"],
        "mixed_vs_no_adapter": ips["mixed_batch"] / ips["no_adapter_batch"],
    }


def compile_section(run: Run, work: Path, res: dict) -> None:
    """torch.compile through the engine; recompiles counted over ``--compile-swaps`` swaps."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    a = run.args
    size = a.compile_size
    cfg_gpu, cfg_cpu, cls_name, px = SIZES[size]
    config = cfg_cpu if run.smoke else cfg_gpu
    px = 64 if run.smoke else px
    backend = "eager" if run.smoke else a.compile_backend
    res.update(size=size, config=config, backend=backend, image_px=px, batch=2, slots=2, adapters=4)
    if run.smoke:
        res["note"] = "CPU smoke run: dynamo with the eager backend (guards and recompiles as on CUDA; no inductor)"
    torch._dynamo.reset()
    run.free()
    pipe = unet_pipeline(build_unet(config, run.device, run.dtype), cls_name)
    run.free()
    run.reset_peak()
    if backend == "inductor":
        eng = engine_for(run, pipe, slots=2, compile=True)
    else:  # what Engine(compile=True) does, with another backend
        eng = engine_for(run, pipe, slots=2)
        eng.bank.routing.fixed_rank = True
        pipe.unet = torch.compile(pipe.unet, backend=backend)
    files = make_loras(eng.arch, work, 4, a.rank, run.dtype, seed=3)
    eng.prefetch(files)
    unet = eng.pipe.unet
    args, kw = unet_inputs(unet, 2, px, run.device, run.dtype)

    def call(i: int) -> None:
        with eng.activate([[(files[i % 4], 1.0)], [(files[(i + 1) % 4], 0.7)]]):
            unet(*args, **kw)

    def graphs() -> tuple[int, int]:
        return counters["frames"]["total"], counters["stats"]["unique_graphs"]

    with torch.inference_mode():
        t = time.perf_counter()
        call(0)
        run.sync()
        res["compile_s"] = time.perf_counter() - t
        call(1)  # a second warm-up call: anything compiled from here on is a recompile
        run.sync()
        frames0, graphs0 = graphs()
        res["graphs_after_warmup"] = graphs0
        swaps0 = eng.swaps
        times = []
        for i in range(2, 2 + a.compile_swaps):
            times.append(run.timed(call, i))
        frames1, graphs1 = graphs()
        res["swaps"] = eng.swaps - swaps0
        res["recompiles"] = frames1 - frames0
        res["new_graphs"] = graphs1 - graphs0
        res["swap_and_step_ms"] = ms(times)
        with eng.activate([[(files[0], 1.0)], [(files[1], 0.7)]]):
            compiled = [run.timed(unet, *args, **kw) for _ in range(5)]
            eager = [run.timed(unet._orig_mod, *args, **kw) for _ in range(5)]
    res["compiled_forward_ms"] = ms(compiled)
    res["eager_forward_ms"] = ms(eager)
    res["speedup"] = res["eager_forward_ms"]["p50"] / res["compiled_forward_ms"]["p50"]
    res["memory"] = run.peak()
    log(f"compile: {res['compile_s']:.1f} s to compile, {res['recompiles']} recompiles over {res['swaps']} swaps")
    eng = unet = pipe = None
    torch._dynamo.reset()
    run.free()


def train_section(run: Run, work: Path, res: dict, deadline: float) -> None:
    """bench/train.py's loradex and reference loops, each in a fresh process (its ``--child`` mode)."""
    sys.path.insert(0, str(HERE))
    import train as bench_train

    a = run.args
    if run.smoke:
        model, dev, res_px, steps, rank, mp, threads = "tiny", "cpu", 32, 3, 4, "no", "1"
    else:
        model, dev, res_px, steps, rank, mp, threads = ("sd15", "cuda", a.train_resolution, a.train_steps,
                                                        a.rank, "fp16", "8")
    res.update(model=model, resolution=res_px, steps=steps, rank=rank, mixed_precision=mp, repeats=a.train_repeats)
    data = bench_train.make_images(work / "train_data", 4, res_px)
    runs: dict[str, list[dict]] = {"loradex": [], "reference": []}
    res["runs"] = runs
    run.free()
    for r in range(a.train_repeats):
        for which in (("loradex", "reference") if r % 2 == 0 else ("reference", "loradex")):
            left = deadline - time.perf_counter()
            if left < 10:
                raise SectionTimeout("no time left for the next training run")
            cmd = [sys.executable, str(HERE / "train.py"), "--child", which, "--data", str(data), "--model", model,
                   "--device", dev, "--steps", str(steps), "--resolution", str(res_px), "--rank", str(rank),
                   "--lr", "1e-4", "--mixed-precision", mp, "--threads", threads]
            log(f"train: {which} ({model}, {steps} steps at {res_px} px)")
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            if out.returncode != 0:
                raise RuntimeError(f"{which} run failed ({out.returncode}): {out.stderr.strip()[-600:]}")
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {w: max(rs, key=lambda x: x["steps_per_s"]) for w, rs in runs.items()}
    res["loradex"] = {k: best["loradex"][k] for k in ("steps_per_s", "peak", "seconds")}
    res["reference"] = {k: best["reference"][k] for k in ("steps_per_s", "peak", "seconds")}
    res["peak_is"] = "torch.cuda.max_memory_allocated above the start" if dev == "cuda" else "peak RSS growth"
    res["speed_ratio"] = res["loradex"]["steps_per_s"] / res["reference"]["steps_per_s"]
    res["memory_ratio"] = res["loradex"]["peak"] / max(res["reference"]["peak"], 1)


# ---- driver ------------------------------------------------------------------------------------

def run_section(run: Run, name: str, fn, limit: float, results: dict) -> None:
    res: dict = {}
    results[name] = res
    left = run.args.budget - run.elapsed()
    if left < 5:
        res.update(status="skipped", reason=f"budget of {run.args.budget:.0f} s spent")
        log(f"{name}: skipped (budget)")
        return
    limit = min(limit, left)
    t = time.perf_counter()
    log(f"{name}: start (limit {limit:.0f} s)")
    try:
        with time_limit(limit), tempfile.TemporaryDirectory(prefix=f"gpu-{name}-") as d:
            if name == "train":
                fn(run, Path(d), res, time.perf_counter() + limit)
            else:
                fn(run, Path(d), res)
        res["status"] = "ok"
    except Exception as e:  # one section's failure (a timeout included) must not stop the others
        res["status"] = "error"
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["traceback"] = traceback.format_exc()[-3000:]
        log(f"{name}: ERROR {res['error'][:300]}")
    finally:
        res["seconds"] = time.perf_counter() - t
        with contextlib.suppress(Exception):
            run.free()


def table(out: dict) -> str:
    """The results as text."""
    lines = [f"loradex GPU benchmark on {out['device']} ({out['mode']}), torch {out['torch']}, diffusers "
             f"{out['diffusers']}, {out['total_s']:.0f} s"]
    if out["mode"] == "cpu-smoke":
        lines.append("  (CPU smoke run: tiny UNets in float32, few iterations -- checks the code paths; the numbers mean nothing)")
    mib = 2**20
    for size in ("sd15", "sdxl"):
        r = out["sections"].get(size)
        if r is None:
            continue
        lines.append(f"\n[{size}] {r.get('status')} in {r.get('seconds', 0):.0f} s -- {r.get('config', '')}, "
                     f"{r.get('params', 0) / 1e6:.0f} M parameters, {r.get('image_px', '')} px, batch {r.get('batch')}, "
                     f"LoRA rank {r.get('rank')}")
        if r.get("status") != "ok":
            lines.append(f"  {r.get('error') or r.get('reason')}")
        sw = r.get("swap_ms", {})
        for key, label in (("engine_cpu_tier", "engine swap (CPU tier -> slot)"),
                           ("engine_from_disk", "engine swap (disk -> slot, cache cold)"),
                           ("diffusers_load_set", "diffusers load_lora_weights + set_adapters"),
                           ("diffusers_hotswap", "diffusers load_lora_weights(hotswap=True)")):
            if key in sw:
                lines.append(f"  {label:<46} p50 {sw[key]['p50']:9.2f} ms   p99 {sw[key]['p99']:9.2f} ms")
        rat = r.get("ratios", {})
        if rat:
            lines.append(f"  engine swap {rat['swap_vs_load_set']:.0f}x faster than load + set_adapters, "
                         f"{rat['swap_vs_hotswap']:.1f}x than hotswap")
        ips = r.get("images_per_s")
        if ips:
            lines.append(f"  images/s ({r['images_per_s_note']}): mixed batch of {r['batch']} adapters "
                         f"{ips['mixed_batch']:.2f}, one by one {ips['one_by_one']:.2f}, no adapters "
                         f"{ips['no_adapter_batch']:.2f}")
            if rat:
                lines.append(f"  mixed batch {rat['mixed_vs_one_by_one']:.2f}x one by one, "
                             f"{rat['mixed_vs_no_adapter']:.2f}x the base model's throughput; "
                             f"max |mixed - alone| {r['mixed_vs_alone_max_abs_diff']:.2e}")
        pm = r.get("patch_mode")
        if pm and "apply_ms" in pm:
            lines.append(f"  patch mode ({pm['mode']}, LoHa on {pm['modules']} modules): first apply "
                         f"{pm['first_apply_ms']:.1f} ms, apply p50 {pm['apply_ms']['p50']:.1f} ms, restore p50 "
                         f"{pm['restore_ms']['p50']:.1f} ms, restored bit-identical: {pm['restored_exact']}")
        if "memory" in r:
            lines.append(f"  memory: model {r['model_bytes'] / mib:.0f} MiB, slots {r['slot_bytes'] / mib:.0f} MiB, "
                         f"engine peak {r['memory']['peak_bytes'] / mib:.0f} MiB ({r['memory']['what']})"
                         + (f"; diffusers swaps peak {r['memory_diffusers']['peak_bytes'] / mib:.0f} MiB"
                            if "memory_diffusers" in r else ""))
    c = out["sections"].get("compile")
    if c is not None:
        lines.append(f"\n[compile] {c.get('status')} in {c.get('seconds', 0):.0f} s -- {c.get('size')} "
                     f"({c.get('config')}), backend {c.get('backend')}")
        if c.get("note"):
            lines.append(f"  {c['note']}")
        if c.get("status") != "ok":
            lines.append(f"  {c.get('error') or c.get('reason')}")
        if "recompiles" in c:
            lines.append(f"  compile {c['compile_s']:.1f} s; {c['swaps']} swaps, {c['recompiles']} recompiles "
                         f"(goal 0); swap + step p50 {c['swap_and_step_ms']['p50']:.2f} ms")
        if "speedup" in c:
            lines.append(f"  forward (batch 2, 2 adapters): compiled {c['compiled_forward_ms']['p50']:.2f} ms, eager "
                         f"{c['eager_forward_ms']['p50']:.2f} ms ({c['speedup']:.2f}x)")
    t = out["sections"].get("train")
    if t is not None:
        lines.append(f"\n[train] {t.get('status')} in {t.get('seconds', 0):.0f} s -- {t.get('model')}, "
                     f"{t.get('steps')} steps at {t.get('resolution')} px, rank {t.get('rank')}, "
                     f"mixed precision {t.get('mixed_precision')}")
        if t.get("status") != "ok":
            lines.append(f"  {t.get('error') or t.get('reason')}")
        if "speed_ratio" in t:
            for w, label in (("loradex", "loradex train lora"), ("reference", "diffusers + peft loop")):
                lines.append(f"  {label:<24} {t[w]['steps_per_s']:.2f} steps/s, peak {t[w]['peak'] / mib:.0f} MiB")
            lines.append(f"  loradex: {t['speed_ratio']:.2f}x the steps/s, {t['memory_ratio']:.2f}x the peak memory "
                         f"({t['peak_is']})")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny UNets on the CPU, few iterations (CI)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table on stderr)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=None, help="seconds; sections that would start later are skipped "
                    "(default 540, CPU smoke 300)")
    ap.add_argument("--section-limit", type=float, default=None, help="seconds per section (default 240, smoke 120)")
    ap.add_argument("--batch", type=int, default=8, help="requests (and adapters) in the mixed batch")
    ap.add_argument("--steps", type=int, default=None, help="UNet calls per image (default 10, smoke 2)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank and engine max_rank (default 16, smoke 4)")
    ap.add_argument("--swaps", type=int, default=None, help="engine swaps timed (default 30, smoke 5)")
    ap.add_argument("--cold", type=int, default=None, help="adapters swapped in from disk (default 3, smoke 2)")
    ap.add_argument("--baseline-swaps", type=int, default=None, help="diffusers loads timed (default 8, smoke 2)")
    ap.add_argument("--patch-reps", type=int, default=None, help="patch-mode batches timed (default 5, smoke 2)")
    ap.add_argument("--compile-size", default="sd15", choices=sorted(SIZES))
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend on CUDA")
    ap.add_argument("--compile-swaps", type=int, default=None, help="swaps under torch.compile (default 100, smoke 10)")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-repeats", type=int, default=1, help="interleaved runs of each loop (the best is kept)")
    ap.add_argument("--train-resolution", type=int, default=512)
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(budget=(300, 540), section_limit=(120, 240), steps=(2, 10), rank=(4, 16), swaps=(5, 30),
                    cold=(2, 3), baseline_swaps=(2, 8), patch_reps=(2, 5), compile_swaps=(10, 100))
    for k, (cpu, gpu) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, cpu if smoke else gpu)
    if smoke:
        args.batch = min(args.batch, 4)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"--sections {', '.join(bad)}: choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-smoke for the CPU dry run)", file=sys.stderr)
        return 2
    import diffusers

    run = Run(args)
    if run.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.set_grad_enabled(False)
    out: dict = {"mode": "cpu-smoke" if run.smoke else "cuda",
                 "device": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "diffusers": diffusers.__version__,
                 "settings": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
                 "sections": {}}
    fns = {"sd15": lambda r, d, res: size_section(r, "sd15", d, res),
           "sdxl": lambda r, d, res: size_section(r, "sdxl", d, res),
           "compile": compile_section, "train": train_section}
    for name in args.sections:
        run_section(run, name, fns[name], args.section_limit, out["sections"])
    out["total_s"] = run.elapsed()
    out["errors"] = [f"{k}: {v.get('error') or v.get('reason')}" for k, v in out["sections"].items()
                     if v.get("status") != "ok"]
    text = table(out)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(out, indent=2, default=str))
    else:
        print(text)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
