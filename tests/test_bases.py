"""Any base model: bases of custom size built in-process, named with ``--base``, on every command.

Four bases no built-in table describes, each as a diffusers folder and as a single-file
checkpoint: an SD1-topology model of custom width (UNet 48/96, CLIP 48 wide), an SDXL-topology
model with fewer blocks (one resnet per level, one transformer block per attention, widths 24/48),
a FLUX model with fewer blocks (1 double + 3 single blocks, 48 wide) and an SD3.5-Medium-like
MMDiT (3 joint blocks, the first with dual attention, qk RMS norms, 40 wide). Reference adapters are
made on them by the real tools (peft + diffusers' ``save_lora_weights``, lycoris-lora), and what
loradex writes is loaded back by diffusers (``load_lora_weights``, ``from_pretrained``) and
compared numerically with the reference tool's own forward pass.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loradex
from ckpt_util import flux_bfl_state_dict, sd1_single_file, sd3_single_file, sdxl_single_file
from cli_util import bad, run
from loradex.core.archs import arch_from_models, builtin_names, get_arch, tiny_names
from loradex.demo import lycoris_preset, randomize_
from loradex.tiny import quiet, tiny_t5, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae
from test_training import stripes

KINDS = ("sd1c", "sdxlc", "fluxc", "sd3c")


pytestmark = pytest.mark.usefixtures("one_thread")


def build_pipe(kind: str, seed: int = 0):
    """The custom-size pipeline of ``kind`` (random weights, CPU)."""
    import diffusers

    with quiet():
        if kind == "sd1c":
            return diffusers.StableDiffusionPipeline(
                vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed, hidden=48), tokenizer=tiny_tokenizer(),
                unet=tiny_unet(seed, cross_attention_dim=48, block_out_channels=(48, 96)),
                scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        if kind == "sdxlc":
            from loradex.tiny import tiny_sdxl_unet

            unet = tiny_sdxl_unet(seed, block_out_channels=(24, 48), layers_per_block=1,
                                  transformer_layers_per_block=(1, 1))
            return diffusers.StableDiffusionXLPipeline(
                vae=tiny_vae(seed), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
                text_encoder_2=tiny_text_encoder(seed + 1, projection=True), tokenizer_2=tiny_tokenizer(), unet=unet,
                scheduler=diffusers.EulerDiscreteScheduler(num_train_timesteps=1000))
        if kind == "sd3c":
            from loradex.core.archs.tables import load_config
            from loradex.tiny import tiny_model

            cfg = {**load_config("tiny_sd3_transformer.json"), "num_layers": 3, "num_attention_heads": 5,
                   "caption_projection_dim": 40, "dual_attention_layers": [0], "qk_norm": "rms_norm"}
            return diffusers.StableDiffusion3Pipeline(
                transformer=tiny_model(cfg, seed),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                vae=tiny_vae(seed, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                             use_post_quant_conv=False),
                text_encoder=tiny_model(load_config("tiny_clip_text_proj.json"), seed), tokenizer=tiny_tokenizer(),
                text_encoder_2=tiny_model(load_config("tiny_clip_g_text_proj.json"), seed + 1),
                tokenizer_2=tiny_tokenizer(),
                text_encoder_3=tiny_model(load_config("tiny_t5_64_encoder.json"), seed + 2),
                tokenizer_3=tiny_tokenizer())
        from loradex.tiny import tiny_flux_transformer

        tr = tiny_flux_transformer(seed, num_layers=1, num_single_layers=3, attention_head_dim=12,
                                   num_attention_heads=4, axes_dims_rope=(4, 4, 4))
        return diffusers.FluxPipeline(
            vae=tiny_vae(seed, shift_factor=0.0), text_encoder=tiny_text_encoder(seed), tokenizer=tiny_tokenizer(),
            text_encoder_2=tiny_t5(seed + 1), tokenizer_2=tiny_tokenizer(), transformer=tr,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


class Bench:
    """A pipeline, fixed denoiser inputs (its family's conditioning of one prompt) and outputs."""

    def __init__(self, pipe) -> None:
        from loradex.training.loop import pipeline_arch

        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.arch = pipeline_arch(pipe)
        fam = self.arch.family
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=g)
        self.t = torch.tensor([0.6]) if fam.objective == "flow" else torch.tensor([500])
        with torch.no_grad():
            self.cond = fam.encode_prompts(pipe, ["a photo of a cat"], torch.device("cpu"))
        self.y_base = self.out(pipe)

    @torch.no_grad()
    def out(self, pipe) -> torch.Tensor:
        return self.arch.family.predict(pipe, self.latents, self.t, self.cond).double()

    def rel(self, y, y_ref) -> float:
        return float((y - y_ref).norm() / (y_ref - self.y_base).norm())

    def fresh(self):
        return copy.deepcopy(self.pipe)

    @property
    def denoiser(self):
        return getattr(self.pipe, self.arch.denoiser)


