"""``loha`` / ``lokr``: the LyCORIS kinds, trained with lycoris-lora's own modules
(``create_lycoris(unet, 1.0, linear_dim=rank, linear_alpha=alpha, algo=...)``) on the UNet's
attention projections (the modules of diffusers' ``Attention`` class: to_q/k/v/out.0).

lycoris-lora keeps its target preset in class attributes: it is set for the call and restored
(``lycoris_preset``, here because both the trainer and the demo's reference builders need it, and
a library module must not import the demo). The trained network is written with lycoris' ``save_weights``
to a temporary file and read back by loradex's lycoris reader, so the Adapter holds exactly the
tensors lycoris itself would load.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

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

    def setup(self, ctx) -> None:
        """Create the LyCORIS network on the denoiser (preset: the family's attention modules)."""
        from lycoris import create_lycoris

        cfg = ctx.cfg
        kw = {"factor": -1} if self.algo == "lokr" else {}
        with lycoris_preset({"target_module": list(ctx.family.lycoris_modules), "target_name": []}):
            self.net = create_lycoris(ctx.denoiser, 1.0, linear_dim=cfg.rank, linear_alpha=cfg.lora_alpha,
                                      algo=self.algo, **kw)
        self.net.apply_to()
        self.net.to(ctx.device)
        cast_frozen(ctx, [ctx.denoiser] + [e for _, e, _ in ctx.encoders()])

    def modules(self, ctx):
        return [ctx.denoiser, self.net]

    def named_trainable(self, ctx) -> dict[str, torch.Tensor]:
        """The network's own parameters (LyCORIS modules wrap the denoiser's, they are not in it)."""
        return {f"lycoris.{n}": p for n, p in self.net.named_parameters() if p.requires_grad}

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
        adapter.metadata = training_metadata(ctx, result, "lycoris.kohya", {"algo": self.algo, "preset": "attn-only"})
        adapter.source_format = "loradex-train"
        adapter.arch = arch.name
        return adapter
