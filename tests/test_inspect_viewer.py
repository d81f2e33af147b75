"""``loradex inspect`` as the viewer people use (issue 13, item 3): any safetensors file or pickle of
tensors is shown, also when loradex cannot tell its base model -- keys grouped by module with
kind, rank, alpha, shapes and dtypes, "base model: unknown", exit 0 -- and ``--metadata`` decodes
every ``ss_*`` / ModelSpec field (tag frequency table, trigger words, training settings, dataset
dirs, base model, hashes). ``--json`` holds all of it.

Inputs come from the real tools: lycoris-lora (LoHa) and peft (LoRA) on small models loradex has
no architecture for (a custom network; Wan's ``blocks.N.self_attn.q`` names saved the way Wan
trainers save them for ComfyUI, ``diffusion_model.`` first; SD3's MMDiT names at toy widths, saved
with kohya's flat ``lora_unet_joint_blocks_*`` names), and ``loradex train`` on the tiny model for
the kohya metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import loradex
from cli_util import run as cli

pytestmark = pytest.mark.usefixtures("one_thread")


def ok(r):
    code, out, err = r
    assert code == 0, err
    return out


@pytest.fixture(autouse=True)
def registry_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORADEX_HOME", str(tmp_path_factory.mktemp("loradex_home")))


# ---- inputs from the real tools ----------------------------------------------------------------
class Custom(nn.Module):
    """A network no loradex architecture knows."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(24, 24), "mlp": nn.Linear(24, 48)})
                                    for _ in range(3))
        self.conv = nn.Conv2d(8, 8, 3)


class WanLike(nn.Module):
    """Wan 2.x's transformer block names (``blocks.N.self_attn.q``, ``cross_attn``, ``ffn.0/2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "self_attn": nn.ModuleDict({"q": nn.Linear(32, 32), "k": nn.Linear(32, 32), "v": nn.Linear(32, 32)}),
                "cross_attn": nn.ModuleDict({"q": nn.Linear(32, 32)}),
                "ffn": nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)),
            }) for _ in range(2))


class MMDiTLike(nn.Module):
    """SD3's MMDiT names (``joint_blocks.N.context_block.attn.qkv``, ``x_block.mlp.fc1``) at toy widths."""

    def __init__(self) -> None:
        super().__init__()
        self.joint_blocks = nn.ModuleList(
            nn.ModuleDict({
                "context_block": nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(16, 48)})}),
                "x_block": nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(16, 48)}),
                                          "mlp": nn.ModuleDict({"fc1": nn.Linear(16, 64)})}),
            }) for _ in range(2))


