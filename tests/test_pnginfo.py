"""Images people can trace (issue 13, item 7): ``loradex generate`` and the server write A1111's
``parameters`` text chunk, laid out as A1111's ``create_infotext`` lays it out, and ``loradex
inspect IMAGE.png`` reads it back.

The reference reader below is A1111's own ``parse_generation_parameters`` core (``re_param``,
``unquote``, the prompt / negative prompt / parameter-line split), copied from
AUTOMATIC1111/stable-diffusion-webui ``modules/infotext_utils.py`` at commit
c19d04436496ab29ddca4758a792831ae41b31de (the UI-only defaults it adds afterwards are left out).
The Lora hash is computed here the way A1111's ``extensions-builtin/Lora/network.py`` (commit
f2844bd024ff3cf7ee712153a514afd9085980db) does: the header's ``sshs_model_hash``, else the sha256
of a safetensors file's bytes after its header, first 12 hex digits."""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.request

import pytest
from PIL import Image
from safetensors import safe_open

from cli_util import run as cli
from loradex import pnginfo

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- A1111's reader (modules/infotext_utils.py @ c19d04436496ab29ddca4758a792831ae41b31de) --------
re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def a1111_unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_parse_generation_parameters(x: str):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = a1111_unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    return res


def a1111_lora_shorthash(path) -> str:
    """extensions-builtin/Lora/network.py: metadata sshs_model_hash, else the addnet hash."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("sshs_model_hash"):
        return meta["sshs_model_hash"][0:12]
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[0:12]


@pytest.fixture(autouse=True)
def registry_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path_factory.mktemp("loradex_home")))


@pytest.fixture(scope="module")
def lora(tmp_path_factory, bench):
    """A LoRA made by lycoris-lora on the tiny UNet, under a name with a comma (A1111 drops it)."""
    from loradex.demo import make_lycoris_reference

    ref = make_lycoris_reference(bench, "lora", tmp_path_factory.mktemp("pnginfo_lora"), seed=3).path
    named = ref.with_name("my,face.safetensors")
    ref.rename(named)
    return named


# ---- the text --------------------------------------------------------------------------------
TEXT_CASES = [
    # prompt with commas and a colon, negative prompt, names and values that need quoting
    dict(prompt="a photo of sks dog, best quality, (red:1.2)", negative="blurry, lowres: bad", model="v1-5, pruned",
         loras=[("alice", "0123456789ab"), ("bob:x", "ba9876543210")]),
    dict(prompt="one line", negative="", model=None, loras=[]),
    dict(prompt="two\nlines, of prompt", negative="neg\nover two lines", model="m", loras=[("a", "00aa00aa00aa")]),
]


@pytest.mark.parametrize("case", TEXT_CASES)
def test_infotext_layout_and_a1111_parser(case):
    params = pnginfo.generation_params(steps=20, sampler="Euler a", cfg_scale=7.0, seed=1234, width=512,
                                       height=768, model_hash="6ce0161689", model=case["model"],
                                       lora_hashes=case["loras"])
    text = pnginfo.infotext(case["prompt"], params, case["negative"])
    *head, last = text.split("\n")
    # A1111's layout: prompt line(s), "Negative prompt: ..." when there is one, one parameter line
    assert head[0] == case["prompt"].split("\n")[0]
    assert ("Negative prompt: " + case["negative"].split("\n")[0] in head) == bool(case["negative"])
    assert last.startswith("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, "
                           "Model hash: 6ce0161689, ")
    if case["loras"]:
        want = ", ".join(f"{n.replace(':', '')}: {h}" for n, h in case["loras"])
        assert f'Lora hashes: "{want}"' in last  # quoted: it holds ":" and ","
    else:
        assert "Lora hashes" not in last and "TI hashes" not in last  # None fields are left out
    # A1111's own parser reads every field back
    res = a1111_parse_generation_parameters(text)
    assert res["Prompt"] == case["prompt"] and res["Negative prompt"] == case["negative"]
    assert (res["Steps"], res["Sampler"], res["CFG scale"], res["Seed"]) == ("20", "Euler a", "7", "1234")
    assert (res["Size-1"], res["Size-2"], res["Model hash"]) == ("512", "768", "6ce0161689")
    assert res.get("Model") == case["model"]
    assert res["Version"].startswith("loradex ")
    if case["loras"]:
        assert res["Lora hashes"] == want
    # and loradex's reader agrees with it
    got = pnginfo.parse(text)
    assert (got["prompt"], got["negative_prompt"]) == (case["prompt"], case["negative"])
    assert (got["steps"], got["sampler"], got["cfg_scale"], got["seed"]) == (20, "Euler a", 7.0, 1234)
    assert (got["width"], got["height"], got["model_hash"], got["model"]) == (512, 768, "6ce0161689", case["model"])
    assert got["lora_hashes"] == {n.replace(":", ""): h for n, h in case["loras"]}
    assert {k: v for k, v in got["params"].items() if k != "Size"} == {
        k: v for k, v in res.items() if k not in ("Prompt", "Negative prompt", "Size-1", "Size-2")}


def test_quote_matches_a1111():
    for v in ("plain", "with, comma", "with: colon", "two\nlines", 'has "quotes", too', 7, 7.5):
        q = pnginfo.quote(v)
        if any(c in str(v) for c in ",:\n"):
            assert q == json.dumps(str(v), ensure_ascii=False) and a1111_unquote(q) == str(v)
        else:
            assert q == str(v)


def test_png_round_trip(tmp_path):
    params = pnginfo.generation_params(steps=4, sampler="DDIM", cfg_scale=7.5, seed=9, width=64, height=64,
                                       model="tiny-sd1", lora_hashes=[("face", "0123456789ab")])
    text = pnginfo.infotext("a cat, ünïcode <lora:face:0.8>", params, "dog: no")
    out = tmp_path / "x.png"
    pnginfo.save_png(Image.new("RGB", (64, 64), (10, 20, 30)), out, text)
    assert Image.open(out).info["parameters"] == text  # what A1111's images.read_info_from_image reads
    assert pnginfo.read_parameters(out) == text  # chunk reader without Pillow (iTXt: not latin-1)
    got = pnginfo.parse(pnginfo.read_parameters(out))
    assert got["loras"] == [{"name": "face", "weight": 0.8, "hash": "0123456789ab"}]
    assert got["negative_prompt"] == "dog: no" and got["model"] == "tiny-sd1" and got["model_hash"] is None
    # bytes too (what the server answers)
    data = pnginfo.png_bytes(Image.new("RGB", (8, 8)), text)
    assert Image.open(io.BytesIO(data)).info["parameters"] == text


# ---- loradex generate -> loradex inspect -------------------------------------------------------
def test_generate_writes_parameters_and_inspect_reads_them(capsys, tmp_path, lora):
    out = tmp_path / "img.png"
    code, stdout, err = cli(capsys, "generate", "a photo, of a dog", "--negative-prompt", "blurry: bad",
                            "--adapter", f"{lora}:0.8", "--seed", "5", "--steps", "2", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    text = Image.open(out).info["parameters"]
    assert report["parameters"] == text
    res = a1111_parse_generation_parameters(text)
    assert res["Prompt"] == "a photo, of a dog <lora:myface:0.8>"  # the file is my,face: A1111 drops the comma
    assert res["Negative prompt"] == "blurry: bad"
    assert (res["Steps"], res["Sampler"], res["Seed"], res["Size-1"], res["Size-2"]) == ("2", "DDIM", "5", "64", "64")
    assert res["CFG scale"] == "7.5" and res["Model"] == "tiny-sd1" and "Model hash" not in res
    assert res["Lora hashes"] == f"myface: {a1111_lora_shorthash(lora)}"
    # inspect: the parameters, parsed
    code, stdout, err = cli(capsys, "inspect", out, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["format"] == "png" and info["image"] == {"width": 64, "height": 64} and info["parameters"] == text
    g = info["generation"]
    assert (g["steps"], g["seed"], g["sampler"], g["width"], g["height"]) == (2, 5, "DDIM", 64, 64)
    assert g["loras"] == [{"name": "myface", "weight": 0.8, "hash": a1111_lora_shorthash(lora)}]
    code, stdout, _ = cli(capsys, "inspect", out)
    assert code == 0 and "prompt:      a photo, of a dog <lora:myface:0.8>" in stdout
    assert f"  myface: {a1111_lora_shorthash(lora)}" in stdout and "Sampler:     DDIM" in stdout


def test_model_fields_of_each_kind_of_base(tmp_path):
    """``Model hash`` is A1111's ``sha256[:10]`` of a single-file base, ``Model`` its file stem."""
    ckpt = tmp_path / "my-base.safetensors"
    ckpt.write_bytes(b"stand-in bytes: only the identity of the file is read here")
    got = pnginfo.model_fields(ckpt)
    assert got == {"Model hash": hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10], "Model": "my-base"}
    assert pnginfo.model_fields(tmp_path) == {"Model hash": None, "Model": tmp_path.name}  # a diffusers folder
    snap = tmp_path / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert pnginfo.model_fields(snap)["Model"] == "org/name"  # a Hub snapshot


