"""Benchmark (CUDA): the inference engine on an SD1.5-size pipeline with random weights.

The pipeline is built from scratch, no download: ``UNet2DConditionModel`` with SD1.5's config
(loradex/core/configs/sd15_unet.json), a ``CLIPTextModel`` with CLIP ViT-L/14's config, an
``AutoencoderKL`` with SD's VAE layout (block widths 128, 256, 512, 512), the byte-level tokenizer of
loradex.tiny (77 positions) and DDIM; fp16 on the GPU. Adapters: random LoRAs (rank 16 on every
attention to_q/to_k/to_v/to_out.0 of the UNet and q/k/v/out_proj of the text encoder), written
as diffusers files and read back like any other file.

Printed (each a ratio against a baseline measured in the same run):

* swap latency p50 / p99 (an adapter from the CPU tier, pinned, copied into a slot; CUDA synced),
  against ``load_lora_weights`` + ``set_adapters`` of diffusers on the same pipeline;
* images/s of a mixed batch (``--batch`` requests, each with a different adapter, one forward pass)
  against one adapter at a time (the same requests run as batches of one), and against the
  base model without adapters at the same batch size (the slot layers' overhead).

    python bench/gpu_swap.py [--steps 10] [--size 512] [--batch 8] [--adapters 16] [--repeat 20]
    python bench/gpu_swap.py --tiny     # CPU dry run on the tiny pipeline (checks the script)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RANK = 16
TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")


def sd15_pipeline(dtype: torch.dtype, device: str):
    """SD1.5's architecture with random weights (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loradex.core.archs.tables import load_config as _load_config
    from loradex.tiny import quiet, tiny_tokenizer

    torch.manual_seed(0)
    with quiet():
        ucfg = {k: v for k, v in _load_config("sd15_unet.json").items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**ucfg)
        tcfg = {k: v for k, v in _load_config("clip_vit_l14_text.json").items() if not k.startswith("_")}
        tok = tiny_tokenizer()
        tcfg.update(vocab_size=max(len(tok), 49408), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in tcfg.items() if k not in ("architectures",)}))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=512)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def make_files(pipe, out: Path, n: int, rank: int) -> list[str]:
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.archs import arch_from_models
    from loradex.core.kinds.lora import LoraPatch

    arch = arch_from_models({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    mods = {name: info for name, info in arch.modules.items() if name.endswith(TARGETS) and info.type == "linear"}
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        patches = {name: LoraPatch(up=torch.randn(info.shape[0], rank, generator=g) * 0.02,
                                   down=torch.randn(rank, info.shape[1], generator=g) * 0.02, alpha=float(rank))
                   for name, info in mods.items()}
        p = out / f"a{i:03d}.safetensors"
        loradex.save(Adapter(patches=patches, arch=arch.name), p, "diffusers", arch=arch)
        paths.append(str(p))
    return paths


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny pipeline")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from loradex.inference.engine import Engine
    from loradex.inference.types import GenerateRequest
    from loradex.tiny import quiet, tiny_sd_pipeline

    torch.set_grad_enabled(False)
    if args.tiny:
        device, dtype = "cpu", torch.float32
        args.steps, args.size, args.batch = min(args.steps, 2), 64, min(args.batch, 4)
        args.adapters, args.repeat = min(args.adapters, 6), min(args.repeat, 4)

        def build():
            return tiny_sd_pipeline()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU dry run")
        device, dtype = "cuda", torch.float16

        def build():
            return sd15_pipeline(dtype, device)

    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "steps": args.steps,
                 "size": args.size, "batch": args.batch, "rank": RANK}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        eng = Engine(build(), device=device, dtype=dtype, max_rank=RANK, slots=args.batch)
        res["engine_init_s"] = time.perf_counter() - t0
        res["slot_bytes"] = eng.bank.nbytes()
        files = make_files(eng.pipe, Path(d), args.adapters, RANK)
        eng.prefetch(files)

        # ---- swap latency: CPU tier -> slot ----
        times = []
        for i in range(args.repeat):
            for s in range(eng.slots):
                eng.bank.clear_slot(s)
            sync(device)
            t = time.perf_counter()
            with eng.activate([[(files[i % len(files)], 1.0)]]):
                sync(device)
                times.append(time.perf_counter() - t)
        res["engine_swap_ms"] = {"p50": pct(times, 50) * 1e3, "p99": pct(times, 99) * 1e3}

        # ---- images/s: mixed batch vs one adapter at a time vs no adapters ----
        def reqs(ads):
            return [GenerateRequest("a photo of a cat", adapters=a, steps=args.steps, width=args.size,
                                    height=args.size, seed=i) for i, a in enumerate(ads)]

        mixed = reqs([[(files[i % len(files)], 1.0)] for i in range(args.batch)])
        plain = reqs([[] for _ in range(args.batch)])
        eng.generate(mixed[:1])  # warm-up
        sync(device)

        def timed(batches: list[list[GenerateRequest]], engine=eng) -> float:
            t = time.perf_counter()
            for b in batches:
                engine.generate(b)
            sync(device)
            return time.perf_counter() - t

        t_mixed = timed([mixed])
        t_one = timed([[r] for r in mixed])
        t_plain = timed([plain])
        res["images_per_s"] = {"mixed_batch": args.batch / t_mixed, "one_at_a_time": args.batch / t_one,
                               "no_adapter_batch": args.batch / t_plain}
        eng.remove_all()
        del timed
        eng = None  # free the GPU copy before the diffusers baseline
        if device == "cuda":
            torch.cuda.empty_cache()

        # ---- baseline swap: diffusers load_lora_weights + set_adapters on the same pipeline ----
        pipe = build()
        times = []
        with quiet():
            for i in range(min(args.repeat, 10)):
                name = f"adapter_{i}"
                sync(device)
                t = time.perf_counter()
                pipe.load_lora_weights(files[i % len(files)], adapter_name=name)
                pipe.set_adapters([name], [1.0])
                sync(device)
                times.append(time.perf_counter() - t)
                pipe.delete_adapters(name)
        res["diffusers_load_set_ms"] = {"p50": pct(times, 50) * 1e3, "p99": pct(times, 99) * 1e3}

    ips = res["images_per_s"]
    res["ratios"] = {"swap_vs_diffusers": res["diffusers_load_set_ms"]["p50"] / res["engine_swap_ms"]["p50"],
                     "mixed_vs_one_at_a_time": ips["mixed_batch"] / ips["one_at_a_time"],
                     "mixed_vs_no_adapter": ips["mixed_batch"] / ips["no_adapter_batch"]}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    r = res["ratios"]
    print(f"{'tiny (CPU dry run)' if args.tiny else 'SD1.5-size random weights'} on {res['device']}: "
          f"{args.size}px, {args.steps} steps, batch {args.batch}, LoRA rank {RANK}, slots {res['slot_bytes'] / 2**20:.0f} MiB")
    print(f"swap p50 {res['engine_swap_ms']['p50']:.2f} ms, p99 {res['engine_swap_ms']['p99']:.2f} ms; "
          f"diffusers load_lora_weights + set_adapters p50 {res['diffusers_load_set_ms']['p50']:.1f} ms "
          f"-> {r['swap_vs_diffusers']:.0f}x faster")
    print(f"images/s: mixed batch {ips['mixed_batch']:.2f}, one adapter at a time {ips['one_at_a_time']:.2f} "
          f"-> {r['mixed_vs_one_at_a_time']:.2f}x; no adapters {ips['no_adapter_batch']:.2f} "
          f"(mixed batch at {r['mixed_vs_no_adapter']:.2f}x of the base model's throughput)")


if __name__ == "__main__":
    main()
