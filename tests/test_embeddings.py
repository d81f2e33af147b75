"""Textual-inversion embeddings: every flavour loradex writes loads in diffusers with the exact
vectors, every flavour in the wild reads, and conversions between them are bit-identical.

The tiny pipeline's CLIP text encoder is 32 wide, so the load tests use 32-dim embeddings; the
architecture and ModelSpec tests use real widths (768 / 1024 / 768+1280), which are still tiny.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
import safetensors.torch
import torch

from loradex.converters import bundles as B
from loradex.converters import embeddings as E
from loradex.converters import safetensors_io as sio
from loradex.converters.common import ConversionReport
from loradex.core.adapter import Adapter, Embedding
from loradex.errors import ArchError, ConversionError, FormatError
from loradex.tiny import quiet, tiny_sd_pipeline, tiny_text_encoder, tiny_tokenizer

DIM = 32
WRITERS = {
    "a1111-ti": E.A1111Embedding(),
    "kohya-ti": E.KohyaEmbedding(),
    "diffusers-ti": E.DiffusersEmbedding(),
}


def emb_adapter(
    token: str = "<tok>", n: int = 3, dim: int = DIM, dtype=torch.float32, seed: int = 0, **comps
) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    vectors = comps or {"text_encoder": torch.randn(n, dim, generator=g).to(dtype)}
    return Adapter(embeddings={token: Embedding(token, vectors)})


def write(fmt: str, adapter: Adapter, path, **options) -> ConversionReport:
    report = ConversionReport(target=fmt)
    WRITERS[fmt].write(adapter, path, report, **options)
    return report


def added_ids(tokenizer, token: str, n: int) -> list[int]:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    return tokenizer.convert_tokens_to_ids(names)


def encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def assert_loaded(pipe, token: str, vectors: torch.Tensor) -> None:
    """The token's rows in the embedding matrix are exactly ``vectors`` and the prompt uses them."""
    n = vectors.shape[0]
    ids = added_ids(pipe.tokenizer, token, n)
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids], vectors.to(weight.dtype))
    prompt = f"a {token} photo"
    expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    input_ids = pipe.tokenizer(expanded).input_ids
    start = input_ids.index(ids[0])
    assert input_ids[start : start + n] == ids  # every vector is used, in order
    assert not torch.equal(encode(pipe, prompt), encode(pipe, "a photo"))


@pytest.fixture
def pipe():
    return tiny_sd_pipeline()


# ---- writing: diffusers loads every flavour -------------------------------------------------
LOADABLE = [
    ("a1111-ti", ".pt", False),  # token comes from the 'name' field
    ("a1111-ti", ".safetensors", True),  # flat string_to_param.*: one key, token= needed
    ("kohya-ti", ".safetensors", True),  # emb_params: token= needed
    ("kohya-ti", ".pt", True),
    ("diffusers-ti", ".safetensors", False),
    ("diffusers-ti", ".bin", False),
]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("fmt,suffix,needs_token", LOADABLE)
def test_written_file_loads_in_diffusers(tmp_path, pipe, fmt, suffix, needs_token, n):
    a = emb_adapter("<tok>", n=n)
    path = tmp_path / f"tok{suffix}"
    write(fmt, a, path)
    with quiet():
        pipe.load_textual_inversion(str(path), token="<tok>" if needs_token else None)
    assert_loaded(pipe, "<tok>", a.embeddings["<tok>"].vectors["text_encoder"])


def test_kohya_file_without_token_loads_as_emb_params(tmp_path, pipe):
    """FORMATS.md §6: diffusers takes any one-key dict as {token: tensor}."""
    write("kohya-ti", emb_adapter("<k>", n=2), tmp_path / "k.safetensors")
    with quiet():
        pipe.load_textual_inversion(str(tmp_path / "k.safetensors"))
    assert "emb_params" in pipe.tokenizer.get_added_vocab()


def test_a1111_pt_layout_and_weights_only(tmp_path):
    a = emb_adapter("<tok>", n=2)
    a.metadata.update({"a1111.step": "1500", "a1111.sd_checkpoint": "abc123"})
    write("a1111-ti", a, tmp_path / "tok.pt")
    obj = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert set(obj) == {
        "string_to_token",
        "string_to_param",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    }
    assert obj["string_to_token"] == {"*": 265}
    assert obj["name"] == "<tok>" and obj["step"] == 1500 and obj["sd_checkpoint"] == "abc123"
    assert torch.equal(obj["string_to_param"]["*"], a.embeddings["<tok>"].vectors["text_encoder"])