def _peft_reference(bench: Bench, out: Path):
    """A LoRA by peft on every Linear of the denoiser (and Conv2d of a UNet), saved by the
    pipeline class's own ``save_lora_weights``; (file, denoiser output with it)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = bench.fresh()
    den = getattr(pipe, bench.arch.denoiser)
    targets = [n for n, m in den.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    cfg = LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(11)
    with quiet():
        inject_adapter_in_model(cfg, den)
    with torch.no_grad():
        for n, p in den.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    y_ref = bench.out(pipe)
    kw = {f"{bench.arch.denoiser}_lora_layers": get_peft_model_state_dict(den),
          f"{bench.arch.denoiser}_lora_adapter_metadata": cfg.to_dict()}
    with quiet():
        type(pipe).save_lora_weights(out / "peft", safe_serialization=True, **kw)
    return out / "peft" / "pytorch_lora_weights.safetensors", y_ref


def _loha_reference(bench: Bench, out: Path):
    """A LoHa by lycoris-lora on the denoiser's Linear layers (standalone ``lycoris_`` keys)."""
    from lycoris import create_lycoris

    den = copy.deepcopy(bench.denoiser)
    with quiet(), lycoris_preset({"target_module": ["Linear"], "target_name": []}):
        net = create_lycoris(den, 1.0, linear_dim=2, linear_alpha=1.0, algo="loha")
        net.apply_to()
    randomize_(net, 5, scale=0.3)
    pipe = copy.copy(bench.pipe)
    setattr(pipe, bench.arch.denoiser, den)
    y_ref = bench.out(pipe)
    path = out / "loha.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path, y_ref


def _single_file(kind: str, pipe, arch, path: Path) -> None:
    if kind == "sd1c":
        sd1_single_file(pipe, arch, path)
    elif kind == "sdxlc":
        sdxl_single_file(pipe, arch, path)
    elif kind == "sd3c":
        sd3_single_file(pipe, arch, path)
    else:  # a BFL FLUX file as BFL ships it: the transformer alone, no prefix
        save_file(flux_bfl_state_dict(pipe.transformer, arch), str(path))


@pytest.fixture(scope="module", params=KINDS)
def base(request, tmp_path_factory):
    kind = request.param
    d = tmp_path_factory.mktemp(kind)
    bench = Bench(build_pipe(kind))
    with quiet():
        bench.pipe.save_pretrained(d / "base")
    _single_file(kind, bench.pipe, bench.arch, d / "base.safetensors")
    peft, y_peft = _peft_reference(bench, d)
    loha, y_loha = _loha_reference(bench, d)
    return {"kind": kind, "dir": d, "bench": bench, "folder": d / "base", "file": d / "base.safetensors",
            "peft": peft, "y_peft": y_peft, "loha": loha, "y_loha": y_loha}


def consume(bench: Bench, path: Path) -> torch.Tensor:
    """The denoiser output of a fresh pipeline after diffusers' ``load_lora_weights(path)``."""
    pipe = bench.fresh()
    with quiet():
        pipe.load_lora_weights(str(path), adapter_name="tested")
    return bench.out(pipe)