def test_inspect_png_without_parameters_or_embedding(capsys, tmp_path):
    p = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(p)
    code, out, err = cli(capsys, "inspect", p)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert "plain.png" in err and "generation parameters" in err and "embedding" in err


def test_embedding_png_stays_an_embedding(capsys, tmp_path):
    """A PNG holding an A1111 embedding is read as one, even with a parameters chunk too (A1111's
    trainer saves both); the parameters ride along under ``generation``."""
    import torch

    import loradex
    from loradex.core.adapter import Adapter, Embedding

    a = Adapter(embeddings={"tok": Embedding("tok", {"text_encoder": torch.randn(2, 32)})}, arch="tiny-sd1")
    emb = tmp_path / "tok.png"
    loradex.save(a, emb, format="a1111-png")
    with Image.open(emb) as im:
        im.load()
        chunks = dict(im.info)
    text = pnginfo.infotext("sks tok", pnginfo.generation_params(steps=3, sampler="DDIM", cfg_scale=7, seed=1,
                                                                 width=64, height=64))
    both = tmp_path / "both.png"
    info = pnginfo.png_info(text)
    for k, v in chunks.items():
        info.add_text(k, v)
    with Image.open(emb) as im:
        im.save(both, pnginfo=info)
    code, out, err = cli(capsys, "inspect", both, "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["format"] == "a1111-png" and list(got["embeddings"]) == ["tok"]
    assert got["generation"]["prompt"] == "sks tok" and got["generation"]["steps"] == 3


# ---- the server's answers ------------------------------------------------------------------------
def test_server_png_carries_parameters(bench, lora, tmp_path):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from loradex.inference.engine import Engine
    from loradex.inference.server import BackgroundServer, create_app
    from loradex.registry import Registry
    from loradex.tiny import tiny_sd_pipeline

    registry = Registry(tmp_path / "home", create=True)
    registry.add(lora, "alice", arch="tiny-sd1")
    engine = Engine(tiny_sd_pipeline(), max_rank=8, slots=2, registry=registry)
    app = create_app(engine, max_queue=4, max_batch=2, window_ms=10, defaults={"steps": 2, "width": 64, "height": 64})

    def post(body):
        req = urllib.request.Request(app_url + "/v1/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.headers.get("Content-Type", ""), r.read()

    with BackgroundServer(app) as srv:
        app_url = srv.url
        body = {"prompt": "a photo", "negative_prompt": "ugly", "seed": 3, "adapters": [f"{lora}:0.5", "alice:0.25"]}
        ctype, data = post(body)
        assert ctype == "image/png"
        text = Image.open(io.BytesIO(data)).info["parameters"]
        ctype, doc = post({**body, "response": "json"})
        doc = json.loads(doc)
    import base64

    assert doc["parameters"] == text
    assert Image.open(io.BytesIO(base64.b64decode(doc["image"]))).info["parameters"] == text
    res = a1111_parse_generation_parameters(text)
    # a file by its stem, a registry REF by its stored name; the same bytes, the same A1111 hash
    assert res["Prompt"] == "a photo <lora:myface:0.5> <lora:alice:0.25>" and res["Negative prompt"] == "ugly"
    assert (res["Steps"], res["Seed"], res["Sampler"], res["Size-1"]) == ("2", "3", "DDIM", "64")
    h = a1111_lora_shorthash(lora)
    assert res["Lora hashes"] == f"myface: {h}, alice: {h}"
    assert res["Model"] == "tiny-sd1"
