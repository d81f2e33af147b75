"""The inference engine: slot swaps equal the real tools' results, mixed batches equal one-by-one runs,
swaps leave the base bit-identical, no recompilation under torch.compile, and the generate CLI.

References come from the real tools on the tiny pipeline: diffusers ``load_lora_weights`` /
``set_adapters`` / ``load_textual_inversion``, and lycoris-lora's own forward pass for LoHa / LoKr
(diffusers rejects those kinds for SD; FORMATS.md section 3).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from loradex.demo import make_lycoris_reference, make_peft_reference
from loradex.inference import BadRequestError, GenerateRequest, UnknownAdapterError
from loradex.inference.engine import Engine
from loradex.log import quiet

STEPS, SIZE = 1, 64  # 64 px is the smallest size a request may ask; 1 step, no CFG unless a test needs it


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def refs(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_refs")
    r = {label: make_lycoris_reference(bench, label, out, seed=i)
         for i, label in enumerate(("lora", "loha", "lokr"))}
    r["peft"] = make_peft_reference(bench, out, seed=3)
    r["te"] = _make_te_unet_lora(bench, out)
    r["ti"] = _make_ti(out)
    return r


def _make_te_unet_lora(bench, out):
    """A LoRA on the text encoder and the UNet made by peft, saved by diffusers' save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = bench.fresh_pipe()
    torch.manual_seed(7)
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    un_cfg = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v", "proj_in"])
    with quiet():
        inject_adapter_in_model(te_cfg, pipe.text_encoder)
        inject_adapter_in_model(un_cfg, pipe.unet)
        StableDiffusionPipeline.save_lora_weights(
            out / "te", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), safe_serialization=True,
            unet_lora_adapter_metadata=un_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    return out / "te" / "pytorch_lora_weights.safetensors"


def _make_ti(out):
    import loradex
    from loradex.core.adapter import Adapter, Embedding

    vec = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    path = out / "sks.safetensors"
    loradex.save(Adapter(embeddings={"<sks>": Embedding("<sks>", {"text_encoder": vec})}), path, "diffusers-ti")
    return path


@pytest.fixture(scope="module")
def engine(bench):
    return Engine(bench.fresh_pipe(), max_rank=64, slots=4)


@pytest.fixture(scope="module")
def small(bench):
    """Rank 8 slots, 2 of them: LoHa (exact rank 16) and LoKr go in by weight patching."""
    return Engine(bench.fresh_pipe(), max_rank=8, slots=2)


def req(prompt="a photo of a cat", adapters=(), seed=3, guidance_scale=1.0, **kw):
    return GenerateRequest(prompt, adapters=list(adapters), steps=STEPS, width=SIZE, height=SIZE, seed=seed,
                           guidance_scale=guidance_scale, **kw)


def latents(pipe, prompt="a photo of a cat", seed=3, guidance_scale=1.0, **kw):
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=STEPS, width=SIZE, height=SIZE, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), guidance_scale=guidance_scale, **kw).images[0]


_BASE: dict = {}


def base_latents(bench, prompt="a photo of a cat", **kw):
    key = (prompt, tuple(sorted(kw.items())))
    if key not in _BASE:
        _BASE[key] = latents(bench.pipe, prompt, **kw)
    return _BASE[key]


def rel(y, y_ref, y_base):
    return float((y.double() - y_ref.double()).norm() / (y_ref.double() - y_base.double()).norm())


def diffusers_pipe(bench, *files, weights=None):
    pipe = bench.fresh_pipe()
    with quiet():
        for i, f in enumerate(files):
            pipe.load_lora_weights(str(f), adapter_name=f"adapter{i}x")
        if weights is not None:
            pipe.set_adapters([f"adapter{i}x" for i in range(len(files))], weights)
    return pipe


# ---- equality with the real tools -------------------------------------------------------------------

