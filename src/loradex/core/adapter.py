"""``Adapter``: the format-neutral model every converter reads into and writes from.

Module names are *canonical*: ``<component>.<module path>`` where the component is one of
``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` and the path is
the diffusers/transformers module path. CLIP text encoders are always spelled with the
``text_model.`` level (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``): that is what
kohya, A1111, ComfyUI and diffusers files in the wild use, even though transformers 5's
``CLIPTextModel`` dropped the level from its own module names.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loradex.core.kinds.base import Patch
from loradex.core.tensorspec import all_finite

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def component_of(name: str) -> str:
    """``unet.down_blocks.0...`` -> ``unet``."""
    return name.split(".", 1)[0]


@dataclass
class Embedding:
    """A textual-inversion token: one ``[n_vectors, dim]`` tensor per text encoder component.

    SD1/SD2 embeddings have only ``text_encoder``; SDXL ones have ``text_encoder`` (CLIP-L, 768,
    the file's ``clip_l``) and ``text_encoder_2`` (OpenCLIP bigG, 1280, the file's ``clip_g``).
    """

    token: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        """Vectors per token (the ``n_vectors`` axis; the same for every component)."""
        return next(iter(self.vectors.values())).shape[0]


@dataclass
class Adapter:
    """Patches by canonical module name, textual-inversion embeddings by token, the file's
    metadata, the arch it is for and the format it was read from.

    ``unexplained`` maps every key of the source file that no patch kind, module or embedding
    explains to the reason (``"lora_unet_x.foo": "no patch kind has the tensor 'foo' (next to a lora
    patch)"``), like ComfyUI's ``lora key not loaded: <key>`` but collected: readers never drop a key
    silently, ``loradex.convert`` carries the list into its report, ``describe`` shows it whole, and
    ``strict=True`` (``loradex.load`` / ``convert``) turns any entry into a FormatError. It is
    keyword-or-last-positional (after ``notes``), so older positional constructions still work.
    """

    patches: dict[str, Patch] = field(default_factory=dict)
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str | None = None
    source_format: str | None = None
    #: What a reader noticed (approximations, renamings); not written to files.
    notes: list[str] = field(default_factory=list)
    #: Source keys nothing explains -> why (see the class docstring); not written to files.
    unexplained: dict[str, str] = field(default_factory=dict)

    # ---- summaries used by inspect, the registry and the writers --------------------------
    def kinds(self) -> Counter:
        """Patch count per kind name (``Counter({"lora": 264, "loha": 2})``)."""
        return Counter(p.kind for p in self.patches.values())

    def components(self) -> dict[str, int]:
        """Patch count per component (``{"unet": 192, "text_encoder": 72}``)."""
        return dict(Counter(component_of(n) for n in self.patches))

    def ranks(self) -> Counter:
        """Patch count per rank, over the patches that have one (full, norm, (IA)^3... have none)."""
        return Counter(p.rank for p in self.patches.values() if p.rank is not None)

    def dtype(self) -> torch.dtype | None:
        """The dtype of the first patch (see :attr:`Patch.dtype`), else of the first embedding;
        None for an empty adapter. Mixed-dtype files are not detected: the first one decides."""
        for p in self.patches.values():
            return p.dtype
        for e in self.embeddings.values():
            return next(iter(e.vectors.values())).dtype
        return None

    def to(self, dtype: torch.dtype) -> Adapter:
        """A copy with every floating-point tensor cast to ``dtype`` (patches via :meth:`Patch.to`,
        alpha scalars included; embeddings too). Metadata, notes and ``unexplained`` are copied."""
        return Adapter(
            patches={n: p.to(dtype) for n, p in self.patches.items()},
            embeddings={
                t: Embedding(e.token, {c: v.to(dtype) for c, v in e.vectors.items()})
                for t, e in self.embeddings.items()
            },
            metadata=dict(self.metadata),
            arch=self.arch,
            source_format=self.source_format,
            notes=list(self.notes),
            unexplained=dict(self.unexplained),
        )

    def nonfinite(self) -> list[str]:
        """Modules and embedding tokens holding NaN or Inf values (sorted). Such an adapter loads
        everywhere and then turns every image it touches into noise (or a black frame), so merge,
        bake and the registry refuse it unless told otherwise (``allow_nonfinite``)."""
        bad = [n for n, p in self.patches.items()
               if any(t.is_floating_point() and not all_finite(t) for t in p.tensors().values())]
        bad += [f"embedding {tok}" for tok, e in self.embeddings.items()
                if any(v.is_floating_point() and not all_finite(v) for v in e.vectors.values())]
        return sorted(bad)

    def check_finite(self, what: str = "adapter") -> None:
        """FormatError naming the count and the first modules when :meth:`nonfinite` is not empty."""
        bad = self.nonfinite()
        if bad:
            from loradex.errors import FormatError

            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise FormatError(f"{what} holds NaN/Inf values in {len(bad)} module(s): {', '.join(bad[:3])}{more} "
                              "(pass --allow-nonfinite / allow_nonfinite=True to use it anyway)")

    def nbytes(self) -> int:
        """Bytes of every tensor the adapter holds."""
        return sum(p.nbytes() for p in self.patches.values()) + sum(
            v.numel() * v.element_size() for e in self.embeddings.values() for v in e.vectors.values()
        )
