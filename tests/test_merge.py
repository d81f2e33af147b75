"""resize (SVD from the factors, dynamic ranks) and merge (concat: the exact weighted sum), checked
against dense references, the real consumers (diffusers, lycoris-lora) and the CLI contract."""

from __future__ import annotations

import json
import time

import pytest
import torch

import loradex
from cli_util import bad, run
from loradex.core.adapter import Adapter, Embedding
from loradex.core.kinds.lora import LoraPatch
from loradex.core.linalg import rank_for
from loradex.demo import consume_diffusers, consume_lycoris_kohya, make_lycoris_reference

WEIGHTS = {"lora": 0.8, "loha": 0.5, "lokr": -0.3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def _lora(out, inp, r, alpha=None, k=None, seed=0, dtype=torch.float32, spectrum=None) -> LoraPatch:
    g = torch.Generator().manual_seed(seed)
    n_in = inp * (k * k if k else 1)
    if spectrum is not None:  # up @ down has exactly these singular values
        q1, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(n_in, r, generator=g, dtype=torch.float64))
        up, down = q1 * torch.tensor(spectrum, dtype=torch.float64), q2.T
    else:
        up, down = torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, n_in, generator=g, dtype=torch.float64)
    if k:
        return LoraPatch(up=up.reshape(out, r, 1, 1).to(dtype), down=down.reshape(r, inp, k, k).to(dtype), alpha=alpha)
    return LoraPatch(up=up.to(dtype), down=down.to(dtype), alpha=alpha)


def _tucker(out, inp, r, k, alpha, seed=0) -> LoraPatch:
    g = torch.Generator().manual_seed(seed)
    return LoraPatch(up=torch.randn(out, r, 1, 1, generator=g), down=torch.randn(r, inp, 1, 1, generator=g),
                     mid=torch.randn(r, r, k, k, generator=g), alpha=alpha)


# ---- resize ----------------------------------------------------------------------------------------
def test_resize_equals_full_svd_truncation():
    patches = {
        "unet.a": _lora(96, 80, 16, alpha=4.0, seed=1),
        "unet.conv": _lora(32, 16, 8, alpha=8.0, k=3, seed=2),
        "unet.tucker": _tucker(24, 12, 6, 3, alpha=3.0, seed=3),
        "unet.noalpha": _lora(40, 200, 12, seed=4, dtype=torch.float64),
    }
    a = Adapter(patches=patches)
    k = 5
    out, report = loradex.resize(a, rank=k)
    assert set(report.modules) == set(patches) and not report.kept
    for name, p in patches.items():
        dense = p.delta().double().reshape(p.shape[0], -1)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)  # kohya's way: SVD of up @ down
        want = (u[:, :k] * s[:k]) @ vh[:k]
        q = out.patches[name]
        assert q.kind == "lora" and q.rank == k and q.mid is None and q.up.dtype == p.up.dtype
        assert tuple(q.delta().shape) == tuple(p.shape)
        assert q.scale == pytest.approx(p.scale)  # alpha = scale * new rank
        got = q.delta().double().reshape(p.shape[0], -1)
        s_got = torch.linalg.svdvals(got)[:k]
        assert torch.allclose(s_got, s[:k], rtol=1e-5, atol=0), name
        assert rel(got, want) <= 1e-5, name
        m = report.modules[name]
        assert (m["old_rank"], m["new_rank"]) == (p.rank, k)
        assert m["energy"] == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()), rel=1e-6)
        assert m["error"] == pytest.approx(rel(want, dense), rel=1e-6)


