"""Files loradex writes, loaded back by the real consumers (diffusers, peft, lycoris-lora), and
compared numerically with the reference tool's own forward pass; bit-identical round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from loradex.demo import LYCORIS_ALGOS, make_lycoris_reference, make_peft_reference, run_demo
from loradex.tiny import quiet, tiny_arch

EXACT = {"lora", "locon-tucker", "loha", "lokr", "dora", "peft-lora"}
BASE_DEPENDENT = {"ia3", "glora", "diag-oft", "boft"}


@pytest.mark.slow
def test_every_kind_in_every_format_loads_in_the_real_consumer():
    """The demo matrix: each lycoris/peft kind written as kohya, lycoris_, diffusers and PEFT, each
    file loaded by its consumer; the UNet output must match the reference tool's forward pass."""
    result = run_demo()
    for label, row in result.rows.items():
        for target, cell in row.items():
            where = f"{label} -> {target}: {cell}"
            if target in ("kohya", "lycoris") or label in EXACT:
                assert cell.status == "ok", where
                assert cell.error <= 1e-4, where
            elif label in BASE_DEPENDENT:
                assert cell.status == "n/a" and "base" in cell.how, where
            else:  # full diff: only an SVD fits diffusers/peft, with its error measured
                assert cell.status == "approx" and cell.error is not None, where
    for target, cell in result.embeddings.items():
        assert cell.status == "ok" and cell.error == 0, (target, cell)


@pytest.mark.parametrize("label", ["loha", "lokr", "locon-tucker", "glora", "boft", "dora"])
@pytest.mark.parametrize("fmt", ["kohya", "lycoris"])
def test_same_format_round_trip_is_bit_identical(bench, tmp_path, label, fmt):
    ref = make_lycoris_reference(bench, label, tmp_path)
    a = loradex.load(ref.path, arch=bench.arch)
    loradex.save(a, tmp_path / "a.safetensors", fmt, arch=bench.arch)
    b = loradex.load(tmp_path / "a.safetensors", arch=bench.arch)
    loradex.save(b, tmp_path / "b.safetensors", "lycoris", arch=bench.arch)
    src, out = load_file(ref.path), load_file(tmp_path / "b.safetensors")
    assert set(src) == set(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k


def test_kohya_diffusers_kohya_keeps_lora_tensors(bench, tmp_path):
    ref = make_lycoris_reference(bench, "lora", tmp_path)
    loradex.save(loradex.load(ref.path, arch=bench.arch), tmp_path / "k.safetensors", "kohya", arch=bench.arch)
    loradex.convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers", arch=bench.arch)
    loradex.convert(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", to="kohya", arch=bench.arch)
    k, k2 = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "k2.safetensors")
    assert set(k) == set(k2)
    for key in k:
        if not key.endswith(".alpha"):  # alpha is metadata in diffusers files: values survive, dtype may not
            assert torch.equal(k[key], k2[key]), key
        assert float(k[key].float().reshape(-1)[0]) == float(k2[key].float().reshape(-1)[0])


def _peft_reference_pipe(pipe, with_te=True):
    """peft LoRA (mixed ranks/alphas) on the UNet and the text encoder, randomised, as diffusers'
    training scripts make them; returns the configs."""
    from peft import LoraConfig, inject_adapter_in_model

    cu = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                    rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3}, init_lora_weights=False)
    # kohya trains every CLIPAttention + CLIPMLP Linear; diffusers infers its kohya text-encoder
    # layout from out_proj keys, so a TE LoRA without them does not load there
    ct = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                    init_lora_weights=False)
    with quiet():
        pipe.unet.add_adapter(cu)
        if with_te:
            inject_adapter_in_model(ct, pipe.text_encoder)
    return cu, ct


@torch.no_grad()
def _te_out(te, ids):
    return te(ids)[0].double()


