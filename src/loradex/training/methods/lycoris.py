"""``loha`` / ``lokr``: the LyCORIS kinds, trained with lycoris-lora's own modules
(``create_lycoris(unet, 1.0, linear_dim=rank, linear_alpha=alpha, algo=...)``) on the UNet's
attention projections (the modules of diffusers' ``Attention`` class: to_q/k/v/out.0), and with
``--text-encoder`` on each CLIP text encoder's attention (q/k/v/out_proj: the same modules a
text-encoder LoRA trains; kohya's LyCORIS "attn-only" preset), one lycoris network per encoder.

lycoris-lora keeps its target preset in class attributes: it is set for the call and restored
(``lycoris_preset``, here because both the trainer and the demo's reference builders need it, and
a library module must not import the demo). The trained network is written with lycoris' ``save_weights``
to a temporary file and read back by loradex's lycoris reader, so the Adapter holds exactly the
tensors lycoris itself would load. A text encoder's network is written the same way and read back
against that encoder's own modules (tiny or SDXL-sized CLIPs share module names, so the file's
keys alone cannot say which encoder they are for).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from loradex.errors import TrainingError
from loradex.training.methods.common import Method, cast_frozen, training_metadata

#: The class attributes of ``LycorisNetwork`` that ``apply_preset`` changes.
_PRESET_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
                 "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@contextlib.contextmanager
def lycoris_preset(preset: dict) -> Iterator[None]:
    """lycoris-lora keeps presets in class attributes: set one and restore the defaults after, so
    one caller's targets never leak into the next network another caller creates."""
    from lycoris import LycorisNetwork

    keep = {k: getattr(LycorisNetwork, k) for k in _PRESET_ATTRS}
    LycorisNetwork.apply_preset(preset)
    try:
        yield
    finally:
        for k, v in keep.items():
            setattr(LycorisNetwork, k, v)


class LycorisMethod(Method):
    """LoHa or LoKr on the denoiser's attention projections, with lycoris-lora's own modules."""

    def __init__(self, algo: str) -> None:
        # imported now, before the loop silences third-party loggers: lycoris.logging sets its
        # logger to INFO (printing to stdout) when first imported, which would undo quiet()
        import lycoris  # noqa: F401

        self.algo = algo
        self.name = algo
        self.net = None
        self.te_nets: dict = {}

    def setup(self, ctx) -> None:
        """Create the LyCORIS network on the denoiser (preset: the family's attention modules) and,
        with ``--text-encoder``, one on each CLIP encoder's attention."""
        cfg = ctx.cfg
        self.net = self._network(ctx.denoiser, list(ctx.family.lycoris_modules), ctx)
        self.trains_text = cfg.text_encoder
        if cfg.text_encoder:
            for comp, enc, _ in ctx.clip_encoders():
                attn = sorted({type(m).__name__ for _, m in enc.named_modules() if hasattr(m, "q_proj")})
                self.te_nets[comp] = self._network(enc, attn, ctx)
        cast_frozen(ctx, [ctx.denoiser] + [e for _, e, _ in ctx.encoders()])

    def _network(self, model, module_classes: list[str], ctx):
        """A lycoris network of this algo on ``module_classes`` of ``model``, applied and on the device."""
        from lycoris import create_lycoris

        cfg = ctx.cfg
        kw = {"factor": -1} if self.algo == "lokr" else {}
        with lycoris_preset({"target_module": module_classes, "target_name": []}):
            net = create_lycoris(model, 1.0, linear_dim=cfg.rank, linear_alpha=cfg.lora_alpha, algo=self.algo, **kw)
        net.apply_to()
        net.to(ctx.device)
        return net

    def modules(self, ctx):
        te = [m for comp, enc, _ in ctx.clip_encoders() if comp in self.te_nets for m in (enc, self.te_nets[comp])]
        return [ctx.denoiser, self.net, *te]

    def named_trainable(self, ctx) -> dict[str, torch.Tensor]:
        """The networks' own parameters (LyCORIS modules wrap the model's, they are not in it):
        ``lycoris.*`` for the denoiser's, ``lycoris_<component>.*`` for a text encoder's."""
        out = {f"lycoris.{n}": p for n, p in self.net.named_parameters() if p.requires_grad}
        for comp, net in self.te_nets.items():
            out.update({f"lycoris_{comp}.{n}": p for n, p in net.named_parameters() if p.requires_grad})
        return out

    def param_groups(self, ctx) -> list[dict]:
        return [{"params": list(self.named_trainable(ctx).values()), "lr": ctx.cfg.learning_rate,
                 "weight_decay": 1e-2}]

    def export(self, ctx, result):
        """The Adapter lycoris itself would load: written with ``save_weights``, read back by loradex."""
        import loradex

        arch = ctx.arch
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "trained.safetensors"
            self.net.save_weights(str(path), torch.float32, {})
            adapter = loradex.load(path, format="lycoris", arch=arch)
            for comp, net in self.te_nets.items():
                te_path = Path(d) / f"{comp}.safetensors"
                net.save_weights(str(te_path), torch.float32, {})
                adapter.patches.update(_component_patches(te_path, comp, arch))
        args = {"algo": self.algo, "preset": "attn-only", "train_text_encoder": ctx.cfg.text_encoder}
        adapter.metadata = training_metadata(ctx, result, "lycoris.kohya", args)
        adapter.source_format = "loradex-train"
        adapter.arch = arch.name
        return adapter


def _component_patches(path: Path, component: str, arch) -> dict:
    """The patches of a lycoris file written for one component, read against that component's
    module names only (``lycoris_<path with _>``, CLIP paths with or without ``text_model.``)."""
    from safetensors.torch import load_file

    from loradex.converters.kohya import read_patches
    from loradex.errors import ArchError

    table: dict[str, str] = {}
    for name in arch.component_modules(component):
        p = name[len(component) + 1:]
        table[p.replace(".", "_")] = name
        if p.startswith("text_model."):
            table[p[len("text_model."):].replace(".", "_")] = name
    tensors = load_file(str(path))
    groups: dict[str, dict[str, str]] = {}
    for k in tensors:
        flat, _, suffix = k.partition(".")
        groups.setdefault(flat.removeprefix("lycoris_"), {})[suffix] = k

    def unflatten(flat: str):
        if flat not in table:
            raise ArchError(flat)
        return [(table[flat], None)]

    patches, _notes, unexplained = read_patches(groups, tensors, arch, unflatten, path)
    if unexplained or not patches:
        raise TrainingError(f"lycoris wrote {component} modules loradex cannot place: {', '.join(sorted(unexplained))[:200]}")
    return patches
