"""SD1.5-size LoRA training on CUDA: loradex's loop vs the diffusers + peft reference loop of
bench/train.py, on a pipeline with SD1.5's exact shapes and random weights built from the bundled
configs (UNet 860 M parameters, CLIP ViT-L/14 text tower, the SD VAE): no download.

    python bench/gpu_train.py                 # CUDA, 512 px, fp16 mixed precision, 30 steps x 3
    python bench/gpu_train.py --tiny          # dry path on the CPU with the tiny model (seconds)

Prints steps/s and peak memory (``torch.cuda.max_memory_allocated``) of both and their ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

#: AutoencoderKL of SD 1.x (runwayml/stable-diffusion-v1-5 vae/config.json, as published).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)


def sd15_pipeline(seed: int = 0):
    """A StableDiffusionPipeline with SD1.5 shapes and random weights (the tiny byte-level tokenizer:
    its ids fit CLIP's 49408-row embedding)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loradex.core.archs.tables import load_config as _load_config
    from loradex.log import quiet
    from loradex.tiny import tiny_tokenizer

    torch.manual_seed(seed)
    ucfg = {k: v for k, v in _load_config("sd15_unet.json").items() if not k.startswith("_")}
    tcfg = {k: v for k, v in _load_config("clip_vit_l14_text.json").items() if not k.startswith("_")}
    tcfg.pop("architectures", None)
    with quiet():
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**tcfg)),
            tokenizer=tiny_tokenizer(), unet=UNet2DConditionModel(**ucfg),
            scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny model")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    import train as bench_train

    if args.tiny:
        common = ["--model", "tiny", "--device", "cpu", "--steps", str(min(args.steps, 10)), "--repeats", "1",
                  "--resolution", "32", "--rank", "4", "--mixed-precision", "no"]
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device (use --tiny for the CPU dry run)")
        common = ["--model", "sd15", "--device", "cuda", "--steps", str(args.steps), "--repeats", str(args.repeats),
                  "--resolution", str(args.resolution), "--rank", str(args.rank), "--lr", "1e-4",
                  "--mixed-precision", args.mixed_precision, "--threads", "8"]
        if args.gradient_checkpointing:
            common.append("--gradient-checkpointing")
    bench_train.main(common)


if __name__ == "__main__":
    main()