def test_dynamic_policies_pick_the_documented_ranks():
    spectrum = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    S = torch.tensor(spectrum)
    # S^2 = 64, 16, 4, 1, .25, .0625 (85.3125): fro 0.9 -> 0.81 * 85.31 = 69.1 -> k = 2; fro 0.8 -> 54.6 -> 1
    # ratio 4 -> S > 2 (strict) -> 2; ratio 3 -> S > 2.67 -> 2; ratio 5 -> S > 1.6 -> 3
    # sum S = 15.75: cumulative 0.9 -> 14.175 -> cumsum 8, 12, 14, 15 -> 4; cumulative 12/15.75 exactly -> 2
    cases = [
        (dict(fro=0.9), 2), (dict(fro=0.8), 1), (dict(fro=1.0), 6), (dict(ratio=4), 2), (dict(ratio=3), 2),
        (dict(ratio=5), 3),
        (dict(cumulative=0.9), 4), (dict(cumulative=12 / 15.75), 2), (dict(fixed=4), 4),
        (dict(fixed=1, cumulative=0.9), 1),
    ]
    for kw, want in cases:
        assert rank_for(S, **kw) == want, kw  # kohya's resize_lora would give want + 1
    a = Adapter(patches={"unet.x": _lora(64, 48, 6, alpha=3.0, spectrum=spectrum, dtype=torch.float64)})
    boundary = ({"ratio": 4}, {"cumulative": 12 / 15.75})  # ties: exact only on the exact spectrum
    for kw, want in cases:
        if kw in boundary:
            continue
        if "fixed" in kw:
            kw = {"rank": kw.pop("fixed"), **kw}
        out, report = loradex.resize(a, **kw)
        if want == 6:
            assert report.kept and "unet.x" not in report.modules
            assert out.patches["unet.x"] is a.patches["unet.x"]
            continue
        assert report.modules["unet.x"]["new_rank"] == want, kw
        assert out.patches["unet.x"].rank == want
        assert out.patches["unet.x"].scale == pytest.approx(0.5)  # alpha 3 / rank 6 kept


def test_resize_policy_errors():
    a = Adapter(patches={"unet.x": _lora(8, 8, 4)})
    for kw in (dict(), dict(fro=0.9, ratio=2), dict(rank=0), dict(fro=1.5), dict(ratio=-1)):
        with pytest.raises(loradex.LoradexError):
            loradex.resize(a, **kw)


# ---- merge --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refs(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_refs")
    return {label: make_lycoris_reference(bench, label, d, seed=i).path for i, label in enumerate(WEIGHTS)}


def _weighted_sum(items) -> dict[str, torch.Tensor]:
    want: dict[str, torch.Tensor] = {}
    for a, w in items:
        for name, p in a.patches.items():
            d = p.delta().double() * w
            want[name] = want[name] + d.reshape(want[name].shape) if name in want else d
    return want


def test_concat_merge_is_the_weighted_sum(bench, refs):
    items = [(loradex.load(refs[k], arch=bench.arch), w) for k, w in WEIGHTS.items()]
    assert {a.kinds().most_common(1)[0][0] for a, _ in items} == {"lora", "loha", "lokr"}
    merged, report = loradex.merge(items)
    want = _weighted_sum(items)
    assert set(merged.patches) == set(want)
    for name, dw in want.items():
        p = merged.patches[name]
        assert p.kind == "lora" and p.scale == 1.0
        assert p.rank == sum(a.patches[name].to_lora()[0].rank for a, _ in items if name in a.patches)
        assert rel(p.delta().double().reshape(dw.shape), dw) <= 1e-6, name
    assert report.modules and not report.warnings


@pytest.mark.slow
def test_merged_kohya_file_loads_in_the_real_consumers(bench, refs, tmp_path):
    items = [(loradex.load(refs[k], arch=bench.arch), w) for k, w in WEIGHTS.items()]
    merged, _ = loradex.merge(items)
    path = tmp_path / "merged.safetensors"
    wr = loradex.save(merged, path, "kohya", arch=bench.arch)
    assert not wr.dropped and not wr.approximated
    # the reference: the weighted delta sum added by hand to a copy of the UNet
    unet = bench.fresh_unet()
    with torch.no_grad():
        for name, dw in _weighted_sum(items).items():
            assert name.startswith("unet.")
            w = unet.get_submodule(name[len("unet."):]).weight
            w.add_(dw.reshape(w.shape).to(w.dtype))
    y_ref = bench.unet_out(unet)
    assert bench.rel(y_ref, bench.y_base) > 0.01  # the merge really changes the model
    # alpha = rank differs between modules: exact for kohya/A1111/ComfyUI/lycoris as written
    assert bench.rel(consume_lycoris_kohya(bench, path), y_ref) <= 1e-4
    # diffusers' kohya loader keeps only the most common alpha: the uniform-alpha form for it
    upath = tmp_path / "merged_uniform.safetensors"
    loradex.save(merged, upath, "kohya", arch=bench.arch, uniform_alpha=True)
    assert bench.rel(consume_diffusers(bench, upath), y_ref) <= 1e-4