def test_pt_writer_does_not_save_the_whole_storage_of_a_view(tmp_path):
    """torch.save writes a view's whole storage: the rows must be copied out first."""
    matrix = torch.randn(20000, DIM)
    a = Adapter(embeddings={"<v>": Embedding("<v>", {"text_encoder": matrix[100:102]})})
    write("a1111-ti", a, tmp_path / "v.pt")
    assert (tmp_path / "v.pt").stat().st_size < 10_000
    assert torch.equal(
        E.read_embedding(tmp_path / "v.pt").embeddings["v"].vectors["text_encoder"], matrix[100:102]
    )


def test_uppercase_token_is_reported_and_really_breaks_multivector(tmp_path, pipe):
    a = emb_adapter("MyTok", n=3)
    report = write("diffusers-ti", a, tmp_path / "up.safetensors")
    assert any("uppercase" in n and "mytok" in n for n in report.notes)
    with quiet():
        pipe.load_textual_inversion(str(tmp_path / "up.safetensors"))
    # what the warning is about: the prompt is not expanded, only the first vector is used
    assert pipe.maybe_convert_prompt("a MyTok photo", pipe.tokenizer) == "a MyTok photo"
    assert E.read_embedding(tmp_path / "up.safetensors").notes  # readers warn too


def test_token_case_is_fine_in_lowercase(tmp_path):
    assert write("diffusers-ti", emb_adapter("<ok-1>"), tmp_path / "ok.safetensors").notes == []


# ---- reading files in the wild ---------------------------------------------------------------
def test_read_a1111_pt_saved_by_a1111_layout(tmp_path):
    vec = torch.randn(4, 768)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vec.clone())},  # A1111 saves the trained Parameter
            "name": "charturner",
            "step": 800,
            "sd_checkpoint": "925997e9",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        tmp_path / "CharTurner.pt",
    )
    assert E.detect_embedding_format(tmp_path / "CharTurner.pt") == "a1111-ti"
    a = E.read_embedding(tmp_path / "CharTurner.pt")
    assert a.source_format == "a1111-ti" and a.arch == "sd1" and not a.patches
    (emb,) = a.embeddings.values()
    assert emb.token == "CharTurner"  # the file name, as in A1111
    assert torch.equal(emb.vectors["text_encoder"], vec) and not emb.vectors["text_encoder"].requires_grad
    assert a.metadata["a1111.step"] == "800" and a.metadata["a1111.name"] == "charturner"
    assert any("charturner" in n for n in a.notes)  # diffusers would call it by its name field
    assert E.read_embedding(tmp_path / "CharTurner.pt", token="ct").embeddings.keys() == {"ct"}


@pytest.mark.parametrize("dim,arch", [(768, "sd1"), (1024, "sd2"), (DIM, "tiny-sd1")])
def test_read_kohya_emb_params(tmp_path, dim, arch):
    vec = torch.randn(2, dim, dtype=torch.float16)
    safetensors.torch.save_file({"emb_params": vec}, str(tmp_path / "style.safetensors"))
    assert E.detect_embedding_format(tmp_path / "style.safetensors") == "kohya-ti"
    assert E.KohyaEmbedding().detect(tmp_path / "style.safetensors")
    assert not E.DiffusersEmbedding().detect(tmp_path / "style.safetensors")
    a = E.KohyaEmbedding().read(tmp_path / "style.safetensors")
    assert a.arch == arch and a.source_format == "kohya-ti"
    assert torch.equal(a.embeddings["style"].vectors["text_encoder"], vec)


def test_read_a1111_flat_safetensors(tmp_path):
    vec = torch.randn(3, 1024)
    safetensors.torch.save_file({"string_to_param.*": vec}, str(tmp_path / "neg.safetensors"))
    a = E.read_embedding(tmp_path / "neg.safetensors")
    assert a.source_format == "a1111-ti" and a.arch == "sd2"
    assert torch.equal(a.embeddings["neg"].vectors["text_encoder"], vec)


def test_read_sdxl_clip_l_clip_g(tmp_path):
    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 1280)
    safetensors.torch.save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"))
    assert E.detect_embedding_format(tmp_path / "xl.safetensors") == "kohya-ti"
    a = E.read_embedding(tmp_path / "xl.safetensors")
    emb = a.embeddings["xl"]
    assert a.arch == "sdxl" and emb.num_vectors == 2
    assert emb.vectors["text_encoder"].shape == (2, 768) and emb.vectors["text_encoder_2"].shape == (2, 1280)
    assert torch.equal(emb.vectors["text_encoder"], clip_l) and torch.equal(
        emb.vectors["text_encoder_2"], clip_g
    )
    with pytest.raises(ArchError):
        E.read_embedding(tmp_path / "xl.safetensors", arch="sd1")


