"""Reading what people have: pickled LoRA/LyCORIS/diffusers files (``.pt``/``.ckpt``/``.bin``, read
with ``torch.load(weights_only=True)`` by the same readers as safetensors, detected by their keys),
diffusers' ``learned_embeds.bin``, and AUTOMATIC1111 embedding images (``sd-ti-embedding`` text
chunk, or the data A1111 hides in the pixels), written back with ``--to a1111-png``.

A1111 is no pip dependency: its encoder and decoder are ported below from its source,
AUTOMATIC1111/stable-diffusion-webui ``modules/textual_inversion/image_embedding.py`` (commit
aea16953804660c39a03d7f4f2913f0ed2050940) and the PNG branch of ``EmbeddingDatabase.load_from_file``
in ``textual_inversion.py`` (commit 22ecb78b51f7e6f0234cbc0efbde4ee9a2dc466f) -- the v1.x code -- with
``np.product`` spelled ``np.prod`` (removed from NumPy 2) and the caption step left out.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import loradex
from loradex.converters import a1111_png, detect
from loradex.demo import make_lycoris_reference
from loradex.errors import FormatError, UnsafeFileError

pytestmark = pytest.mark.usefixtures("one_thread")

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw, PngImagePlugin  # noqa: E402


# ---- A1111's image_embedding.py, ported as the reference --------------------------------------
class A1111EmbeddingEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


class A1111EmbeddingDecoder(json.JSONDecoder):
    def __init__(self, *args, **kwargs):
        json.JSONDecoder.__init__(self, *args, object_hook=self.object_hook, **kwargs)

    def object_hook(self, d):
        if "TORCHTENSOR" in d:
            return torch.from_numpy(np.array(d["TORCHTENSOR"]))
        return d


def a1111_embedding_to_b64(data):
    d = json.dumps(data, cls=A1111EmbeddingEncoder)
    return base64.b64encode(d.encode())


def a1111_embedding_from_b64(data):
    d = base64.b64decode(data)
    return json.loads(d, cls=A1111EmbeddingDecoder)


def a1111_lcg(m=2**32, a=1664525, c=1013904223, seed=0):
    while True:
        seed = (a * seed + c) % m
        yield seed % 255


def a1111_xor_block(block):
    g = a1111_lcg()
    randblock = np.array([next(g) for _ in range(np.prod(block.shape))]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), randblock & 0x0F)


def a1111_style_block(block, sequence):
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 0
            if yi % 2 == 0:
                offset = 4
            shade = sequence[i % len(sequence)]
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def a1111_insert_image_data_embed(image, data):
    d = 3
    data_compressed = zlib.compress(json.dumps(data, cls=A1111EmbeddingEncoder).encode(), level=9)
    data_np_ = np.frombuffer(data_compressed, np.uint8).copy()
    data_np_high = data_np_ >> 4
    data_np_low = data_np_ & 0x0F
    h = image.size[1]
    next_size = data_np_low.shape[0] + (h - (data_np_low.shape[0] % h))
    next_size = next_size + ((h * d) - (next_size % (h * d)))
    data_np_low = np.resize(data_np_low, next_size)
    data_np_low = data_np_low.reshape((h, -1, d))
    data_np_high = np.resize(data_np_high, next_size)
    data_np_high = data_np_high.reshape((h, -1, d))
    edge_style = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    edge_style = (np.abs(edge_style) / np.max(np.abs(edge_style)) * 255).astype(np.uint8)
    data_np_low = a1111_style_block(data_np_low, sequence=edge_style)
    data_np_low = a1111_xor_block(data_np_low)
    data_np_high = a1111_style_block(data_np_high, sequence=edge_style[::-1])
    data_np_high = a1111_xor_block(data_np_high)
    im_low = Image.fromarray(data_np_low, mode="RGB")
    im_high = Image.fromarray(data_np_high, mode="RGB")
    background = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, image.size[1]), (0, 0, 0))
    background.paste(im_low, (0, 0))
    background.paste(image, (im_low.size[0] + 1, 0))
    background.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return background


def a1111_load_png(path):
    """The PNG branch of A1111's ``EmbeddingDatabase.load_from_file``, up to the vectors and name."""
    name = os.path.splitext(os.path.basename(path))[0]
    embed_image = Image.open(path)
    if hasattr(embed_image, "text") and "sd-ti-embedding" in embed_image.text:
        data = a1111_embedding_from_b64(embed_image.text["sd-ti-embedding"])
        name = data.get("name", name)
    else:
        raise AssertionError("the text chunk A1111 reads first is missing")
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        vec = next(iter(param_dict.items()))[1].detach().to(dtype=torch.float32)
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items()}
    else:
        raise AssertionError("Couldn't identify as neither textual inversion embedding nor diffuser concept.")
    return name, vec


