"""The engine's patch mode (weights patched for the batch, restored after): the deltas are computed
on the weights' device from factors moved there once (cache.DevicePatches). On the CPU the result
must be bit-identical to the former path (``W.float().cpu() + delta``, computed on the CPU), for
every kind that goes through it, and the weights must come back bit-identical."""

from __future__ import annotations

import pytest
import torch

from loradex.demo import make_lycoris_reference
from loradex.inference.cache import DevicePatches, Ready, patch_to_device
from loradex.inference.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("loha", "lokr", "full", "diag-oft", "boft", "dora", "ia3", "glora")


@pytest.fixture(scope="module")
def patch_engine(bench):
    """max_rank 1: nothing lycoris makes at dim 4 fits a slot, every kind goes by weight patching."""
    return Engine(bench.fresh_pipe(), max_rank=1, slots=1)


@pytest.fixture(scope="module")
def files(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch_refs")
    return {label: make_lycoris_reference(bench, label, out, seed=10 + i) for i, label in enumerate(KINDS)}


def _old_path_output(bench, engine, path, multiplier):
    """The UNet output with the adapter applied as the engine did before deltas moved to the device:
    each weight read back as float32 on the CPU, ``delta`` computed there, the sum cast back."""
    import loradex
    from loradex.inference.slots import live_modules

    adapter = loradex.load(path, arch=engine.arch)
    unet = bench.fresh_unet()
    mods = dict((canon, m) for canon, _, m in live_modules("unet", unet))
    with torch.no_grad():
        for name, patch in adapter.patches.items():
            mod = mods[name]
            cur = mod.weight.detach().float().cpu()
            d = patch.delta(cur, multiplier=multiplier)
            mod.weight.copy_((cur + d.reshape(cur.shape)).to(mod.weight.device, mod.weight.dtype))
            bias = getattr(mod, "bias", None)
            bd = patch.bias_delta(None if bias is None else bias.detach().float().cpu(), multiplier=multiplier)
            if bd is not None and bias is not None:
                bias.copy_((bias.detach().float().cpu() + bd.reshape(bias.shape)).to(bias.device, bias.dtype))
        return bench.unet_out(unet)


@pytest.mark.parametrize("label", KINDS)
def test_patch_mode_equals_the_former_cpu_path(bench, patch_engine, files, label):
    ref = files[label]
    path = str(ref.path)
    ready = patch_engine.ready(path)
    assert ready.mode == "patch", ready.describe()
    unet = patch_engine.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for m in (1.0, 0.6):
        with torch.no_grad(), patch_engine.activate([[(path, m)]]):
            y = bench.unet_out(unet)
        assert torch.equal(y, _old_path_output(bench, patch_engine, path, m)), m
        if m == 1.0:
            assert bench.rel(y, ref.y_ref) < 1e-4  # and lycoris-lora's own forward
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert len(patch_engine.on_device) == 0  # on the CPU the ready patches are used as they are


def test_patch_to_device_moves_the_factors_only():
    from loradex.core.kinds.ia3 import IA3Patch
    from loradex.core.kinds.lora import LoraPatch

    p = LoraPatch(up=torch.randn(6, 2), down=torch.randn(2, 5), alpha=1.0,
                  residual_indices=torch.tensor([[0, 1], [2, 3]]), residual_values=torch.randn(2),
                  residual_size=torch.tensor([6, 5]))
    m = patch_to_device(p, "meta")
    assert m is not p and m.up.is_meta and m.down.is_meta and m.residual_values.is_meta
    assert not m.alpha.is_meta and not m.residual_indices.is_meta and not m.residual_size.is_meta
    assert not p.up.is_meta  # the original is untouched
    assert patch_to_device(p, "cpu") is p
    ia3 = IA3Patch(weight=torch.randn(6), on_input=torch.tensor(1), weight_shape=(6, 6))
    moved = patch_to_device(ia3, "meta")
    assert moved.weight.is_meta and not moved.on_input.is_meta and moved.axis == 1


def test_device_patches_cache_once_per_adapter_within_budget():
    from loradex.core.kinds.lora import LoraPatch

    def ready(i, n):
        return Ready(f"a{i}", "patch", patches={"m": LoraPatch(up=torch.randn(n, 1), down=torch.randn(1, n))})

    a, b, big = ready(0, 8), ready(1, 8), ready(2, 64)  # 64 and 64 bytes, 512 bytes
    cpu = DevicePatches("cpu", 1 << 20)
    assert cpu.get(a) is a.patches and len(cpu) == 0
    dev = DevicePatches("meta", 200)
    first = dev.get(a)
    assert first["m"].up.is_meta and dev.get(a) is first and dev.nbytes == 64
    dev.get(b)
    assert len(dev) == 2 and dev.nbytes == 128
    assert dev.get(big)["m"].up.is_meta and len(dev) == 2  # over the budget: moved, not kept
    dev.get(ready(3, 16))  # 128 bytes: the least recently used (a) goes
    assert len(dev) == 2 and dev.nbytes == 192 and dev.get(b) is not None
    assert dev.get(a) is not first


def test_routing_made_under_inference_mode_is_rewritable_outside():
    """``activate`` inside ``torch.inference_mode`` (benchmarks, tests) and a same-shape routing after
    it, outside: the routing tensors made in inference mode cannot be written in place, so they are
    replaced."""
    from loradex.inference.slots import Routing

    r = Routing("cpu", torch.float32, 4)
    with torch.inference_mode():
        r.set([[(0, 1.0)], [(1, 0.5)]], rank=4)
    r.set([[(1, 1.0)], [(0, 0.5)]], rank=4)
    assert r.idx.tolist() == [[1], [0]] and r.coef.tolist() == [[1.0], [0.5]] and not r.idx.is_inference()
    same = r.idx
    r.set([[(0, 1.0)], [(1, 0.5)]], rank=4)
    assert r.idx is same  # otherwise in place, as before
