"""What the denoiser learns: the DDPM objective (epsilon or v) or rectified flow, the loss of one
batch, and ``evaluate_loss``, the fixed-noise measure the tests and benchmarks read a trained
adapter by.

The recipe is the denoising objective of DDPM (Ho et al. 2020) as diffusers' training examples use
it (``train_dreambooth_lora.py``): ``t ~ U{0..T-1}``, ``zt = sqrt(abar_t) z0 + sqrt(1-abar_t) eps``
(``DDPMScheduler.add_noise`` built from the base pipeline's scheduler config, so the betas are the
model's own), target ``eps`` (``prediction_type: epsilon``) or ``v = sqrt(abar_t) eps -
sqrt(1-abar_t) z0`` (``v_prediction``, ``get_velocity``), loss = MSE(unet(zt, t, text), target).

The kohya options, with kohya's semantics (kohya-ss/sd-scripts at 48d368f; the function named is
where each was checked):

* ``noise_offset`` (``custom_train_functions.apply_noise_offset``, Guttenberg's offset noise):
  ``noise += offset * N(0,1)`` of shape (batch, channels, 1, 1);
* ``multires_noise_iterations`` / ``_discount`` (``pyramid_noise_like``): per level ``i``,
  bilinearly upsampled noise of ``1 / r^i`` the size (``r`` uniform in [2, 4)) weighted
  ``discount^i`` is added, and the sum is scaled back to unit std. kohya draws ``r`` from Python's
  ``random`` and the noise from torch's global generator; loradex draws both from the loop's one
  generator, which is what keeps ``--resume`` bit-exact;
* ``min_snr_gamma`` (``apply_snr_weight``, Hang et al. 2023): each sample's loss times
  ``min(SNR_t, gamma) / SNR_t`` (epsilon) or ``/ (SNR_t + 1)`` (v), ``SNR_t = abar_t / (1 -
  abar_t)`` of the base's own betas (as kohya, whose table is built before the zero-terminal-SNR
  rescale: the rescaled last step has SNR 0, where the epsilon weight is undefined);
* ``v_parameterization``: learn ``v`` on a base whose scheduler says epsilon;
  ``zero_terminal_snr`` (``fix_noise_scheduler_betas_for_zero_terminal_snr``, Lin et al. 2023):
  the betas rescaled so the last step is pure noise (diffusers' ``rescale_betas_zero_snr``, the
  same algorithm);
* flow families, ``timestep_sampling`` (``flux_train_utils.get_noisy_model_input_and_timesteps``):
  ``sigmoid`` ``sigma = sigmoid(scale * n)``, n ~ N(0,1) (the default: the sampling loradex always
  used, which is also SD3's ``logit_normal`` weighting scheme with mean 0 and std 1); ``uniform``
  ``sigma ~ U[0,1)``; ``shift`` the sigmoid sample shifted ``s*sigma / (1 + (s-1)*sigma)`` by
  ``discrete_flow_shift``; ``flux_shift`` shifted by FLUX.1's resolution-dependent ``mu`` (the
  inference schedule's, from the packed image's token count); ``sigma`` u drawn from the
  ``weighting_scheme`` density (``logit_normal``: ``sigmoid(N(logit_mean, logit_std))``,
  ``mode``: with ``mode_scale``, else uniform) and looked up in a FlowMatchEulerDiscreteScheduler
  with ``shift=discrete_flow_shift`` (SD3's recipe, diffusers' train_dreambooth_lora_sd3.py);
* ``model_prediction_type``: ``raw`` (the velocity as predicted, target ``noise - z0``: what
  x-flux, ai-toolkit and kohya's docs recommend) or ``sigma_scaled`` (the prediction turned into
  ``zt - sigma * v``, compared with ``z0`` and weighted by the ``weighting_scheme``: ``sigma_sqrt``
  ``sigma^-2``, ``cosmap`` ``2 / (pi (1 - 2 sigma + 2 sigma^2))``, else 1) as kohya's
  sd3_train_network.py and diffusers' ``--precondition_outputs`` do. kohya's FLUX script compares
  its sigma-scaled prediction with ``noise - z0`` instead, which no velocity model minimises.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loradex.errors import TrainingError
from loradex.training.config import TrainConfig
from loradex.training.context import Context, encode_prompts


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's ``pyramid_noise_like`` (multires noise) with the loop's generator: for ``i`` in
    ``range(iterations)`` add bilinearly upsampled noise at ``1 / r^i`` of the size (``r`` uniform in
    [2, 4), at least 1x1; the loop stops after a 1-pixel level) weighted ``discount^i``, then divide
    by the result's std."""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        out += up(torch.randn((b, c, hn, wn), generator=gen).to(noise.device)) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def flux_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent shift (``flux_train_utils.get_lin_function``): linear in the
    packed image's token count between (256, 0.5) and (4096, 1.15)."""
    m = (max_shift - base_shift) / (4096 - 256)
    return m * image_tokens + base_shift - m * 256