# ---------------------------------------------------------------------------------------------


def test_the_arch_comes_from_the_base(base, capsys):
    """Folder and single file give the arch its modules deserve: a derived name (no built-in or
    embedded size has these modules), the same for both layouts where both hold every component;
    without --base the file's keys fit no known size and the error says how to name the base."""
    bench = base["bench"]
    name = bench.arch.name
    assert name not in builtin_names() and name not in tiny_names()
    assert name.startswith(bench.arch.family.name + "-")
    r = run(capsys, "inspect", base["peft"], "--base", base["folder"], "--json")
    assert r[0] == 0, r
    assert json.loads(r[1])["arch"] == name
    if base["kind"] != "fluxc":  # BFL files hold the transformer only: text encoders are FLUX.1's
        from loradex.converters.checkpoint import model_arch

        assert model_arch(base["file"]).name == name
    # a fresh process that never saw the base (one family is enough: it costs an interpreter start):
    # the keys fit no known size; kohya names cannot be written without the arch, and the error says
    # what to do
    if base["kind"] == "sd1c":
        p = subprocess.run([sys.executable, "-m", "loradex", "convert", str(base["peft"]), "--to", "kohya", "-o",
                            str(base["dir"] / "x.safetensors")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "LORADEX_CACHE": "off"})
        assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1 and "--base" in p.stderr, p.stderr


def test_convert_round_trip_loads_in_diffusers(base, capsys):
    """peft LoRA -> kohya (native names of the family) -> diffusers, and lycoris LoHa -> kohya ->
    diffusers (exact LoRA of rank r1*r2), with the base named by its folder, then its single file:
    diffusers' load_lora_weights reproduces the reference tool's forward pass."""
    bench, d = base["bench"], base["dir"]
    for label, ref, y_ref in (("peft", base["peft"], base["y_peft"]), ("loha", base["loha"], base["y_loha"])):
        k, df = d / f"{label}_k.safetensors", d / f"{label}_d.safetensors"
        assert run(capsys, "convert", ref, "--to", "kohya", "-o", k, "--base", base["folder"])[0] == 0
        base_for_file = base["file"] if base["kind"] != "fluxc" else base["folder"]
        r = run(capsys, "convert", k, "--to", "diffusers", "-o", df, "--base", base_for_file, "--json")
        assert r[0] == 0, r
        assert json.loads(r[1])["max_error"] == 0.0
        assert bench.rel(consume(bench, df), y_ref) < 1e-4, label
        # the kohya file names the denoiser as the family's kohya does (native paths where it fuses)
        keys = list(loradex.load(k, arch=bench.arch).patches)
        assert keys and all(kk.split(".", 1)[0] == bench.arch.denoiser for kk in keys)


def test_bake_into_folder_and_single_file(base, capsys):
    bench, d = base["bench"], base["dir"]
    out = d / "baked"
    assert run(capsys, "bake", "--base", base["folder"], base["loha"], "-o", out)[0] == 0
    import diffusers

    with quiet():
        baked = diffusers.DiffusionPipeline.from_pretrained(str(out))
    assert bench.rel(bench.out(baked), base["y_loha"]) < 1e-4
    # single file: the layout kept, the patched weights equal W + dW
    outf = d / "baked.safetensors"
    assert run(capsys, "bake", "--base", base["file"], f"{base['peft']}:0.5", "-o", outf)[0] == 0
    from loradex.converters.checkpoint import CheckpointReader

    a = loradex.load(base["peft"], arch=bench.arch)
    before, after = CheckpointReader(base["file"]), CheckpointReader(outf)
    name = next(n for n in a.patches if ".attn" in n)
    w0 = before.weight(name).float()
    assert torch.allclose(after.weight(name).float(), w0 + a.patches[name].delta(w0, 0.5), atol=1e-6)


