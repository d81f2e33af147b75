"""Trainers (loradex.training, `loradex train`): on the tiny pipeline and a learnable synthetic set
(striped images), each method's loss falls, what it writes loads in the real consumer (diffusers
load_lora_weights / load_textual_inversion / from_pretrained, lycoris-lora) and lowers the
denoising loss on the training data there; TI leaves every other embedding row bit-identical;
--resume equals an uninterrupted run bit for bit."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loradex.training.checkpoint import completion
from loradex.training.loop import TrainConfig, evaluate_loss, save_trained, train

RES = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def stripes(root: Path, n: int = 4, size: int = RES) -> Path:
    """Red/blue vertical stripes (period 8 px) at n phases: one learnable pattern, distinct hashes."""
    root.mkdir(parents=True, exist_ok=True)
    x = np.arange(size)
    for i in range(n):
        s = ((x + 2 * i) // 4) % 2
        a = np.zeros((size, size, 3), np.uint8)
        a[:, :, 0] = (200 * s + 30)[None, :]
        a[:, :, 2] = (200 * (1 - s) + 30)[None, :]
        a[:, :, 1] = 40 + 10 * i
        Image.fromarray(a).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return stripes(tmp_path_factory.mktemp("train") / "data")


def cfg(method: str, **kw) -> TrainConfig:
    base = dict(method=method, steps=40, resolution=RES, rank=4, seed=0, blur_threshold=0.0)
    base.update(kw)
    return TrainConfig(**base)


def fell(losses: list[float], k: int = 10) -> tuple[float, float]:
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def fresh_pipe():
    from loradex.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline()


def expanded(pipe, examples):
    """The examples with prompts as the consumer pipeline expands them (multi-vector TI tokens)."""
    from loradex.training.data import Example

    return [Example(e.path, e.pixels, pipe.maybe_convert_prompt(e.prompt, pipe.tokenizer)) for e in examples]


def test_lora_learns_and_loads_in_diffusers(data, tmp_path):
    import loradex

    res = train(data, cfg("lora", lr=3e-3, text_encoder=True))
    first, last = fell(res.losses)
    assert last < first * 0.97, (first, last)
    base_loss = evaluate_loss(fresh_pipe(), res.examples)
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"lora_{fmt}.safetensors"
        saved = save_trained(res, out, format=fmt)
        a = loradex.load(out, arch="tiny-sd1")
        assert a.kinds() == {"lora": 32 + 2 * 4}  # 32 UNet attention projections + 2 CLIP layers x q/k/v/out
        pipe = fresh_pipe()
        pipe.load_lora_weights(str(out), adapter_name="trained")
        assert evaluate_loss(pipe, res.examples) < base_loss * 0.97, fmt
        md = a.metadata
        assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.trigger_phrase"] == "sks"
        if fmt == "kohya":  # diffusers files carry ModelSpec only
            assert md["ss_network_dim"] == "4" and md["ss_steps"] == "40" and md["ss_network_module"] == "networks.lora"
            assert len(md["ss_loradex_dataset_sha256"]) == 64
        assert saved["paths"] == [str(out)]


def test_resume_equals_uninterrupted_run(data, tmp_path):
    def run(**kw):
        return train(data, cfg("lora", steps=8, lr=3e-3, batch_size=2, dora=True, checkpoint_every=4),
                     work_dir=tmp_path / kw.pop("work"), **kw)

    full = run(work="a")
    assert [Path(c).name for c in full.checkpoints] == ["checkpoint-4", "checkpoint-8"]  # the last, to extend
    resumed = run(work="b", resume=tmp_path / "a" / "checkpoint-4")
    assert resumed.started_step == 4 and resumed.steps_done == 8
    a, b = full.method.state(full.ctx), resumed.method.state(resumed.ctx)
    assert a.keys() == b.keys() and any("magnitude" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.losses == resumed.losses
    # from the run's last checkpoint: nothing left to train, the checkpoint is the result
    assert full.final_checkpoint == str(tmp_path / "a" / "checkpoint-8") and completion(full.final_checkpoint) is None
    again = run(work="b", resume=tmp_path / "a")
    assert again.started_step == again.steps_done == 8 and again.losses == full.losses and again.checkpoints == []
    c = again.method.state(again.ctx)
    assert all(torch.equal(a[k], c[k]) for k in a) and again.final_checkpoint == full.final_checkpoint
    out = tmp_path / "a.safetensors"
    save_trained(again, out)  # writes, then marks the last checkpoint complete
    assert completion(full.final_checkpoint) == {"step": 8, "outputs": [str(out)]}
    from loradex.training.loop import TrainingError

    with pytest.raises(TrainingError, match="other settings"):
        train(data, cfg("lora", steps=8, rank=2, checkpoint_every=4), work_dir=tmp_path / "c",
              resume=tmp_path / "a" / "checkpoint-4")
    with pytest.raises(TrainingError, match="already at step 8 of 6"):
        train(data, cfg("lora", steps=6, lr=3e-3, batch_size=2, dora=True), resume=tmp_path / "a")


def test_ti_only_new_rows_learn_and_load_in_diffusers(data, tmp_path):
    import loradex
    from loradex.tiny import tiny_text_encoder

    res = train(data, cfg("ti", lr=5e-2, num_vectors=2, init_word="x", steps=40))
    first, last = fell(res.losses)
    assert last < first, (first, last)
    te = res.ctx.pipe.text_encoder
    w = te.get_input_embeddings().weight.detach()
    orig = tiny_text_encoder().get_input_embeddings().weight.detach()
    n = orig.shape[0]
    assert w.shape[0] == n + 2 and torch.equal(w[:n], orig)  # every other row bit-identical
    tok = res.ctx.pipe.tokenizer
    init = orig[tok("x", add_special_tokens=False).input_ids].mean(0)
    assert not torch.equal(w[n], init) and not torch.equal(w[n + 1], init)
    for fmt in ("a1111-ti", "diffusers-ti"):
        out = tmp_path / ("sks.pt" if fmt == "a1111-ti" else "learned_embeds.safetensors")
        save_trained(res, out, format=fmt)
        emb = loradex.load(out, arch="tiny-sd1").embeddings["sks"].vectors["text_encoder"]
        assert torch.equal(emb, w[n:])
        pipe = fresh_pipe()
        pipe.load_textual_inversion(str(out), token="sks")
        ex = expanded(pipe, res.examples)
        assert ex[0].prompt.startswith("a photo of sks sks_1")
        trained = evaluate_loss(pipe, ex)
        with torch.no_grad():  # the same consumer with the token at its initial value
            ids = pipe.tokenizer.convert_tokens_to_ids(["sks", "sks_1"])
            pipe.text_encoder.get_input_embeddings().weight[ids] = init
        assert trained < evaluate_loss(pipe, ex), fmt


def test_ti_sdxl_both_encoders(tmp_path):
    import loradex
    from loradex.tiny import tiny_sdxl_pipeline

    d = stripes(tmp_path / "data", n=2)
    pipe = tiny_sdxl_pipeline()
    orig = [e.get_input_embeddings().weight.detach().clone() for e in (pipe.text_encoder, pipe.text_encoder_2)]
    res = train(d, cfg("ti", lr=5e-2, steps=4), pipe=pipe)
    for o, enc in zip(orig, (pipe.text_encoder, pipe.text_encoder_2)):
        w = enc.get_input_embeddings().weight.detach()
        assert torch.equal(w[: o.shape[0]], o) and not torch.equal(w[-1], o[-1])
    out = tmp_path / "sks.safetensors"
    save_trained(res, out, format="kohya-ti")
    from safetensors.torch import load_file

    sd = load_file(out)
    assert set(sd) == {"clip_l", "clip_g"}
    consumer = tiny_sdxl_pipeline()
    consumer.load_textual_inversion(sd["clip_l"], token="sks", text_encoder=consumer.text_encoder,
                                    tokenizer=consumer.tokenizer)
    consumer.load_textual_inversion(sd["clip_g"], token="sks", text_encoder=consumer.text_encoder_2,
                                    tokenizer=consumer.tokenizer_2)
    assert torch.equal(consumer.text_encoder_2.get_input_embeddings().weight[-1],
                       pipe.text_encoder_2.get_input_embeddings().weight[-1])
    assert set(loradex.load(out, arch="tiny-sdxl").embeddings["sks"].vectors) == {"text_encoder", "text_encoder_2"}


def test_lora_sdxl_kohya_file_reproduces_the_trained_unet(tmp_path):
    """SDXL: the trained LoRA written with kohya's SGM names loads in diffusers and gives the trained
    UNet's output (both text encoders' conditioning and the pooled/time-id path are exercised)."""
    from loradex.tiny import tiny_sdxl_pipeline

    d = stripes(tmp_path / "data", n=2)
    res = train(d, cfg("lora", lr=3e-3, steps=6), pipe=tiny_sdxl_pipeline())
    out = tmp_path / "xl.safetensors"
    save_trained(res, out)
    consumer = tiny_sdxl_pipeline()
    consumer.load_lora_weights(str(out), adapter_name="trained")
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}}
    with torch.no_grad():
        y_trained = res.ctx.denoiser(x, torch.tensor([500]), h, **kw).sample
        y_consumer = consumer.unet(x, torch.tensor([500]), h, **kw).sample
        y_base = tiny_sdxl_pipeline().unet(x, torch.tensor([500]), h, **kw).sample
    change = (y_trained - y_base).norm()
    assert change > 0 and (y_consumer - y_trained).norm() < 1e-3 * change


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_kinds_learn_and_load_in_lycoris(data, tmp_path, algo):
    from lycoris import create_lycoris_from_weights

    import loradex

    res = train(data, cfg(algo, lr=3e-3))
    first, last = fell(res.losses)
    assert last < first * 0.97, (first, last)
    out = tmp_path / f"{algo}.safetensors"
    save_trained(res, out, format="lycoris")
    assert loradex.load(out, arch="tiny-sd1").kinds() == {algo: 32}
    pipe = fresh_pipe()
    base_loss = evaluate_loss(pipe, res.examples)
    net, _ = create_lycoris_from_weights(1.0, str(out), pipe.unet)
    net.apply_to()
    assert evaluate_loss(pipe, res.examples) < base_loss * 0.97


def test_pivotal_bundle_and_diffusers_pair(data, tmp_path):
    import loradex

    res = train(data, cfg("pivotal", lr=3e-3, text_lr=5e-2))
    first, last = fell(res.losses)
    assert last < first * 0.97, (first, last)
    bundled = tmp_path / "piv.safetensors"
    save_trained(res, bundled)  # kohya + bundle_emb
    a = loradex.load(bundled, arch="tiny-sd1")
    assert set(a.embeddings) == {"sks"} and a.kinds() == {"lora": 32}
    from safetensors.torch import load_file

    assert "bundle_emb.sks.string_to_param.*" in load_file(bundled)
    saved = save_trained(res, tmp_path / "piv_d.safetensors", format="diffusers")
    lora_path, emb_path = saved["paths"]
    pipe = fresh_pipe()
    base_loss = evaluate_loss(pipe, expanded(pipe, res.examples))
    pipe.load_lora_weights(lora_path, adapter_name="pivotal")
    pipe.load_textual_inversion(emb_path)
    assert evaluate_loss(pipe, expanded(pipe, res.examples)) < base_loss * 0.97


def test_dreambooth_prior_on_and_off(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    off = train(data, cfg("dreambooth", lr=1e-3, steps=30, class_word="pattern"))
    first, last = fell(off.losses)
    assert last < first * 0.97, (first, last)
    out = tmp_path / "db"
    save_trained(off, out)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert evaluate_loss(pipe, off.examples) < evaluate_loss(fresh_pipe(), off.examples) * 0.97
    assert json.loads((out / "loradex_training.json").read_text())["ss_steps"] == "30"
    on = train(data, cfg("dreambooth", lr=1e-3, steps=4, class_word="pattern", prior_preservation=True,
                         num_class_images=2, sample_steps=2), work_dir=tmp_path / "w")
    cached = sorted((tmp_path / "w" / "class_images").glob("*/*.png"))
    assert len(cached) == 2 and len(on.losses) == 4
    stamps = [p.stat().st_mtime_ns for p in cached]
    train(data, cfg("dreambooth", lr=1e-3, steps=1, class_word="pattern", prior_preservation=True,
                    num_class_images=2, sample_steps=2), work_dir=tmp_path / "w")
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # reused from the cache


def test_cli_train_registers_with_lineage(data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from loradex.cli import cli

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(home))
    out = tmp_path / "cli.safetensors"
    res = CliRunner().invoke(cli, ["train", "lora", "--data", str(data), "--token", "sks", "--steps", "3",
                                   "--resolution", str(RES), "--blur-threshold", "0", "--sample-every", "3",
                                   "--checkpoint-every", "3", "--work-dir", str(tmp_path / "work"), "-o", str(out), "--save-as", "face",
                                   "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # stderr may carry library notices
    assert d["steps"] == 3 and len(d["losses"]) == 3 and d["saved_as"]["ref"] == "face@1"
    assert Path(d["samples"][0]).is_file() and out.is_file()
    # marked complete once written and stored
    assert completion(tmp_path / "work" / "checkpoint-3") == {"step": 3, "outputs": [str(out)], "saved_as": "face@1"}
    from loradex.registry import Registry

    lin = Registry().lineage("face")
    text = json.dumps(lin, default=str)
    assert "train" in text and d["dataset_sha256"] in text and '"rank": 4' in text


def test_cli_train_bad_input(tmp_path, capsys):
    from loradex.cli import main

    for args in (["train", "lora", "--data", str(tmp_path / "none"), "--steps", "1", "-o", str(tmp_path / "x")],
                 ["train", "nope", "--data", str(tmp_path), "--steps", "1", "-o", str(tmp_path / "x")],
                 ["train", "lora", "--data", str(tmp_path), "--steps", "1", "-o", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_cli_resume_continues_bit_for_bit(data, tmp_path):
    """The README's flow: train with --checkpoint-every, stop, run again with --resume WORKDIR: the
    written file equals the one an uninterrupted CLI run writes, tensor for tensor."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from loradex.cli import cli

    common = ["train", "lora", "--data", str(data), "--resolution", str(RES), "--blur-threshold", "0",
              "--seed", "3", "--json"]
    full = tmp_path / "full.safetensors"
    r = CliRunner().invoke(cli, [*common, "--steps", "6", "-o", str(full)])
    assert r.exit_code == 0, r.output
    part = tmp_path / "part.safetensors"
    # a finished 3-step run, extended to 6 steps from its last checkpoint
    r = CliRunner().invoke(cli, [*common, "--steps", "3", "--checkpoint-every", "3", "--work-dir", str(tmp_path / "w"),
                                 "-o", str(part)])
    assert r.exit_code == 0, r.output
    resumed = tmp_path / "resumed.safetensors"
    r = CliRunner().invoke(cli, [*common, "--steps", "6", "--resume", str(tmp_path / "w"), "-o", str(resumed)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["resumed_from"] == 3 and d["steps"] == 6
    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_file(part)[k]) for k in a)  # the last 3 steps did change it