def test_read_sdxl_rejects_vector_count_mismatch(tmp_path):
    safetensors.torch.save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, str(tmp_path / "bad.safetensors")
    )
    with pytest.raises(FormatError, match="clip_l 2, clip_g 3") as e:
        E.read_embedding(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_read_diffusers_learned_embeds(tmp_path):
    vec = torch.randn(768)  # diffusers' single-vector files are 1-D
    safetensors.torch.save_file({"<cat-toy>": vec}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        assert E.detect_embedding_format(tmp_path / name) == "diffusers-ti"
        a = E.read_embedding(tmp_path / name)
        assert a.arch == "sd1" and a.source_format == "diffusers-ti"
        assert torch.equal(a.embeddings["<cat-toy>"].vectors["text_encoder"], vec[None])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"emb_params": torch.randn(2, 3, 4)}, r"shape \[2, 3, 4\]"),
        ({"emb_params": torch.ones(2, 4, dtype=torch.int32)}, "floating point"),
        ({"emb_params": torch.randn(0, 4)}, r"shape \[0, 4\]"),
    ],
)
def test_read_rejects_bad_shapes_in_one_line(tmp_path, bad, match):
    safetensors.torch.save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FormatError, match=match) as e:
        E.read_embedding(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)


def test_detect_ignores_other_files(tmp_path):
    safetensors.torch.save_file(
        {"lora_unet_x.lora_down.weight": torch.randn(4, 8), "lora_unet_x.lora_up.weight": torch.randn(8, 4)},
        str(tmp_path / "lora.safetensors"),
    )
    safetensors.torch.save_file({"conv.weight": torch.randn(2, 3)}, str(tmp_path / "w.safetensors"))
    safetensors.torch.save_file({"x": torch.randn(2, 3, 3, 3)}, str(tmp_path / "conv.safetensors"))
    torch.save([torch.randn(2)], tmp_path / "list.pt")
    (tmp_path / "notes.txt").write_text("hello")
    for name in (
        "lora.safetensors",
        "w.safetensors",
        "conv.safetensors",
        "list.pt",
        "notes.txt",
        "missing.pt",
    ):
        assert E.detect_embedding_format(tmp_path / name) is None, name
    assert E.detect_embedding_format(tmp_path) is None
    with pytest.raises(FormatError, match="not a textual-inversion file"):
        E.read_embedding(tmp_path / "lora.safetensors")


