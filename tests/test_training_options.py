"""Issue 15: the training options kohya users rely on, and every method on every tiny family.

Each method trains on the tiny SD1 (tests/test_training.py), SDXL, FLUX.1 and SD3 pipelines where
it applies (TI and pivotal need CLIP-only conditioning: refused for the T5 families), its output
is reloaded in its real consumer (diffusers ``load_lora_weights`` / ``load_textual_inversion`` /
``from_pretrained``, lycoris-lora ``create_lycoris_from_weights``) and lowers the denoising loss on
its training images there. The kohya options are checked against kohya sd-scripts' formulas
(kohya-ss/sd-scripts 48d368f: flux_train_utils.py, custom_train_functions.py, train_util.py)
and resume bit for bit with their state (schedule, optimizer, caption and noise draws).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loradex.errors import TrainingError
from loradex.training.loop import TrainConfig, Trainer, evaluate_loss, save_trained, train
from test_training import stripes

RES = 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return stripes(tmp_path_factory.mktemp("opts") / "data", n=2)


def cfg(method: str, **kw) -> TrainConfig:
    base = dict(method=method, steps=30, resolution=RES, rank=4, seed=0, blur_threshold=0.0, class_word="pattern")
    base.update(kw)
    return TrainConfig(**base)


def tiny(name: str):
    from loradex.tiny import tiny_pipeline

    return tiny_pipeline(name)


def quiet_load(fn, *a, **kw):
    from loradex.log import quiet

    with quiet():
        return fn(*a, **kw)


def stripe(path: Path, phase: int, caption: str | None = None) -> None:
    """One red/blue stripe image (period 8 px) at ``phase``, with an optional caption file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(RES)
    s = ((x + 2 * phase) // 4) % 2
    a = np.zeros((RES, RES, 3), np.uint8)
    a[:, :, 0] = (200 * s + 30)[None, :]
    a[:, :, 2] = (200 * (1 - s) + 30)[None, :]
    a[:, :, 1] = 40 + 10 * phase
    Image.fromarray(a).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


# ---------------------------------------------------------------------------------------------
# every method on every family, reloaded in its real consumer
# ---------------------------------------------------------------------------------------------

#: (family, method, extra settings, loss ratio to beat). SD1 is covered method by method in
#: test_training.py; SDXL TI and the SD3 default LoRA in test_training.py / test_sd3.py. The tiny
#: SDXL UNet has attention in two blocks only: a LyCORIS there lowers the loss by ~3.5% at most
#: (measured 0.963-0.966 over several learning rates, ranks and batch sizes), hence 0.98 for those.
MATRIX = [
    ("tiny-sdxl", "lora", dict(lr=2e-2, text_encoder=True), 0.97),
    ("tiny-sdxl", "loha", dict(lr=2e-2, rank=8, alpha=4), 0.98),
    ("tiny-sdxl", "lokr", dict(lr=3e-2, text_encoder=True), 0.98),
    ("tiny-sdxl", "pivotal", dict(lr=2e-2, text_lr=5e-2), 0.97),
    ("tiny-sdxl", "dreambooth", dict(lr=1e-3, steps=15), 0.97),
    # FLUX: kohya's recommended recipe (docs/flux_train_network.md) and BFL target names
    ("tiny-flux1", "lora", dict(lr=1e-2, timestep_sampling="shift", discrete_flow_shift=3.1582, guidance_scale=1.0,
                                targets=("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "linear1", "linear2")), 0.97),
    ("tiny-flux1", "loha", dict(lr=1e-2), 0.97),
    ("tiny-flux1", "lokr", dict(lr=1e-2), 0.97),
    ("tiny-flux1", "dreambooth", dict(lr=1e-3, steps=20), 0.97),
    # SD3: its trainers' recipe (logit-normal sigmas, sigma-scaled x0 prediction)
    ("tiny-sd3", "lora", dict(lr=1e-2, timestep_sampling="sigma", weighting_scheme="logit_normal",
                              model_prediction_type="sigma_scaled", text_encoder=True), 0.97),
    ("tiny-sd3", "loha", dict(lr=1e-2), 0.97),
    ("tiny-sd3", "lokr", dict(lr=2e-2, steps=40), 0.97),
    ("tiny-sd3", "dreambooth", dict(lr=1e-3, steps=20), 0.97),
]


def _consumer_loss(family: str, method: str, res, tmp_path: Path) -> float:
    """The denoising loss on the training images of a fresh pipeline with the written output
    loaded by its real consumer."""
    import loradex

    examples = res.examples
    if method == "dreambooth":
        import diffusers

        out = tmp_path / "db"
        save_trained(res, out)
        return evaluate_loss(quiet_load(diffusers.DiffusionPipeline.from_pretrained, str(out)), examples)
    pipe = tiny(family)
    den = getattr(pipe, "transformer", None) or pipe.unet
    if method in ("loha", "lokr"):
        from lycoris import create_lycoris_from_weights

        save_trained(res, tmp_path / f"{method}.safetensors")  # kohya (FLUX's fused qkv: as its exact LoRA)
        a = res.export()
        comps = sorted({k.split(".")[0] for k in a.patches})
        assert a.kinds() == {method: len(a.patches)} and a.metadata["ss_network_module"] == "lycoris.kohya"
        for comp in comps:  # lycoris' own files hold one component each
            part = tmp_path / f"{method}_{comp}.safetensors"
            loradex.save(a, part, format="lycoris", component=comp)
            model = den if comp == res.ctx.arch.denoiser else getattr(pipe, comp)
            net, _ = quiet_load(create_lycoris_from_weights, 1.0, str(part), model)
            net.apply_to()
        return evaluate_loss(pipe, examples)
    saved = save_trained(res, tmp_path / f"{method}.safetensors", format="diffusers")
    quiet_load(pipe.load_lora_weights, saved["paths"][0], adapter_name="trained")
    if method == "pivotal":  # SDXL: one vector per encoder in the embedding file
        from safetensors.torch import load_file

        sd = load_file(saved["paths"][1])
        pipe.load_textual_inversion(sd["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    return evaluate_loss(pipe, examples)


@pytest.mark.parametrize("family,method,extra,ratio", MATRIX, ids=[f"{f[5:]}-{m}" for f, m, _, _ in MATRIX])
def test_method_trains_on_family_and_loads_in_its_consumer(data, tmp_path, family, method, extra, ratio):
    res = train(data, cfg(method, **extra), pipe=tiny(family))
    assert res.ctx.arch.name == family and len(res.losses) == res.ctx.cfg.steps
    base = evaluate_loss(tiny(family), res.examples)
    trained = _consumer_loss(family, method, res, tmp_path)
    assert trained < base * ratio, (base, trained)
    if method == "dreambooth":
        return
    md = res.export().metadata
    assert md["modelspec.trigger_phrase"] == "sks" and md["ss_max_train_steps"] == str(res.ctx.cfg.steps)
    if res.ctx.family.objective == "flow":
        assert md["modelspec.prediction_type"] == "flow"
        assert md["ss_timestep_sampling"] == res.ctx.cfg.timestep_sampling
        assert md["ss_model_prediction_type"] == res.ctx.cfg.model_prediction_type
    if family == "tiny-flux1" and method == "lora":
        assert md["ss_guidance_scale"] == "1.0" and md["ss_discrete_flow_shift"] == "3.1582"
        from safetensors.torch import load_file

        kohya = tmp_path / "kohya.safetensors"
        save_trained(res, kohya)  # kohya names BFL modules: the fused qkv and linear1 of the targets
        keys = load_file(kohya)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in keys
        assert not any("ff" in k or "mlp" in k for k in keys)
        # diffusers' kohya-FLUX reader hardcodes FLUX.1's widths: at tiny width the kohya file goes
        # through loradex's converter to diffusers, whose file diffusers loads
        import loradex

        loradex.convert(kohya, tmp_path / "k2d.safetensors", to="diffusers")
        pipe = tiny(family)
        quiet_load(pipe.load_lora_weights, str(tmp_path / "k2d.safetensors"), adapter_name="k")
        assert evaluate_loss(pipe, res.examples) < base * 0.97


@pytest.mark.parametrize("family", ["tiny-flux1", "tiny-sd3"])
@pytest.mark.parametrize("method", ["ti", "pivotal"])
def test_token_methods_refused_for_t5_families(data, family, method):
    with pytest.raises(TrainingError, match="T5"):
        train(data, cfg(method, steps=1), pipe=tiny(family))


# ---------------------------------------------------------------------------------------------
# flow matching: timestep sampling and prediction types against kohya's formulas
# ---------------------------------------------------------------------------------------------


def _flow_objective(**kw):
    from loradex.training.objective import Objective

    fam = types.SimpleNamespace(objective="flow", label="FLUX.1")
    return Objective(types.SimpleNamespace(cfg=TrainConfig(**kw), family=fam, pipe=None))


def test_flow_timestep_sampling_matches_kohya():
    """Each ``--timestep-sampling`` draws kohya's sigmas (flux_train_utils.py, same draws)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    z0 = torch.zeros(64, 4, 8, 12)  # latent 8x12: FLUX packs it into 4 x 6 = 24 tokens
    n = z0.shape[0]

    def ours(**kw):
        return _flow_objective(**kw).sigmas(z0, torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    assert torch.equal(ours(timestep_sampling="uniform"), torch.rand((n,), generator=g))
    g = torch.Generator().manual_seed(7)
    assert torch.allclose(ours(timestep_sampling="sigmoid", sigmoid_scale=1.5),
                          torch.sigmoid(1.5 * torch.randn((n,), generator=g)))
    g = torch.Generator().manual_seed(7)
    s = torch.randn((n,), generator=g).sigmoid()
    assert torch.allclose(ours(timestep_sampling="shift", discrete_flow_shift=3.1582), (s * 3.1582) / (1 + 2.1582 * s))
    m = (1.15 - 0.5) / (4096 - 256)
    mu = m * 24 + (0.5 - m * 256)  # get_lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
    assert torch.allclose(ours(timestep_sampling="flux_shift"), math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(torch.randn((n,), generator=g) * 0.8 + 0.3)  # compute_density_for_timestep_sampling
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    want = sched.sigmas[(u * 1000).long()]
    got = ours(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.8)
    assert torch.allclose(got, want)
    # the default is the sampling loradex always used: sigmoid(N(0,1))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(ours(), torch.sigmoid(torch.randn((n,), generator=g)))


def test_sigma_scaled_prediction_and_sd3_weighting():
    """``sigma_scaled``: the velocity turned into ``zt - sigma v`` and compared with z0, weighted
    by SD3's scheme (cosmap: 2 / (pi (1 - 2s + 2s^2))); ``raw``: plain MSE on noise - z0."""
    obj = _flow_objective(model_prediction_type="sigma_scaled", weighting_scheme="cosmap")
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 4, 4, generator=g)
    zt, t, target = obj.sample(z0, g)
    assert torch.equal(target, z0)
    v = torch.randn(z0.shape, generator=g)
    x0 = zt - t.view(-1, 1, 1, 1) * v
    w = 2 / (math.pi * (1 - 2 * t + 2 * t ** 2))
    want = (((x0 - z0) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    assert torch.allclose(obj.loss(v, zt, t, target), want)
    raw = _flow_objective()
    zt, t, target = raw.sample(z0, torch.Generator().manual_seed(0))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(target, noise - z0) and torch.allclose(zt, (1 - t.view(-1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1) * noise)
    with pytest.raises(TrainingError, match="additive"):
        TrainConfig(model_prediction_type="additive")


# ---------------------------------------------------------------------------------------------
# DDPM families: min-SNR, noise offset, multires, v-parameterization, zero terminal SNR
# ---------------------------------------------------------------------------------------------


def _kohya_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """kohya's custom_train_functions.fix_noise_scheduler_betas_for_zero_terminal_snr, verbatim math."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    a0, at = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= at
    alphas_bar_sqrt *= a0 / (a0 - at)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def test_ddpm_options_match_kohya():
    from loradex.training.context import Context
    from loradex.training.objective import Objective, pyramid_noise

    pipe = tiny("tiny-sd1")
    kw = dict(min_snr_gamma=5.0, noise_offset=0.1, multires_noise_iterations=6, v_parameterization=True,
              zero_terminal_snr=True)
    obj = Objective(Context(pipe, TrainConfig(**kw), torch.device("cpu")))
    from diffusers import DDPMScheduler

    base = DDPMScheduler.from_config(pipe.scheduler.config)
    assert torch.allclose(obj.sched.betas, _kohya_zero_terminal_snr(base.betas), atol=1e-6)
    assert float(obj.sched.alphas_cumprod[-1]) < 1e-9 and obj.pred_type == "v_prediction"
    # noise: N(0,1), then the offset (b, c, 1, 1), then the pyramid levels: all from the one generator
    z0 = torch.randn(2, 4, 8, 8)
    noise = obj.noise(z0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    want = torch.randn(z0.shape, generator=g)
    want = want + 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    want = pyramid_noise(want, g, 6, 0.3)
    assert torch.equal(noise, want) and abs(float(noise.std()) - 1) < 1e-5
    # min-SNR (v): min(SNR, gamma) / (SNR + 1), SNR of the base's own betas (kohya builds the table first)
    t = torch.tensor([10, 500, 990])
    abar = base.alphas_cumprod[t]
    snr = abar / (1 - abar)
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    want = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    assert torch.allclose(obj.loss(pred, pred, t, target), want)
    with pytest.raises(TrainingError, match="flow-matching"):
        Trainer(".", TrainConfig(v_parameterization=True, resolution=RES), pipe=tiny("tiny-flux1"), examples=[]).prepare()


def test_v_parameterization_zero_terminal_snr_trains_sd1(data, tmp_path):
    """SD1 trained as v with zero terminal SNR (min-SNR, offset and multires noise on): the file
    says v, and a consumer whose scheduler is set the same way gets a lower v loss."""
    res = train(data, cfg("lora", lr=3e-3, steps=40, v_parameterization=True, zero_terminal_snr=True, min_snr_gamma=5.0,
                          noise_offset=0.05, multires_noise_iterations=4), pipe=tiny("tiny-sd1"))
    assert res.ctx.pipe.scheduler.config.prediction_type == "v_prediction"  # samples are drawn as v too
    out = tmp_path / "v.safetensors"
    save_trained(res, out, format="diffusers")

    def consumer():
        p = tiny("tiny-sd1")
        p.scheduler = type(p.scheduler).from_config(p.scheduler.config, prediction_type="v_prediction",
                                                    rescale_betas_zero_snr=True)
        return p

    base = evaluate_loss(consumer(), res.examples)
    p = consumer()
    quiet_load(p.load_lora_weights, str(out), adapter_name="v")
    assert evaluate_loss(p, res.examples) < base * 0.97
    md = res.export().metadata
    assert md["modelspec.prediction_type"] == "v" and md["ss_zero_terminal_snr"] == "True"
    assert md["ss_min_snr_gamma"] == "5.0" and md["ss_noise_offset"] == "0.05"


@pytest.mark.parametrize("family,kw,match", [
    ("tiny-sd1", dict(timestep_sampling="shift"), "FLUX/SD3"),
    ("tiny-sd3", dict(guidance_scale=1.0), "guidance embedding"),
    ("tiny-flux1", dict(min_snr_gamma=5.0), "flow-matching"),
])
def test_family_options_refused_where_they_do_not_apply(data, family, kw, match):
    with pytest.raises(TrainingError, match=match):
        train(data, cfg("lora", steps=1, **kw), pipe=tiny(family))


# ---------------------------------------------------------------------------------------------
# optimizers, schedules, captions: resume bit for bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,kw", [
    ("tiny-sd1", dict(optimizer="Adafactor", lr_scheduler="cosine", lr_warmup_steps=2, shuffle_caption=True,
                      keep_tokens=1, caption_dropout_rate=0.3, noise_offset=0.1, multires_noise_iterations=3)),
    ("tiny-sd1", dict(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=0.25,
                      optimizer_args=("weight_decay=0.05", "betas=(0.9, 0.99)"))),
    ("tiny-flux1", dict(lr_scheduler="linear", lr_warmup_steps=1, timestep_sampling="sigma",
                        weighting_scheme="mode", model_prediction_type="sigma_scaled")),
])
def test_options_resume_bit_for_bit(tmp_path, family, kw):
    d = tmp_path / "data"
    for i in range(3):
        stripe(d / f"img{i}.png", i, caption=f"sks, red, blue, phase {i}")

    def run(work, resume=None):
        return train(d, cfg("lora", steps=8, lr=3e-3, checkpoint_every=4, **kw), pipe=tiny(family),
                     work_dir=tmp_path / work, resume=resume)

    full = run("a")
    resumed = run("b", resume=tmp_path / "a" / "checkpoint-4")
    a, b = full.method.state(full.ctx), resumed.method.state(resumed.ctx)
    assert all(torch.equal(a[k], b[k]) for k in a) and full.losses == resumed.losses
    # the schedule is diffusers' (get_scheduler), checkpointed and restored
    from diffusers.optimization import get_scheduler

    c = full.ctx.cfg
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.learning_rate)
    warm = int(c.lr_warmup_steps * c.steps) if c.lr_warmup_steps < 1 else int(c.lr_warmup_steps)
    sched = get_scheduler(c.lr_scheduler, ref, num_warmup_steps=warm, num_training_steps=c.steps,
                          num_cycles=c.lr_scheduler_num_cycles)
    for _ in range(8):
        ref.step()
        sched.step()
    state = json.loads((tmp_path / "a" / "checkpoint-8" / "state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == 8
    assert math.isclose(state["param_groups"][0]["lr"], ref.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15)
    md = full.export().metadata
    assert md["ss_lr_scheduler"] == c.lr_scheduler
    if "optimizer_args" in kw:
        assert md["ss_optimizer"] == "torch.optim.adamw.AdamW(betas=(0.9, 0.99),eps=1e-08,weight_decay=0.05)"
    if c.optimizer == "Adafactor":
        assert md["ss_optimizer"].startswith("transformers.optimization.Adafactor(scale_parameter=False,relative_step=False")


def test_optimizers_that_need_packages(data, monkeypatch):
    """AdamW8bit / Prodigy: a one-line TrainingError without their package; Prodigy is built from
    ``prodigyopt`` when it is importable (a stand-in here), with its designed lr 1.0 by default."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(TrainingError, match="needs bitsandbytes") as e:
            train(data, cfg("lora", steps=1, optimizer="adamw8bit"), pipe=tiny("tiny-sd1"))
        assert "\n" not in str(e.value)
    fake = types.ModuleType("prodigyopt")

    class Prodigy(torch.optim.AdamW):
        """Stand-in: AdamW under Prodigy's name (the wiring is what is tested)."""

    Prodigy.__module__ = "prodigyopt"
    fake.Prodigy = Prodigy
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    assert TrainConfig(optimizer="prodigy").learning_rate == 1.0
    res = train(data, cfg("lora", steps=2, lr=1e-3, optimizer="Prodigy"), pipe=tiny("tiny-sd1"))
    assert res.export().metadata["ss_optimizer"].startswith("prodigyopt.Prodigy(")
    with pytest.raises(TrainingError, match="relative_step"):
        train(data, cfg("lora", steps=1, optimizer="Adafactor", optimizer_args=("relative_step=True",)),
              pipe=tiny("tiny-sd1"))


def test_caption_processing_is_kohyas():
    from loradex.training.captions import process

    cap = "sks dog, red, blue, green, sofa"
    outs = {process(cap, torch.Generator().manual_seed(s), True, 1, 0.0) for s in range(20)}
    assert len(outs) > 3 and all(o.startswith("sks dog, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert process(cap, torch.Generator(), False, 0, 1.0) == ""
    assert process(cap, torch.Generator(), False, 0, 0.0) == cap


# ---------------------------------------------------------------------------------------------
# repeat folders, epochs, metadata, --config
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def kohya_folders(tmp_path) -> Path:
    root = tmp_path / "train"
    stripe(root / "10_sks dog" / "a.png", 0, "sks dog, red and blue stripes")
    stripe(root / "10_sks dog" / "b.png", 2, "sks dog, red and blue stripes")
    stripe(root / "2_pattern" / "c.png", 1)  # no caption: the folder's words are its prompt
    (root / "notes").mkdir()  # not N_words: skipped, as kohya does
    return root


def test_cli_config_repeats_epochs_and_kohya_metadata(kohya_folders, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors import safe_open

    from loradex.cli import cli

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(home))
    conf = tmp_path / "run.toml"
    conf.write_text(f"""
method = "lora"
[general]
train_data_dir = "{kohya_folders}"
max_train_epochs = 2
train_batch_size = 2
network_dim = 2
learning_rate = 3e-3
optimizer_type = "AdamW"
optimizer_args = ["weight_decay=0.05"]
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1
resolution = "{RES},{RES}"
blur-threshold = 0
cache_latents = true
seed = 1
""")
    out = tmp_path / "k.safetensors"
    r = CliRunner().invoke(cli, ["train", "--config", str(conf), "--rank", "3", "-o", str(out),
                                 "--save-as", "dog", "--json"])
    assert r.exit_code == 0, r.output
    assert "cache_latents" in r.stderr  # a kohya key with no effect here is named, then skipped
    d = json.loads(r.stdout)
    # an epoch: 2 images x 10 + 1 image x 2 = 22 samples, batches of 2 (one bucket) = 11 steps
    assert d["steps"] == 22 and d["config"]["rank"] == 3 and d["config"]["epochs"] == 2
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                                 "2_pattern": {"n_repeats": 2, "img_count": 1}}
    assert json.loads(md["ss_tag_frequency"]) == {"10_sks dog": {"sks dog": 2, "red and blue stripes": 2},
                                                  "2_pattern": {"pattern": 1}}
    assert md["ss_num_train_images"] == "22" and md["ss_num_batches_per_epoch"] == "11"
    assert md["ss_epoch"] == "2" and md["ss_num_epochs"] == "2" and md["ss_max_train_steps"] == "22"
    assert md["ss_resolution"] == f"({RES}, {RES})" and md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "3"
    assert md["ss_learning_rate"] == "0.003" and md["ss_lr_scheduler"] == "constant_with_warmup"
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW(betas=(0.9, 0.999),eps=1e-08,weight_decay=0.05)"
    assert md["modelspec.trigger_phrase"] == "sks"
    from loradex.registry import Registry

    params = json.dumps(Registry().lineage("dog"), default=str)
    for fact in ('"dataset_dirs"', '"tag_frequency"', '"num_train_images": 22', "weight_decay=0.05", '"epoch": 2'):
        assert fact in params, fact


@pytest.mark.parametrize("toml,args,msg", [
    ("max_train_steps = 2\nbogus_key = 1\n", [], "unknown key(s) bogus_key"),
    ("max_train_steps = 'many'\n", [], "max_train_steps"),
    ("", ["--steps", "3", "--epochs", "2"], "--steps or --epochs"),
    ("", ["--model-prediction-type", "additive"], "additive"),
])
def test_cli_config_bad_input_is_one_line(kohya_folders, tmp_path, capsys, toml, args, msg):
    from loradex.cli import main

    conf = tmp_path / "bad.toml"
    conf.write_text(toml)
    with pytest.raises(SystemExit) as e:
        main(["train", "lora", "--config", str(conf), "--data", str(kohya_folders), "--resolution", str(RES),
              "-o", str(tmp_path / "x.safetensors"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


# ---------------------------------------------------------------------------------------------
# LyCORIS on the text encoders, pivotal's TI-first phase, samples, default resolution
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_text_encoder_trains_resumes_and_loads(data, tmp_path, algo):
    from lycoris import create_lycoris_from_weights

    import loradex

    def run(work, resume=None):
        return train(data, cfg(algo, lr=1e-2, steps=6, text_encoder=True, checkpoint_every=3), pipe=tiny("tiny-sd1"),
                     work_dir=tmp_path / work, resume=resume)

    full = run("a")
    resumed = run("b", resume=tmp_path / "a" / "checkpoint-3")
    a, b = full.method.state(full.ctx), resumed.method.state(resumed.ctx)
    assert any(k.startswith("lycoris_text_encoder.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    res = train(data, cfg(algo, lr=1e-2, steps=30, text_encoder=True), pipe=tiny("tiny-sd1"))
    out = tmp_path / "te.safetensors"
    save_trained(res, out)
    ad = loradex.load(out, arch="tiny-sd1")
    assert ad.kinds() == {algo: 32 + 8} and json.loads(ad.metadata["ss_network_args"])["train_text_encoder"]
    pipe = tiny("tiny-sd1")
    base = evaluate_loss(pipe, res.examples)
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        loradex.save(ad, tmp_path / f"{comp}.safetensors", format="lycoris", component=comp)
        net, _ = quiet_load(create_lycoris_from_weights, 1.0, str(tmp_path / f"{comp}.safetensors"), model)
        net.apply_to()
    assert evaluate_loss(pipe, res.examples) < base * 0.97


def test_pivotal_ti_first_phase(data, tmp_path):
    """--ti-steps 4: the checkpoint after 4 steps has the LoRA exactly at its initialisation (B
    zero) and the embedding moved; after that both learn."""
    from safetensors.torch import load_file

    res = train(data, cfg("pivotal", lr=3e-3, text_lr=5e-2, steps=8, ti_steps=4, checkpoint_every=4),
                pipe=tiny("tiny-sd1"), work_dir=tmp_path / "w")
    mid = load_file(tmp_path / "w" / "checkpoint-4" / "trainable.safetensors")
    ups = [k for k in mid if "lora_B" in k]
    assert ups and all(not mid[k].any() for k in ups)
    emb = next(k for k in mid if "embed" in k)
    orig = tiny("tiny-sd1").text_encoder.get_input_embeddings().weight
    assert not torch.equal(mid[emb][-1], mid[emb][-1] * 0 + orig.mean(0))  # moved from its init row
    end = res.method.state(res.ctx)
    assert any(end[k].any() for k in ups)
    with pytest.raises(TrainingError, match="pivotal"):
        TrainConfig(method="lora", ti_steps=3)


def test_samples_grid_of_several_prompts(data, tmp_path):
    res = train(data, cfg("lora", steps=2, sample_every=2, sample_steps=1,
                          sample_prompts=("a photo of sks", "stripes", "a red pattern")),
                pipe=tiny("tiny-sd1"), work_dir=tmp_path / "w")
    (png,) = res.samples
    assert Path(png).name == "step-000002.png" and Image.open(png).size == (3 * RES, RES)


@pytest.mark.parametrize("family,res", [("tiny-sd1", 512), ("tiny-sdxl", 1024)])
def test_default_resolution_is_the_familys(family, res):
    from loradex.training.data import Example

    ex = [Example("x.png", torch.zeros(3, RES, RES), "a photo of sks")]
    t = Trainer(".", TrainConfig(method="lora", steps=1), pipe=tiny(family), examples=ex).prepare()
    assert t.cfg.resolution == res