def test_lora_equals_diffusers_load_lora_weights(bench, refs, engine):
    """A diffusers LoRA file (made by peft, mixed ranks/alphas, convs included) against diffusers'
    load_lora_weights: UNet output and final latents with a fixed seed."""
    path = str(refs["peft"].path)
    ref = diffusers_pipe(bench, path)
    y_ref = bench.unet_out(ref.unet)
    with engine.activate([[(path, 1.0)]]):
        y = bench.unet_out(engine.pipe.unet)
    assert engine.ready(path).mode == "slots"
    assert rel(y, y_ref, bench.y_base) < 1e-4
    assert rel(y, refs["peft"].y_ref, bench.y_base) < 1e-4  # and peft's own forward
    base = base_latents(bench)
    lat_ref = latents(ref)
    lat = engine.run([req(adapters=[(path, 1.0)])], output_type="latent")[0]
    assert rel(lat, lat_ref, base) < 1e-4


def test_locon_equals_lycoris_forward(bench, refs, engine):
    """lycoris-lora's LoRA/LoCon on every Linear and Conv2d (3x3 convs included)."""
    path = str(refs["lora"].path)
    with engine.activate([[(path, 1.0)]]):
        y = bench.unet_out(engine.pipe.unet)
    assert engine.ready(path).mode == "slots"
    assert rel(y, refs["lora"].y_ref, bench.y_base) < 1e-4


@pytest.mark.parametrize("label", ["loha", "lokr"])
def test_lycoris_kinds_equal_lycoris_forward(bench, refs, engine, small, label):
    """diffusers refuses LoHa/LoKr for SD: the reference is lycoris-lora's own forward. Through the
    exact LoRA conversion in the slots (max_rank 64) and through weight patching (max_rank 8)."""
    path = str(refs[label].path)
    for eng, mode in ((engine, "slots"), (small, "patch")):
        assert eng.ready(path).mode == mode, eng.ready(path).reason
        with eng.activate([[(path, 1.0)]]):
            y = bench.unet_out(eng.pipe.unet)
        assert rel(y, refs[label].y_ref, bench.y_base) < 1e-4, mode


def test_stacked_with_weights_equals_diffusers_set_adapters(bench, refs, engine):
    a, b = str(refs["peft"].path), str(refs["te"])
    ref = diffusers_pipe(bench, a, b, weights=[0.7, -0.4])
    lat_ref = latents(ref)
    lat = engine.run([req(adapters=[(a, 0.7), (b, -0.4)])], output_type="latent")[0]
    assert rel(lat, lat_ref, base_latents(bench)) < 1e-4


def test_stacked_lycoris_kinds_equal_lycoris_networks(bench, refs, engine):
    """LoRA 0.7 + LoHa 0.5 + LoKr -0.3: lycoris applies three networks on one UNet, each with its
    multiplier; the engine stacks three slots on the sample."""
    from lycoris import create_lycoris_from_weights

    unet = bench.fresh_unet()
    stack = [("lora", 0.7), ("loha", 0.5), ("lokr", -0.3)]
    with quiet():
        for label, w in stack:
            net, _ = create_lycoris_from_weights(w, str(refs[label].path), unet)
            net.apply_to()
    y_ref = bench.unet_out(unet)
    with engine.activate([[(str(refs[label].path), w) for label, w in stack]]):
        y = bench.unet_out(engine.pipe.unet)
    assert rel(y, y_ref, bench.y_base) < 1e-4


def test_text_encoder_lora_equals_diffusers(bench, refs, engine, small):
    path = str(refs["te"])
    ready = engine.ready(path)
    assert any(n.startswith("text_encoder.") for n in ready.factors)
    lat_ref = latents(diffusers_pipe(bench, path))
    base = base_latents(bench)
    for eng in (engine, small):
        lat = eng.run([req(adapters=[(path, 1.0)])], output_type="latent")[0]
        assert rel(lat, lat_ref, base) < 1e-4


def test_textual_inversion_equals_load_textual_inversion(bench, refs, engine):
    path = str(refs["ti"])
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_textual_inversion(path, token="<sks>")
    prompt, neg = "a photo of <sks> on a beach", "blurry <sks>"
    lat_ref = latents(pipe, prompt, negative_prompt=neg, guidance_scale=5.0)
    base = base_latents(bench, prompt, negative_prompt=neg, guidance_scale=5.0)
    # alone, and stacked with a LoRA (reference: diffusers with both loaded)
    lat = engine.run([req(prompt, [(path, 1.0)], negative_prompt=neg, guidance_scale=5.0)], output_type="latent")[0]
    assert rel(lat, lat_ref, base) < 1e-4
    with quiet():
        pipe.load_lora_weights(str(refs["te"]), adapter_name="lorax")
    lat_ref2 = latents(pipe, prompt, negative_prompt=neg, guidance_scale=5.0)
    lat2 = engine.run([req(prompt, [(path, 1.0), (str(refs["te"]), 1.0)], negative_prompt=neg, guidance_scale=5.0)],
                      output_type="latent")[0]
    assert rel(lat2, lat_ref2, base) < 1e-4
    # the reserved rows are back to their pristine values
    for emb, ids, pristine in engine.ti.tables.values():
        assert torch.equal(emb.weight[ids], pristine)


