"""merge methods svd / ties / dare / dare_ties / magnitude and block weights (LBW), checked against
full SVDs of the dense sums, peft's own merge_utils functions, independently written block tables,
the real consumers (diffusers, lycoris-lora) and the CLI contract."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft.utils import merge_utils

import loradex
from cli_util import bad, run
from loradex.core.adapter import Adapter
from loradex.core.archs import get_arch
from loradex.core.archs.sd1 import SD17, SD26
from loradex.core.archs.sdxl import SDXL12, SDXL20
from loradex.core.kinds.full import FullPatch
from loradex.core.kinds.lora import LoraPatch
from loradex.core.linalg import rank_for
from loradex.demo import consume_diffusers, consume_lycoris_kohya, make_lycoris_reference

# the function itself: since ``import loradex`` is lazy (PEP 562), importing the subpackage
# loradex.merge before the name is first used binds ``loradex.merge`` to the subpackage
from loradex.merge import merge
from loradex.merge.blocks import apply_block_weights, block_of
from loradex.merge.ties import combine, module_seed
from loradex.tiny import tiny_arch

HUGE = 10**6  # a rank above every module's size: the reduction keeps everything


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def _lora(out, inp, r, alpha=None, k=None, seed=0) -> LoraPatch:
    g = torch.Generator().manual_seed(seed)
    n_in = inp * (k * k if k else 1)
    up, down = torch.randn(out, r, generator=g), torch.randn(r, n_in, generator=g)
    if k:
        return LoraPatch(up=up.reshape(out, r, 1, 1), down=down.reshape(r, inp, k, k), alpha=alpha)
    return LoraPatch(up=up, down=down, alpha=alpha)


def _dense(items, name) -> torch.Tensor:
    total = None
    for a, w in items:
        if name in a.patches:
            d = a.patches[name].delta().double()
            d = d.reshape(d.shape[0], -1) * w
            total = d if total is None else total + d
    return total


# ---- svd -------------------------------------------------------------------------------------------
def test_svd_merge_is_the_optimal_truncation_of_the_weighted_sum():
    from loradex.core.kinds.loha import LohaPatch

    g = torch.Generator().manual_seed(5)
    loha = LohaPatch(hada_w1_a=torch.randn(48, 3, generator=g), hada_w1_b=torch.randn(3, 40, generator=g),
                     hada_w2_a=torch.randn(48, 2, generator=g), hada_w2_b=torch.randn(2, 40, generator=g),
                     alpha=torch.tensor(2.0))
    # a large dense module (full kind): low rank + noise, so the randomized SVD path is taken
    lowrank = torch.randn(160, 12, generator=g) @ torch.randn(12, 200, generator=g)
    full = FullPatch(diff=lowrank + 0.05 * torch.randn(160, 200, generator=g))
    a = Adapter(patches={"unet.x": _lora(48, 40, 8, alpha=4.0, seed=1), "unet.conv": _lora(16, 8, 4, 2.0, k=3, seed=2),
                         "unet.big": _lora(160, 200, 6, seed=3), "unet.only": _lora(24, 24, 3, seed=4)})
    b = Adapter(patches={"unet.x": loha, "unet.conv": _lora(16, 8, 6, 3.0, k=3, seed=6), "unet.big": full})
    items = [(a, 0.8), (b, -0.6)]
    k = 5
    out, report = merge(items, "svd", rank=k)
    assert set(out.patches) == {"unet.x", "unet.conv", "unet.big", "unet.only"}
    for name, p in out.patches.items():
        dense = _dense(items, name)
        s = torch.linalg.svdvals(dense)
        kk = min(k, 3) if name == "unet.only" else k
        assert p.kind == "lora" and p.rank == kk and p.scale == 1.0, name
        got = p.delta().double().reshape(dense.shape)
        s_got = torch.linalg.svdvals(got)[:kk]
        assert torch.allclose(s_got, s[:kk], rtol=1e-5, atol=0), name
        optimal = float((s[kk:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        err = rel(got, dense)
        assert err <= 1.001 * optimal + 1e-6, (name, err, optimal)  # float32 storage: ~1e-7
        assert report.modules[name]["error"] == pytest.approx(err, rel=1e-4, abs=1e-6), name
    assert report.modules["unet.only"]["exact"] and report.modules["unet.only"]["error"] == 0.0
    assert report.modules["unet.x"]["how"].startswith("from factors")  # LoHa + LoRA: no dense product
    assert report.modules["unet.big"]["how"] == "randomized svd"
    assert tuple(out.patches["unet.conv"].shape) == (16, 8, 3, 3)
    # dynamic policy: the rank rank_for picks on the true spectrum
    out, report = merge(items, "svd", fro=0.9)
    for name, p in out.patches.items():
        want = rank_for(torch.linalg.svdvals(_dense(items, name)), fro=0.9)
        assert p.rank == want, name
    # full rank: the exact sum (any kinds)
    out, _ = merge(items, "svd", rank=HUGE)
    for name, p in out.patches.items():
        dense = _dense(items, name)
        assert rel(p.delta().double().reshape(dense.shape), dense) <= 1e-6, name


def test_svd_merge_1d_modules_and_refusals():
    from loradex.core.kinds.ia3 import IA3Patch
    from loradex.core.kinds.norm import NormPatch

    n1 = NormPatch(w_norm=torch.arange(4.0), b_norm=torch.ones(4))
    n2 = NormPatch(w_norm=torch.ones(4), b_norm=None)
    a = Adapter(patches={"unet.x": _lora(8, 8, 2, seed=1), "unet.norm": n1})
    b = Adapter(patches={"unet.x": _lora(8, 8, 2, seed=2), "unet.norm": n2})
    for method, kw in (("svd", {}), ("magnitude", {"density": 1.0})):
        out, report = merge([(a, 2.0), (b, -1.0)], method, rank=2, **kw)
        p = out.patches["unet.norm"]
        assert p.kind == "norm" and report.modules["unet.norm"]["exact"]
        assert torch.equal(p.w_norm, 2 * torch.arange(4.0) - 1) and torch.equal(p.b_norm, torch.full((4,), 2.0))
    dora = _lora(8, 8, 2)
    dora.dora_scale = torch.ones(8, 1)
    ia3 = IA3Patch(weight=torch.ones(8))
    for bad_patch, needle in ((dora, "DoRA"), (ia3, "base weight")):
        for method, kw in (("svd", {}), ("ties", {"density": 0.5})):
            with pytest.raises(loradex.LoradexError, match=needle):
                merge([(a, 1.0), (Adapter(patches={"unet.x": bad_patch}), 1.0)], method, rank=2, **kw)
    with pytest.raises(loradex.LoradexError, match="rank policy"):
        merge([(a, 1.0)], "svd")
    with pytest.raises(loradex.LoradexError, match="density"):
        merge([(a, 1.0)], "dare", rank=2, density=0.0)


# ---- ties / dare / magnitude vs peft -----------------------------------------------------------------
@pytest.fixture(scope="module")
def refs(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_methods_refs")
    return {label: make_lycoris_reference(bench, label, d, seed=10 + i).path for i, label in enumerate(("lora", "loha"))}


PEFT = {
    "ties": lambda ds, w, d: merge_utils.ties(ds, w, d),
    "dare": lambda ds, w, d: merge_utils.dare_linear(ds, w, d),
    "dare_ties": lambda ds, w, d: merge_utils.dare_ties(ds, w, d),
    "magnitude": lambda ds, w, d: merge_utils.magnitude_prune(ds, w, d),
}


def test_sparse_methods_equal_peft(bench, refs, tmp_path):
    items = [(loradex.load(refs["lora"], arch=bench.arch), 0.7), (loradex.load(refs["loha"], arch=bench.arch), 0.5)]
    density, seed = 0.4, 11
    for method in PEFT:
        merged, report = merge(items, method, rank=HUGE, density=density, seed=seed)
        assert report.params["density"] == density and report.max_error == 0.0
        back = merged
        if method in ("ties", "dare"):  # the saved float32 file at full rank reproduces the result
            path = tmp_path / f"{method}.safetensors"
            loradex.save(merged, path, "kohya", arch=bench.arch)
            back = loradex.load(path, arch=bench.arch)
        checked = 0
        for name in merged.patches:
            parts = [(a.patches[name], w) for a, w in items if name in a.patches]
            deltas = [p.delta().double() for p, _ in parts]
            deltas = [d.reshape(d.shape[0], -1) for d in deltas]
            weights = torch.tensor([w for _, w in parts], dtype=torch.float64)
            torch.manual_seed(module_seed(seed, name))  # peft draws DARE masks from the global RNG
            want = PEFT[method](deltas, weights, density)
            gen = torch.Generator().manual_seed(module_seed(seed, name))
            mine = combine(method, deltas, [w for _, w in parts], density, gen)
            assert torch.allclose(mine, want, rtol=0, atol=1e-12 * float(want.abs().max())), (method, name)
            assert want.abs().max() > 0
            got = back.patches[name].delta().double().reshape(want.shape)
            assert rel(got, want) <= 1e-5, (method, name)
            checked += len(parts) > 1
        assert checked >= 10


def test_dare_is_seeded_and_deterministic():
    a = Adapter(patches={"unet.x": _lora(32, 24, 4, seed=1), "unet.y": _lora(16, 16, 2, seed=2)})
    b = Adapter(patches={"unet.x": _lora(32, 24, 4, seed=3), "unet.y": _lora(16, 16, 2, seed=4)})
    one, _ = merge([(a, 1.0), (b, 1.0)], "dare", rank=HUGE, density=0.5, seed=3)
    two, _ = merge([(a, 1.0), (b, 1.0)], "dare", rank=HUGE, density=0.5, seed=3)
    other, _ = merge([(a, 1.0), (b, 1.0)], "dare", rank=HUGE, density=0.5, seed=4)
    # the masks of a module do not depend on which other modules exist
    alone, _ = merge([(Adapter(patches={"unet.y": a.patches["unet.y"]}), 1.0),
                              (Adapter(patches={"unet.y": b.patches["unet.y"]}), 1.0)], "dare", rank=HUGE,
                             density=0.5, seed=3)
    for name in ("unet.x", "unet.y"):
        assert torch.equal(one.patches[name].delta(), two.patches[name].delta())
        assert not torch.allclose(one.patches[name].delta(), other.patches[name].delta())
    assert torch.equal(alone.patches["unet.y"].delta(), one.patches["unet.y"].delta())
    # density 1: no drop; dare is then the weighted sum, ties the disjoint mean
    full, _ = merge([(a, 1.0), (b, 1.0)], "dare", rank=HUGE, density=1.0)
    assert rel(full.patches["unet.x"].delta(), a.patches["unet.x"].delta() + b.patches["unet.x"].delta()) <= 1e-6


# ---- the float32 path of ties / dare / magnitude (issue 14) -------------------------------------------
def _loha(out, inp, r1, r2, seed):
    from loradex.core.kinds.loha import LohaPatch

    g = torch.Generator().manual_seed(seed)
    return LohaPatch(hada_w1_a=torch.randn(out, r1, generator=g), hada_w1_b=torch.randn(r1, inp, generator=g),
                     hada_w2_a=torch.randn(out, r2, generator=g), hada_w2_b=torch.randn(r2, inp, generator=g),
                     alpha=torch.tensor(2.0))


def _inputs(n_inputs: int, shapes: dict, seed: int, mixed: bool = True) -> list[tuple[Adapter, float]]:
    """``n_inputs`` adapters on ``shapes`` (name -> (out, in)): LoRAs (fp32, one fp16), and with
    ``mixed`` a LoHa and a full diff in the mix; weights of both signs."""
    items = []
    for i in range(n_inputs):
        patches = {}
        for j, (name, (out, inp)) in enumerate(shapes.items()):
            sd = seed + 100 * i + j
            if mixed and i == 1:
                patches[name] = _loha(out, inp, 3, 4, sd)
            elif mixed and i == 2:
                g = torch.Generator().manual_seed(sd)
                patches[name] = FullPatch(diff=torch.randn(out, 6, generator=g) @ torch.randn(6, inp, generator=g))
            else:
                p = _lora(out, inp, 8, alpha=4.0, seed=sd)
                patches[name] = p.to(torch.float16) if i == 3 else p
        items.append((Adapter(patches=patches), (0.9, -0.6, 0.7, 1.2, 0.5)[i % 5]))
    return items


def _parts(items, name):
    return [(i, a.patches[name], w) for i, (a, w) in enumerate(items) if name in a.patches]


def _cut_ties(d: torch.Tensor, density: float) -> bool:
    """Whether entries of equal magnitude straddle the trim's cut (where topk's pick is its own)."""
    a = d.reshape(-1).abs()
    k = int(density * a.numel())
    t = torch.topk(a, k).values.min()
    return int((a >= t).sum()) > k


def test_float32_merged_update_equals_peft_bit_for_bit():
    from loradex.merge.ties import dense_updates, merged_update

    # "big" has more entries than sparsify.SMALL_SELECT: sampled bracket, block sweep, chunked combine
    shapes = {"unet.small": (24, 40), "unet.big": (384, 448)}
    density, seed = 0.3, 9
    for n_inputs in (2, 3, 5):
        items = _inputs(n_inputs, shapes, seed=10 * n_inputs)
        for name, (m, n) in shapes.items():
            parts = _parts(items, name)
            deltas = [r.view(m, n).clone() for r in dense_updates(parts, m)]
            for d, (_, p, _) in zip(deltas, parts):
                assert d.dtype == torch.float32 and torch.equal(d, p.delta().reshape(m, n)), name
            w32 = torch.tensor([w for _, _, w in parts], dtype=torch.float32)  # as peft's torch.tensor(weights)
            w64 = w32.double()
            for method in PEFT:
                got = merged_update(name, parts, method, density, seed)
                if method in ("ties", "magnitude"):
                    assert not any(_cut_ties(d, density) for d in deltas)  # else topk's pick is arbitrary
                    want = PEFT[method](deltas, w32, density)
                else:
                    # peft's random_pruning draws torch.bernoulli(full_like(d, density)) from the global
                    # RNG; on float64 updates those are loradex's masks (module_seed): the same masks,
                    # then peft's own steps on the float32 updates
                    torch.manual_seed(module_seed(seed, name))
                    masks = [torch.bernoulli(torch.full_like(d.double(), density)).float() for d in deltas]
                    pruned = [d * mk / density for d, mk in zip(deltas, masks)]
                    if method == "dare":
                        want = merge_utils.task_arithmetic(pruned, w32)
                    else:
                        stack = torch.stack(pruned)
                        want = merge_utils.disjoint_merge(stack * w32.view(-1, 1, 1),
                                                          merge_utils.calculate_majority_sign_mask(stack, "total"))
                    torch.manual_seed(module_seed(seed, name))
                    ref64 = PEFT[method]([d.double() for d in deltas], w64, density)  # peft itself, float64
                    assert rel(got, ref64) <= 1e-6, (method, name)
                assert got.dtype == torch.float32 and torch.equal(got, want), (method, name, n_inputs)
                assert want.abs().max() > 0


def test_float32_truncation_is_within_one_percent_of_optimal():
    from loradex.merge.ties import merged_update

    shapes = {"unet.a": (320, 448), "unet.b": (256, 640)}  # randomized path: rank 24 is a small share
    rank = 24
    for n_inputs in (2, 5):
        items = _inputs(n_inputs, shapes, seed=7 * n_inputs, mixed=n_inputs > 2)
        for method in PEFT:
            out, report = merge(items, method, rank=rank, density=0.3, seed=5)
            for name, (m, n) in shapes.items():
                mat = merged_update(name, _parts(items, name), method, 0.3, 5).double()
                s = torch.linalg.svdvals(mat)
                optimal = float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
                p = out.patches[name]
                err = rel(p.delta().double().reshape(m, n), mat)
                info = report.modules[name]
                assert p.rank == rank and "randomized svd" in info["how"], info
                assert err <= 1.01 * optimal, (method, n_inputs, name, err / optimal)
                assert info["error"] == pytest.approx(err, rel=1e-3), (method, name)
                # the same update as the float64 path of before (combine + reduce_dense), to rounding
                gen = torch.Generator().manual_seed(module_seed(5, name)) if method.startswith("dare") else None
                old = combine(method, [q.delta().double().reshape(m, n) for _, q, _ in _parts(items, name)],
                              [w for _, _, w in _parts(items, name)], 0.3, gen)
                assert rel(mat, old) <= 1e-6, (method, name)


def test_trim_is_topk_with_ties_at_the_cut_resolved_in_row_order(monkeypatch):
    from loradex.core import sparsify

    g = torch.Generator().manual_seed(3)
    for n in (1000, 300_000):  # sorted selection / sampled bracket
        d = torch.randn(n, generator=g) * torch.rand(n, generator=g)
        for density in (0.01, 0.2, 0.9):
            k = int(density * n)
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.topk(d.abs(), k).indices] = True
            assert not _cut_ties(d, density)
            assert torch.equal(sparsify.trim_mask(d, density), want), (n, density)
            row = d.clone()
            assert torch.equal(sparsify.trim_(row, density), d * want)
            t, c = sparsify.magnitude_threshold(d, k)
            assert float(t) == float(torch.kthvalue(d.abs(), n - k + 1).values) and c == k
        # a useless sample (all zeros) only costs speed: the threshold is still exact
        with monkeypatch.context() as mp:
            mp.setattr(sparsify, "_sample_abs", lambda row, s: torch.zeros(s))
            k = int(0.2 * n)
            assert float(sparsify.magnitude_threshold(d, k)[0]) == float(torch.kthvalue(d.abs(), n - k + 1).values)
    # many equal magnitudes: all above the cut kept, then the first tied ones in row-major order
    for n in (5000, 200_000):
        q = torch.randint(-5, 6, (n,), generator=g).float()
        k = int(0.3 * n)
        mask = sparsify.trim_mask(q, 0.3)
        t = float(torch.kthvalue(q.abs(), n - k + 1).values)
        above = q.abs() > t
        tied = torch.nonzero(q.abs() == t).view(-1)
        want = above.clone()
        want[tied[: k - int(above.sum())]] = True
        assert int(mask.sum()) == k and torch.equal(mask, want), n
    # NaN ranks first, as in topk; density 1 keeps all, a zero count keeps none
    d = torch.randn(300_000, generator=g)
    d[::997] = float("nan")
    want = torch.zeros(d.numel(), dtype=torch.bool)
    want[torch.topk(d.abs(), int(0.2 * d.numel())).indices] = True
    assert torch.equal(sparsify.trim_mask(d, 0.2), want)
    assert sparsify.trim_mask(d, 1.0).all() and not sparsify.trim_mask(d[:3], 0.2).any()


def test_sparse_merge_threads_do_not_change_results():
    from loradex.merge.ties import merge_sparse

    shapes = {f"unet.m{i}": (48 + 16 * i, 40 + 8 * i) for i in range(5)}
    items = _inputs(3, shapes, seed=1)
    by_module = {name: _parts(items, name) for name in shapes}
    for method in PEFT:
        one = merge_sparse(by_module, method, {"rank": 6}, 0.4, seed=2, workers=1)
        three = merge_sparse(by_module, method, {"rank": 6}, 0.4, seed=2, workers=3)
        assert list(one[0]) == list(three[0]) == list(shapes)  # the inputs' order, whatever ran first
        for name in shapes:
            assert torch.equal(one[0][name].up, three[0][name].up) and torch.equal(one[0][name].down, three[0][name].down)
            assert one[1][name] == three[1][name]
    assert torch.get_num_threads() == 1  # the caller's setting is restored


def test_subspace_svd():
    from loradex.core.linalg import subspace_svd

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 40, generator=g) @ torch.randn(40, 500, generator=g) + 2.0 * torch.randn(300, 500, generator=g)
    s = torch.linalg.svdvals(a.double())
    optimal = float((s[32:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    for lowp in (False, True):
        for start in (None, torch.randn(300, 48, generator=g)):
            info: dict = {}
            u, sv, vh = subspace_svd(a, 32, start=start, width=48, lowp=lowp, info=info)
            assert u.shape == (300, 32) and vh.shape == (32, 500) and info["lowp"] is lowp
            err = rel((u * sv) @ vh, a)
            assert err <= 1.01 * optimal, (lowp, start is None, err / optimal)
            assert torch.allclose(u.T @ u, torch.eye(32), atol=1e-4)
            assert torch.allclose(sv.double(), s[:32], rtol=2e-2)
    # an exactly low-rank matrix is reproduced to float32 rounding (the exact finish takes over)
    low = torch.randn(300, 8, generator=g) @ torch.randn(8, 500, generator=g)
    for lowp in (False, True):
        u, sv, vh = subspace_svd(low, 16, width=32, lowp=lowp)
        assert rel((u * sv) @ vh, low) <= 1e-5, lowp
        u, sv, vh = subspace_svd(low, 8, width=32, lowp=lowp)
        assert rel((u * sv) @ vh, low) <= 1e-5, lowp
    with pytest.raises(ValueError, match="rows"):
        subspace_svd(a, 8, start=torch.randn(5, 16))


# ---- block weights -----------------------------------------------------------------------------------
# Written from the UNet layout, not from loradex's SGM map: (diffusers prefix -> LBW block).
TINY_SD1_BLOCKS = {
    "unet.conv_in": "IN00",
    "unet.down_blocks.0.resnets.0.": "IN01", "unet.down_blocks.0.attentions.0.": "IN01",
    "unet.down_blocks.0.downsamplers.0.": "IN02",
    "unet.down_blocks.1.resnets.0.": "IN03",
    "unet.mid_block.": "M00",
    "unet.up_blocks.0.resnets.0.": "OUT00", "unet.up_blocks.0.resnets.1.": "OUT01",
    "unet.up_blocks.0.upsamplers.0.": "OUT01",
    "unet.up_blocks.1.resnets.0.": "OUT02", "unet.up_blocks.1.attentions.0.": "OUT02",
    "unet.up_blocks.1.resnets.1.": "OUT03", "unet.up_blocks.1.attentions.1.": "OUT03",
    "unet.time_embedding.": None, "unet.conv_out": None, "unet.conv_norm_out": None,
    "text_encoder.": "BASE",
}
TINY_SDXL_BLOCKS = {
    "unet.conv_in": "IN00",
    "unet.down_blocks.0.resnets.0.": "IN01", "unet.down_blocks.0.resnets.1.": "IN02",
    "unet.down_blocks.0.downsamplers.0.": "IN03",
    "unet.down_blocks.1.resnets.0.": "IN04", "unet.down_blocks.1.attentions.0.": "IN04",
    "unet.down_blocks.1.resnets.1.": "IN05", "unet.down_blocks.1.attentions.1.": "IN05",
    "unet.mid_block.": "M00",
    **{f"unet.up_blocks.0.{k}.{j}.": f"OUT0{j}" for k in ("resnets", "attentions") for j in range(3)},
    "unet.up_blocks.0.upsamplers.0.": "OUT02",
    **{f"unet.up_blocks.1.resnets.{j}.": f"OUT0{3 + j}" for j in range(3)},
    "unet.time_embedding.": None, "unet.add_embedding.": None, "unet.conv_out": None, "unet.conv_norm_out": None,
    "text_encoder.": "BASE", "text_encoder_2.": "BASE",
}


def expected_block(table: dict, name: str) -> str | None:
    hits = [b for prefix, b in table.items() if name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def _check_weighted(src: Adapter, out: Adapter, weights: dict[str, float], table: dict) -> int:
    zeroed = 0
    for name, p in src.patches.items():
        w = 1.0 if expected_block(table, name) is None else weights.get(expected_block(table, name), 0.0)
        if w == 0:
            assert name not in out.patches, name
            zeroed += 1
        else:
            assert rel(out.patches[name].delta(), w * p.delta()) <= 1e-6, name
    return zeroed


def test_block_weights_sd1_presets_and_vectors(bench, refs):
    src = loradex.load(refs["lora"], arch=bench.arch)
    for name in src.patches:
        assert block_of(bench.arch, name) == expected_block(TINY_SD1_BLOCKS, name), name
    # 26 entries: one distinct weight per block
    vec = [round(0.1 * (i + 1), 2) for i in range(26)]
    out, rep = apply_block_weights(src, ",".join(map(str, vec)))
    _check_weighted(src, out, dict(zip(SD26, vec)), TINY_SD1_BLOCKS)
    assert rep.outside and not rep.dropped
    # 17-entry preset: blocks the layout does not list (IN00, IN03, OUT00-OUT02 here) get 0, as in the extension
    out, rep = apply_block_weights(src, "INALL")
    weights = dict(zip(SD17, [1, 1, 1, 1, 1, 1, 1] + [0] * 10))
    zeroed = _check_weighted(src, out, weights, TINY_SD1_BLOCKS)
    assert zeroed == len(rep.dropped) > 0
    assert {rep.blocks[n] for n in rep.unlisted} == {"IN00", "IN03", "OUT00", "OUT01", "OUT02"}
    out, rep = apply_block_weights(src, "NONE")
    assert set(out.patches) == set(rep.outside)  # only modules outside every block survive
    # the real SD1.5 layout: attentions of down level i, slot j -> IN(3i+j+1); of up level i -> OUT(3i+j)
    sd1 = get_arch("sd1")
    for name in sd1.modules:
        m = re.match(r"unet\.(down|up)_blocks\.(\d)\.attentions\.(\d)\.", name)
        if m:
            i, j = int(m.group(2)), int(m.group(3))
            want = f"IN{3 * i + j + 1:02d}" if m.group(1) == "down" else f"OUT{3 * i + j:02d}"
            assert block_of(sd1, name) == want, name
    assert block_of(sd1, "unet.down_blocks.2.downsamplers.0.conv") == "IN09"
    assert block_of(sd1, "unet.mid_block.attentions.0.proj_in") == "M00"
    assert block_of(sd1, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "BASE"


def test_block_weights_sdxl_and_flux():
    arch = tiny_arch("sdxl")
    g = torch.Generator().manual_seed(0)
    patches = {}
    for name, info in arch.modules.items():
        if info.type == "linear" or (info.type == "conv" and len(info.shape) == 4):
            shape = tuple(info.shape)
            n_in = int(torch.tensor(shape[1:]).prod())
            patches[name] = LoraPatch._from_2d(torch.randn(shape[0], 2, generator=g), torch.randn(2, n_in, generator=g),
                                               shape, torch.float32)
    src = Adapter(patches=patches, arch=arch.name)
    assert len(src.patches) > 50
    for name in src.patches:
        assert block_of(arch, name) == expected_block(TINY_SDXL_BLOCKS, name), name
    vec = [round(0.05 * (i + 1), 2) for i in range(20)]
    out, _ = apply_block_weights(src, vec)
    _check_weighted(src, out, dict(zip(SDXL20, vec)), TINY_SDXL_BLOCKS)
    vec12 = [1, 0, 0.5, 1, 0, 2, 1, 1, 0, 0, 1, -1]
    out, rep = apply_block_weights(src, vec12)
    _check_weighted(src, out, dict(zip(SDXL12, vec12)), TINY_SDXL_BLOCKS)
    assert {rep.blocks[n] for n in rep.unlisted} == {"IN00", "IN01", "IN02", "IN03"}
    with pytest.raises(loradex.LoradexError, match="Stable Diffusion 1.x vector"):
        apply_block_weights(src, "INALL")  # a 17-entry SD1 preset
    with pytest.raises(loradex.LoradexError, match="12 or 20"):
        apply_block_weights(src, ",".join(["1"] * 17))
    # FLUX: the extension's CLIP, T5, IN, Dnn, Snn, OUT layout (61 entries for FLUX.1; 8 for the tiny one)
    flux = tiny_arch("flux1")
    assert block_of(get_arch("flux1"), "transformer.single_transformer_blocks.37.proj_out") == "S37"
    assert block_of(flux, "transformer.transformer_blocks.1.attn.to_q") == "D01"
    assert block_of(flux, "transformer.x_embedder") == "IN" and block_of(flux, "transformer.proj_out") == "OUT"
    with pytest.raises(loradex.LoradexError, match="61"):
        apply_block_weights(Adapter(arch="flux1"), ",".join(["1"] * 17))


def test_merged_file_with_blocks_loads_in_diffusers_and_lycoris(bench, refs, tmp_path):
    a = loradex.load(refs["lora"], arch=bench.arch)
    b = loradex.load(refs["loha"], arch=bench.arch)
    vec = ",".join(["1"] * 8 + ["0.5"] * 18)  # 26 entries: OUT blocks at half
    merged, report = merge([(a, 0.8, vec), (b, 0.5)], "svd", rank=HUGE)
    a_w, _ = apply_block_weights(a, vec)
    items = [(a_w, 0.8), (b, 0.5)]
    unet = bench.fresh_unet()
    with torch.no_grad():
        for name in merged.patches:
            dw = _dense(items, name)
            assert rel(merged.patches[name].delta().double().reshape(dw.shape), dw) <= 1e-6, name
            w = unet.get_submodule(name[len("unet."):]).weight
            w.add_(dw.reshape(w.shape).to(w.dtype))
    y_ref = bench.unet_out(unet)
    assert bench.rel(y_ref, bench.y_base) > 0.01
    assert report.blocks["1"]["block_weights"]["weights"]["OUT03"] == 0.5
    path = tmp_path / "merged.safetensors"
    loradex.save(merged, path, "kohya", arch=bench.arch)
    assert bench.rel(consume_lycoris_kohya(bench, path), y_ref) <= 1e-4
    upath = tmp_path / "merged_uniform.safetensors"
    loradex.save(merged, upath, "kohya", arch=bench.arch, uniform_alpha=True)
    assert bench.rel(consume_diffusers(bench, upath), y_ref) <= 1e-4


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_merge_methods_and_blocks(bench, refs, tmp_path, monkeypatch, capsys):
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    arch = bench.arch.name
    lora, loha = refs["lora"], refs["loha"]
    out = tmp_path / "svd.safetensors"
    code, stdout, err = run(capsys, "merge", f"{lora}:0.8", f"{loha}:0.5", "-o", out, "--method", "svd",
                            "--rank", 3, "--arch", arch, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["method"] == "svd" and d["params"]["rank"] == 3 and d["modules"]
    assert all(m["rank"] <= 3 and 0 <= m["error"] < 1 for m in d["modules"].values())
    assert set(loradex.load(out, arch=arch).ranks()) <= {1, 2, 3}
    # dare via the CLI = the library call with the same seed
    code, stdout, err = run(capsys, "merge", f"{lora}:0.8", f"{loha}:0.5", "-o", tmp_path / "dare.safetensors",
                            "--method", "dare", "--density", 0.5, "--seed", 7, "--rank", HUGE, "--arch", arch,
                            "--to", "kohya", "--save-as", "dared")
    assert code == 0 and "dare" in stdout and "stored as dared" in stdout, err
    lib, _ = merge([(loradex.load(lora, arch=arch), 0.8), (loradex.load(loha, arch=arch), 0.5)], "dare", rank=HUGE,
                           density=0.5, seed=7)
    got = loradex.load(tmp_path / "dare.safetensors", arch=arch)
    for name, p in lib.patches.items():
        assert rel(got.patches[name].delta(), p.delta()) <= 1e-5, name
    # one input + --blocks: apply block weights (kinds kept); per-input IN:W:BLOCKS in a merge
    code, stdout, err = run(capsys, "merge", loha, "--blocks", "OUTALL", "-o", tmp_path / "b.safetensors",
                            "--arch", arch, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    applied = loradex.load(tmp_path / "b.safetensors", arch=arch)
    assert set(applied.kinds()) == {"loha"} and d["blocks"]["1"]["block_weights"]["spec"] == "OUTALL"
    want, _ = apply_block_weights(loradex.load(loha, arch=arch), "OUTALL")
    assert set(applied.patches) == set(want.patches)
    code, stdout, err = run(capsys, "merge", f"{lora}:0.8:MIDD", f"{loha}:0.5", "-o", tmp_path / "c.safetensors",
                            "--arch", arch, "--json")
    assert code == 0, err
    assert json.loads(stdout)["blocks"]["1"]["block_weights"]["spec"] == "MIDD"
    # bad inputs: one line, exit 2, nothing written
    x = tmp_path / "x.safetensors"
    bad(run(capsys, "merge", lora, "--blocks", "NOPE", "-o", x, "--arch", arch), "preset")
    bad(run(capsys, "merge", lora, "--blocks", "1,0,1", "-o", x, "--arch", arch), "17 or 26")
    bad(run(capsys, "merge", f"{lora}:1:1,0", loha, "-o", x, "--arch", arch), "entries")
    bad(run(capsys, "merge", lora, loha, "-o", x, "--method", "ties", "--rank", 4, "--density", 0, "--arch", arch), "density")
    bad(run(capsys, "merge", lora, loha, "-o", x, "--method", "ties", "--rank", 4, "--density", 1.5, "--arch", arch), "density")
    bad(run(capsys, "merge", lora, loha, "-o", x, "--method", "ties", "--rank", 4, "--arch", arch), "density")
    bad(run(capsys, "merge", lora, loha, "-o", x, "--method", "svd", "--rank", 0, "--arch", arch), "rank")
    bad(run(capsys, "merge", lora, loha, "-o", x, "--method", "svd", "--arch", arch), "rank policy")
    bad(run(capsys, "merge", lora, loha, "-o", x, "--rank", 4, "--arch", arch), "concat")
    assert not x.exists()