def test_text_encoder_lora_sd1_diffusers_and_kohya(bench, tmp_path):
    """UNet + text encoder LoRA from peft, saved by diffusers: loradex's diffusers and kohya
    outputs load with load_lora_weights and reproduce both models' outputs."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    ref = bench.fresh_pipe()
    cu, ct = _peft_reference_pipe(ref)
    src = tmp_path / "ref"
    with quiet():
        StableDiffusionPipeline.save_lora_weights(
            src, unet_lora_layers=get_peft_model_state_dict(ref.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
            unet_lora_adapter_metadata=cu.to_dict(), text_encoder_lora_adapter_metadata=ct.to_dict(),
        )
    ids = ref.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    y_unet, y_te = bench.unet_out(ref.unet), _te_out(ref.text_encoder, ids)
    base_te = _te_out(bench.pipe.text_encoder, ids)
    a = loradex.load(src / "pytorch_lora_weights.safetensors")
    assert a.arch == "tiny-sd1" and set(a.components()) == {"unet", "text_encoder"}
    # mixed alphas (alpha_pattern) in a kohya file: diffusers' kohya loader keeps only the most
    # common alpha (a diffusers defect); the writer says so, and uniform_alpha folds them exactly
    report = loradex.save(a, tmp_path / "mixed.safetensors", "kohya")
    assert any("--uniform-alpha" in n for n in report.notes)
    for fmt, opts in (("diffusers", {}), ("kohya", {"uniform_alpha": True}), ("diffusers", {"uniform_alpha": True})):
        out = tmp_path / f"{fmt}{'_u' if opts else ''}.safetensors"
        loradex.save(a, out, fmt, **opts)
        pipe = bench.fresh_pipe()
        with quiet():
            pipe.load_lora_weights(str(out), adapter_name="t")
        assert bench.rel(bench.unet_out(pipe.unet), y_unet) < 1e-5, fmt
        te = _te_out(pipe.text_encoder, ids)
        assert float((te - y_te).norm() / (y_te - base_te).norm()) < 1e-5, fmt


def test_peft_folder_loads_with_peft_from_pretrained(bench, tmp_path):
    from peft import PeftModel

    ref = make_peft_reference(bench, tmp_path)
    a = loradex.load(ref.path)
    loradex.save(a, tmp_path / "peft", "peft")
    with quiet():
        m = PeftModel.from_pretrained(bench.fresh_unet(), str(tmp_path / "peft"))
    assert bench.rel(bench.unet_out(m.base_model.model), ref.y_ref) < 1e-5
    back = loradex.load(tmp_path / "peft")
    assert back.source_format == "peft" and set(back.patches) == set(a.patches)
    for n, p in a.patches.items():
        assert torch.equal(back.patches[n].up, p.up) and torch.equal(back.patches[n].down, p.down)
        assert abs(back.patches[n].scale - p.scale) < 1e-7


def test_sdxl_names_round_trip_and_load_in_diffusers(tmp_path):
    """Tiny SDXL: kohya output uses SGM names and lora_te1/lora_te2, and diffusers' own SDXL kohya
    converter loads it into the pipeline with the same outputs as the peft-made reference."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from loradex.tiny import tiny_sdxl_pipeline

    tiny_arch("sdxl")
    base = tiny_sdxl_pipeline()
    ref = copy.deepcopy(base)
    cu = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                    init_lora_weights=False)
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # kohya's (see the SD1 test)
    c1 = LoraConfig(r=4, lora_alpha=4, target_modules=te_targets, init_lora_weights=False)
    c2 = LoraConfig(r=2, lora_alpha=4, target_modules=te_targets, init_lora_weights=False)
    with quiet():
        ref.unet.add_adapter(cu)
        inject_adapter_in_model(c1, ref.text_encoder)
        inject_adapter_in_model(c2, ref.text_encoder_2)
        StableDiffusionXLPipeline.save_lora_weights(
            tmp_path / "ref", unet_lora_layers=get_peft_model_state_dict(ref.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
            text_encoder_2_lora_layers=get_peft_model_state_dict(ref.text_encoder_2),
            unet_lora_adapter_metadata=cu.to_dict(), text_encoder_lora_adapter_metadata=c1.to_dict(),
            text_encoder_2_lora_adapter_metadata=c2.to_dict(),
        )
    a = loradex.load(tmp_path / "ref" / "pytorch_lora_weights.safetensors")
    assert a.arch == "tiny-sdxl"
    loradex.save(a, tmp_path / "k.safetensors", "kohya")
    keys = set(load_file(tmp_path / "k.safetensors"))
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1.") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_1_self_attn_out_proj.") for k in keys)
    # back through loradex: the same tensors
    b = loradex.load(tmp_path / "k.safetensors")
    assert b.arch == "tiny-sdxl" and set(b.patches) == set(a.patches)
    for n in a.patches:
        assert torch.equal(a.patches[n].up, b.patches[n].up) and torch.equal(a.patches[n].down, b.patches[n].down)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    ids = base.tokenizer(["a cat"], return_tensors="pt").input_ids

    @torch.no_grad()
    def outs(p):
        return (p.unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample.double(),
                _te_out(p.text_encoder, ids), _te_out(p.text_encoder_2, ids))

    want, zero = outs(ref), outs(base)
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"{fmt}.safetensors"
        loradex.save(a, out, fmt, **({"uniform_alpha": True} if fmt == "kohya" else {}))
        pipe = copy.deepcopy(base)
        with quiet():
            pipe.load_lora_weights(str(out), adapter_name="t")
        for got, w, z in zip(outs(pipe), want, zero):
            assert float((got - w).norm() / (w - z).norm()) < 1e-5, fmt