def a1111_training_png(path, vectors, name="probe", step=3, text_chunk=True, size=(96, 96)):
    """What A1111's train_embedding writes as an 'image with stored embedding': the .pt dict in an
    sd-ti-embedding text chunk and in the pixel border."""
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": step,
            "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}
    info = PngImagePlugin.PngInfo()
    if text_chunk:
        info.add_text("sd-ti-embedding", a1111_embedding_to_b64(data))
    a1111_insert_image_data_embed(Image.new("RGB", size, (90, 120, 200)), data).save(path, "PNG", pnginfo=info)


# ---- pickled adapters --------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("container", [".pt", ".ckpt"])
def test_pickled_kohya_files_read_like_their_safetensors(bench, tmp_path, label, container):
    """kohya sd-scripts' ``--save_model_as pt/ckpt`` is ``torch.save(state_dict)``: the same keys
    as the safetensors file, read by the same reader (zip container and legacy pickle alike)."""
    ref = make_lycoris_reference(bench, label, tmp_path)
    kohya = tmp_path / "k.safetensors"
    loradex.convert(ref.path, kohya, to="kohya", arch=bench.arch)
    sd = load_file(kohya)
    pt = tmp_path / f"k{container}"
    torch.save({**sd, "epoch": 3}, pt, _use_new_zipfile_serialization=(container == ".pt"))
    assert detect(pt).name == "kohya"
    a, b = loradex.load(pt, arch=bench.arch), loradex.load(kohya, arch=bench.arch)
    assert a.unexplained == {"epoch": "a pickled int, not a tensor"}
    assert set(a.patches) == set(b.patches) and a.kinds() == b.kinds()
    for n, p in b.patches.items():
        assert torch.equal(a.patches[n].delta(), p.delta()), n


def test_pickled_lycoris_wrapper_file(bench, tmp_path):
    ref = make_lycoris_reference(bench, "loha", tmp_path)
    pt = tmp_path / "w.pt"
    torch.save(load_file(ref.path), pt)
    a = loradex.load(pt, arch=bench.arch)
    assert a.source_format == "lycoris"
    b = loradex.load(ref.path, arch=bench.arch)
    assert all(torch.equal(a.patches[n].delta(), p.delta()) for n, p in b.patches.items())


def test_diffusers_bin_from_save_lora_weights(bench, tmp_path):
    """``save_lora_weights(safe_serialization=False)`` writes ``pytorch_lora_weights.bin``; loradex
    reads it and its --to diffusers file loads in diffusers as the .bin itself does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from loradex.demo import consume_diffusers, randomize_
    from loradex.log import quiet

    pipe = bench.fresh_pipe()
    with quiet():
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_(pipe.unet, 0)
    base = bench.pipe.unet.state_dict()
    with torch.no_grad():  # only the LoRA factors random
        for n, p in pipe.unet.named_parameters():
            key = n.replace(".base_layer", "")
            if "lora_" not in n and key in base:
                p.copy_(base[key])
    d = tmp_path / "bin"
    with quiet():
        StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                  safe_serialization=False)
    binf = d / "pytorch_lora_weights.bin"
    assert binf.is_file() and detect(binf).name == "diffusers"
    a = loradex.load(binf, arch=bench.arch)
    assert len(a.patches) == 4 * sum(".attn" in n and n.endswith(".to_q") for n in a.patches) and set(a.kinds()) == {"lora"}
    out = tmp_path / "out.safetensors"
    loradex.save(a, out, "diffusers", arch=bench.arch)
    y_ref = bench.unet_out(pipe.unet)
    assert bench.rel(consume_diffusers(bench, out), y_ref) < 1e-5
    assert bench.rel(consume_diffusers(bench, binf), y_ref) < 1e-5


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_needing_code_is_refused_not_run(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"lora_unet_x.lora_up.weight": _Evil()}, f, protocol=2)
    with pytest.raises(UnsafeFileError, match="refused to unpickle"):
        loradex.load(p)


def test_learned_embeds_bin_of_diffusers_textual_inversion(bench, tmp_path):
    """diffusers' textual_inversion.py with ``--no_safe_serialization`` saves
    ``torch.save({placeholder_token: vectors}, "learned_embeds.bin")``: it already read as
    diffusers-ti; loradex's vectors are the ones diffusers' load_textual_inversion puts in."""
    from loradex.log import quiet

    v = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    p = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": v}, p)
    a = loradex.load(p)
    assert a.source_format == "diffusers-ti" and list(a.embeddings) == ["<cat-toy>"]
    assert torch.equal(a.embeddings["<cat-toy>"].vectors["text_encoder"], v)
    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_textual_inversion(str(p))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, v)


# ---- A1111 embedding images --------------------------------------------------------------------
def test_lcg_matches_a1111_self_test():
    """A1111's image_embedding.py self-test: the first 100 values and the sum of the next 100,000."""
    reference = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215, 220,
                 194, 126, 28, 240, 179, 160, 153, 149, 50, 105, 14, 21, 218, 199, 18, 54, 198, 193, 38, 128,
                 19, 53, 195, 124, 75, 205, 12, 6, 145, 0, 28, 30, 148, 8, 45, 218, 171, 55, 249, 97, 166, 12,
                 35, 0, 41, 221, 122, 215, 170, 31, 113, 186, 97, 119, 31, 23, 185, 66, 140, 30, 41, 37, 63,
                 137, 109, 216, 55, 159, 145, 82, 204, 86, 73, 222, 44, 198, 118, 240, 97]
    s = a1111_png.lcg_stream(100_100)
    assert s[:100].tolist() == reference
    assert int(s[100:].astype(np.int64).sum()) == 12731374


