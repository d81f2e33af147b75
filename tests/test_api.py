"""The Python API for apps that hold a diffusers pipeline: ``to_diffusers`` (a state dict
``load_lora_weights`` takes in memory), ``apply`` / ``remove`` (diffusers' own adapters where the
adapter has a LoRA form, exact in-place patches otherwise), and the package's import hygiene."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loradex
from loradex.core.adapter import Adapter
from loradex.demo import make_lycoris_reference, make_peft_reference
from loradex.errors import ConversionError
from loradex.log import quiet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_prints_nothing_and_pulls_no_diffusers():
    code = ("import sys, loradex; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'lycoris') if m in sys.modules), end='')")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "[]"


def test_typed_and_documented():
    assert (Path(loradex.__file__).parent / "py.typed").is_file()
    for name in loradex.__all__:
        obj = getattr(loradex, name)
        assert inspect.getdoc(obj), name


def _fused(bench, adapter: Adapter, weight: float):
    """A copy of the tiny pipeline with loradex's exact delta(W, weight) added to every weight."""
    pipe = bench.fresh_pipe()
    with torch.no_grad():
        for n, p in adapter.patches.items():
            comp, _, path = n.partition(".")
            model = getattr(pipe, comp)
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                mod = model.get_submodule(path.removeprefix("text_model."))
            w = mod.weight
            w.copy_((w.float() + p.delta(w.float(), multiplier=weight).reshape(w.shape)).to(w.dtype))
            db = p.bias_delta(None if mod.bias is None else mod.bias.float(), multiplier=weight)
            if db is not None:
                mod.bias.copy_(mod.bias + db)
    return pipe


def _state(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_to_diffusers_loads_in_memory(bench, tmp_path):
    """Mixed ranks and alphas (peft's own rank_pattern / alpha_pattern) and a LoHa: the state dict
    alone, with no metadata, gives what the reference tool gives."""
    for ref in (make_peft_reference(bench, tmp_path), make_lycoris_reference(bench, "loha", tmp_path)):
        sd, meta = loradex.to_diffusers(loradex.load(ref.path, arch=bench.arch))
        assert all(isinstance(v, torch.Tensor) for v in sd.values()) and "lora_adapter_metadata" in meta
        pipe = bench.fresh_pipe()
        with quiet():
            pipe.load_lora_weights(sd, adapter_name="mem")
        assert bench.rel(bench.unet_out(pipe.unet), ref.y_ref) < 1e-4, ref.label


def test_to_diffusers_names_the_module_it_cannot_express(bench, tmp_path):
    a = loradex.load(make_lycoris_reference(bench, "diag-oft", tmp_path).path, arch=bench.arch)
    with pytest.raises(ConversionError, match=r"unet\.\S+: a oft patch depends on the base weights"):
        loradex.to_diffusers(a)


@pytest.mark.parametrize("label", ["lora", "loha", "lokr", "dora", "diag-oft", "boft", "ia3", "glora", "full"])
def test_apply_equals_fused_and_remove_restores_bit_exactly(bench, tmp_path, label):
    a = loradex.load(make_lycoris_reference(bench, label, tmp_path).path, arch=bench.arch)
    pipe = bench.fresh_pipe()
    before = _state(pipe)
    name = loradex.apply(pipe, a, weight=0.7)
    y = bench.unet_out(pipe.unet)
    ref = bench.unet_out(_fused(bench, a, 0.7).unet)
    assert bench.rel(y, ref) < 1e-4
    assert loradex.remove(pipe, name) == [name]
    assert _same(_state(pipe), before)  # bit for bit, and PEFT's layers are gone again


def test_apply_then_generate_equals_fused_pipeline(bench, tmp_path):
    """A LoRA (through diffusers, mixed ranks and alphas) and a Diag-OFT (in place) applied together,
    then the pipeline generates: the same latents as a pipeline with both fused."""
    lora = loradex.load(make_peft_reference(bench, tmp_path).path, arch=bench.arch)
    oft = loradex.load(make_lycoris_reference(bench, "diag-oft", tmp_path).path, arch=bench.arch)
    pipe = bench.fresh_pipe()
    before = _state(pipe)
    n1 = loradex.apply(pipe, lora, weight=0.6, name="face")
    n2 = loradex.apply(pipe, oft, weight=1.0)

    def gen(p):
        with torch.no_grad():
            return p("a photo", num_inference_steps=2, height=64, width=64, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images

    # in-place kinds change the base weights; diffusers' LoRA layers add their update on top
    fused = _fused(bench, oft, 1.0)
    with torch.no_grad():
        for n, p in lora.patches.items():
            w = fused.unet.get_submodule(n[5:]).weight
            w.copy_(w + p.delta(w.float(), multiplier=0.6).reshape(w.shape))
    x, ref = gen(pipe), gen(fused)
    err = float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))
    assert err < 1e-5, err  # float32 rounding of the two orders of summation
    assert set(loradex.remove(pipe)) == {n1, n2}
    assert _same(_state(pipe), before)


