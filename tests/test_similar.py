"""Sketches, ``loradex similar``, ``loradex conflicts`` and ``inspect --quality``.

Adapters are made by the real tools on the tiny SD model (lycoris-lora's LoRA/LoHa/LoKr, peft + diffusers'
``save_lora_weights``) and their near-duplicates the ways they occur in the wild: the metadata edited, cast
to fp16, converted to another format (``loradex.convert``), resized from rank 32 to 24 (``loradex.resize``),
and re-saved with another alpha and the scale folded into the factors. Every near-duplicate must rank
above every unrelated adapter of the same base.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loradex
from cli_util import bad, run
from loradex.core.adapter import Adapter
from loradex.core.kinds import FullPatch
from loradex.core.kinds.lora import LoraPatch
from loradex.core.quality import quality, spectrum_stats
from loradex.core.sketch import (
    adapter_forms,
    estimate_cosine,
    estimate_group,
    exact_cosine,
    inner,
    projections,
    singular_values,
    sketch_adapter,
    update_form,
)
from loradex.demo import lycoris_preset, make_peft_reference, randomize_
from loradex.merge.blocks import apply_block_weights, block_of
from loradex.merge.conflicts import conflicts

pytestmark = pytest.mark.usefixtures("one_thread")


def _lycoris(bench, out, name, seed, algo="lora", dim=32, alpha=16.0, **kw):
    """A LyCORIS adapter on every Linear/Conv2d of the tiny UNet, every factor randomized."""
    from lycoris import create_lycoris

    from loradex.log import quiet

    unet = bench.fresh_unet()
    with quiet(), lycoris_preset({"target_module": ["Linear", "Conv2d"], "target_name": []}):
        net = create_lycoris(unet, 1.0, linear_dim=dim, linear_alpha=alpha, conv_dim=dim, conv_alpha=alpha,
                             algo=algo, **kw)
        net.apply_to()
    randomize_(net, seed)
    path = out / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_output_name": name})
    return path


@pytest.fixture(scope="module")
def family(bench, tmp_path_factory):
    """``near``: the near-duplicates of ``base``; ``far``: unrelated adapters on the same base."""
    d = tmp_path_factory.mktemp("similar")
    base = _lycoris(bench, d, "base", seed=1)
    a = loradex.load(base)
    near = {}
    # metadata edited by hand (another title and trigger), tensors untouched
    t = load_file(str(base))
    near["edited"] = d / "edited.safetensors"
    save_file(t, str(near["edited"]), metadata={"ss_output_name": "my renamed lora", "modelspec.title": "x"})
    near["fp16"] = d / "fp16.safetensors"
    loradex.convert(base, near["fp16"], to="kohya", dtype="fp16")
    near["diffusers"] = d / "diffusers.safetensors"
    loradex.convert(base, near["diffusers"], to="diffusers")
    near["peft"] = d / "peft"
    loradex.convert(base, near["peft"], to="peft")
    resized, rep = loradex.resize(a, rank=24)
    assert rep.modules and max(m["new_rank"] for m in rep.modules.values()) == 24
    near["resized"] = d / "resized.safetensors"
    loradex.save(resized, near["resized"], "kohya")
    folded = Adapter(patches={n: p.fold_alpha("sqrt") for n, p in a.patches.items()}, arch=a.arch)
    assert all(float(p.alpha) == p.rank for p in folded.patches.values())
    near["alpha"] = d / "alpha.safetensors"
    loradex.save(folded, near["alpha"], "kohya")
    far = {
        "other": _lycoris(bench, d, "other", seed=2),
        "rank4": _lycoris(bench, d, "rank4", seed=3, dim=4, alpha=2.0),
        "loha": _lycoris(bench, d, "loha", seed=4, algo="loha", dim=4, alpha=2.0),
        "lokr": _lycoris(bench, d, "lokr", seed=5, algo="lokr", dim=4, alpha=2.0, factor=4),
        "peftlora": make_peft_reference(bench, d, seed=6).path,
    }
    return {"dir": d, "base": base, "near": near, "far": far}


# ---- the math: sketches and exact inner products against dense references ----------------------------
def _dense(f):
    m = f.weight().double()
    b = f.bias.double() if f.bias is not None else torch.zeros(f.out, dtype=torch.float64)
    return torch.cat([m, b[:, None]], 1)


def test_exact_forms_match_dense_updates(family):
    """Norms, inner products and spectra from the factors equal the dense ones, every kind."""
    adapters = {k: loradex.load(family["far"][k]) for k in ("other", "loha", "lokr")}
    adapters["full"] = Adapter(patches={"x": FullPatch(diff=torch.randn(16, 8, 3, 3),
                                                                         diff_b=torch.randn(16))})
    for label, a in adapters.items():
        forms, skipped = adapter_forms(a)
        assert not skipped, label
        for name, f in list(forms.items())[:12]:
            p = a.patches[name]
            d = p.delta().double().reshape(f.out, -1)
            ref = _dense(f)
            assert torch.allclose(d, ref[:, :-1], rtol=1e-4, atol=1e-6), (label, name)
            assert f.sq_norm() == pytest.approx(float(ref.square().sum()), rel=1e-5), (label, name)
            s = singular_values(f)
            s_ref = torch.linalg.svdvals(d)
            n = min(len(s), len(s_ref))
            assert torch.allclose(s[:n], s_ref[:n], rtol=1e-4, atol=1e-6 * float(s_ref[0])), (label, name)
    fo, _ = adapter_forms(adapters["other"])
    fh, _ = adapter_forms(adapters["loha"])
    fk, _ = adapter_forms(adapters["lokr"])
    for name in list(fo)[:10]:
        for g in (fh, fk, fo):
            if name in g:
                want = float((_dense(fo[name]) * _dense(g[name])).sum())
                assert inner(fo[name], g[name]) == pytest.approx(want, rel=1e-4, abs=1e-6), name
    # two LoKr updates with the same halves: <kron(a1, a2), kron(b1, b2)> = <a1, b1> <a2, b2>
    ka = next(iter(fk.values()))
    kb = update_form(type(next(iter(adapters["lokr"].patches.values()))).from_tensors(
        {k: v * 0.5 + 0.1 for k, v in next(iter(adapters["lokr"].patches.values())).tensors().items()}))[0]
    assert ka.form == kb.form == "kron"
    assert inner(ka, kb) == pytest.approx(float((_dense(ka) * _dense(kb)).sum()), rel=1e-4)


def test_projections_depend_only_on_family_shape_seed():
    h1, g1 = projections("sd1", 320, 768)
    h2, g2 = projections("sd1", 320, 768)
    assert torch.equal(h1, h2) and torch.equal(g1, g2)
    h3, _ = projections("sdxl", 320, 768)
    assert not torch.equal(h1, h3)
    assert torch.allclose(h1.abs(), torch.full_like(h1, 1 / math.sqrt(h1.shape[1])))
    assert 0.4 < float((h1 > 0).float().mean()) < 0.6
    # E[G G^T] = I: the Rademacher columns are scaled so that sketches preserve inner products
    _, g = projections("sd1", 8, 4000)
    assert float((g * g).sum(1).mean()) == pytest.approx(1.0)
    # a side no longer than the sketch is kept exactly (identity)
    h, g = projections("sd1", 6, 2)
    assert torch.equal(h, torch.eye(6, h.shape[1])) and torch.equal(g, torch.eye(3, g.shape[1]))


def test_estimator_tracks_the_exact_cosine(family):
    """Pairs with a known cosine: the estimate is within the documented noise of the exact value."""
    a = loradex.load(family["base"])
    b = loradex.load(family["far"]["other"])
    sa, sb = sketch_adapter(a), sketch_adapter(b)
    fa, _ = adapter_forms(a)
    fb, _ = adapter_forms(b)
    for t in (0.0, 0.3, 0.7, -0.5):
        # c = t a + (1 - |t|) b: an adapter whose cosine with a is anywhere between -1 and 1
        mix = Adapter(patches={n: LoraPatch(up=torch.cat([p.factors()[0] * p.scale * t,
                                                          b.patches[n].factors()[0] * b.patches[n].scale * (1 - abs(t))], 1),
                                            down=torch.cat([p.factors()[1], b.patches[n].factors()[1]], 0))
                               for n, p in a.patches.items()}, arch=a.arch)
        fm, _ = adapter_forms(mix)
        exact = exact_cosine(fa, fm).cosine
        est = estimate_cosine(sa, sketch_adapter(mix)).cosine
        assert abs(est - exact) < 0.08, (t, est, exact)
    assert abs(exact_cosine(fa, fb).cosine) < 0.05
    assert abs(estimate_cosine(sa, sb).cosine) < 0.1
    # the batched estimator of the search (candidates sharing their keys) is the same estimator,
    # also when the query has other modules (a peft LoRA on a subset of them)
    sp = sketch_adapter(loradex.load(family["far"]["peftlora"]))
    for q in (sa, sp):
        cos, n = estimate_group(q, sb.keys, np.stack([sb.norms, sa.norms]), np.stack([sb.units, sa.units]))
        want = [estimate_cosine(q, sb), estimate_cosine(q, sa)]
        assert np.allclose(cos, [w.cosine for w in want], atol=1e-6) and list(n) == [w.modules for w in want]


def test_base_dependent_kinds_are_skipped_or_partial(bench, tmp_path):
    unet = bench.pipe.unet.state_dict()

    def weights(name):
        return unet[name.removeprefix("unet.") + ".weight"]

    for algo, want in (("ia3", "skipped"), ("dora", "partial"), ("glora", "partial"), ("diag-oft", "skipped")):
        kw = {"dora_wd": True} if algo == "dora" else {"constraint": 0.0} if algo == "diag-oft" else {}
        p = _lycoris(bench, tmp_path, algo, seed=7, algo="lora" if algo == "dora" else algo, dim=4, alpha=2.0, **kw)
        a = loradex.load(p)
        s = sketch_adapter(a)
        if want == "skipped":
            assert s.modules == 0 and len(s.skipped) == len(a.patches)
            assert all("base weight" in why for why in s.skipped.values())
        else:
            assert s.modules == len(a.patches) and len(s.partial) == len(a.patches), algo
        # with the base weights every module is whole
        s2 = sketch_adapter(a, base_weights=weights)
        assert s2.modules == len(a.patches) and not s2.partial and not s2.skipped, algo


# ---- similar -------------------------------------------------------------------------------------------
def test_near_duplicates_rank_above_unrelated(family, home):
    from loradex.registry import sketches

    reg = loradex.Registry()
    reg.add(family["base"], name="base")
    for k, p in {**family["near"], **family["far"]}.items():
        reg.add(p, name=k)
    # add stored every sketch (the hook in Registry.add): reindex finds nothing to do, and redoes
    # them all when forced
    done = sketches.reindex(reg)
    assert done["sketched"] == [] and not done["none"]
    done = sketches.reindex(reg, force=True)
    assert len(done["sketched"]) == 1 + len(family["near"]) + len(family["far"]) and not done["none"]
    assert sketches.reindex(reg) == {"sketched": [], "none": {}, "dropped": 0, "checked": done["checked"]}
    rep = sketches.similar(reg, "base", top=20, exact=True)
    scores = {h.name: h.cosine for h in rep.hits}
    assert set(scores) == set(family["near"]) | set(family["far"])
    near = {k: scores[k] for k in family["near"]}
    far = {k: scores[k] for k in family["far"]}
    assert min(near.values()) > max(far.values()), (near, far)
    for k in ("edited", "fp16", "diffusers", "peft", "alpha"):
        assert near[k] > 0.99, (k, near[k])
    assert near["resized"] > 0.85
    assert all(abs(v) < 0.15 for v in far.values()), far
    exact = {h.name: h.exact["cosine"] for h in rep.hits}
    for k, v in scores.items():
        assert abs(v - exact[k]) < 0.08, (k, v, exact[k])
    # the resized copy: exactly sqrt(kept energy) (the truncation is orthogonal to what it keeps)
    assert 0.85 < exact["resized"] < 0.999
    assert all(h.modules == len(loradex.load(family["base"]).patches) for h in rep.hits if h.name in near)
    # a LoHa and its exact LoRA in diffusers format are the same update
    loha_diff = family["dir"] / "loha_diffusers.safetensors"
    loradex.convert(family["far"]["loha"], loha_diff, to="diffusers")
    sketches.store_sketch(reg, reg.add(loha_diff, name="loha-diffusers"))  # the hook add will call
    hits = sketches.similar(reg, "loha", top=3).hits
    assert hits[0].name == "loha-diffusers" and hits[0].cosine > 0.99
    # a removed version disappears; its row goes
    reg.remove("fp16")
    hits = sketches.similar(reg, "base", top=20).hits
    assert "fp16" not in {h.name for h in hits}
    assert sketches.reindex(reg)["dropped"] == 0  # similar already dropped the stale row


def test_signature_packs(family, home, monkeypatch):
    """The scan reads a family's signatures from its pack plus the rows added since; replacing or
    deleting a row drops the pack; every path gives the same hits."""
    from loradex.registry import sketches

    monkeypatch.setattr(sketches, "PACK_TAIL", 1)
    reg = loradex.Registry()
    for k, p in [("base", family["base"]), *family["near"].items(), *family["far"].items()][:8]:
        sketches.store_sketch(reg, reg.add(p, name=k))
    conn = sketches.connection(reg)

    def hits():
        sketches._SCANS.clear()
        return [(h.ref, round(h.cosine, 6)) for h in sketches.similar(reg, "base", top=10).hits]

    first = hits()
    assert conn.execute("SELECT count(*) FROM sketch_packs").fetchone()[0] == 1  # packed by that scan
    assert hits() == first  # from the pack
    sketches.store_sketch(reg, reg.add(family["far"]["lokr"], name="late"))  # in the tail
    with_late = hits()
    assert ("late@1" in dict(with_late)) and conn.execute("SELECT count(*) FROM sketch_packs").fetchone()[0] == 1
    sketches.forget(reg, [reg.get("late").id])
    assert conn.execute("SELECT count(*) FROM sketch_packs").fetchone()[0] == 0  # dropped
    assert hits() == first


def test_store_sketch_hook_and_planned_structures(family, home):
    """``store_sketch`` (the hook for add) stores a row; the second file of a structure is sketched
    straight from its bytes, with the same result as through the reader."""
    from loradex.registry import sketch_plans, sketches

    reg = loradex.Registry()
    v1 = reg.add(family["base"], name="a")
    s1 = sketches.store_sketch(reg, v1)
    assert s1 is not None and sketches.stored_sketch(reg, v1) is not None
    v2 = reg.add(family["far"]["other"], name="b")
    key = sketch_plans._structure_key(reg, v2)
    assert key is not None and sketch_plans._PLANS.get(key[0])  # learned from a@1 (same structure)
    planned = sketches.store_sketch(reg, v2)
    a = loradex.load(family["far"]["other"])
    direct = sketch_adapter(a)
    assert (planned.keys == direct.keys).all()
    assert torch.allclose(torch.from_numpy(planned.norms), torch.from_numpy(direct.norms), rtol=1e-5)
    assert float(abs(planned.units - direct.units).max()) < 1e-5
    # the same bytes under another name reuse the row
    v3 = reg.add(family["far"]["other"], name="c")
    s3 = sketches.store_sketch(reg, v3)
    assert (s3.keys == planned.keys).all()
    # the hook for remove
    assert sketches.forget(reg, [v3.id]) == 1 and sketches.stored_sketch(reg, v3) is None
    assert sketches.stored_sketch(reg, v2) is not None


def test_similar_cli(family, home, capsys):
    for name, p in (("base", family["base"]), ("fp16", family["near"]["fp16"]), ("other", family["far"]["other"]),
                    ("loha", family["far"]["loha"])):
        assert run(capsys, "add", p, "--name", name)[0] == 0
    code, out, err = run(capsys, "similar", "base", "--top", "2", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert [h["ref"] for h in d["hits"]][0] == "fp16@1" and d["hits"][0]["cosine"] > 0.99
    # add stored every sketch already: nothing left for similar's reindex
    assert len(d["hits"]) == 2 and d["reindexed"]["sketched"] == [] and d["scanned"] == 3
    # search --similar-to: the text search filtered and ordered by the same estimate
    code, out, err = run(capsys, "search", "--similar-to", "base", "--json")
    assert code == 0, err
    found = json.loads(out)
    assert [f["ref"] for f in found][0] == "fp16@1" and found[0]["cosine"] > 0.99
    assert [f["cosine"] for f in found] == sorted((f["cosine"] for f in found), reverse=True)
    code, out, _ = run(capsys, "similar", "base", "--exact")
    assert code == 0 and "fp16@1" in out and "exact" in out
    # a file that is not stored
    code, out, _ = run(capsys, "similar", family["near"]["diffusers"], "--json")
    d = json.loads(out)
    assert code == 0 and {d["hits"][0]["ref"], d["hits"][1]["ref"]} == {"base@1", "fp16@1"}
    # conflicts of stored versions (REFs), one with a weight
    code, out, err = run(capsys, "conflicts", "base", "other:0.5", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["pairs"]["base|other"]["modules"] == 83 and d["weights"] == [1.0, 0.5] and not d["fights"]
    bad(run(capsys, "similar", "nosuch"), "nosuch")
    bad(run(capsys, "similar", "base", "--top", "0"))


# ---- conflicts -----------------------------------------------------------------------------------------
def test_conflicts_find_a_planted_overlap(family, tmp_path, capsys):
    """B gets A's update in the mid block (M00) and its negative in OUT01: exactly those two blocks
    fight, and the suggested block weights remove both."""
    a = loradex.load(family["base"])
    b = loradex.load(family["far"]["other"])
    arch = a.arch
    planted = dict(b.patches)
    for n, p in a.patches.items():
        blk = block_of(arch, n)
        if blk == "M00":
            planted[n] = p
        elif blk == "OUT01":
            planted[n] = p.scaled(-1.0)
    bp = tmp_path / "planted.safetensors"
    loradex.save(Adapter(patches=planted, arch=arch), bp, "kohya")
    rep = conflicts([("A", a, 1.0), ("B", loradex.load(bp), 1.0)])
    fights = {f["block"]: f for f in rep.fights}
    assert set(fights) == {"M00", "OUT01"}, rep.fights
    assert fights["M00"]["kind"] == "overlapping" and fights["M00"]["cosine"] > 0.999
    assert fights["OUT01"]["kind"] == "opposing" and fights["OUT01"]["cosine"] < -0.999
    for blk, info in rep.blocks.items():
        if blk not in fights and blk != "outside":
            assert abs(info["pairs"]["A|B"]["overlap"]) < 0.1, blk
    assert rep.remaining < 0.1
    dropped = {x for v in rep.dropped.values() for x in v}
    assert dropped == {"M00", "OUT01"}
    # the suggestion is valid `merge ... IN:W:BLOCKS` syntax and removes the fights
    label = next(k for k, v in rep.suggestion.items() if v)
    fixed, _ = apply_block_weights({"A": a, "B": loradex.load(bp)}[label], rep.suggestion[label])
    other = "B" if label == "A" else "A"
    rep2 = conflicts([(label, fixed, 1.0), (other, {"A": a, "B": loradex.load(bp)}[other], 1.0)])
    assert not rep2.fights
    # end to end
    code, out, err = run(capsys, "conflicts", family["base"], bp, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {f["block"] for f in d["fights"]} == {"M00", "OUT01"} and d["merge_args"]
    merged = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", *d["merge_args"], "-o", merged)
    assert code == 0, err
    code, out, _ = run(capsys, "conflicts", f"{family['base']}:0.5", bp)
    assert code == 0 and "M00" in out and "loradex merge" in out
    bad(run(capsys, "conflicts", family["base"]), "two")


# ---- quality --------------------------------------------------------------------------------------------
def test_quality_flags_dead_outlier_and_nonfinite(family, tmp_path, capsys):
    a = loradex.load(family["far"]["rank4"])
    names = sorted(a.patches)
    dead, outlier, nan = names[3], names[10], names[20]
    p = dict(a.patches)
    p[dead] = LoraPatch(up=torch.zeros_like(p[dead].up), down=p[dead].down, alpha=p[dead].alpha)
    p[outlier] = p[outlier].scaled(100.0)
    up = p[nan].up.clone()
    up.view(-1)[0] = float("nan")
    p[nan] = LoraPatch(up=up, down=p[nan].down, alpha=p[nan].alpha)
    f = tmp_path / "bad.safetensors"
    loradex.save(Adapter(patches=p, arch=a.arch), f, "kohya")
    rep = quality(loradex.load(f))
    assert rep.flags == {"dead": [dead], "outlier": [outlier], "nonfinite": [nan]}
    m = rep.modules[names[0]]
    s_ref = torch.linalg.svdvals(a.patches[names[0]].delta().double().reshape(m["shape"][0], -1))
    assert torch.allclose(torch.tensor(m["spectrum"], dtype=torch.float64), s_ref[: len(m["spectrum"])], rtol=1e-4)
    assert 1 <= m["effective_rank"] <= 4 and 1 <= m["rank99"] <= 4 and 0.5 <= m["energy_half"] <= 1
    code, out, err = run(capsys, "inspect", f, "--quality", "--json")
    assert code == 0, err
    q = json.loads(out)["quality"]
    assert q["flags"] == {"dead": [dead], "outlier": [outlier], "nonfinite": [nan]}
    assert len(q["modules"]) == len(names)
    code, out, _ = run(capsys, "inspect", f, "--quality")
    assert code == 0 and f"dead: {dead}" in out and f"outlier: {outlier}" in out and "eff. rank" in out


def test_quality_relative_to_the_base(family, bench, tmp_path, capsys):
    from loradex.log import quiet

    a = loradex.load(family["far"]["rank4"])
    sd = bench.pipe.unet.state_dict()
    rep = quality(a, base_weights=lambda n: sd[n.removeprefix("unet.") + ".weight"])
    assert rep.scale == "rel_base"
    for n, m in list(rep.modules.items())[:5]:
        w = sd[n.removeprefix("unet.") + ".weight"].double()
        assert m["rel_base"] == pytest.approx(m["norm"] / float(w.norm()), rel=1e-9)
    # --base a diffusers folder: its weights are read module by module
    base = tmp_path / "base"
    with quiet():
        bench.pipe.save_pretrained(base)
    code, out, err = run(capsys, "inspect", family["far"]["rank4"], "--quality", "--base", base, "--json")
    assert code == 0, err
    q = json.loads(out)["quality"]
    assert q["scale"] == "rel_base" and q["summary"]["median_rel_base"] > 0
    name = next(iter(rep.modules))
    assert q["modules"][name]["rel_base"] == pytest.approx(rep.modules[name]["rel_base"], rel=1e-5)
    code, out, _ = run(capsys, "inspect", family["far"]["rank4"], "--quality", "--base", base)
    assert code == 0 and "vs base:" in out


def test_spectrum_stats_definitions():
    st = spectrum_stats(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert st["effective_rank"] == pytest.approx(4.0) and st["rank99"] == 4 and st["energy_half"] == pytest.approx(0.5)
    st = spectrum_stats(torch.tensor([10.0, 0.0, 0.0]), r=2)
    assert st["effective_rank"] == pytest.approx(1.0) and st["rank99"] == 1 and st["energy_half"] == 1.0