def test_a1111_training_image_text_chunk(tmp_path):
    """The text chunk wins (A1111's order) and the 'name' field is the token, not the file stem."""
    v = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    p = tmp_path / "probe-500.png"
    a1111_training_png(p, v, name="probe")
    assert detect(p).name == "a1111-png"
    a = loradex.load(p)
    assert list(a.embeddings) == ["probe"] and a.arch == "sd1"
    assert torch.equal(a.embeddings["probe"].vectors["text_encoder"], v)
    assert a.metadata["a1111.step"] == "3" and a.metadata["a1111.png_route"] == "text"


def test_a1111_training_image_pixels_only(tmp_path):
    """An image whose text chunk was stripped (re-saved by a site or an editor): the data hidden in
    the pixels, decoded as A1111's extract_image_data_embed does."""
    v = torch.randn(2, 768, generator=torch.Generator().manual_seed(1))
    p = tmp_path / "stripped.png"
    a1111_training_png(p, v, name="hidden", text_chunk=False)
    assert "sd-ti-embedding" not in Image.open(p).text
    a = loradex.load(p)
    assert a.metadata["a1111.png_route"] == "pixels" and list(a.embeddings) == ["hidden"]
    assert torch.equal(a.embeddings["hidden"].vectors["text_encoder"], v)


def test_png_without_embedding_names_the_problem(tmp_path):
    p = tmp_path / "preview.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(p)
    with pytest.raises(FormatError, match="a PNG image without an embedding"):
        loradex.load(p)


@pytest.mark.parametrize("sdxl", [False, True])
def test_written_png_loads_in_a1111(tmp_path, sdxl):
    vectors = {"text_encoder": torch.randn(4, 768, generator=torch.Generator().manual_seed(2))}
    if sdxl:
        vectors["text_encoder_2"] = torch.randn(4, 1280, generator=torch.Generator().manual_seed(3))
    a = loradex.Adapter(embeddings={"mytok": loradex.Embedding("mytok", vectors)})
    out = tmp_path / "mytok.png"
    rep = loradex.save(a, out, format="a1111-png")
    assert rep.kept == ["embedding mytok"]
    name, vec = a1111_load_png(out)
    assert name == "mytok"
    if sdxl:
        assert torch.equal(vec["clip_l"], vectors["text_encoder"]) and torch.equal(vec["clip_g"], vectors["text_encoder_2"])
    else:
        assert torch.equal(vec, vectors["text_encoder"])
    back = loradex.load(out)  # and loradex reads its own file back
    assert all(torch.equal(back.embeddings["mytok"].vectors[c], t) for c, t in vectors.items())


def test_convert_pt_embedding_to_png(tmp_path):
    v = torch.randn(2, 768, generator=torch.Generator().manual_seed(5))
    src = tmp_path / "style.pt"
    loradex.save(loradex.Adapter(embeddings={"style": loradex.Embedding("style", {"text_encoder": v})}), src,
                 format="a1111-ti")
    loradex.convert(src, tmp_path / "style.png", to="a1111-png")
    name, vec = a1111_load_png(tmp_path / "style.png")
    assert name == "style" and torch.equal(vec, v)


def test_text_chunk_reads_without_pillow(tmp_path, monkeypatch):
    """Pillow is not one of loradex's requirements (diffusers brings it): the text chunk is parsed
    without it, and what needs it (pixels, writing) says so in one line."""
    import sys

    v = torch.randn(1, 768, generator=torch.Generator().manual_seed(6))
    p = tmp_path / "e.png"
    a1111_training_png(p, v, name="e")
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert torch.equal(loradex.load(p).embeddings["e"].vectors["text_encoder"], v)
    with pytest.raises(FormatError, match="needs Pillow"):
        loradex.save(loradex.load(p), tmp_path / "f.png", format="a1111-png")