#: Run in a subprocess: the CLI, SIGKILLed by itself at a fixed point of a run's end, so no cleanup
#: runs (as when killed from outside) and the point is deterministic: ``after`` the rename that
#: puts TARGET in place (the last checkpoint), or ``before`` it (the output, its temporary file
#: written and fsynced).
_KILLED_CHILD = r"""
import os, signal, sys

import torch

torch.set_num_threads(1)
when, target = sys.argv[1], os.path.abspath(sys.argv[2])
real_replace = os.replace


def replace(src, dst, *args, **kw):
    hit = os.path.abspath(os.fspath(dst)) == target
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kw)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = replace
from loradex.cli import main

main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["last-checkpoint", "output-rename"])
def test_killed_run_resumes_to_its_output(data, tmp_path, kill_at):
    """Issue 12: a run killed after its last checkpoint and before its output exists. --resume
    writes the output (nothing is retrained), its tensors equal an uninterrupted run's, and the
    last checkpoint is marked complete only once the output exists."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from loradex.cli import cli

    common = ["train", "lora", "--data", str(data), "--resolution", str(RES), "--blur-threshold", "0", "--seed", "5",
              "--steps", "4", "--checkpoint-every", "2", "--json"]
    full = tmp_path / "full.safetensors"
    r = CliRunner().invoke(cli, [*common, "--work-dir", str(tmp_path / "wf"), "-o", str(full)])
    assert r.exit_code == 0, r.output
    assert completion(tmp_path / "wf" / "checkpoint-4") == {"step": 4, "outputs": [str(full)]}
    full_losses = json.loads(r.stdout)["losses"]

    out, work = tmp_path / "out.safetensors", tmp_path / "w"
    when, target = ("after", work / "checkpoint-4") if kill_at == "last-checkpoint" else ("before", out)
    p = subprocess.run([sys.executable, "-c", _KILLED_CHILD, when, str(target), *common, "--work-dir", str(work),
                        "-o", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert (work / "checkpoint-4" / "state.json").is_file() and not out.exists()
    assert completion(work / "checkpoint-4") is None  # the output does not exist: not complete
    if kill_at == "output-rename":  # written whole to its temporary file, never visible half-written
        assert len(list(tmp_path.glob(".out.safetensors.*.tmp"))) == 1

    r = CliRunner().invoke(cli, [*common, "--work-dir", str(work), "--resume", str(work), "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["resumed_from"] == 4 and d["steps"] == 4 and d["losses"] == full_losses and d["checkpoints"] == []
    a, b = load_file(full), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert completion(work / "checkpoint-4") == {"step": 4, "outputs": [str(out)]}


def test_training_package_has_no_import_circle_and_small_modules():
    """Issue 11: the training rooms import one way (config <- context <- objective, checkpoint,
    methods <- output <- loop), with lazy imports counted too, and no module grows past ~600 lines."""
    import loradex.training
    from test_layout import cycles, import_graph  # the package-wide checker, on the training rooms

    root = Path(loradex.training.__file__).parent
    graph = {m: {d for d in deps if d.startswith("loradex.training")}
             for m, deps in import_graph(lazy=True).items() if m.startswith("loradex.training")}
    assert cycles(graph) == [], cycles(graph)
    assert "loradex.training.loop" not in set().union(*(graph[m] for m in graph if m != "loradex.training"))
    sizes = {f.name: len(f.read_text().splitlines()) for f in root.rglob("*.py")}
    assert max(sizes.values()) <= 600, sizes
    demo = ast.parse((root.parent / "demo.py").read_text())
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "lycoris_preset" for n in demo.body)
    from loradex.training.methods import lycoris

    assert not any("loradex.demo" in ast.unparse(n) for n in ast.walk(ast.parse(Path(lycoris.__file__).read_text()))
                   if isinstance(n, (ast.Import, ast.ImportFrom)))


def test_find_checkpoint_uses_the_old_copy_a_crash_left_alone(tmp_path):
    """``replace_folder`` renames ``checkpoint-N`` aside before moving the new one in: a crash
    between the two renames leaves only ``checkpoint-N.old`` (complete), which resume must use;
    a lone ``.tmp`` (maybe half-written) is never used."""
    from loradex.training.checkpoint import STATE, find_checkpoint

    for name in ("checkpoint-2", "checkpoint-4.old", "checkpoint-6.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE).write_text("{}")
    assert find_checkpoint(tmp_path).name == "checkpoint-4.old"
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / STATE).write_text("{}")
    assert find_checkpoint(tmp_path).name == "checkpoint-4"