# ---- SDXL: two encoders ------------------------------------------------------------------
def sdxl_adapter(token="<xl>", n=3, dims=(DIM, 64), dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return emb_adapter(
        token,
        text_encoder=torch.randn(n, dims[0], generator=g).to(dtype),
        text_encoder_2=torch.randn(n, dims[1], generator=g).to(dtype),
    )


def second_encoder():
    """A second tiny CLIP encoder (64 wide, like bigG is to CLIP-L) with its own tokenizer."""
    return tiny_text_encoder(seed=1, hidden=64, projection=True), tiny_tokenizer()


def test_sdxl_clip_file_loads_per_encoder(tmp_path, pipe):
    a = sdxl_adapter()
    report = write("diffusers-ti", a, tmp_path / "xl.safetensors")
    assert any("text_encoder_2" in n for n in report.notes)
    sd = safetensors.torch.load_file(str(tmp_path / "xl.safetensors"))
    assert set(sd) == {"clip_l", "clip_g"}
    with pytest.raises(ValueError), quiet():  # diffusers cannot take the two-encoder dict at once
        pipe.load_textual_inversion(str(tmp_path / "xl.safetensors"), token="<xl>")
    te2, tok2 = second_encoder()
    with quiet():
        pipe.load_textual_inversion(
            sd["clip_l"], token="<xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(sd["clip_g"], token="<xl>", text_encoder=te2, tokenizer=tok2)
    vec = a.embeddings["<xl>"].vectors
    assert_loaded(pipe, "<xl>", vec["text_encoder"])
    rows2 = te2.get_input_embeddings().weight[added_ids(tok2, "<xl>", 3)]
    assert torch.equal(rows2, vec["text_encoder_2"])


def test_sdxl_split_pair_loads_by_path_and_reads_back(tmp_path, pipe):
    a = sdxl_adapter()
    write("diffusers-ti", a, tmp_path / "learned_embeds.safetensors", sdxl_layout="split")
    first, second = tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors"
    assert set(sio.read_header(first).tensors) == set(sio.read_header(second).tensors) == {"<xl>"}
    te2, tok2 = second_encoder()
    with quiet():
        pipe.load_textual_inversion(str(first))
        pipe.load_textual_inversion(str(second), text_encoder=te2, tokenizer=tok2)
    vec = a.embeddings["<xl>"].vectors
    assert_loaded(pipe, "<xl>", vec["text_encoder"])
    assert torch.equal(te2.get_input_embeddings().weight[added_ids(tok2, "<xl>", 3)], vec["text_encoder_2"])
    back = E.read_embedding(first)
    assert set(back.embeddings["<xl>"].vectors) == {"text_encoder", "text_encoder_2"}
    assert any("learned_embeds_2" in n for n in back.notes)
    assert torch.equal(back.embeddings["<xl>"].vectors["text_encoder_2"], vec["text_encoder_2"])


# ---- round trips ---------------------------------------------------------------------------
FLAVOURS = [
    ("a1111-ti", ".pt", {}),
    ("a1111-ti", ".safetensors", {}),
    ("kohya-ti", ".safetensors", {}),
    ("diffusers-ti", ".safetensors", {}),
    ("diffusers-ti", ".bin", {}),
]
SDXL_FLAVOURS = [*FLAVOURS, ("diffusers-ti", ".safetensors", {"sdxl_layout": "split"})]


def assert_same_embedding(a: Embedding, b: Embedding) -> None:
    assert a.vectors.keys() == b.vectors.keys()
    for c in a.vectors:
        assert a.vectors[c].dtype == b.vectors[c].dtype
        assert torch.equal(a.vectors[c], b.vectors[c])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_round_trips_between_all_flavours_are_bit_identical(tmp_path, dtype, sdxl):
    src = sdxl_adapter("tok", dtype=dtype) if sdxl else emb_adapter("tok", n=3, dtype=dtype)
    original = src.embeddings["tok"]
    flavours = SDXL_FLAVOURS if sdxl else FLAVOURS
    for i, ((f1, s1, o1), (f2, s2, o2)) in enumerate(itertools.product(flavours, flavours)):
        p1, p2 = tmp_path / f"a{i}" / f"tok{s1}", tmp_path / f"b{i}" / f"tok{s2}"
        p1.parent.mkdir(), p2.parent.mkdir()
        write(f1, src, p1, **o1)
        mid = E.read_embedding(p1)
        write(f2, mid, p2, **o2)
        back = E.read_embedding(p2)
        assert list(back.embeddings) == ["tok"], (f1, s1, f2, s2)
        assert_same_embedding(back.embeddings["tok"], original)


def test_read_token_override_and_dtype_option(tmp_path):
    write("kohya-ti", emb_adapter("x", n=2), tmp_path / "x.safetensors", dtype=torch.float16)
    a = E.read_embedding(tmp_path / "x.safetensors", token="<new>")
    assert list(a.embeddings) == ["<new>"]
    assert a.embeddings["<new>"].vectors["text_encoder"].dtype == torch.float16


# ---- metadata --------------------------------------------------------------------------------
SGM = "https://github.com/Stability-AI/generative-models"  # kohya's implementation for TI


@pytest.mark.parametrize(
    "fmt,arch,dims,expected,impl",
    [
        ("kohya-ti", "sd1", (768,), "stable-diffusion-v1/textual-inversion", SGM),
        ("a1111-ti", "sd1", (768,), "stable-diffusion-v1/textual-inversion", SGM),
        ("diffusers-ti", "sd1", (768,), "stable-diffusion-v1/textual-inversion", "diffusers"),
        ("kohya-ti", "sd2", (1024,), "stable-diffusion-v2-768-v/textual-inversion", SGM),
        ("kohya-ti", "sdxl", (768, 1280), "stable-diffusion-xl-v1-base/textual-inversion", SGM),
    ],
    ids=lambda v: v if isinstance(v, str) and "/" not in v else None,
)
def test_modelspec_metadata(tmp_path, fmt, arch, dims, expected, impl):
    path = tmp_path / "s.safetensors"
    a = emb_adapter("s", dim=dims[0]) if len(dims) == 1 else sdxl_adapter("s", dims=dims)
    assert E.guess_arch(a.embeddings["s"].vectors) == arch
    write(fmt, a, path, title="My style")
    h = sio.read_header(path)
    m = h.metadata
    assert m["modelspec.sai_model_spec"] == "1.0.1"
    assert m["modelspec.architecture"] == expected
    assert m["modelspec.implementation"] == impl
    assert m["modelspec.title"] == "My style"
    data = path.read_bytes()[h.data_offset :]
    assert m["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()


def test_sd2_512_architecture_of_the_source_is_kept(tmp_path):
    a = emb_adapter("s", dim=1024)
    a.metadata["modelspec.architecture"] = "stable-diffusion-v2-512/textual-inversion"
    write("kohya-ti", a, tmp_path / "s.safetensors")
    arch = sio.read_header(tmp_path / "s.safetensors").metadata["modelspec.architecture"]
    assert arch == "stable-diffusion-v2-512/textual-inversion"


# ---- writer errors ---------------------------------------------------------------------------
def test_writer_needs_exactly_one_embedding(tmp_path):
    with pytest.raises(ConversionError, match="no textual-inversion embedding"):
        write("kohya-ti", Adapter(), tmp_path / "e.safetensors")
    two = emb_adapter("a")
    two.embeddings["b"] = Embedding("b", {"text_encoder": torch.randn(1, DIM)})
    with pytest.raises(ConversionError, match="pass token=NAME"):
        write("kohya-ti", two, tmp_path / "e.safetensors")
    report = write("kohya-ti", two, tmp_path / "b.safetensors", token="b")
    assert "embedding a" in report.dropped
    assert list(E.read_embedding(tmp_path / "b.safetensors").embeddings) == ["b"]


def test_writer_reports_dropped_patches_and_file_name(tmp_path):
    a = emb_adapter("<t>")
    a.patches["unet.x"] = object()  # any patch: a TI file has no place for it
    report = write("a1111-ti", a, tmp_path / "other.pt")
    assert report.dropped == {"unet.x": "a1111-ti holds embeddings only"}
    assert any("'other'" in n for n in report.notes)  # A1111 calls it by its file name


def test_writer_checks_arch_against_widths(tmp_path):
    with pytest.raises(ArchError, match="do not fit sdxl"):
        write("kohya-ti", emb_adapter(dim=768), tmp_path / "e.safetensors", arch="sdxl")
    with pytest.raises(ConversionError, match="sdxl_layout"):
        write("diffusers-ti", sdxl_adapter(), tmp_path / "e.safetensors", sdxl_layout="two")


# ---- bundle_emb ------------------------------------------------------------------------------
def test_bundle_round_trip():
    sd = emb_adapter("face", n=2, dim=768).embeddings
    xl = sdxl_adapter("style", n=4, dims=(768, 1280)).embeddings
    embs = {**sd, **xl}
    t = B.bundle_tensors(embs)
    assert set(t) == {
        "bundle_emb.face.string_to_param.*",
        "bundle_emb.style.clip_l",
        "bundle_emb.style.clip_g",
    }
    lora = {"lora_unet_x.lora_down.weight": torch.randn(4, 8), **t}
    back = B.parse_bundle(lora)
    assert back.keys() == embs.keys()
    for k in embs:
        assert back[k].token == k
        assert_same_embedding(back[k], embs[k])
    assert B.bundle_tensors(back).keys() == t.keys()


def test_parse_bundle_other_spellings_and_errors():
    v = torch.randn(2, 768)
    got = B.parse_bundle({"bundle_emb.k.emb_params": v, "bundle_emb.d.<d>": v[0]})
    assert torch.equal(got["k"].vectors["text_encoder"], v) and got["d"].vectors["text_encoder"].shape == (
        1,
        768,
    )
    with pytest.raises(FormatError, match="cannot tell"):
        B.parse_bundle({"bundle_emb.a.x": v, "bundle_emb.a.y": v})
    with pytest.raises(FormatError, match="disagree"):
        B.parse_bundle({"bundle_emb.a.clip_l": v, "bundle_emb.a.clip_g": torch.randn(3, 1280)})
    with pytest.raises(FormatError, match="bundle_emb.<name>"):
        B.parse_bundle({"bundle_emb.lonely": v})
    with pytest.raises(ConversionError, match="cannot contain"):
        B.bundle_tensors({"a.b": Embedding("a.b", {"text_encoder": v})})