def _peft_state_dict(model: nn.Module, targets: list[str], r: int, seed: int) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from lycoris import create_lycoris

    from loradex.demo import lycoris_preset, randomize_
    from loradex.log import quiet

    d = tmp_path_factory.mktemp("viewer")
    # lycoris-lora LoHa on a custom network (dim 4, alpha 2 on Linear, dim 2, alpha 1 on Conv2d)
    torch.manual_seed(0)
    m = Custom()
    with quiet(), lycoris_preset({"target_module": ["Linear", "Conv2d"], "target_name": []}):
        net = create_lycoris(m, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="loha")
        net.apply_to()
    randomize_(net, 0)
    net.save_weights(str(d / "custom_loha.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    # the same tensors as A1111 also loads them: a pickle
    torch.save(load_file(d / "custom_loha.safetensors"), d / "custom_loha.pt")
    # peft LoRA on Wan names, saved as Wan trainers save for ComfyUI (diffusion_model. prefix, bf16)
    sd = _peft_state_dict(WanLike(), ["q", "k", "v", "ffn.0", "ffn.2"], r=4, seed=1)
    save_file({f"diffusion_model.{k}": v.to(torch.bfloat16) for k, v in sd.items()}, str(d / "wan_lora.safetensors"))
    # peft LoRA on MMDiT names, saved with kohya's flat names and alphas (another trainer's SD3 file)
    sd = _peft_state_dict(MMDiTLike(), ["qkv", "fc1"], r=8, seed=2)
    kohya = {}
    for k, v in sd.items():
        mod, _, suffix = k.rpartition(".lora_")
        name = "lora_unet_" + mod.replace(".", "_")
        kohya[f"{name}.lora_{'down' if suffix.startswith('A') else 'up'}.weight"] = v.to(torch.float16)
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(d / "sd3_other_trainer.safetensors"), {"ss_base_model_version": "sd3", "ss_network_dim": "8"})
    return {"custom": d / "custom_loha.safetensors", "custom_pt": d / "custom_loha.pt",
            "wan": d / "wan_lora.safetensors", "sd3": d / "sd3_other_trainer.safetensors"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``loradex train`` (2 steps) on the tiny model with tagged captions in a kohya-style dataset
    dir: its kohya file carries the ss_* metadata kohya's trainer writes (tag frequency included)."""
    import numpy as np
    from PIL import Image

    from loradex.training.loop import TrainConfig, save_trained, train

    root = tmp_path_factory.mktemp("viewer_train")
    data = root / "data" / "3_sks dog"
    data.mkdir(parents=True)
    for i, cap in enumerate(["sks dog, red, stripes", "sks dog, blue", "sks dog, red"]):
        Image.fromarray(np.full((16, 16, 3), 40 * i + 30, np.uint8)).save(data / f"i{i}.png")
        (data / f"i{i}.txt").write_text(cap)
    res = train(root / "data", TrainConfig(method="lora", steps=2, resolution=16, rank=4, seed=0, blur_threshold=0.0))
    out = root / "trained.safetensors"
    save_trained(res, out, format="kohya")
    return out


# ---- files of no known base model ------------------------------------------------------------
@pytest.mark.parametrize("which", ["custom", "custom_pt"])
def test_custom_network_lycoris_loha(capsys, files, which):
    path = files[which]
    text = ok(cli(capsys, "inspect", path))
    assert "arch:        unknown" in text and "base model:  unknown" in text
    assert "kinds:       loha x7" in text and "modules by name (7)" in text
    info = json.loads(ok(cli(capsys, "inspect", path, "--json")))
    assert info["raw"] is True and info["arch"] is None and info["base_model"] == "unknown"
    assert info["container"] == ("pickle" if which == "custom_pt" else "safetensors")
    assert info["kinds"] == {"loha": 7} and info["ranks"] == {"2": 1, "4": 6} and info["alphas"] == {"1.0": 1, "2.0": 6}
    assert info["components"] == {"lycoris_conv": 1, "lycoris_layers": 6} and info["modules"] == 7
    sd = load_file(files["custom"])
    table = info["module_table"]
    assert sorted(table) == sorted({k.rsplit(".", 1)[0] for k in sd})
    for name, m in table.items():
        assert m["kind"] == "loha"
        assert m["rank"] == (2 if name == "lycoris_conv" else 4) and m["alpha"] == (1.0 if name == "lycoris_conv" else 2.0)
        for suffix, t in m["tensors"].items():  # every key, with its shape and dtype
            assert t["key"] == f"{name}.{suffix}" and t["shape"] == list(sd[t["key"]].shape) and t["dtype"] == "F32"
    assert sum(len(m["tensors"]) for m in table.values()) == len(sd) and info["other_keys"] == {}
    # a pickle carries no metadata; the safetensors file's header does
    want = {} if which == "custom_pt" else {"ss_network_module": "lycoris.kohya"}
    assert info["metadata_decoded"]["training"] == want


def test_wan_peft_lora(capsys, files):
    info = json.loads(ok(cli(capsys, "inspect", files["wan"], "--json")))
    assert info["raw"] and info["base_model"] == "unknown" and info["dtype"] == "BF16"
    assert info["kinds"] == {"lora": 12} and info["ranks"] == {"4": 12} and info["alphas"] == {}
    assert info["components"] == {"diffusion_model": 12}  # 2 blocks x (q, k, v, cross q, ffn.0, ffn.2)
    m = info["module_table"]["diffusion_model.blocks.1.ffn.0"]
    assert m["kind"] == "lora" and m["rank"] == 4 and m["alpha"] is None
    assert m["tensors"]["lora_A.weight"]["shape"] == [4, 32] and m["tensors"]["lora_B.weight"]["shape"] == [64, 4]


def test_sd3_keys_from_another_trainer(capsys, files):
    text = ok(cli(capsys, "inspect", files["sd3"]))
    assert "base model:  unknown" in text and "format:      kohya" in text
    assert "  lora_unet_joint_blocks_0_context_block_attn_qkv  lora r8 a4  [alpha scalar F32, " \
           "lora_down.weight 8x16 F16, lora_up.weight 48x8 F16]" in text
    info = json.loads(ok(cli(capsys, "inspect", files["sd3"], "--json")))
    assert info["kinds"] == {"lora": 6} and info["ranks"] == {"8": 6} and info["alphas"] == {"4.0": 6}
    assert info["metadata_decoded"]["base_model"] == {"ss_base_model_version": "sd3"}
    assert info["metadata"]["base_model"] == "sd3"
    # --strict refuses what no architecture explains, --arch insists on one: errors, as before
    for extra in (["--strict"], ["--arch", "sd3"]):
        code, out, err = cli(capsys, "inspect", files["sd3"], *extra)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, (extra, err)


def test_long_lists_are_cut_with_a_count(capsys, bench, tmp_path):
    """``--raw`` on a file loradex does know: more modules than the text shows say so; --json has all."""
    from loradex.demo import make_lycoris_reference

    ref = make_lycoris_reference(bench, "lokr", tmp_path).path
    info = json.loads(ok(cli(capsys, "inspect", ref, "--raw", "--json")))
    n = info["modules"]
    assert n > 40 and info["raw"] and len(info["module_table"]) == n and info["kinds"] == {"lokr": n}
    text = ok(cli(capsys, "inspect", ref, "--raw"))
    assert f"modules by name ({n})" in text and f"... and {n - 40} more (--json lists all)" in text
    # without --raw it is read against its arch as before
    assert json.loads(ok(cli(capsys, "inspect", ref, "--json")))["arch"] == "tiny-sd1"
    code, out, err = cli(capsys, "inspect", ref, "--raw", "--arch", "tiny-sd1")
    assert code == 2 and out == "" and err.count("\n") == 1 and "--raw" in err


def test_not_an_adapter_is_still_an_error_unless_raw(capsys, tmp_path):
    """A model's state dict holds no adapter module: one-line error as before; --raw shows it."""
    from loradex.tiny import tiny_unet

    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(path))
    code, out, err = cli(capsys, "inspect", path)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    info = json.loads(ok(cli(capsys, "inspect", path, "--raw", "--json")))
    assert info["kinds"] == {"none": info["modules"]} and info["tensors"] == len(load_file(path))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, out, err = cli(capsys, "inspect", junk, "--raw")
    assert code == 2 and out == "" and err.count("\n") == 1 and "junk.safetensors" in err


# ---- metadata ------------------------------------------------------------------------------------
def test_metadata_decoded(capsys, trained):
    with safe_open(str(trained), "pt") as f:
        meta = f.metadata()
    info = json.loads(ok(cli(capsys, "inspect", trained, "--json")))
    d = info["metadata_decoded"]
    # every field is somewhere, none twice
    placed = [k for s in ("base_model", "training", "dataset", "hashes", "modelspec", "other") for k in d[s]]
    assert sorted(placed + ["ss_tag_frequency"]) == sorted(meta)
    # dir -> [tag, count] pairs, by count then name (pairs: the order survives JSON)
    assert d["tag_frequency"] == {"3_sks dog": [["sks dog", 3], ["red", 2], ["blue", 1], ["stripes", 1]]}
    assert d["triggers"] == {"trigger_phrase": "sks", "top_tags": [["sks dog", 3], ["red", 2], ["blue", 1], ["stripes", 1]],
                             "dataset_dir_names": ["sks dog"]}
    assert d["dataset"]["ss_dataset_dirs"] == {"3_sks dog": {"n_repeats": 3, "img_count": 3}}
    assert d["dataset"]["ss_num_train_images"] == "9"
    assert d["training"]["ss_learning_rate"] == meta["ss_learning_rate"] and d["training"]["ss_max_train_steps"] == "2"
    assert isinstance(d["training"]["ss_network_args"], dict)  # JSON decoded
    assert d["training"]["ss_training_started_at"].endswith("+00:00")  # epoch seconds -> ISO 8601
    assert d["hashes"]["sshs_model_hash"] == meta["sshs_model_hash"]
    assert d["base_model"]["modelspec.architecture"] == meta["modelspec.architecture"]
    text = ok(cli(capsys, "inspect", trained, "--metadata"))
    for line in ("tag frequency (1 dataset dirs):", "  3_sks dog (4 tags, 7 uses)", "dataset dirs (1):",
                 "  3_sks dog: 3 images x 3 repeats", "  trigger phrase (ModelSpec): sks",
                 "  most used tags: sks dog (3), red (2), blue (1), stripes (1)", "training:", "hashes:", "base model:"):
        assert line in text, line
    assert "    sks dog  " in text and "ss_learning_rate" in text and "ss_optimizer" in text
    assert "tag frequency" not in ok(cli(capsys, "inspect", trained))  # only with --metadata


def test_trigger_falls_back_to_the_most_used_tags(trained, tmp_path):
    """api.describe's trigger: ModelSpec's phrase, else the top tags (it used to drop them)."""
    with safe_open(str(trained), "pt") as f:
        meta = f.metadata()
    assert loradex.inspect(trained)["metadata"]["trigger"] == "sks"
    stripped = tmp_path / "no_phrase.safetensors"
    save_file(load_file(trained), str(stripped), {k: v for k, v in meta.items() if k != "modelspec.trigger_phrase"})
    assert loradex.inspect(stripped)["metadata"]["trigger"] == "sks dog, red, blue"
    assert loradex.describe(loradex.load(stripped))["metadata"]["trigger"] == "sks dog, red, blue"