def test_stacked_in_place_adapters_remove_in_any_order(bench, tmp_path):
    oft = loradex.load(make_lycoris_reference(bench, "diag-oft", tmp_path).path, arch=bench.arch)
    dora = loradex.load(make_lycoris_reference(bench, "dora", tmp_path, seed=1).path, arch=bench.arch)
    pipe = bench.fresh_pipe()
    before = _state(pipe)
    a = loradex.apply(pipe, oft)
    loradex.apply(pipe, dora, weight=0.5, name="d")
    loradex.remove(pipe, a)  # the first one: the DoRA is re-applied on the restored weights
    alone = bench.fresh_pipe()
    loradex.apply(alone, dora, weight=0.5)
    assert _same(_state(pipe), _state(alone))
    loradex.remove(pipe, "d")
    assert _same(_state(pipe), before)


def test_apply_keeps_the_apps_own_adapters(bench, tmp_path):
    """An adapter the app loaded itself keeps its weight while ours comes and goes."""
    ref = make_peft_reference(bench, tmp_path)
    mine = loradex.load(make_lycoris_reference(bench, "lora", tmp_path).path, arch=bench.arch)
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(ref.path), adapter_name="app_style")
        pipe.set_adapters(["app_style"], [0.5])
    y_app = bench.unet_out(pipe.unet)
    name = loradex.apply(pipe, mine, weight=0.8)
    assert sorted(pipe.get_active_adapters()) == sorted(["app_style", name])
    assert loradex.api._lora_weights(pipe, ["app_style", name]) == pytest.approx([0.5, 0.8])
    loradex.remove(pipe, name)
    assert pipe.get_active_adapters() == ["app_style"]
    assert bench.rel(bench.unet_out(pipe.unet), y_app) < 1e-6


def test_apply_embeddings_and_remove_them(bench):
    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    a = Adapter(embeddings={"<sks>": loradex.Embedding("<sks>", {"text_encoder": v})})
    pipe = bench.fresh_pipe()
    before, n_tok = _state(pipe), len(pipe.tokenizer)
    name = loradex.apply(pipe, a)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], v)
    loradex.remove(pipe, name)
    assert len(pipe.tokenizer) == n_tok and _same(_state(pipe), before)


def test_apply_refuses_bad_input_before_changing_anything(bench, tmp_path):
    a = loradex.load(make_lycoris_reference(bench, "lora", tmp_path).path, arch=bench.arch)
    pipe = bench.fresh_pipe()
    before = _state(pipe)
    bad = Adapter({**a.patches, "unet.no.such.module": next(iter(a.patches.values()))}, arch=bench.arch)
    with pytest.raises(ConversionError, match="no such module"):
        loradex.apply(pipe, bad)
    assert _same(_state(pipe), before)
    loradex.apply(pipe, a, name="x")
    with pytest.raises(ConversionError, match="already applied"):
        loradex.apply(pipe, a, name="x")
    with pytest.raises(ConversionError, match="no adapter named"):
        loradex.remove(pipe, "y")
