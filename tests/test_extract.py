"""extract (checkpoint minus base -> LoRA) and the lazy checkpoint reader: known low-rank deltas
recovered, noise within 1.02x of the optimal truncation (full SVD here), rank policies against
the full spectrum, the file loaded by diffusers reproduces the tuned model, diffusers folders and
LDM/SGM single files (written here from the real models with independent name maps) read alike,
and the CLI contract."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import loradex
from ckpt_util import flux_bfl_state_dict, sd1_single_file, sdxl_single_file
from cli_util import bad, run
from loradex.converters.checkpoint import CheckpointReader
from loradex.core.linalg import rank_for
from loradex.log import quiet

RANK = 3
#: modules that get a known low-rank delta: unet linear, 1x1 conv (SD1 proj_in), 3x3 conv, text encoder
TARGETS = (
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.mid_block.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "text_encoder.text_model.encoder.layers.1.mlp.fc1",
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def module_of(pipe, canonical: str) -> torch.nn.Module:
    comp, path = canonical.split(".", 1)
    model = getattr(pipe, comp)
    if comp.startswith("text_encoder") and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")  # transformers 5's CLIPTextModel
    return model.get_submodule(path)


def add_deltas(pipe, seed: int, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Add a known rank-RANK delta (plus optional dense noise) to each TARGETS module, in place."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name in TARGETS:
            w = module_of(pipe, name).weight
            m, n = w.shape[0], w[0].numel()
            dw = (torch.randn(m, RANK, generator=g) @ torch.randn(RANK, n, generator=g)) * 0.05
            if noise:
                dw += torch.randn(m, n, generator=g) * noise
            w += dw.reshape(w.shape)
            out[name] = dw.reshape(w.shape)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, bench):
    """base / tuned (exact rank-3 deltas) / noisy (deltas + noise) as diffusers folders, and base
    and tuned as LDM single files."""
    d = tmp_path_factory.mktemp("extract")
    base = bench.fresh_pipe()
    tuned, noisy = copy.deepcopy(base), copy.deepcopy(base)
    deltas = add_deltas(tuned, 1)
    noisy_deltas = add_deltas(noisy, 2, noise=0.004)
    with quiet():
        for name, p in (("base", base), ("tuned", tuned), ("noisy", noisy)):
            p.save_pretrained(d / name)
    sd1_single_file(base, bench.arch, d / "base.safetensors")
    sd1_single_file(tuned, bench.arch, d / "tuned.safetensors")
    return {"dir": d, "deltas": deltas, "noisy": noisy_deltas, "base": base, "tuned": tuned, "noisy_pipe": noisy}


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_recovers_known_low_rank_deltas(models, bench, method):
    d = models["dir"]
    a, report = loradex.extract(d / "base", d / "tuned", rank=RANK, conv_rank=RANK, arch=bench.arch, method=method)
    assert set(a.patches) == set(TARGETS)
    for name, dw in models["deltas"].items():
        p = a.patches[name]
        assert p.rank == RANK and tuple(p.shape) == tuple(dw.shape)
        assert rel(p.delta(), dw) <= 1e-5, name
        assert report.modules[name]["error"] <= 1e-5 and report.modules[name]["energy"] >= 1 - 1e-10
    # every other linear/conv module is reported as identical, the text encoder's one by one
    te = [n for n in report.skipped if n.startswith("text_encoder.")]
    assert len(te) == 12 - 2 and all(report.skipped[n] == "identical" for n in te)
    assert report.components()["text_encoder"] == {"extracted": 2, "identical": 10, "skipped": 0}
    # without conv_rank the 3x3 conv is reported as changed-but-skipped, not silently dropped
    a2, r2 = loradex.extract(d / "base", d / "tuned", rank=RANK, arch=bench.arch, method=method)
    assert "unet.down_blocks.0.resnets.0.conv1" not in a2.patches
    assert "conv_rank" in r2.skipped["unet.down_blocks.0.resnets.0.conv1"]


def test_noise_within_optimal_truncation_and_policies(models, bench):
    d = models["dir"]
    a, report = loradex.extract(d / "base", d / "noisy", rank=RANK, conv_rank=RANK, arch=bench.arch)
    for name, dw in models["noisy"].items():
        mat = dw.double().reshape(dw.shape[0], -1)
        s = torch.linalg.svdvals(mat)
        optimal = math.sqrt(float((s[RANK:] ** 2).sum() / (s**2).sum()))
        got = rel(a.patches[name].delta(), dw)
        assert optimal > 1e-3 and got <= 1.02 * optimal, (name, got, optimal)
        assert report.modules[name]["error"] == pytest.approx(got, rel=1e-3)
    # dynamic policies: the rank is exactly what rank_for gives on the full spectrum, per module
    for kw in ({"fro": 0.9}, {"ratio": 8.0}, {"cumulative": 0.6}):
        a, report = loradex.extract(d / "base", d / "noisy", arch=bench.arch, conv_rank=64, **kw)
        for name, dw in models["noisy"].items():
            s = torch.linalg.svdvals(dw.double().reshape(dw.shape[0], -1))
            assert report.modules[name]["rank"] == rank_for(s, **kw), (kw, name)
    # the cap of a dynamic policy
    a, report = loradex.extract(d / "base", d / "noisy", arch=bench.arch, rank=2, fro=0.999)
    assert max(m["rank"] for m in report.modules.values()) == 2


def test_file_loads_in_diffusers_and_reproduces_tuned(models, bench, tmp_path):
    d = models["dir"]
    a, report = loradex.extract(d / "base", d / "tuned", rank=RANK, conv_rank=RANK, arch=bench.arch)
    out = tmp_path / "extracted.safetensors"
    loradex.save(a, out, "kohya", arch=bench.arch)
    meta = loradex.load(out, arch=bench.arch).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"].endswith("/lora")
    assert len(meta["sshs_model_hash"]) == 64 and "extracted" in meta["modelspec.description"]
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(out), adapter_name="extracted")
    tuned = models["tuned"]
    y_tuned, y_lora = bench.unet_out(tuned.unet), bench.unet_out(pipe.unet)
    assert rel(y_lora, y_tuned) <= 1e-5 * 10 and torch.linalg.vector_norm(y_tuned - bench.y_base) > 0
    assert bench.rel(y_lora, y_tuned) <= 1e-4  # relative to what the fine-tune changed
    # diffusers 0.42.1 under transformers 5 drops the self_attn modules of kohya text-encoder files
    # (its converter renames them to the old to_q_lora names, which nothing maps back): check the
    # text encoder through the diffusers-format file
    out = tmp_path / "extracted.diffusers.safetensors"
    loradex.save(a, out, "diffusers", arch=bench.arch)
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(out), adapter_name="extracted")
    assert bench.rel(bench.unet_out(pipe.unet), y_tuned) <= 1e-4
    ids = pipe.tokenizer(["a photo"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        h_lora = pipe.text_encoder(ids)[0]
        h_tuned = tuned.text_encoder(ids)[0]
        h_base = models["base"].text_encoder(ids)[0]
    assert rel(h_lora - h_base, h_tuned - h_base) <= 1e-4


def test_single_file_and_folder_read_alike(models, bench):
    d = models["dir"]
    folder, single = CheckpointReader(d / "base", arch=bench.arch), CheckpointReader(d / "base.safetensors", arch=bench.arch)
    assert folder.layout == "folder" and single.layout == "file"
    assert set(folder.modules()) == set(single.modules())
    for name, params in folder.iter_weights():
        for p, t in params.items():
            assert torch.equal(single.weight(name, p), t), (name, p)
    # extraction from single files (and across layouts) equals the one from folders
    a, _ = loradex.extract(d / "base", d / "tuned", rank=RANK, arch=bench.arch)
    b, _ = loradex.extract(d / "base.safetensors", d / "tuned.safetensors", rank=RANK, arch=bench.arch)
    c, _ = loradex.extract(d / "base", d / "tuned.safetensors", rank=RANK, arch=bench.arch)
    assert set(a.patches) == set(b.patches) == set(c.patches)
    for n in a.patches:
        assert torch.allclose(a.patches[n].delta(), b.patches[n].delta(), atol=1e-7)
        assert torch.allclose(a.patches[n].delta(), c.patches[n].delta(), atol=1e-7)


def test_sdxl_single_file_openclip_names(tmp_path):
    from loradex.tiny import tiny_arch, tiny_sdxl_pipeline

    arch = tiny_arch("sdxl")
    pipe = tiny_sdxl_pipeline()
    with quiet():
        pipe.save_pretrained(tmp_path / "xl")
    sdxl_single_file(pipe, arch, tmp_path / "xl.safetensors")
    folder, single = CheckpointReader(tmp_path / "xl", arch=arch), CheckpointReader(tmp_path / "xl.safetensors", arch=arch)
    assert set(folder.modules()) == set(single.modules())
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj" in single.modules()
    for name, params in folder.iter_weights():
        for p, t in params.items():
            assert torch.equal(single.weight(name, p), t), (name, p)
    # writing back keeps the layout: fused in_proj rows and the transposed projection
    k = "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj"
    new = torch.full(single.shape(k), 0.5)
    single.rewrite(tmp_path / "xl2.safetensors", {(k, "weight"), ("text_encoder_2.text_projection", "weight")},
                   lambda n, p, t: new if n == k else t * 2)
    again = CheckpointReader(tmp_path / "xl2.safetensors", arch=arch)
    assert torch.equal(again.weight(k), new)
    assert torch.equal(again.weight(k.replace("v_proj", "q_proj")), single.weight(k.replace("v_proj", "q_proj")))
    assert torch.equal(again.weight("text_encoder_2.text_projection"), 2 * single.weight("text_encoder_2.text_projection"))


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_extract(models, bench, tmp_path, monkeypatch, capsys):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    d, arch = models["dir"], bench.arch.name
    out = tmp_path / "x.safetensors"
    code, stdout, err = run(capsys, "extract", "--base", d / "base", "--tuned", d / "tuned", "-o", out,
                            "--rank", RANK, "--conv-rank", RANK, "--arch", arch, "--json", "--save-as", "face")
    assert code == 0, err
    rep = json.loads(stdout)
    assert set(rep["modules"]) == set(TARGETS) and rep["max_error"] <= 1e-5
    assert rep["saved_as"]["ref"].startswith("face")
    assert loradex.load(out, arch=arch).kinds() == {"lora": len(TARGETS)}
    code, stdout, _ = run(capsys, "extract", "--base", d / "base", "--tuned", d / "tuned", "-o", tmp_path / "d.safetensors",
                          "--fro", 0.99, "--to", "diffusers", "--arch", arch)
    assert code == 0 and "energy" in stdout
    # bad inputs: one line, exit 2
    bad(run(capsys, "extract", "--base", d / "base", "--tuned", d / "nope", "-o", out, "--rank", 4, "--arch", arch), "nope")
    bad(run(capsys, "extract", "--base", d / "base", "--tuned", d / "tuned", "-o", out, "--arch", arch), "policy")
    bad(run(capsys, "extract", "--base", d / "base", "--tuned", d / "tuned", "-o", out, "--ratio", 2, "--fro", 0.5,
            "--arch", arch), "at most one")
    bad(run(capsys, "extract", "--base", d / "base", "--tuned", d / "base", "-o", out, "--rank", 2, "--arch", arch), "identical")
    not_a_model = tmp_path / "junk.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(not_a_model))
    bad(run(capsys, "extract", "--base", d / "base", "--tuned", not_a_model, "-o", out, "--rank", 2, "--arch", arch),
        "not a full model")
    # mismatched models: an SDXL-shaped tuned against the SD1 base
    from loradex.tiny import tiny_sdxl_pipeline

    with quiet():
        tiny_sdxl_pipeline().save_pretrained(tmp_path / "xl")
    bad(run(capsys, "extract", "--base", d / "base", "--tuned", tmp_path / "xl", "-o", out, "--rank", 2, "--arch", arch))


def test_flux_bfl_single_file(tmp_path):
    """FLUX BFL names: fused qkv / linear1 rows, RMSNorm ``scale``, the adaLN [shift | scale] swap;
    the file is written here from the tiny FluxTransformer2DModel with the arch's BFL parts."""
    from loradex.tiny import tiny_arch, tiny_flux_transformer

    arch = tiny_arch("flux1")
    model = tiny_flux_transformer()
    sd = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    out = flux_bfl_state_dict(model, arch)
    assert "double_blocks.0.img_attn.qkv.weight" in out and "single_blocks.1.linear1.bias" in out
    save_file(out, str(tmp_path / "flux.safetensors"))
    r = CheckpointReader(tmp_path / "flux.safetensors", arch=arch)
    mods = set(r.modules())
    assert "transformer.transformer_blocks.0.attn.to_k" in mods and "transformer.single_transformer_blocks.1.proj_mlp" in mods
    for key, v in sd.items():
        mod, _, param = key.rpartition(".")
        if mod in mods and r.has(mod, param):
            assert torch.equal(r.weight(mod, param), v), key
    w = r.weight("transformer.norm_out.linear")
    d = w.shape[0] // 2
    stored = out["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(stored[:d], w[d:]) and torch.equal(stored[d:], w[:d])  # BFL [shift | scale]
    # rewrite one fused part and the swapped layer: the other parts and the layout stay
    k = "transformer.single_transformer_blocks.0.attn.to_v"
    r.rewrite(tmp_path / "flux2.safetensors", {(k, "weight"), ("transformer.norm_out.linear", "weight")},
              lambda n, p, t: torch.zeros_like(t) if n == k else t + 1)
    again = load_file_(tmp_path / "flux2.safetensors")
    assert set(again) == set(out)
    r2 = CheckpointReader(tmp_path / "flux2.safetensors", arch=arch)
    assert torch.equal(r2.weight(k), torch.zeros_like(r.weight(k)))
    assert torch.equal(r2.weight(k.replace("to_v", "to_q")), r.weight(k.replace("to_v", "to_q")))
    assert torch.equal(r2.weight("transformer.norm_out.linear"), w + 1)


def load_file_(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sharded_folder(models, bench, tmp_path):
    """A component saved in shards (``*.safetensors.index.json``) reads like the single file, and a
    rewrite touches only the shards that hold changed tensors."""
    d = models["dir"]
    with quiet():
        models["base"].unet.save_pretrained(tmp_path / "sharded" / "unet", max_shard_size="100KB")
    import shutil

    for part in ("model_index.json", "text_encoder", "tokenizer", "vae", "scheduler"):
        src = d / "base" / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / "sharded" / part)
    shards = sorted((tmp_path / "sharded" / "unet").glob("*.safetensors"))
    assert len(shards) > 2
    r, ref = CheckpointReader(tmp_path / "sharded", arch=bench.arch), CheckpointReader(d / "base", arch=bench.arch)
    assert set(r.modules()) == set(ref.modules())
    for name, params in ref.iter_weights():
        for p, t in params.items():
            assert torch.equal(r.weight(name, p), t)
    k = TARGETS[0]
    r.rewrite(tmp_path / "out", {(k, "weight")}, lambda n, p, t: t * 0)
    out_shards = sorted((tmp_path / "out" / "unet").glob("*.safetensors"))
    changed = [a.name for a, b in zip(shards, out_shards) if a.read_bytes() != b.read_bytes()]
    assert len(changed) == 1 and [s.name for s in out_shards] == [s.name for s in shards]
    assert torch.equal(CheckpointReader(tmp_path / "out", arch=bench.arch).weight(k), torch.zeros(ref.shape(k)))
