"""``loha`` / ``lokr``: the LyCORIS kinds, trained with lycoris-lora's own modules
(``create_lycoris(unet, 1.0, linear_dim=rank, linear_alpha=alpha, algo=...)``) on the UNet's
attention projections (the modules of diffusers' ``Attention`` class: to_q/k/v/out.0).

lycoris-lora keeps its target preset in class attributes: it is set for the call and restored
(``loradex.demo.lycoris_preset``). The trained network is written with lycoris' ``save_weights``
to a temporary file and read back by loradex's lycoris reader, so the Adapter holds exactly the
tensors lycoris itself would load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from loradex.training.methods import Method, cast_frozen, training_metadata


class LycorisMethod(Method):
    def __init__(self, algo: str) -> None:
        self.algo = algo
        self.name = algo
        self.net = None

    def setup(self, ctx) -> None:
        from lycoris import create_lycoris

        from loradex.demo import lycoris_preset

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
        return {f"lycoris.{n}": p for n, p in self.net.named_parameters() if p.requires_grad}

    def param_groups(self, ctx) -> list[dict]:
        return [{"params": list(self.named_trainable(ctx).values()), "lr": ctx.cfg.learning_rate,
                 "weight_decay": 1e-2}]

    def export(self, ctx, result):
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