def test_merge_partial_modules_embeddings_and_refusals():
    a = Adapter(patches={"unet.x": _lora(16, 8, 4, alpha=2.0, seed=1), "unet.y": _lora(8, 8, 2, seed=2)},
                embeddings={"sks": Embedding("sks", {"text_encoder": torch.ones(2, 4)})})
    b = Adapter(patches={"unet.x": _lora(16, 8, 3, alpha=6.0, seed=3)},
                embeddings={"sks": Embedding("sks", {"text_encoder": torch.zeros(2, 4)}),
                            "other": Embedding("other", {"text_encoder": torch.full((1, 4), 2.0)})})
    merged, report = loradex.merge([(a, 3.0), (b, -1.0)])
    assert merged.patches["unet.x"].rank == 7 and merged.patches["unet.y"].rank == 2
    assert rel(merged.patches["unet.x"].delta(), 3 * a.patches["unet.x"].delta() - b.patches["unet.x"].delta()) <= 1e-6
    assert rel(merged.patches["unet.y"].delta(), 3 * a.patches["unet.y"].delta()) <= 1e-6
    assert torch.allclose(merged.embeddings["sks"].vectors["text_encoder"], torch.full((2, 4), 1.5))  # (3*1 - 0) / 2
    assert torch.equal(merged.embeddings["other"].vectors["text_encoder"], torch.full((1, 4), 2.0))
    assert len(report.warnings) == 1 and "sks" in report.warnings[0]
    dora = _lora(16, 8, 4)
    dora.dora_scale = torch.ones(16, 1)
    with pytest.raises(loradex.LoradexError, match="DoRA"):
        loradex.merge([(a, 1.0), (Adapter(patches={"unet.x": dora}), 1.0)])
    with pytest.raises(loradex.LoradexError, match="method"):
        loradex.merge([(a, 1.0)], method="ties")


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_resize_and_merge(bench, refs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path / "home"))
    arch = bench.arch.name
    out = tmp_path / "r.safetensors"
    code, stdout, err = run(capsys, "resize", refs["lora"], "-o", out, "--rank", 2, "--arch", arch, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["format"] == "lycoris" and all(m["new_rank"] == 2 for m in d["modules"].values()) and d["modules"]
    assert set(loradex.load(out, arch=arch).ranks()) == {2}
    code, stdout, err = run(capsys, "resize", refs["loha"], "-o", tmp_path / "h.safetensors", "--fro", 0.9,
                            "--to", "kohya", "--arch", arch)
    assert code == 0 and "modules resized" in stdout, err
    # counts add up, no list is cut silently, and what --fro names (the norm share) is printed
    code, js, _ = run(capsys, "resize", refs["loha"], "-o", tmp_path / "h.safetensors", "--fro", 0.9,
                      "--to", "kohya", "--arch", arch, "--json", "--force")
    d = json.loads(js)
    n, kept = len(d["modules"]), len(d["kept"])
    assert f"{n} of {n + kept} modules resized" in stdout
    shown = [ln for ln in stdout.splitlines() if ln.startswith("  ") and "rank" in ln and "->" in ln]
    assert len(shown) == min(n, 20) and (n <= 20 or f"... and {n - 20} more" in stdout)
    assert all(float(ln.split("(norm ")[1].split(")")[0]) >= 0.9 - 1e-4 for ln in shown)
    t0 = time.perf_counter()
    bad(run(capsys, "resize", refs["lora"], "-o", tmp_path / "x.safetensors", "--arch", arch), "policy")
    bad(run(capsys, "resize", refs["lora"], "-o", tmp_path / "x.safetensors", "--fro", 0.5, "--ratio", 2))
    bad(run(capsys, "merge", f"{refs['lora']}:abc", refs["loha"], "-o", tmp_path / "x.safetensors"), "not a number")
    bad(run(capsys, "merge", tmp_path / "missing.safetensors", "-o", tmp_path / "x.safetensors"))
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "x.safetensors").exists()
    m = tmp_path / "m.safetensors"
    code, stdout, err = run(capsys, "merge", f"{refs['lora']}:0.8", f"{refs['loha']}:0.5", f"{refs['lokr']}:-0.3",
                            "-o", m, "--arch", arch, "--json")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["format"] == "lycoris" and d["weights"] == [0.8, 0.5, -0.3]
    items = [(loradex.load(refs[k], arch=arch), w) for k, w in WEIGHTS.items()]
    got = loradex.load(m, arch=arch)
    for name, dw in _weighted_sum(items).items():
        assert rel(got.patches[name].delta().double().reshape(dw.shape), dw) <= 1e-6