def test_extract_from_tuned_folder(base, capsys):
    """tuned = base + known rank-2 deltas: extract at rank 2 recovers them (read by diffusers)."""
    bench, d = base["bench"], base["dir"]
    tuned = bench.fresh()
    den = getattr(tuned, bench.arch.denoiser)
    g = torch.Generator().manual_seed(3)
    names = [n for n, m in den.named_modules() if isinstance(m, torch.nn.Linear) and ("to_q" in n or "to_v" in n)][:4]
    with torch.no_grad():
        for n in names:
            w = den.get_submodule(n).weight
            w += (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)) * 0.05
    with quiet():
        tuned.save_pretrained(d / "tuned")
    out = d / "extracted.safetensors"
    r = run(capsys, "extract", "--base", base["folder"], "--tuned", d / "tuned", "--rank", 2, "-o", out,
            "--to", "diffusers", "--json")
    assert r[0] == 0, r
    assert json.loads(r[1])["modules"] and len(json.loads(r[1])["modules"]) == len(names)
    y_tuned = bench.out(tuned)
    assert bench.rel(consume(bench, out), y_tuned) < 1e-4
    assert loradex.load(out).metadata.get("loradex.base_model") == str(base["folder"].resolve())
    # the same from single files of base and tuned
    _single_file(base["kind"], tuned, bench.arch, d / "tuned.safetensors")
    out2 = d / "extracted2.safetensors"
    r = run(capsys, "extract", "--base", base["file"], "--tuned", d / "tuned.safetensors", "--rank", 2, "-o", out2,
            "--to", "diffusers")
    assert r[0] == 0, r
    assert bench.rel(consume(bench, out2), y_tuned) < 1e-4


def test_merge_resize_export_push_with_base(base, capsys, tmp_path, monkeypatch):
    bench = base["bench"]
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    m = tmp_path / "m.safetensors"
    assert run(capsys, "merge", f"{base['peft']}:0.5", f"{base['loha']}:0.5", "-o", m, "--to", "diffusers",
               "--base", base["folder"])[0] == 0
    a, b = (loradex.load(x, arch=bench.arch) for x in (base["peft"], base["loha"]))
    merged = loradex.load(m, arch=bench.arch)
    for name in list(merged.patches)[:12]:  # exactly the weighted sum of the updates
        want = sum(0.5 * x.patches[name].delta().double() for x in (a, b) if name in x.patches)
        got = merged.patches[name].delta().double()
        assert float((got - want).norm() / want.norm()) < 1e-5, name
    consume(bench, m)  # and diffusers loads it
    rz = tmp_path / "r.safetensors"
    assert run(capsys, "resize", base["peft"], "--rank", 2, "-o", rz, "--base", base["folder"])[0] == 0
    assert set(loradex.load(rz, arch=bench.arch).ranks()) == {2}
    # the registry remembers the base: later commands on the REF need no --base
    r = run(capsys, "add", base["peft"], "--name", "face", "--base", base["folder"], "--json")
    assert r[0] == 0, r
    folder = tmp_path / "loras"  # a folder import: --base for every file
    folder.mkdir()
    shutil.copy(base["loha"], folder / "style.safetensors")
    shutil.copy(base["peft"], folder / "face.safetensors")
    r = run(capsys, "add", folder, "--name", "imp", "--base", base["folder"], "--json")
    assert r[0] == 0, r
    added = json.loads(r[1])["added"]
    assert len(added) == 2 and all(v["arch"] == bench.arch.name and v["base_model"] == str(base["folder"].resolve())
                                   for v in added)
    shown = json.loads(run(capsys, "show", "face", "--json")[1])
    assert shown["arch"] == bench.arch.name and shown["base_model"] == str(base["folder"].resolve())
    e = tmp_path / "e.safetensors"
    assert run(capsys, "export", "face", "-o", e, "--to", "kohya")[0] == 0
    back, orig = loradex.load(e, arch=bench.arch), loradex.load(base["peft"], arch=bench.arch)
    assert set(back.patches) == set(orig.patches)
    for name in list(orig.patches)[:12]:
        assert torch.allclose(back.patches[name].delta(), orig.patches[name].delta(), atol=1e-7), name
    if base["kind"] == "sd1c":  # diffusers' kohya loaders hard-code SDXL's SGM block layout and FLUX.1's widths
        assert bench.rel(consume(bench, e), base["y_peft"]) < 1e-4
    assert run(capsys, "push", "face", "--repo-id", "me/face", "--dry-run", "-o", tmp_path / "card")[0] == 0
    assert run(capsys, "convert", "face", "--to", "diffusers", "-o", tmp_path / "c.safetensors")[0] == 0


