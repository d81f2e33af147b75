"""Hugging Face Hub: push (``--dry-run`` folder, and a real ``huggingface_hub`` upload whose HTTP
layer alone is replaced by an in-memory transport) and pull (``snapshot_download`` from a local
cache built here, ``HF_HUB_OFFLINE=1``). No test touches the network."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loradex
from loradex import Registry, RegistryError
from loradex.demo import make_lycoris_reference
from loradex.log import quiet
from test_registry import REPO, child_env, cli, ok

SECRET = "hf_loradexTestTokenThatMustNeverBePrinted"
BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def adapters(bench, tmp_path_factory):
    d = tmp_path_factory.mktemp("hub_refs")
    return {label: make_lycoris_reference(bench, label, d, seed=i) for i, label in enumerate(("lora", "loha"))}


@pytest.fixture
def reg(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("LORADEX_HOME", str(h))
    r = Registry()
    yield r
    r.close()


class FakeHub:
    """The Hub's HTTP endpoints that create_repo / create_commit call, answered in memory."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}

    def __call__(self, request):
        import httpx2

        path = request.url.path
        self.requests.append((request.method, path, dict(request.headers)))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            rid = f"{body.get('organization')}/{body['name']}"
            self.repos[rid] = body
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{rid}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                        for f in files]})
        if "/commit/" in path:
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/face/commit/" + "c" * 40,
                                              "commitOid": "c" * 40, "success": True})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    """Only huggingface_hub's network layer is replaced: its shared httpx2 client gets a mock
    transport (``set_client_factory``, huggingface_hub's own hook); everything above is real."""
    import httpx2
    from huggingface_hub.utils import _http

    hub = FakeHub()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def _card(path: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def test_push_dry_run_writes_the_upload_folder_with_a_card(reg, adapters, bench, tmp_path, capsys):
    reg.add(adapters["lora"].path, "face", trigger_words=["sks person"], labels=["portrait"], base_model=BASE,
            description="My face, trained on 12 selfies.")
    out = tmp_path / "upload"
    r = ok(cli(capsys, "push", "face", "--repo-id", "me/face-lora", "--dry-run", "-o", out, "--json")).json()
    assert r["files"] == ["README.md", "pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == r["files"]
    card = _card(out / "README.md")
    assert card["base_model"] == BASE and card["library_name"] == "diffusers"
    assert card["instance_prompt"] == "sks person" and card["widget"] == [{"text": "sks person"}]
    assert {"text-to-image", "diffusers", "lora", "template:sd-lora", "portrait"} <= set(card["tags"])
    assert card["license"]
    text = (out / "README.md").read_text()
    assert "My face, trained on 12 selfies." in text and 'load_lora_weights("me/face-lora"' in text
    # the weights load in diffusers and reproduce the reference
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors", adapter_name="face")
    assert bench.rel(bench.unet_out(pipe.unet), adapters["lora"].y_ref) < 1e-4
    # --to kohya keeps LyCORIS kinds (LoHa cannot be a diffusers file without conversion)
    reg.add(adapters["loha"].path, "style")
    out2 = tmp_path / "upload2"
    ok(cli(capsys, "push", "style", "--repo-id", "me/style", "--to", "kohya", "--dry-run", "-o", out2))
    assert sorted(p.name for p in out2.iterdir()) == ["README.md", "style.safetensors"]
    assert set(loradex.load(out2 / "style.safetensors").kinds()) == {"loha"}
    assert "lycoris" in _card(out2 / "README.md")["tags"]
    r = cli(capsys, "push", "face", "--repo-id", "me/face-lora", "--dry-run")
    assert r.code == 2 and "-o DIR" in r.err
    r = cli(capsys, "push", "face", "--repo-id", "not a repo id!", "--dry-run", "-o", tmp_path / "x")
    assert r.code == 2 and "bad repo id" in r.err


def test_push_uploads_exactly_the_dry_run_folder_and_never_shows_the_token(reg, adapters, tmp_path, fake_hub, capsys):
    reg.add(adapters["lora"].path, "face", trigger_words=["sks person"], base_model=BASE)
    dry = tmp_path / "dry"
    ok(cli(capsys, "push", "face", "--repo-id", "me/face-lora", "--dry-run", "-o", dry))
    assert fake_hub.requests == []  # a dry run talks to nobody
    r = cli(capsys, "push", "face", "--repo-id", "me/face-lora", "--private", "--json")
    ok(r)
    assert SECRET not in r.out + r.err
    res = r.json()
    assert res["url"] == "https://huggingface.co/me/face-lora" and res["commit"] == "c" * 40
    assert fake_hub.repos["me/face-lora"]["visibility"] == "private"
    # exactly the dry-run folder went up
    assert fake_hub.files == {p.name: p.read_bytes() for p in dry.iterdir()}
    # the token came from huggingface_hub's usual place (HF_TOKEN) and was sent, not stored
    writes = [h for m, path, h in fake_hub.requests if m == "POST"]
    assert len(writes) == 4 and all(h.get("authorization") == f"Bearer {SECRET}" for h in writes)
    for f in reg.home.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def _hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> Path:
    """A Hugging Face cache laid out as huggingface_hub writes it: blobs by hash, snapshot symlinks,
    refs/<branch> holding the commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        dst = snap / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(os.path.relpath(blob, dst.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


def test_pull_from_the_local_cache_offline(reg, adapters, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    # what a push would upload, placed in a local HF cache
    reg.add(adapters["loha"].path, "style", trigger_words=["wtrcolor style"], labels=["watercolor"], base_model=BASE,
            description="Soft watercolour washes.")
    up = tmp_path / "up"
    reg.push("style", "me/style", to="kohya", dry_run=True, out_dir=up)
    commit = "a" * 40
    cache = tmp_path / "hf-cache"
    _hf_cache(cache, "me/style", {p.name: p.read_bytes() for p in up.iterdir()}, commit)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    v = reg.pull("me/style", "style-hub", tags=["prod"])
    assert v.ref == "style-hub@1" and v.tags == ["prod"] and v.kinds == {"loha": 83}
    assert v.hashes["autov3"] and v.sha256 == hashlib.sha256((up / "style.safetensors").read_bytes()).hexdigest()
    edge = reg.show(v)["parents"][0]
    assert edge["operation"] == "pull" and edge["source"] == f"hf://me/style@{commit}"
    assert edge["params"] == {"repo_id": "me/style", "revision": "main", "commit": commit, "file": "style.safetensors"}
    info = reg.info("style-hub")
    assert info["trigger_words"] == ["wtrcolor style"] and "watercolor" in info["labels"]
    assert info["description"] == "Soft watercolour washes."
    assert v.base_model == BASE
    # ID@REVISION (a commit hash: nothing to resolve), and a repo that is not in the cache
    assert reg.pull(f"me/style@{commit}", "style-hub").ref == "style-hub@1"  # same bytes: same version
    with pytest.raises(RegistryError, match="pull me/other"):
        reg.pull("me/other", "other")
    # the same tensors as the stored LoHa (AutoV3), though the file is a new kohya serialization
    a = reg.load("style-hub")
    b = loradex.load(adapters["loha"].path)
    for k in a.patches:
        assert torch.equal(a.patches[k].delta(), b.patches[k].delta())


def test_pull_cli_subprocess_with_hf_hub_offline(reg, tmp_path):
    """The real environment variables (read by huggingface_hub at import) in a fresh process; a
    textual-inversion embedding of SD1 width, pushed as diffusers' learned_embeds."""
    from loradex.core.adapter import Adapter, Embedding

    vec = torch.randn(2, 768, generator=torch.Generator().manual_seed(4))
    ti = tmp_path / "sks.safetensors"
    loradex.save(Adapter(embeddings={"sks": Embedding("sks", {"text_encoder": vec})}), ti, "diffusers-ti")
    reg.add(ti, "sks")
    up = tmp_path / "up"
    assert reg.push("sks", "me/sks", dry_run=True, out_dir=up)["files"] == ["README.md", "learned_embeds.safetensors"]
    card, text = _card(up / "README.md"), (up / "README.md").read_text()
    assert "textual-inversion" in card["tags"] and card["instance_prompt"] == "sks"
    # the registry recorded only the file's ModelSpec architecture (stable-diffusion-v1/textual-inversion):
    # it looks like a repo id but is not a model, so it is no base_model
    assert reg.get("sks").base_model == "stable-diffusion-v1/textual-inversion"
    assert "base_model" not in card and "the file names only its architecture" in text
    assert 'load_textual_inversion("me/sks", weight_name="learned_embeds.safetensors", token="sks")' in text
    commit = "b" * 40
    cache = tmp_path / "hf-cache"
    _hf_cache(cache, "me/sks", {p.name: p.read_bytes() for p in up.iterdir()}, commit, ref="v1")
    env = child_env(reg.home, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_TOKEN=SECRET)
    p = subprocess.run([sys.executable, "-c", "from loradex.cli import main; main()", "pull", "me/sks@v1", "--name",
                        "sks-hub", "--json"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert SECRET not in p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["ref"] == "sks-hub@1" and out["artifact"] == "embedding" and out["arch"] == "sd1"
    assert out["parents"][0]["source"] == f"hf://me/sks@{commit}"
    assert out["parents"][0]["params"]["revision"] == "v1"
    emb = reg.load("sks-hub").embeddings
    assert torch.equal(next(iter(emb.values())).vectors["text_encoder"], vec)


# ---- model cards (issue 13, item 8) -------------------------------------------------------------------


def _code_block(text: str, lang: str = "python") -> str:
    start = text.index(f"```{lang}\n") + len(f"```{lang}\n")
    return text[start:text.index("```", start)]


def test_card_with_no_known_base_never_guesses_one(reg, adapters, bench, tmp_path, capsys):
    """No base recorded: the card says unknown and has no base_model (never the family's usual
    base); a kohya LoHa has no library_name (diffusers cannot load it: checked), says what loads it."""
    reg.add(adapters["loha"].path, "style")
    out = tmp_path / "up"
    ok(cli(capsys, "push", "style", "--repo-id", "me/style", "--to", "kohya", "--dry-run", "-o", out))
    card, text = _card(out / "README.md"), (out / "README.md").read_text()
    assert not {"base_model", "base_model_relation", "library_name", "instance_prompt"} & set(card)
    assert "stable-diffusion-v1-5" not in text and "## Base model\n\nunknown" in text
    assert {"lora", "lycoris", "loha", "template:sd-lora", "stable-diffusion"} <= set(card["tags"])
    assert "diffusers" not in card["tags"]
    assert "does not read this file (LoHa modules)" in text and "ComfyUI" in text and "load_lora_weights(" not in text
    assert " a adapter" not in text and "a LoHa adapter (LyCORIS) for Stable Diffusion 1.x" in text
    with quiet(), pytest.raises(ValueError):  # what the card says: diffusers does not read it
        bench.fresh_pipe().load_lora_weights(str(out), weight_name="style.safetensors", adapter_name="style")
    # a kohya file of plain LoRA: diffusers loads it (checked), so library_name is diffusers and the snippet uses it
    reg.add(adapters["lora"].path, "face", trigger_words=["sks person"])
    out2 = tmp_path / "up2"
    ok(cli(capsys, "push", "face", "--repo-id", "me/face", "--to", "kohya", "--dry-run", "-o", out2))
    card, text = _card(out2 / "README.md"), (out2 / "README.md").read_text()
    assert card["library_name"] == "diffusers" and "base_model" not in card
    assert 'pipe.load_lora_weights("me/face", weight_name="face.safetensors")' in text and "<lora:face:1>" in text
    assert 'from_pretrained("BASE_MODEL")  # unknown base' in text and 'pipe("sks person")' in text
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(out2), weight_name="face.safetensors", adapter_name="face")
    assert bench.rel(bench.unet_out(pipe.unet), adapters["lora"].y_ref) < 1e-4


def test_card_prompt_from_kohya_tag_frequency(reg, adapters, tmp_path):
    from loradex.registry.hub import top_tags

    a = loradex.load(adapters["lora"].path)
    a.metadata["ss_tag_frequency"] = json.dumps({"10_sks person": {"sks person": 12, "smiling": 5, "outdoors": 3},
                                                 "5_person": {" sks person": 6, "smiling": 8}})
    f = tmp_path / "tagged.safetensors"
    loradex.save(a, f, "kohya")
    reg.add(f, "tagged")  # no trigger words
    up = tmp_path / "up"
    reg.push("tagged", "me/tagged", to="kohya", dry_run=True, out_dir=up)
    card, text = _card(up / "README.md"), (up / "README.md").read_text()
    assert card["instance_prompt"] == "sks person" and card["widget"] == [{"text": "sks person"}]
    assert "`sks person` (18), `smiling` (13), `outdoors` (3)" in text
    # ties at the top all go into the prompt (3 at most); malformed metadata is no prompt, not an error
    assert top_tags('{"a": {"x": 2, "y": 2, "z": 1}}') == [("x", 2), ("y", 2), ("z", 1)]
    assert top_tags("not json") == [] and top_tags('{"a": 3}') == [] and top_tags(None) == []


@pytest.fixture
def hub_base(reg, bench, tmp_path, monkeypatch):
    """A tiny SD1 pipeline as the Hub repo me/tiny-base in a local HF cache (offline), pulled into
    the registry as the stored base `tinybase`."""
    import huggingface_hub.constants as hc

    folder = tmp_path / "tiny-base"
    with quiet():
        bench.fresh_pipe().save_pretrained(folder)
    cache = tmp_path / "hf-cache"
    _hf_cache(cache, "me/tiny-base", {p.relative_to(folder).as_posix(): p.read_bytes()
                                      for p in folder.rglob("*") if p.is_file()}, "d" * 40)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    v = reg.pull("me/tiny-base", "tinybase")
    assert v.artifact == "checkpoint"
    return cache


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_push_samples_on_the_recorded_base_and_the_snippet_runs_as_written(reg, adapters, hub_base, tmp_path, capsys):
    from PIL import Image

    # the base is recorded as a registry REF of a base pulled from the Hub: the card names that repo
    reg.add(adapters["lora"].path, "face", trigger_words=["sks person"], base_model="tinybase")
    out = tmp_path / "up"
    r = ok(cli(capsys, "push", "face", "--repo-id", "me/face-lora", "--samples", 2, "--dry-run", "-o", out,
               "--json")).json()
    assert r["files"] == ["README.md", "pytorch_lora_weights.safetensors", "samples/sample_0.png",
                          "samples/sample_1.png"]
    card, text = _card(out / "README.md"), (out / "README.md").read_text()
    assert card["base_model"] == "me/tiny-base" and card["base_model_relation"] == "adapter"
    assert card["library_name"] == "diffusers" and card["instance_prompt"] == "sks person"
    assert card["widget"] == [{"text": "sks person", "output": {"url": f"samples/sample_{i}.png"}} for i in range(2)]
    assert "<Gallery />" in text and "seeds 0, 1" in text
    imgs = [Image.open(out / f"samples/sample_{i}.png").convert("RGB") for i in range(2)]
    assert imgs[0].size == (64, 64) and imgs[0].tobytes() != imgs[1].tobytes()
    # rendered with the adapter: the base alone gives another image at the same seed
    from loradex.inference.engine import Engine
    from loradex.inference.types import GenerateRequest

    with reg.checkout(reg.get("tinybase")) as base_path:
        plain = Engine(base_path).generate([GenerateRequest("sks person", steps=4, width=64, height=64, seed=0)])[0]
    assert plain.convert("RGB").tobytes() != imgs[0].tobytes()
    # the usage snippet, as written, in a fresh process against the Hub (a local cache of base + this upload)
    _hf_cache(hub_base, "me/face-lora", {f: (out / f).read_bytes() for f in r["files"]}, "e" * 40)
    snippet = _code_block(text)
    assert 'DiffusionPipeline.from_pretrained("me/tiny-base")' in snippet and 'pipe("sks person")' in snippet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_base), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "run"
    work.mkdir()
    p = subprocess.run([sys.executable, "-c", snippet], env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(work / "face.png").size[0] > 0


@pytest.mark.usefixtures("one_thread")
def test_push_samples_needs_the_base_here(reg, adapters, tmp_path, capsys):
    reg.add(adapters["lora"].path, "face")  # no base recorded
    out = tmp_path / "up"
    r = cli(capsys, "push", "face", "--repo-id", "me/face", "--samples", 1, "--dry-run", "-o", out)
    assert r.code == 2 and "no recorded base model" in r.err and r.err.count("\n") == 1
    assert not any(out.iterdir())  # nothing written
    # --base names it for this push: the samples render there (here the embedded tiny model), the card says so
    r = ok(cli(capsys, "push", "face", "--repo-id", "me/face", "--base", "tiny", "--samples", 1, "--dry-run", "-o", out,
               "--json")).json()
    assert r["files"] == ["README.md", "pytorch_lora_weights.safetensors", "samples/sample_0.png"]
    assert "made for `tiny-sd1`" in (out / "README.md").read_text() and "base_model" not in _card(out / "README.md")
    out = tmp_path / "up2"
    reg.add(adapters["loha"].path, "style", base_model=BASE)  # a Hub id that is not in the local cache
    r = cli(capsys, "push", "style", "--repo-id", "me/style", "--to", "kohya", "--samples", 1, "--dry-run", "-o", out)
    assert r.code == 2 and "not here" in r.err and f"hf download {BASE}" in r.err
    r = cli(capsys, "push", "style", "--repo-id", "me/style", "--sample-prompt", "x", "--dry-run", "-o", out)
    assert r.code == 2 and "--samples" in r.err
    # a base recorded as a Hub id is the card's base_model even when it is not downloaded here
    reg.push("style", "me/style", to="kohya", dry_run=True, out_dir=out)
    assert _card(out / "README.md")["base_model"] == BASE
