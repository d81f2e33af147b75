"""bake (adapters -> checkpoint): every kind made by lycoris-lora / peft on the tiny SD model,
merged into a saved base and reloaded with diffusers, gives the wrapped model's forward; two
adapters at 0.7 / 0.3; single-file bases keep their layout; TI tokens appended; the CLI contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from cli_util import bad, run
from loradex.converters.checkpoint import CheckpointReader
from loradex.core.adapter import Adapter, Embedding
from loradex.demo import LYCORIS_ALGOS, Reference, lycoris_preset, make_peft_reference, randomize_
from loradex.log import quiet

TOL = 1e-5
#: the modules the lycoris references patch: Linear (self/cross attention, feed-forward), the 1x1
#: conv proj_in, 3x3 convs and a 1x1 conv shortcut (a few, to keep the test fast; every kind's math
#: runs on each module type)
NAMES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
         "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
         "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "mid_block.attentions.0.proj_in",
         "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv_shortcut"]


def make_lycoris_reference(bench, label: str, out, seed: int = 0, unet=None, mult: float = 1.0) -> Reference:
    """demo.make_lycoris_reference on the modules NAMES: lycoris-lora's network applied to the UNet
    (``unet``, default a fresh one; several calls stack networks on one UNet), its factors
    randomized, the wrapped forward recorded, the file saved by lycoris-lora."""
    from lycoris import create_lycoris

    unet = bench.fresh_unet() if unet is None else unet
    with quiet(), lycoris_preset({"target_module": [], "target_name": NAMES}):
        net = create_lycoris(unet, mult, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0,
                             **LYCORIS_ALGOS[label])
        net.apply_to()
    randomize_(net, seed)
    path = out / f"ref_{label}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return Reference(label, path, bench.unet_out(unet))


def baked_unet(path):
    from diffusers import UNet2DConditionModel

    with quiet():
        return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").eval()


def rel_out(y, y_ref) -> float:
    return float(torch.linalg.vector_norm(y - y_ref) / torch.linalg.vector_norm(y_ref))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, bench):
    d = tmp_path_factory.mktemp("bake") / "base"
    with quiet():
        bench.pipe.save_pretrained(d)
    return d


@pytest.mark.parametrize("label", [*LYCORIS_ALGOS, "peft"])
def test_bake_each_kind_equals_wrapped_forward(label, bench, base_dir, tmp_path):
    ref = (make_peft_reference(bench, tmp_path, seed=3) if label == "peft"
           else make_lycoris_reference(bench, label, tmp_path, seed=3))
    adapter = loradex.load(ref.path, arch=bench.arch)
    report = loradex.bake(base_dir, [(adapter, 1.0)], tmp_path / "out", arch=bench.arch)
    assert report.layout == "folder" and len(report.modules) == len(adapter.patches)
    y = bench.unet_out(baked_unet(tmp_path / "out"))
    assert rel_out(y, ref.y_ref) <= TOL, (label, rel_out(y, ref.y_ref))
    assert bench.rel(y, ref.y_ref) <= 1e-3, label  # relative to what the adapter changes
    # the untouched components are byte-identical copies
    assert (tmp_path / "out/vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (base_dir / "vae/diffusion_pytorch_model.safetensors").read_bytes()


def test_two_adapters_weighted(bench, base_dir, tmp_path):
    """LoRA at 0.7 and LoHa at 0.3, both applied by lycoris-lora to one UNet (multipliers 0.7 / 0.3)."""
    unet = bench.fresh_unet()
    r1 = make_lycoris_reference(bench, "lora", tmp_path, seed=10, unet=unet, mult=0.7)
    r2 = make_lycoris_reference(bench, "loha", tmp_path, seed=11, unet=unet, mult=0.3)
    items = [(loradex.load(r1.path, arch=bench.arch), 0.7), (loradex.load(r2.path, arch=bench.arch), 0.3)]
    loradex.bake(base_dir, items, tmp_path / "out", arch=bench.arch)
    y = bench.unet_out(baked_unet(tmp_path / "out"))
    assert rel_out(y, r2.y_ref) <= TOL and bench.rel(y, r2.y_ref) <= 1e-3


def test_single_file_base_keeps_layout(bench, base_dir, tmp_path):
    from test_extract import sd1_single_file

    sd1_single_file(bench.pipe, bench.arch, tmp_path / "base.safetensors")
    ref = make_lycoris_reference(bench, "loha", tmp_path, seed=5)
    adapter = loradex.load(ref.path, arch=bench.arch)
    loradex.bake(tmp_path / "base.safetensors", [(adapter, 1.0)], tmp_path / "baked.safetensors", arch=bench.arch)
    loradex.bake(base_dir, [(adapter, 1.0)], tmp_path / "baked", arch=bench.arch)
    src, out = load_file(str(tmp_path / "base.safetensors")), load_file(str(tmp_path / "baked.safetensors"))
    assert list(src) == list(out) or set(src) == set(out)
    changed = {k for k in src if not torch.equal(src[k], out[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    assert all(torch.equal(src[k], out[k]) for k in src if k.startswith(("first_stage_model.", "cond_stage_model.")))
    # the same numbers as the baked folder, module by module
    single, folder = CheckpointReader(tmp_path / "baked.safetensors", arch=bench.arch), CheckpointReader(tmp_path / "baked", arch=bench.arch)
    for name, params in folder.iter_weights():
        for p, t in params.items():
            assert torch.equal(single.weight(name, p), t), name
    y = bench.unet_out(baked_unet(tmp_path / "baked"))
    assert rel_out(y, ref.y_ref) <= TOL
    # dtype: the whole file cast (VAE and text encoder too), the same numbers as the default bake cast
    loradex.bake(tmp_path / "base.safetensors", [(adapter, 1.0)], tmp_path / "bf16.safetensors", arch=bench.arch,
                 dtype="bf16")
    cast = load_file(str(tmp_path / "bf16.safetensors"))
    assert set(cast) == set(out)
    for k, t in cast.items():
        want = out[k].to(torch.bfloat16) if out[k].is_floating_point() else out[k]
        assert t.dtype == want.dtype and torch.equal(t, want), k


def test_with_embeddings_appends_tokens(bench, base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    ref = make_lycoris_reference(bench, "lora", tmp_path, seed=6)
    lora = loradex.load(ref.path, arch=bench.arch)
    lora.embeddings = {"<sks>": Embedding("<sks>", {"text_encoder": vec})}
    report = loradex.bake(base_dir, [(lora, 1.0)], tmp_path / "out", with_embeddings=True, arch=bench.arch)
    assert set(report.tokens) == {"<sks>", "<sks>_1"}
    with quiet():
        pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert ids == [len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1] and table.shape[0] == len(pipe.tokenizer)
    assert torch.equal(table[ids], vec)
    assert torch.equal(table[: ids[0]], bench.pipe.text_encoder.get_input_embeddings().weight.detach())
    assert rel_out(bench.unet_out(pipe.unet), ref.y_ref) <= TOL
    with pytest.raises(loradex.LoradexError, match="tokenizer"):
        from test_extract import sd1_single_file

        sd1_single_file(bench.pipe, bench.arch, tmp_path / "b.safetensors")
        loradex.bake(tmp_path / "b.safetensors", [(lora, 1.0)], tmp_path / "o.safetensors", with_embeddings=True,
                     arch=bench.arch)


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_bake(bench, base_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    arch = bench.arch.name
    ref = make_lycoris_reference(bench, "lokr", tmp_path, seed=8)
    code, out, err = run(capsys, "bake", "--base", base_dir, f"{ref.path}:0.5", "-o", tmp_path / "out",
                         "--arch", arch, "--json", "--save-as", "baked")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["layout"] == "folder" and rep["saved_as"]["ref"].startswith("baked") and len(rep["modules"]) > 0
    # weight 0.5 on an additive kind: W + 0.5 dW, module by module
    out_r, base_r = CheckpointReader(tmp_path / "out", arch=arch), CheckpointReader(base_dir, arch=arch)
    adapter = loradex.load(ref.path, arch=arch)
    for name, p in adapter.patches.items():
        want = base_r.weight(name) + 0.5 * p.delta().reshape(base_r.shape(name))
        assert torch.allclose(out_r.weight(name), want, atol=1e-6), name
    # bad inputs
    bad(run(capsys, "bake", "--base", base_dir, tmp_path / "missing.safetensors", "-o", tmp_path / "o2", "--arch", arch),
        "missing")
    bad(run(capsys, "bake", "--base", tmp_path / "nobase", ref.path, "-o", tmp_path / "o3", "--arch", arch))
    bad(run(capsys, "bake", "--base", base_dir, ref.path, "-o", tmp_path / "out", "--arch", arch), "exists")
    sdxl_lora = tmp_path / "sdxl.safetensors"
    from loradex.core.kinds.lora import LoraPatch
    from loradex.tiny import tiny_arch

    xl = tiny_arch("sdxl")
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    shape = xl.module(name).shape
    loradex.save(Adapter(patches={name: LoraPatch(up=torch.zeros(shape[0], 2), down=torch.zeros(2, shape[1]))},
                         arch=xl.name), sdxl_lora, "diffusers", arch=xl)
    bad(run(capsys, "bake", "--base", base_dir, sdxl_lora, "-o", tmp_path / "o4", "--arch", arch))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    bad(run(capsys, "bake", "--base", tmp_path / "junk.safetensors", ref.path, "-o", tmp_path / "o5.safetensors",
            "--arch", arch), "not a full model")


def test_pickled_component(bench, base_dir, tmp_path):
    """A component stored as a pickle (``diffusion_pytorch_model.bin``) is read with weights_only and,
    once changed, written as safetensors (the pickle is not carried over)."""
    import shutil

    from loradex.core.kinds.lora import LoraPatch

    shutil.copytree(base_dir, tmp_path / "base", ignore=shutil.ignore_patterns("unet"))
    with quiet():
        bench.pipe.unet.save_pretrained(tmp_path / "base" / "unet", safe_serialization=False)
    assert (tmp_path / "base/unet/diffusion_pytorch_model.bin").is_file()
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k"
    shape = bench.arch.module(name).shape
    g = torch.Generator().manual_seed(0)
    p = LoraPatch(up=torch.randn(shape[0], 2, generator=g), down=torch.randn(2, shape[1], generator=g), alpha=1.0)
    report = loradex.bake(tmp_path / "base", [(Adapter(patches={name: p}), 1.0)], tmp_path / "out", arch=bench.arch)
    assert any("pickle" in n for n in report.notes)
    assert not (tmp_path / "out/unet/diffusion_pytorch_model.bin").exists()
    out, base = CheckpointReader(tmp_path / "out", arch=bench.arch), CheckpointReader(base_dir, arch=bench.arch)
    assert torch.allclose(out.weight(name), base.weight(name) + p.delta(), atol=1e-7)
    assert torch.equal(out.weight(name.replace("to_k", "to_q")), base.weight(name.replace("to_k", "to_q")))
    baked_unet(tmp_path / "out")  # diffusers loads it