def density(scheme: str, n: int, gen: torch.Generator, mean: float, std: float, mode_scale: float) -> torch.Tensor:
    """u in [0, 1) drawn from SD3's timestep density (``compute_density_for_timestep_sampling``)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn((n,), generator=gen) * std + mean)
    u = torch.rand((n,), generator=gen)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """SD3's loss weighting (``compute_loss_weighting_for_sd3``): ``sigma_sqrt`` sigma^-2,
    ``cosmap`` 2 / (pi (1 - 2 sigma + 2 sigma^2)); None (uniform) for the others."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return None


class Objective:
    """What the denoiser learns to predict. DDPM families (SD1/SD2/SDXL): ``t ~ U{0..T-1}``,
    ``zt = sqrt(abar_t) z0 + sqrt(1-abar_t) eps`` with the base scheduler's own betas (rescaled to
    zero terminal SNR on request), target ``eps`` (``epsilon``) or ``v = sqrt(abar_t) eps -
    sqrt(1-abar_t) z0`` (``v_prediction``, the base's or ``v_parameterization``). Flow-matching
    families (FLUX, SD3; rectified flow as their trainers use it): ``sigma`` from
    ``timestep_sampling`` (default ``sigmoid``: ``sigmoid(n)``, ``n ~ N(0,1)``), ``zt = (1 - sigma)
    z0 + sigma eps``, target the velocity ``eps - z0`` (``raw``). All draws come from the loop's one
    generator: noise, then its offset / multires levels, then the timesteps (see the module
    docstring for every option)."""

    def __init__(self, ctx: Context) -> None:
        from diffusers import DDPMScheduler

        cfg = self.cfg = ctx.cfg
        self.flow = ctx.family.objective == "flow"
        self.snr = None
        if self.flow:
            if cfg.v_parameterization or cfg.zero_terminal_snr or cfg.min_snr_gamma:
                raise TrainingError(f"{ctx.family.label} learns a flow-matching velocity: v-parameterization, zero "
                                    "terminal SNR and min-SNR are for the DDPM families (use --timestep-sampling, "
                                    "--weighting-scheme)")
            self.T = 1000
            self.flow_sched = None
            if cfg.timestep_sampling == "sigma":
                from diffusers import FlowMatchEulerDiscreteScheduler

                self.flow_sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
                                                                  shift=cfg.discrete_flow_shift)
            return
        flow_opts = (cfg.timestep_sampling != "sigmoid" or cfg.model_prediction_type != "raw"
                     or cfg.weighting_scheme not in ("uniform", "none") or cfg.guidance_scale is not None)
        if flow_opts:
            raise TrainingError(f"{ctx.family.label} learns the DDPM objective: --timestep-sampling, "
                                "--model-prediction-type, --weighting-scheme and --guidance-scale are for FLUX/SD3")
        config = ctx.pipe.scheduler.config
        over = {}
        if cfg.v_parameterization:
            over["prediction_type"] = "v_prediction"
        if cfg.zero_terminal_snr:
            over["rescale_betas_zero_snr"] = True
        self.sched = DDPMScheduler.from_config(config, **over)
        self.pred_type = self.sched.config.prediction_type
        if self.pred_type not in ("epsilon", "v_prediction"):
            raise TrainingError(f"prediction type {self.pred_type!r} is not trained (epsilon or v_prediction)")
        self.T = self.sched.config.num_train_timesteps
        if cfg.min_snr_gamma:
            abar = DDPMScheduler.from_config(config).alphas_cumprod  # the base's betas, before any rescale
            self.snr = (abar / (1.0 - abar)).clamp(min=1e-12)

    @property
    def name(self) -> str:
        """``flow``, ``epsilon`` or ``v_prediction``."""
        return "flow" if self.flow else self.pred_type

    def noise(self, z0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """N(0,1) noise shaped like ``z0`` with the noise offset and multires levels when set."""
        cfg, dev = self.cfg, z0.device
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((z0.shape[0], z0.shape[1], 1, 1), generator=gen).to(dev)
        if cfg.multires_noise_iterations:
            noise = pyramid_noise(noise, gen, cfg.multires_noise_iterations, cfg.multires_noise_discount)
        return noise

    def sigmas(self, z0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One flow-matching sigma per sample, drawn as ``timestep_sampling`` says."""
        cfg, n = self.cfg, z0.shape[0]
        how = cfg.timestep_sampling
        if how == "uniform":
            return torch.rand((n,), generator=gen)
        if how == "sigma":
            u = density(cfg.weighting_scheme, n, gen, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)
            idx = (u * self.T).long().clamp(0, self.T - 1)
            return self.flow_sched.sigmas[idx].float()
        x = torch.randn((n,), generator=gen)
        s = torch.sigmoid(x if cfg.sigmoid_scale == 1.0 else x * cfg.sigmoid_scale)
        if how == "shift":
            k = cfg.discrete_flow_shift
            s = (s * k) / (1 + (k - 1) * s)
        elif how == "flux_shift":
            mu = flux_mu((z0.shape[-2] // 2) * (z0.shape[-1] // 2))
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        return s

    def sample(self, z0: torch.Tensor, gen: torch.Generator, t: torch.Tensor | None = None):
        """``(zt, timesteps, target)`` for clean latents ``z0`` (``t``: fixed integer steps in [0, T))."""
        dev = z0.device
        noise = self.noise(z0, gen)
        if t is None:
            if self.flow:
                t = self.sigmas(z0, gen).to(dev)
            else:
                t = torch.randint(0, self.T, (z0.shape[0],), generator=gen).to(dev)
        elif self.flow:
            t = t.to(dev).float() / self.T
        if self.flow:
            s = t.view(-1, *([1] * (z0.dim() - 1)))
            target = z0 if self.cfg.model_prediction_type == "sigma_scaled" else noise - z0
            return (1 - s) * z0 + s * noise, t, target
        zt = self.sched.add_noise(z0, noise, t)
        target = noise if self.pred_type == "epsilon" else self.sched.get_velocity(z0, noise, t)
        return zt, t, target

    def loss(self, pred: torch.Tensor, zt: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the MSE, with the sigma-scaled prediction and SD3 weighting or the
        min-SNR weights when those are set (per sample, then the batch mean)."""
        pred, target = pred.float(), target.float()
        cfg = self.cfg
        weights = None
        if self.flow and cfg.model_prediction_type == "sigma_scaled":
            s = t.float().view(-1, *([1] * (pred.dim() - 1)))
            pred = pred * (-s) + zt.float()
            weights = flow_weighting(cfg.weighting_scheme, t.float())
        if self.snr is not None:
            snr = self.snr.to(t.device)[t]
            clipped = torch.minimum(snr, torch.full_like(snr, cfg.min_snr_gamma))
            weights = clipped / (snr + 1 if self.pred_type == "v_prediction" else snr)
        if weights is None:
            return F.mse_loss(pred, target, reduction="mean")
        per = F.mse_loss(pred, target, reduction="none").mean(dim=list(range(1, pred.dim())))
        return (per * weights.float().to(per.device)).mean()


def denoise_loss(ctx: Context, objective: Objective, z0: torch.Tensor, prompts: list[str],
                 conditioning: Callable[[list[str]], dict[str, torch.Tensor]], gen: torch.Generator) -> torch.Tensor:
    """The loss between the denoiser's prediction and the objective's target for clean latents
    ``z0`` and their prompts (``conditioning`` turns prompts into the family's text inputs; the loop
    passes its cache). The forward runs under mixed precision's autocast; the loss is in fp32."""
    zt, t, target = objective.sample(z0, gen)
    with ctx.autocast():
        cond = conditioning(prompts)
        if ctx.cfg.guidance_scale is not None:
            cond = {**cond, "guidance": torch.full((z0.shape[0],), float(ctx.cfg.guidance_scale))}
        zin = zt.to(ctx.weight_dtype) if ctx.weight_dtype != torch.float32 else zt
        pred = ctx.family.predict(ctx.pipe, zin, t, cond)
    return objective.loss(pred, zt, t, target)


@torch.no_grad()
def evaluate_loss(pipe, examples: list, seed: int = 1234, repeats: int = 8, timesteps: list[int] | None = None,
                  device: str | None = None) -> float:
    """The denoising loss of ``pipe`` on ``examples`` with fixed noise, timesteps and latent samples:
    the measure that says whether an adapter loaded in a consumer pipeline moved the model towards
    the training data (lower = better). Prompts are used as the examples give them; ``timesteps``
    are integer steps in [0, 1000) (flow-matching families: sigma = t / 1000). The objective is the
    pipeline scheduler's own (its prediction type; its ``rescale_betas_zero_snr``)."""
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
