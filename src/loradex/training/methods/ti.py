"""``ti``: textual inversion (Gal et al. 2022). A new token (``--vectors N``: ``tok, tok_1 ...
tok_{N-1}``, diffusers' multi-vector convention, which its ``load_textual_inversion`` re-creates)
is added to each tokenizer; its embedding rows start as the mean embedding of ``--init-word``
(default: the class word) and are the only thing that learns.

Every other row stays bit-identical: the embedding matrix is trained with weight decay 0 and the
gradient of every other row zeroed before the optimizer step, so AdamW's moments for those rows
stay exactly zero and their update is ``-lr * 0 / (sqrt(0) + eps) = -0.0`` (``x + -0.0 == x`` for
every float). SDXL: both encoders (CLIP-L and bigG) get the token; the file holds ``clip_l`` and
``clip_g`` (written by converters/embeddings.py).
"""

from __future__ import annotations

import re

import torch

from loradex.errors import TrainingError
from loradex.training.methods.common import Method, cast_frozen, training_metadata


class TextualInversion(Method):
    """A new token whose embedding rows are the only thing that learns."""

    name = "ti"
    trains_text = True

    def setup(self, ctx) -> None:
        """Add the token (and its extra vectors) to every CLIP tokenizer, initialised from ``--init-word``."""
        cfg = ctx.cfg
        if len(ctx.clip_encoders()) != len(ctx.encoders()):
            raise TrainingError(f"textual inversion trains CLIP token embeddings; {ctx.family.label} is also "
                                "conditioned on T5, which loradex does not train embeddings for")
        self.tokens = [cfg.token] + [f"{cfg.token}_{i}" for i in range(1, cfg.num_vectors)]
        init = cfg.init_word or cfg.class_word or "*"
        self.ids: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        for comp, enc, tok in ctx.clip_encoders():
            if tok.add_tokens(self.tokens) != len(self.tokens):
                raise TrainingError(f"token {cfg.token!r} is already in the vocabulary of {comp}: pick a new word")
            ids = tok.convert_tokens_to_ids(self.tokens)
            init_ids = tok(init, add_special_tokens=False).input_ids
            if not init_ids:
                raise TrainingError(f"--init-word {init!r} has no tokens")
            enc.resize_token_embeddings(len(tok), mean_resizing=False)
            w = enc.get_input_embeddings().weight
            with torch.no_grad():
                w[ids] = w[init_ids].mean(0, keepdim=True).expand(len(ids), -1)
            w.requires_grad_(True)
            self.ids[comp] = torch.tensor(ids, device=w.device)
            mask = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
            mask[self.ids[comp]] = False
            self.frozen[comp] = mask
        cast_frozen(ctx, [e for _, e, _ in ctx.clip_encoders()] + [ctx.denoiser])

    def embedding_weights(self, ctx) -> list[torch.Tensor]:
        """The input-embedding matrix of each CLIP encoder (what the optimizer holds)."""
        return [enc.get_input_embeddings().weight for _, enc, _ in ctx.clip_encoders()]

    def modules(self, ctx):
        return [e for _, e, _ in ctx.clip_encoders()]

    def param_groups(self, ctx) -> list[dict]:
        cfg = ctx.cfg
        lr = cfg.text_lr if cfg.text_lr is not None else cfg.learning_rate
        return [{"params": self.embedding_weights(ctx), "lr": lr, "weight_decay": 0.0}]

    def prompt(self, ctx, prompt: str) -> str:
        """A multi-vector token spelled out as ``tok tok_1 ...`` (diffusers' convention)."""
        if len(self.tokens) == 1:
            return prompt
        return re.sub(rf"(?<![\w]){re.escape(self.tokens[0])}(?![\w])", " ".join(self.tokens), prompt)

    def after_backward(self, ctx) -> None:
        """Zero every other row's gradient: with weight decay 0 those rows never move (bit-identical)."""
        for (comp, _, _), w in zip(ctx.clip_encoders(), self.embedding_weights(ctx)):
            if w.grad is not None:
                w.grad[self.frozen[comp]] = 0

    def embedding(self, ctx):
        """The trained rows as a loradex Embedding (one tensor per text encoder)."""
        from loradex.core.adapter import Embedding

        vec = {comp: enc.get_input_embeddings().weight[self.ids[comp]].detach().float().cpu().clone()
               for comp, enc, _ in ctx.clip_encoders()}
        return Embedding(ctx.cfg.token, vec)

    def export(self, ctx, result):
        """An Adapter holding only the embedding."""
        from loradex.core.adapter import Adapter

        md = training_metadata(ctx, result)
        md["ss_num_vectors_per_token"] = str(len(self.tokens))
        return Adapter(embeddings={ctx.cfg.token: self.embedding(ctx)}, metadata=md, arch=ctx.arch.name,
                       source_format="loradex-train")