# ---- mixed batches, swaps, compile --------------------------------------------------------------

def test_mixed_batch_equals_one_by_one(refs, engine):
    lora, loha, te, ti = (str(refs[k].path if hasattr(refs[k], "path") else refs[k]) for k in ("lora", "loha", "te", "ti"))
    batch = [
        req("a cat", [(lora, 1.0)], seed=1),
        req("a dog <loradex-ti-0>", [], seed=2),  # spelling a placeholder reads nothing of the neighbour's
        req("a <sks>", [(loha, 0.6), (te, 0.5), (ti, 1.0)], seed=3),
        req("a cat", [(lora, 0.3)], seed=1),
    ]
    before = engine.stats()["batches"]
    mixed = engine.run(batch, output_type="latent")
    assert engine.stats()["batches"] == before + 1  # one forward pass per step for all four
    assert engine.exact_batches  # the CPU default (inference/exact.py)
    for r, lat in zip(batch, mixed):
        alone = engine.run([r], output_type="latent")[0]
        assert torch.equal(lat, alone), float((lat - alone).abs().max())  # bit-identical, not just close
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)  # weights matter per sample


def test_batches_without_exact_mode_differ_only_by_rounding(bench, refs):
    """``exact_batches=False`` (the GPU default) runs the batch in one call: the same images up to
    float rounding (what exact.py measures on the CPU)."""
    lora = str(refs["lora"].path)
    eng = Engine(bench.fresh_pipe(), max_rank=8, slots=2, exact_batches=False)
    batch = [req("a cat", [(lora, 1.0)], seed=1, guidance_scale=5.0), req("a dog", [], seed=2, guidance_scale=5.0)]
    mixed = eng.run(batch, output_type="latent")
    for r, lat in zip(batch, mixed):
        alone = eng.run([r], output_type="latent")[0]
        assert float((lat - alone).abs().max()) < 1e-3


class _Control:
    """A run control (engine.py): records the steps, lends the engine to ``inside`` once at step
    ``at``, stops the batch at step ``stop``."""

    def __init__(self, at=None, inside=None, stop=None):
        self.at, self.inside, self.stop, self.steps, self.out = at, inside, stop, [], None

    def wanted(self, idx):
        return True

    def step(self, idx, i, n, suspend):
        from loradex.inference import RequestCancelled

        self.steps.append(i)
        if i == self.stop:
            raise RequestCancelled("stop")
        if i == self.at:
            with suspend():
                self.out = self.inside()


def test_run_control_suspends_and_stops_between_steps(refs, small):
    """A batch lends the engine mid-run to another request (its LoKr patched into the weights, a TI
    token, a slot LoRA) and resumes: both results are bit-identical to each run alone; the base
    weights are pristine after. A control that raises stops the batch at that step."""
    lokr, lora, ti = str(refs["lokr"].path), str(refs["lora"].path), str(refs["ti"])
    a = dataclasses.replace(req("a <sks>", [(lokr, 0.8), (ti, 1.0)], seed=1), steps=3)
    b = dataclasses.replace(req("a dog", [(lora, 1.0)], seed=2), steps=2)
    want_a = small.run([a], output_type="latent")[0]
    want_b = small.run([b], output_type="latent")[0]
    before = small.stats()
    ctl = _Control(at=0, inside=lambda: small.run([b], output_type="latent")[0])
    got_a = small.run([a], output_type="latent", control=ctl)[0]
    assert torch.equal(got_a, want_a) and torch.equal(ctl.out, want_b)
    assert small.stats()["suspensions"] == before["suspensions"] + 1
    assert all(torch.equal(small.modules[n].weight, w.to(small.modules[n].weight)) for n, (w, _) in
               small._pristine.items())
    ctl = _Control(stop=1)
    steps0 = small.stats()["steps"]
    assert small.run([a], output_type="latent", control=ctl) == [None]
    assert ctl.steps == [0, 1] and small.stats()["steps"] - steps0 == 2
    assert small.stats()["cancelled_batches"] == before["cancelled_batches"] + 1
    assert torch.equal(small.run([a], output_type="latent")[0], want_a)  # nothing left behind