# BFL (kohya FLUX) name -> (diffusers module names it stacks, in row order); written out here, in
# the test, from the published layout, independently of loradex' arch tables
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_mlp_2": ("ff_context.net.2",),
}
_FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}


def _flux_kohya_file(path, tr, rank=4, seed=0):
    """A kohya FLUX LoRA on the tiny transformer (fused qkv / linear1 and plain projections), and
    the transformer with those updates added to its weights by hand."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    baked = copy.deepcopy(tr)
    mods = dict(baked.named_modules())
    blocks = [("double_blocks", "transformer_blocks", len(tr.transformer_blocks), _FLUX_DOUBLE),
              ("single_blocks", "single_transformer_blocks", len(tr.single_transformer_blocks), _FLUX_SINGLE)]
    for bfl, dif, n, table in blocks:
        for i in range(n):
            for name, parts in table.items():
                targets = [mods[f"{dif}.{i}.{p}"] for p in parts]
                rows = [t.weight.shape[0] for t in targets]
                flat = f"lora_unet_{bfl}_{i}_{name}"
                down = torch.randn(rank, targets[0].weight.shape[1], generator=g) * 0.1
                up = torch.randn(sum(rows), rank, generator=g) * 0.1
                sd.update({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up,
                           f"{flat}.alpha": torch.tensor(2.0)})
                delta = (up @ down) * (2.0 / rank)
                with torch.no_grad():
                    for t, chunk in zip(targets, delta.split(rows)):
                        t.weight += chunk
    save_file(sd, str(path))
    return sd, baked


def test_flux_fused_qkv_split_and_fuse(tmp_path):
    """Tiny FLUX: fused img_attn_qkv / txt_attn_qkv / linear1 split exactly into to_q/to_k/to_v
    (/proj_mlp) and fused back bit-identically; the diffusers output loads into the transformer
    (load_lora_adapter) and equals the updates added to the weights by hand."""
    from loradex.tiny import tiny_flux_transformer

    tiny_arch("flux1")
    tr = tiny_flux_transformer()
    src = tmp_path / "flux_kohya.safetensors"
    sd, baked = _flux_kohya_file(src, tr)
    a = loradex.load(src)
    assert a.arch == "tiny-flux1"
    assert "transformer.transformer_blocks.0.attn.to_q" in a.patches
    assert "transformer.single_transformer_blocks.0.proj_mlp" in a.patches
    loradex.save(a, tmp_path / "k.safetensors", "kohya")
    back = load_file(tmp_path / "k.safetensors")
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k

    loradex.save(a, tmp_path / "d.safetensors", "diffusers")
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
    )

    @torch.no_grad()
    def run(m):
        return m(**inputs).sample.double()

    y0, want = run(tr), run(baked)
    ours = copy.deepcopy(tr)
    with quiet():
        # use_safetensors=True: without it (and without weight_name) diffusers 0.42's model-level
        # loader skips the safetensors branch that reads lora_adapter_metadata, so alphas are lost
        ours.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="t",
                               use_safetensors=True)
    assert float((run(ours) - want).norm() / (want - y0).norm()) < 1e-5


@pytest.mark.parametrize("label", sorted(LYCORIS_ALGOS))
def test_inspect_reports_every_kind(bench, tmp_path, label):
    ref = make_lycoris_reference(bench, label, tmp_path)
    info = loradex.inspect(ref.path, arch=bench.arch)
    assert info["format"] == "lycoris" and info["modules"] > 0
    assert info["hashes"]["sha256"] and len(info["hashes"]["autov2"]) == 10
