"""``bake``: adapters merged into a base model, written in the base's own layout.

For every module an adapter patches, ``W' = W + delta`` with each kind's exact math from
``Patch.delta(base_weight, multiplier)`` (LoRA/LoCon/Tucker, LoHa, LoKr, full, and the kinds that
depend on the weight: DoRA, (IA)^3, GLoRA, Diag-OFT, BOFT) and ``bias_delta`` for the bias. The
base is read and written one tensor at a time (``CheckpointReader.rewrite``): unchanged tensors are
copied file-to-file, the output is a diffusers folder or a single file like the base.

Several adapters are applied in the order given, each to the weight the previous ones produced
(what ComfyUI does when it stacks patches on one weight); for additive kinds the order does not
matter and the result is ``W + sum_i delta_i(w_i)``. The weight ``w_i`` is the multiplier the
reference tools apply (lycoris-lora's ``multiplier``: linear for additive kinds, inside the
non-linear map for DoRA / OFT / BOFT / (IA)^3).

``with_embeddings``: textual-inversion tokens carried by the adapters (pivotal tuning bundles,
TI files) are appended to the tokenizer(s) and as new rows of the token-embedding table(s), as
diffusers' ``load_textual_inversion`` does at run time (a multi-vector token ``<t>`` becomes
``<t>``, ``<t>_1``, ...). Only a diffusers folder holds a tokenizer: single files refuse it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loradex.core.adapter import Adapter
from loradex.core.kinds.base import fit_to
from loradex.errors import ConversionError, LoradexError


@dataclass
class BakeReport:
    """``out``: the path written; ``layout``: the base's (``folder`` or a single-file layout);
    ``modules``: module -> kinds applied, in adapter order (``lora+dora`` for a DoRA patch);
    ``tokens``: token row (``<t>``, ``<t>_1``...) -> tokenizer folder -> ``[id]`` added;
    ``notes``: what was not done and why; ``seconds``: wall time."""

    out: str = ""
    layout: str = ""
    modules: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Every field, JSON-ready (``loradex bake --json``)."""
        return {"out": self.out, "layout": self.layout, "modules": self.modules, "tokens": self.tokens,
                "notes": self.notes, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        """One line: modules changed with a count per kind, tokens added, layout and time."""
        kinds: dict[str, int] = {}
        for ks in self.modules.values():
            for k in ks:
                kinds[k] = kinds.get(k, 0) + 1
        what = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "nothing"
        tok = f", {len(self.tokens)} tokens added" if self.tokens else ""
        return f"{len(self.modules)} modules changed ({what}){tok}, {self.layout} written in {self.seconds:.1f} s"


def _token_rows(name: str, n: int) -> list[str]:
    """diffusers' names for the vectors of a multi-vector token: ``t``, ``t_1``, ``t_2``..."""
    return [name] + [f"{name}_{i}" for i in range(1, n)]


def _embedding_plan(reader, adapters, report: BakeReport):
    """(new table shapes, rows to append per table, extra files) for ``with_embeddings``."""
    from transformers import AutoTokenizer

    from loradex.converters import safetensors_io as sio

    if reader.layout != "folder":
        raise LoradexError("--with-embeddings needs a diffusers folder base (a single file has no tokenizer)")
    tok_dir = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    rows: dict[str, list[torch.Tensor]] = {}
    tokens: dict[str, list[str]] = {}
    for adapter, w in adapters:
        for tok, emb in adapter.embeddings.items():
            if w != 1.0:
                report.notes.append(f"{tok}: embeddings are added as they are (weight {w:g} does not apply)")
            for comp, vec in emb.vectors.items():
                if comp not in tok_dir:
                    raise LoradexError(f"{tok}: no tokenizer for {comp}")
                rows.setdefault(comp, []).append(vec.reshape(-1, vec.shape[-1]))
                tokens.setdefault(comp, []).extend(_token_rows(tok, vec.reshape(-1, vec.shape[-1]).shape[0]))
    shapes, extra, appended = {}, {}, {}
    for comp, vecs in rows.items():
        table = f"{comp}.text_model.embeddings.token_embedding"
        if not reader.has(table):
            raise LoradexError(f"{reader.path}: no token embedding table for {comp}")
        num, dim = reader.shape(table)
        new = torch.cat(vecs)
        if new.shape[1] != dim:
            raise LoradexError(f"embedding width {new.shape[1]} does not fit {comp} ({dim})")
        tdir = reader.path / tok_dir[comp]
        if not tdir.is_dir():
            raise LoradexError(f"{reader.path}: no {tok_dir[comp]}/ folder for {comp}'s tokens")
        import tempfile

        from loradex.log import quiet

        with quiet():
            tk = AutoTokenizer.from_pretrained(str(tdir))
        clash = [t for t in tokens[comp] if t in tk.get_vocab()]
        if clash:
            raise LoradexError(f"token {clash[0]!r} is already in {tok_dir[comp]}")
        tk.add_tokens(tokens[comp])
        ids = tk.convert_tokens_to_ids(tokens[comp])
        if ids != list(range(num, num + len(ids))):
            raise LoradexError(f"{tok_dir[comp]}: has {len(tk)} tokens but {comp}'s table {num} rows; cannot append")
        with tempfile.TemporaryDirectory() as td, quiet():
            tk.save_pretrained(td)
            for f in Path(td).iterdir():
                extra[f"{tok_dir[comp]}/{f.name}"] = f.read_bytes()
        cfg_path = reader.path / comp / "config.json"
        cfg = sio.read_json(cfg_path)
        cfg["vocab_size"] = num + new.shape[0]
        extra[f"{comp}/config.json"] = (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
        shapes[(table, "weight")] = (num + new.shape[0], dim)
        appended[table] = new
        for t, i in zip(tokens[comp], ids):
            report.tokens.setdefault(t, {})[tok_dir[comp]] = [i]
    return shapes, appended, extra


def bake(
    base, adapters: list[tuple[Adapter, float]], out, with_embeddings: bool = False, arch=None,
    progress: bool = False, allow_nonfinite: bool = False, dtype: torch.dtype | str | None = None,
) -> BakeReport:
    """Merge ``adapters`` (``(adapter, weight)`` pairs) into ``base`` (a path of a diffusers folder
    or single-file checkpoint, or a ``CheckpointReader``) and write the result to ``out`` in the
    base's layout. Every patched module must exist in the base (else ConversionError: wrong base
    model?). An adapter holding NaN/Inf values is refused (FormatError) unless ``allow_nonfinite``:
    it would write a checkpoint full of NaN. ``dtype`` (``torch.float16`` or ``"fp16"``/``"bf16"``/
    ``"fp32"``): every floating tensor of the output in that dtype, the untouched ones too (default:
    each tensor keeps the base's dtype; the sums are computed in fp32 either way). Returns a
    ``BakeReport``."""
    from loradex.converters import DTYPES
    from loradex.converters.checkpoint import CheckpointReader

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LoradexError(f"dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
        dtype = DTYPES[dtype]

    t0 = time.perf_counter()
    if not adapters:
        raise LoradexError("bake needs at least one adapter")
    if not allow_nonfinite:
        for i, (adapter, _w) in enumerate(adapters):
            adapter.check_finite(f"bake adapter {i + 1}")
    reader = base if isinstance(base, CheckpointReader) else CheckpointReader(base, arch=arch)
    report = BakeReport(out=str(out), layout=reader.layout)
    changed: set[tuple[str, str]] = set()
    for adapter, _w in adapters:
        unknown = [n for n in adapter.patches if not reader.has(n)]
        if unknown:
            raise ConversionError(
                f"{len(unknown)} modules of the adapter are not in the base model (e.g. {unknown[0]}); "
                f"is it for {reader.arch.name}?")
        for n, p in adapter.patches.items():
            shape = reader.shape(n)
            if tuple(p.shape) != tuple(shape) and torch.Size(p.shape).numel() != torch.Size(shape).numel():
                raise ConversionError(f"{n}: adapter shape {list(p.shape)} does not fit the base's {list(shape)}")
            changed.add((n, "weight"))
            if reader.has(n, "bias"):
                changed.add((n, "bias"))
            report.modules.setdefault(n, []).append(p.kind + ("+dora" if getattr(p, "dora_scale", None) is not None else ""))
    new_shapes, appended, extra = {}, {}, {}
    if with_embeddings:
        if not any(a.embeddings for a, _ in adapters):
            report.notes.append("--with-embeddings: the adapters carry no embeddings")
        else:
            new_shapes, appended, extra = _embedding_plan(reader, adapters, report)
            changed |= set(new_shapes)
    elif any(a.embeddings for a, _ in adapters):
        report.notes.append("the adapters carry embeddings; not baked (use with_embeddings)")

    def update(module: str, param: str, current: torch.Tensor) -> torch.Tensor | None:
        dt = torch.float64 if current.dtype == torch.float64 else torch.float32
        w = current.to(dt)
        if (module, param) in new_shapes:
            return torch.cat([w, appended[module].to(dt)]).to(current.dtype)
        touched = False
        for adapter, mult in adapters:
            p = adapter.patches.get(module)
            if p is None:
                continue
            if param == "weight":
                d = p.delta(base_weight=w if p.needs_base else None, multiplier=mult)
                w = w + fit_to(d.to(dt), w)
                touched = True
            else:
                d = p.bias_delta(base_bias=w, multiplier=mult)
                if d is not None:
                    w = w + d.to(dt).reshape(w.shape)
                    touched = True
        return w.to(current.dtype) if touched else None

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(reader.stored), unit="tensor", desc="bake", leave=False)
    try:
        report.notes += reader.rewrite(
            out, changed, update,
            metadata={"loradex.bake": json.dumps({"adapters": len(adapters), "modules": len(report.modules),
                                                  "with_embeddings": bool(with_embeddings)})},
            progress=bar.update if bar is not None else None, extra_files=extra, new_shapes=new_shapes,
            dtype=dtype,
        )
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report