@pytest.mark.slow
def test_train_on_custom_base_loads_and_learns(base, tmp_path, capsys):
    """``train lora`` with ``--base FOLDER``: the file loads in diffusers, lowers the denoising loss
    on its images, and names its base (``loradex.arch`` + descriptor): ``inspect`` needs no --base,
    even in a fresh process with an empty architecture cache."""
    from loradex.training.loop import TrainConfig, evaluate_loss, train

    data = stripes(tmp_path / "data", n=2, size=32)
    out = tmp_path / "trained.safetensors"
    r = run(capsys, "train", "lora", "--base", base["folder"], "--data", data, "--steps", 12, "--resolution", 32,
            "--lr", "3e-3", "--device", "cpu", "--no-curate", "-o", out, "--to", "diffusers", "--json")
    assert r[0] == 0, r
    bench = base["bench"]
    res = train(data, TrainConfig(method="lora", steps=1, resolution=32, curate=False), pipe=bench.fresh())
    before = evaluate_loss(bench.fresh(), res.examples, repeats=4)
    pipe = bench.fresh()
    with quiet():
        pipe.load_lora_weights(str(out))
    assert evaluate_loss(pipe, res.examples, repeats=4) < before
    assert json.loads(run(capsys, "inspect", out, "--json")[1])["arch"] == bench.arch.name
    if base["kind"] != "fluxc":
        return  # the fresh-process check once (an interpreter start costs seconds)
    env = {**os.environ, "LORADEX_CACHE": str(tmp_path / "empty-cache")}
    p = subprocess.run([sys.executable, "-m", "loradex", "inspect", str(out), "--json"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["arch"] == bench.arch.name


@pytest.mark.parametrize("method", ["loha", "lokr", "ti"])
def test_train_sd1_custom_lycoris_and_ti(method, tmp_path, capsys):
    """The other methods on the custom-width SD1 base: LoHa/LoKr load in lycoris-lora (its own
    loader builds every module from loradex's file), the TI embedding (48 wide) in diffusers, and the
    files name their base."""
    bench = Bench(build_pipe("sd1c"))
    with quiet():
        bench.pipe.save_pretrained(tmp_path / "base")
    data = stripes(tmp_path / "data", n=2, size=32)
    out = tmp_path / ("emb.safetensors" if method == "ti" else "x.safetensors")
    args = ["train", method, "--base", tmp_path / "base", "--data", data, "--steps", 6, "--resolution", 32,
            "--device", "cpu", "--no-curate", "-o", out, "--json"]
    if method == "ti":
        args += ["--token", "sks", "--init-word", "cat", "--to", "diffusers-ti"]
    else:
        args += ["--to", "lycoris"]  # lycoris-lora's own standalone loader reads it
    assert run(capsys, *args)[0] == 0
    info = json.loads(run(capsys, "inspect", out, "--json")[1])
    assert info["arch"] == bench.arch.name
    pipe = bench.fresh()
    with quiet():
        if method == "ti":
            pipe.load_textual_inversion(str(out), token="sks")
            assert "sks" in pipe.tokenizer.get_vocab()
        else:
            from lycoris import create_lycoris_from_weights

            net, _ = create_lycoris_from_weights(1.0, str(out), pipe.unet)
            net.apply_to()
            assert len(net.loras) == loradex.load(out).kinds()[method] > 0


def test_hub_id_in_the_local_cache(base, tmp_path, monkeypatch, capsys):
    """``--base org/name``: a repo already in the Hugging Face cache (its snapshot folder), offline."""
    if base["kind"] != "sd1c":
        pytest.skip("one family is enough for the cache lookup")
    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--me--custom-sd" / "snapshots" / rev
    shutil.copytree(base["folder"], snap)
    (cache / "models--me--custom-sd" / "refs").mkdir(parents=True)
    (cache / "models--me--custom-sd" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run(capsys, "inspect", base["peft"], "--base", "me/custom-sd", "--json")
    assert r[0] == 0, r
    assert json.loads(r[1])["arch"] == base["bench"].arch.name
    bad(run(capsys, "inspect", base["peft"], "--base", "me/not-cached"), "not in the local Hugging Face cache")


def test_engine_and_generate_on_custom_base(base, tmp_path, capsys):
    """The engine on the custom base: a LoRA in its slots gives diffusers' load_lora_weights output."""
    from loradex.inference.engine import Engine

    bench = base["bench"]
    eng = Engine(base["folder"], max_rank=8, slots=2)
    assert eng.arch.name == bench.arch.name
    with eng.activate([[(str(base["peft"]), 1.0)]]):
        y = bench.out(eng.pipe)
    assert bench.rel(y, base["y_peft"]) < 1e-4
    png = tmp_path / "x.png"
    r = run(capsys, "generate", "a cat", "--base", base["folder"], "--adapter", base["peft"], "-o", png,
            "--steps", 1, "--width", 64, "--height", 64, "--device", "cpu", "--json")
    assert r[0] == 0, r
    assert png.is_file()


def test_derived_arch_resolves_from_registry_alone(tmp_path, monkeypatch, capsys):
    """A version stored with --base keeps its arch's descriptor in the catalogue: a process that has
    neither the base nor a cache rebuilds it."""
    bench = Bench(build_pipe("sd1c", seed=4))
    with quiet():
        bench.pipe.save_pretrained(tmp_path / "base")
    peft, _ = _peft_reference(bench, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(home))
    assert run(capsys, "add", peft, "--name", "p", "--base", tmp_path / "base")[0] == 0
    shutil.rmtree(tmp_path / "base")
    env = {**os.environ, "LORADEX_HOME": str(home), "LORADEX_CACHE": "off"}
    p = subprocess.run([sys.executable, "-m", "loradex", "convert", "p", "--to", "kohya", "-o",
                        str(tmp_path / "k.safetensors"), "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["kept"] > 0


def test_embedded_tiny_names_and_own_files(tmp_path, capsys):
    """The embedded tiny models are named archs (``tiny`` = ``tiny-sd1``), and a file trained on the
    default tiny model comes back known (its ModelSpec says tiny-sd1)."""
    assert get_arch("tiny") is get_arch("tiny-sd1")
    data = stripes(tmp_path / "data", n=2, size=32)
    out = tmp_path / "face.safetensors"
    assert run(capsys, "train", "lora", "--data", data, "--steps", 2, "--device", "cpu", "--no-curate", "-o", out)[0] == 0
    assert json.loads(run(capsys, "inspect", out, "--json")[1])["arch"] == "tiny-sd1"
    assert run(capsys, "convert", out, "--to", "diffusers", "-o", tmp_path / "d.safetensors")[0] == 0
    assert run(capsys, "inspect", out, "--arch", "tiny", "--json")[0] == 0
    bad(run(capsys, "inspect", out, "--base", "nope/missing-repo"), "not in the local")
    bad(run(capsys, "bake", "--base", "sdxl", out, "-o", tmp_path / "b"), "names an architecture")


def test_arch_from_models_equals_config_build():
    """The derived arch of live models is built from their configs alone (a descriptor that
    rebuilds anywhere) and has exactly the live modules."""
    from loradex.core.archs import arch_from_descriptor

    pipe = build_pipe("sdxlc", seed=2)
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    a = arch_from_models(comps)
    assert a.family.name == "sdxl" and a.descriptor() is not None
    b = arch_from_descriptor(json.loads(json.dumps(a.descriptor())))
    assert b is a or b.signature() == a.signature()
    from loradex.core.archs import module_table

    for c, m in comps.items():
        assert module_table(c, m) == a.component_modules(c)