def test_patch_mode_adapters_get_their_own_batch(refs, small):
    lokr, lora = str(refs["lokr"].path), str(refs["lora"].path)
    batch = [req("x", [(lokr, 1.0)], seed=1), req("x", [(lora, 1.0)], seed=2), req("x", [(lokr, 1.0)], seed=3)]
    before = small.stats()
    out = small.run(batch, output_type="latent")
    after = small.stats()
    assert after["batches"] - before["batches"] == 2 and after["patched_batches"] - before["patched_batches"] == 1
    assert torch.allclose(out[1], small.run([batch[1]], output_type="latent")[0], atol=1e-5, rtol=1e-4)


def test_200_swaps_leave_the_base_bit_identical(bench, refs, small, tmp_path):
    """50 adapters (46 random LoRAs of mixed ranks written by loradex + LoRA, LoHa, LoKr, full made by
    lycoris-lora): 200 swaps through 2 slots and the patch path, then everything removed."""
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    g = torch.Generator().manual_seed(0)
    layers = list(small.bank.layers.items())
    paths = [str(refs[k].path) for k in ("lora", "loha", "lokr", "peft")]
    for i in range(46):
        patches = {}
        for name, layer in layers[i % 7::7]:
            r = 1 + (i % 8)
            patches[name] = LoraPatch(up=torch.randn(layer.fan_out, r, generator=g) * 0.1,
                                      down=torch.randn(r, layer.fan_in, generator=g) * 0.1, alpha=float(r))
            if isinstance(layer, torch.nn.Conv2d):
                k = layer.kernel_size
                patches[name] = LoraPatch(up=patches[name].up[..., None, None],
                                          down=patches[name].down.reshape(r, layer.in_channels, *k), alpha=float(r))
        p = tmp_path / f"rand{i}.safetensors"
        loradex.save(Adapter(patches=patches, arch=small.arch.name), p, "kohya", arch=small.arch)
        paths.append(str(p))
    state = {k: v.clone() for k, v in small.pipe.unet.state_dict().items()}
    state.update({f"te.{k}": v.clone() for k, v in small.pipe.text_encoder.state_dict().items()})
    small.remove_all()
    y0 = bench.unet_out(small.pipe.unet)  # (this thread count's rounding; bench.y_base may differ in the last bit)
    before = small.stats()["swaps"]
    y_first = None
    for i in range(200):
        a, b = paths[(7 * i) % 50], paths[(11 * i + 3) % 50]
        with small.activate([[(a, 0.8), (b, 0.5)]] if small.ready(a).mode == small.ready(b).mode == "slots"
                            else [[(a, 1.0)]]):
            if i % 40 == 0:
                y = bench.unet_out(small.pipe.unet)
                assert not torch.allclose(y, y0)
                if i == 0:
                    y_first = y
    assert small.stats()["swaps"] - before >= 150
    assert small.stats()["hits"] > 0 and small.stats()["swap_latency_p50_s"] is not None
    small.remove_all()
    assert small.bank.is_clean()
    now = {k: v for k, v in small.pipe.unet.state_dict().items()}
    now.update({f"te.{k}": v for k, v in small.pipe.text_encoder.state_dict().items()})
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert torch.equal(bench.unet_out(small.pipe.unet), y0)
    # and swapping the first pair back in gives the first result again
    with small.activate([[(paths[0], 0.8), (paths[3], 0.5)]] if small.ready(paths[3]).mode == "slots"
                        else [[(paths[0], 1.0)]]):
        assert torch.allclose(bench.unet_out(small.pipe.unet), y_first, atol=1e-6)


