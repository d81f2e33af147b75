"""What the denoiser learns: the DDPM objective (epsilon or v) or rectified flow, the loss of one
batch, and ``evaluate_loss``, the fixed-noise measure the tests and benchmarks read a trained
adapter by.

The recipe is the denoising objective of DDPM (Ho et al. 2020) as diffusers' training examples use
it (``train_dreambooth_lora.py``): ``t ~ U{0..T-1}``, ``zt = sqrt(abar_t) z0 + sqrt(1-abar_t) eps``
(``DDPMScheduler.add_noise`` built from the base pipeline's scheduler config, so the betas are the
model's own), target ``eps`` (``prediction_type: epsilon``) or ``v = sqrt(abar_t) eps -
sqrt(1-abar_t) z0`` (``v_prediction``, ``get_velocity``), loss = MSE(unet(zt, t, text), target).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loradex.errors import TrainingError
from loradex.training.config import TrainConfig
from loradex.training.context import Context, encode_prompts


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
        """``flow``, ``epsilon`` or ``v_prediction``."""
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


def denoise_loss(ctx: Context, objective: Objective, z0: torch.Tensor, prompts: list[str],
                 conditioning: Callable[[list[str]], dict[str, torch.Tensor]], gen: torch.Generator) -> torch.Tensor:
    """The MSE between the denoiser's prediction and the objective's target for clean latents
    ``z0`` and their prompts (``conditioning`` turns prompts into the family's text inputs; the loop
    passes its cache). The forward runs under mixed precision's autocast; the loss is in fp32."""
    zt, t, target = objective.sample(z0, gen)
    with ctx.autocast():
        cond = conditioning(prompts)
        zin = zt.to(ctx.weight_dtype) if ctx.weight_dtype != torch.float32 else zt
        pred = ctx.family.predict(ctx.pipe, zin, t, cond)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


@torch.no_grad()
def evaluate_loss(pipe, examples: list, seed: int = 1234, repeats: int = 8, timesteps: list[int] | None = None,
                  device: str | None = None) -> float:
    """The denoising loss of ``pipe`` on ``examples`` with fixed noise, timesteps and latent samples:
    the measure that says whether an adapter loaded in a consumer pipeline moved the model towards
    the training data (lower = better). Prompts are used as the examples give them; ``timesteps``
    are integer steps in [0, 1000) (flow-matching families: sigma = t / 1000)."""
    if not examples:
        raise TrainingError("evaluate_loss needs at least one example")
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
