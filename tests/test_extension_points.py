"""Extension points: a patch kind and a file format defined and registered in this file alone.

Each is one class with one registration decorator; nothing else in loradex is edited, and every
layer picks it up from the registries -- readers (kohya keys), detection, the exact LoRA form that
LoRA-only writers use (then diffusers' own ``load_lora_weights`` checks the result), merges, the
``--to`` list and its help text, and the rule that unknown writer options are an error. (The family
extension point is ``test_arch.py::test_a_new_family_is_one_class_and_one_registration``.)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loradex
from loradex.cli import cli
from loradex.converters import converters, lora_targets, write_targets
from loradex.converters import safetensors_io as sio
from loradex.converters.common import ConversionReport, Converter, register_format, unregister_format
from loradex.core.adapter import Adapter
from loradex.core.kinds import KINDS, exact_lora_kinds, kind_suffixes, marker_suffixes, unregister_kind
from loradex.core.kinds.base import Patch, Shape, fields_from, register_kind
from loradex.core.kinds.lora import LoraPatch
from loradex.errors import ConversionError
from loradex.log import quiet
from loradex.tiny import tiny_arch, tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def toy_kind():
    """A rank-1 kind: ``dW = s * u v^T`` stored as ``toy_u`` (out,), ``toy_v`` (in,), ``toy_s`` ()."""

    @register_kind
    @dataclass(eq=False)
    class ToyPatch(Patch):
        u: torch.Tensor
        v: torch.Tensor
        s: torch.Tensor | None = None

        kind = "toy"
        MARKERS = ("toy_u", "toy_v")
        SUFFIXES = {"toy_u": "u", "toy_v": "v", "toy_s": "s"}
        exact_lora = True

        @property
        def shape(self) -> Shape:
            return (self.u.shape[0], self.v.shape[0])

        @property
        def rank(self) -> int:
            return 1

        def _scale(self) -> float:
            return 1.0 if self.s is None else float(self.s)

        def delta(self, base_weight=None, multiplier: float = 1.0) -> torch.Tensor:
            return (torch.outer(self.u.float(), self.v.float()) * self._scale() * multiplier).float()

        def to_lora(self, rank=None, base_weight=None):
            return LoraPatch(up=self.u[:, None] * self._scale(), down=self.v[None, :]), 0.0

        def scaled(self, factor: float):
            return ToyPatch(self.u * factor, self.v, self.s)

        @classmethod
        def from_tensors(cls, tensors, weight_shape=None):
            p = cls(**fields_from("toy", tensors, cls.SUFFIXES, ("toy_u", "toy_v"), ("toy_s",)))
            if weight_shape is not None and tuple(weight_shape) != p.shape:
                from loradex.errors import FormatError

                raise FormatError(f"toy patch {p.shape} does not fit {tuple(weight_shape)}")
            return p

    yield ToyPatch
    unregister_kind("toy")


def test_a_new_kind_is_one_class_and_one_registration(toy_kind, tmp_path):
    # every table of kinds is derived from the registry
    assert "toy" in KINDS and "toy" in exact_lora_kinds()
    assert {"toy_u", "toy_v", "toy_s"} <= set(kind_suffixes()) and "toy_u" in marker_suffixes()

    arch = tiny_arch("sd1")
    pipe = tiny_sd_pipeline()
    w = dict(pipe.unet.named_parameters())[MODULE.split(".", 1)[1] + ".weight"]
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g)
    # a kohya-keyed file holding the toy kind, written as another tool would (plain tensors)
    src = tmp_path / "toy.safetensors"
    flat = arch.kohya_name(MODULE)
    sio.save({f"{flat}.toy_u": u, f"{flat}.toy_v": v, f"{flat}.toy_s": torch.tensor(0.5)}, src, {})

    a = loradex.load(src, arch=arch)  # read by the kohya reader through split_kind
    assert a.patches[MODULE].kind == "toy" and not a.unexplained
    assert torch.allclose(a.patches[MODULE].delta(), 0.5 * torch.outer(u, v))
    assert loradex.load(src).arch == arch.name  # detected from the kind's shapes alone

    # a LoRA-only writer takes the exact LoRA form; diffusers' own loader checks the math
    out = tmp_path / "diffusers.safetensors"
    report = loradex.convert(src, out, to="diffusers", arch=arch.name)
    assert MODULE in report.exact and not report.approximated
    ref = copy.deepcopy(pipe)
    with quiet():
        pipe.load_lora_weights(str(out), adapter_name="t")
        pipe.fuse_lora(adapter_names=["t"], lora_scale=1.0)
        pipe.unload_lora_weights()  # the fused weights stay, the PEFT wrappers go
    got = dict(pipe.unet.named_parameters())[MODULE.split(".", 1)[1] + ".weight"]
    base = dict(ref.unet.named_parameters())[MODULE.split(".", 1)[1] + ".weight"]
    assert torch.allclose(got - base, 0.5 * torch.outer(u, v), atol=1e-5)

    # merges use the exact LoRA form too (concat: rank 1 + 1)
    merged, _ = loradex.merge([(a, 1.0), (a, 1.0)], method="concat")
    assert torch.allclose(merged.patches[MODULE].delta(), torch.outer(u, v), atol=1e-5)

    # kohya/lycoris writers keep the kind as is
    back = tmp_path / "back.safetensors"
    loradex.convert(src, back, to="kohya", arch=arch.name)
    assert loradex.load(back).patches[MODULE].kind == "toy"


@pytest.fixture
def toy_format():
    """A JSON-lines-free toy format: a safetensors file whose keys are ``toy::<canonical>::<suffix>``."""

    @register_format
    class ToyFormat(Converter):
        name = "toyfmt"
        priority = 5
        aliases = ("toy-format",)
        options = frozenset({"shout"})
        description = "toy keys"

        def detect(self, path: Path) -> bool:
            return path.is_file() and all(k.startswith("toy::") for k in sio.read_header(path).tensors)

        def read(self, path: Path, arch=None) -> Adapter:
            from loradex.core.kinds import patch_from_tensors

            groups: dict[str, dict[str, torch.Tensor]] = {}
            for k, t in sio.load(path).items():
                _, mod, suf = k.split("::")
                groups.setdefault(mod, {})[suf] = t
            meta = dict(sio.read_header(path).metadata)
            return Adapter({m: patch_from_tensors(sd) for m, sd in groups.items()}, {}, meta,
                           meta.get("arch", ""), self.name)

        def write(self, adapter, path, report: ConversionReport, dtype=None, rank=None, arch=None, title=None,
                  shout=False):
            out = {f"toy::{m}::{s}": t for m, p in adapter.patches.items() for s, t in p.tensors().items()}
            sio.save(out, path, {"arch": adapter.arch, "shout": json.dumps(bool(shout))})
            report.kept.extend(adapter.patches)

    yield ToyFormat
    unregister_format("toyfmt")


def test_a_new_format_is_one_class_and_one_registration(toy_format, tmp_path):
    assert "toyfmt" in converters() and "toyfmt" in write_targets() and "toy-format" in write_targets()
    assert "toyfmt" in lora_targets()
    arch = tiny_arch("sd1")
    shape = arch.module(MODULE).shape
    a = Adapter({MODULE: LoraPatch(up=torch.randn(shape[0], 2), down=torch.randn(2, shape[1]), alpha=1.0)},
                arch=arch.name)
    out = tmp_path / "a.toy"
    loradex.save(a, out, "toy-format", shout=True)
    assert sio.read_header(out).metadata["shout"] == "true"
    back = loradex.load(out)  # detected by the toy format (asked first: priority 5)
    assert back.source_format == "toyfmt"
    assert torch.equal(back.patches[MODULE].delta(), a.patches[MODULE].delta())
    # to and from the built-in formats, exact
    k = tmp_path / "k.safetensors"
    loradex.convert(out, k, to="kohya", arch=arch.name)
    assert torch.allclose(loradex.load(k).patches[MODULE].delta(), a.patches[MODULE].delta())
    # unknown writer options are an error, for the toy and for the built-ins alike
    with pytest.raises(ConversionError, match="no option uniform_alpha"):
        loradex.save(a, tmp_path / "x.toy", "toyfmt", uniform_alpha=True)
    with pytest.raises(ConversionError, match="diffusers writer has no option shout"):
        loradex.save(a, tmp_path / "x.safetensors", "diffusers", shout=True)
    # the CLI's --to help and its error list come from the registry
    r = CliRunner().invoke(cli, ["convert", "--help"])
    assert "toyfmt" in r.output and "toy-format" in r.output