@pytest.mark.slow
def test_swaps_do_not_recompile():
    """torch.compile a small model of slot layers (a Linear and a 3x3 Conv2d) once; swap different
    adapters into the same slots in place: dynamo's error_on_recompile stays silent and the compiled
    outputs follow the swaps (equal to the eager ones)."""
    import torch._dynamo

    from loradex.inference.slots import SlotBank

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 24)
            self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x, img):
            return self.proj(x), self.conv(img)

    torch.manual_seed(0)
    model = Small().eval()
    bank = SlotBank({"unet": model}, slots=2, max_rank=8, device="cpu", dtype=torch.float32)
    bank.routing.fixed_rank = True
    g = torch.Generator().manual_seed(1)

    def adapter(r):
        return {n: (torch.randn(r, m.fan_in, generator=g), torch.randn(r, m.fan_out, generator=g))
                for n, m in bank.layers.items()}

    x, img = torch.randn(3, 5, 16, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    adapters = [adapter(r) for r in (2, 8, 5, 1)]
    compiled = torch.compile(model)
    torch._dynamo.reset()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    outs = []
    try:
        with torch.no_grad():
            for i, ad in enumerate(adapters + adapters[:1]):
                bank.load_slot(i % 2, f"a{i}", ad)
                bank.routing.set([[(i % 2, 0.5)], [(i % 2, 1.0)], [(i % 2, -1.0)]], rank=8)
                outs.append((compiled(x, img), model(x, img)))
            # the control: a mixed batch is another graph, and dynamo does complain about it
            bank.routing.set([[(0, 0.5)], [(1, 1.0)], [(0, -1.0)]], rank=8)
            with pytest.raises(torch._dynamo.exc.RecompileError):
                compiled(x, img)
    finally:
        torch._dynamo.config.error_on_recompile = old
    for (yc, ic), (ye, ie) in outs:
        assert torch.allclose(yc, ye, atol=1e-5) and torch.allclose(ic, ie, atol=1e-5)
    assert not torch.allclose(outs[0][0][0], outs[1][0][0])
    assert torch.allclose(outs[0][0][0], outs[4][0][0], atol=1e-5)  # the first adapter again
    with torch.no_grad():  # and the math: y = W x + coef * up^T down x
        bank.load_slot(0, "a0", adapters[0])
        bank.routing.set([[(0, 0.5)], [(0, 1.0)], [(0, -1.0)]], rank=8)
        d, u = adapters[0]["unet.proj"]
        want = model.proj.weight @ x[1].T
        want = (want + u.T @ (d @ x[1].T)).T + model.proj.bias
        assert torch.allclose(model(x, img)[0][1], want, atol=1e-5)


@pytest.mark.slow
def test_swaps_do_not_recompile_the_tiny_unet(bench, refs):
    """The whole tiny UNet under dynamo (recompilation is decided by dynamo's guards, whatever the
    backend: the "eager" backend skips inductor's code generation, which takes minutes on 2 cores;
    LORADEX_SLOW_TESTS=1 uses inductor)."""
    import torch._dynamo

    eng = Engine(bench.fresh_pipe(), max_rank=16, slots=1)
    eng.bank.routing.fixed_rank = True
    compiled = torch.compile(eng.pipe.unet, backend="inductor" if os.environ.get("LORADEX_SLOW_TESTS") else "eager")
    a, b = str(refs["lora"].path), str(refs["loha"].path)
    assert eng.ready(a).mode == eng.ready(b).mode == "slots"
    outs: dict[str, list] = {}
    torch._dynamo.reset()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        for ref in (a, b, a):  # one slot: every step is a swap into the same buffers
            with eng.activate([[(ref, 1.0)]]):
                outs.setdefault(ref, []).append((bench.unet_out(compiled), bench.unet_out(eng.pipe.unet)))
    finally:
        torch._dynamo.config.error_on_recompile = old
    assert eng.stats()["swaps"] == 3
    for pairs in outs.values():
        for y, y_eager in pairs:
            assert torch.allclose(y, y_eager, atol=1e-4)
    assert not torch.allclose(outs[a][0][0], outs[b][0][0], atol=1e-4)
    assert torch.allclose(outs[a][0][0], outs[a][1][0], atol=1e-5)


# ---- references, errors, cache, CLI -----------------------------------------------------------------

def test_registry_refs_and_unknown_adapters(bench, refs, tmp_path):
    from loradex.registry import Registry

    reg = Registry(tmp_path / "home", create=True)
    reg.add(refs["lora"].path, "face", arch=None)
    eng = Engine(bench.fresh_pipe(), max_rank=8, slots=1, registry=reg, allow_paths=False, cache_bytes=1)
    assert eng.resolve("face").startswith("sha256:") and eng.resolve("face") == eng.resolve("face@1")
    with pytest.raises(UnknownAdapterError):
        eng.resolve("nobody")
    with pytest.raises(UnknownAdapterError):
        eng.resolve(str(refs["loha"].path))  # paths refused when allow_paths=False
    with pytest.raises(UnknownAdapterError):
        eng.generate([req(adapters=[("nobody", 1.0)])])
    with pytest.raises(BadRequestError):
        eng.generate([req(adapters=[("face", 9.0)])])
    with pytest.raises(BadRequestError):
        eng.generate([GenerateRequest("x", steps=0)])
    info = eng.prefetch(["face"])
    assert info["face"]["mode"] == "slots"
    assert len(eng.cache) == 0  # a 1-byte budget keeps nothing...
    eng.prefetch(["face"])
    assert eng.stats()["misses"] == 2 and eng.stats()["hits"] == 0  # ...so every lookup misses
    assert any(a.get("ref") == "face" for a in eng.list_adapters())


def test_cache_lru_counts_and_bounds(refs, engine):
    from loradex.inference.cache import ReadyCache

    ready = [engine.ready(str(refs[k].path)) for k in ("lora", "loha")]
    built = []
    cache = ReadyCache(ready[0].nbytes + ready[1].nbytes - 1,
                       lambda i: built.append(i) or dataclasses.replace(ready[int(i)], id=i))
    cache.get("0"), cache.get("0"), cache.get("1"), cache.get("0")
    assert (cache.hits, cache.misses, cache.evictions) == (1, 3, 2) and built == ["0", "1", "0"]
    assert cache.nbytes <= cache.capacity


def test_bad_adapter_for_this_base(tmp_path, engine):
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    p = tmp_path / "wrong.safetensors"
    loradex.save(Adapter(patches={name: LoraPatch(torch.ones(7, 2), torch.ones(2, 5))}, arch="sd1"), p, "diffusers")
    with pytest.raises(BadRequestError):
        engine.generate([req(adapters=[(str(p), 1.0)])])


def test_cli_generate_png_and_grid(refs, tmp_path, capsys, monkeypatch):
    import json

    from PIL import Image

    from loradex.cli import main

    monkeypatch.setenv("LORADEX_HOME", str(tmp_path))
    out = tmp_path / "one.png"
    with pytest.raises(SystemExit) as e:
        main(["generate", "a <sks>", "--adapter", f"{refs['lora'].path}:0.8", "--adapter", str(refs["ti"]),
              "-o", str(out), "--steps", "1", "--guidance", "1", "--json"])
    assert e.value.code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["images"] == 1 and Image.open(out).size == (64, 64)
    grid = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--adapter", str(refs["lora"].path), "--adapter", str(refs["loha"].path),
              "--grid", "--weights", "0,0.5,1", "-o", str(grid), "--steps", "1", "--guidance", "1", "--json"])
    assert e.value.code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["cells"][0] == ["ref_lora:0", "ref_lora:0.5", "ref_lora:1"]
    im = Image.open(grid)
    assert im.size == (3 * 64, 2 * (64 + 14))
    # weight 0 equals the base: the first column's two cells hold the same image
    a = im.crop((0, 14, 64, 78)).tobytes()
    b = im.crop((0, 78 + 14, 64, 2 * 78)).tobytes()
    assert a == b
    assert im.crop((64, 14, 128, 78)).tobytes() != a
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--adapter", str(tmp_path / "missing.safetensors"), "-o", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_pipeline_and_tokenizer_stay_usable(bench, engine):
    """Wrapping keeps module names and the state dict; the base output is unchanged with no adapter."""
    assert set(engine.pipe.unet.state_dict()) == set(bench.pipe.unet.state_dict())
    assert torch.equal(bench.unet_out(engine.pipe.unet), bench.unet_out(bench.pipe.unet))
    lat = engine.run([req()], output_type="latent")[0]
    assert torch.allclose(lat, base_latents(bench), atol=1e-6)
    assert copy.deepcopy(engine.pipe.unet) is not None
