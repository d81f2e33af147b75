"""``loradex demo``: the main job on an embedded tiny model, end to end, with the real tools.

1. Build a tiny SD-style pipeline in-process (random weights, no download).
2. Make reference adapters with the real tools: every LyCORIS algorithm with lycoris-lora
   (LoRA/LoCon, LoCon-Tucker, LoHa, LoKr, full, (IA)^3, GLoRA, Diag-OFT, BOFT, DoRA), a LoRA with
   peft saved by diffusers' ``save_lora_weights``, and a textual-inversion embedding.
3. Read each with loradex, write it in every format, load each result back with the consumer of
   that format (diffusers ``load_lora_weights`` for diffusers files and plain-LoRA kohya files,
   lycoris-lora's kohya loader for kohya files of other kinds, ``create_lycoris_from_weights``
   for ``lycoris_`` files, ``PeftModel.from_pretrained`` for PEFT folders, and
   ``load_textual_inversion`` for embeddings).
4. Compare the UNet's (text encoder's) output with the reference tool's own forward pass and print
   the matrix of relative errors: ``||y - y_ref|| / ||y_ref - y_base||``, the error relative to
   what the adapter changes (much stricter than relative to the output).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loradex.training.methods.lycoris import lycoris_preset

TARGETS = ("kohya", "lycoris", "diffusers", "peft")
SVD_RANK = 8


@dataclass
class Reference:
    """A reference adapter made by a real tool: its file and the UNet output (``y_ref``, float64)
    with the tool's own module applied; ``kinds`` is filled in by :func:`run_one` and not read."""

    label: str
    path: Path
    y_ref: torch.Tensor  # UNet output with the real tool's adapter applied
    kinds: str = ""


@dataclass
class Cell:
    """One entry of the demo matrix: ``status``, the relative error (None when nothing could be
    measured) and how the file was written / loaded, or why not."""

    status: str  # "ok", "approx" (an SVD at SVD_RANK: the error is the loss), "n/a", "fail"
    error: float | None = None
    how: str = ""


@dataclass
class DemoResult:
    """``rows``: reference label -> target format -> Cell; ``embeddings``: TI format -> Cell."""

    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)
    embeddings: dict[str, Cell] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """``{"adapters": {label: {target: cell}}, "embeddings": {format: cell}}`` (``loradex demo --json``)."""

        def c(x: Cell) -> dict:
            return {"status": x.status, "error": x.error, "how": x.how}

        return {
            "adapters": {r: {t: c(x) for t, x in row.items()} for r, row in self.rows.items()},
            "embeddings": {t: c(x) for t, x in self.embeddings.items()},
        }

    @property
    def failures(self) -> int:
        """Cells with status ``fail`` (``n/a`` and ``approx`` are not failures)."""
        return sum(x.status == "fail" for row in self.rows.values() for x in row.values()) + sum(
            x.status == "fail" for x in self.embeddings.values()
        )


class TinyBench:
    """The tiny pipeline, fixed UNet inputs, and the output of the clean model."""

    def __init__(self, seed: int = 0) -> None:
        from loradex.tiny import tiny_arch, tiny_sd_pipeline

        self.pipe = tiny_sd_pipeline(seed)
        self.arch = tiny_arch()
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(2, 4, 8, 8, generator=g)
        self.t = torch.tensor([10, 500])
        self.ctx = torch.randn(2, 7, 32, generator=g)
        self.y_base = self.unet_out(self.pipe.unet)

    @torch.no_grad()
    def unet_out(self, unet) -> torch.Tensor:
        """``unet``'s prediction on the fixed inputs (2 latents 4x8x8, timesteps 10 and 500, a
        random 7x32 context), as float64."""
        return unet(self.latents, self.t, encoder_hidden_states=self.ctx).sample.double()

    def fresh_unet(self):
        """A deep copy of the clean UNet, for one tool to patch."""
        return copy.deepcopy(self.pipe.unet)

    def fresh_pipe(self):
        """A deep copy of the clean pipeline, for one tool to patch."""
        return copy.deepcopy(self.pipe)

    def rel(self, y: torch.Tensor, y_ref: torch.Tensor) -> float:
        """``||y - y_ref|| / ||y_ref - y_base||``: the error relative to what the reference adapter
        changes (inf when it changes nothing)."""
        d = torch.linalg.vector_norm(y_ref - self.y_base)
        return float(torch.linalg.vector_norm(y - y_ref) / d) if d > 0 else math.inf


#: label -> create_lycoris keyword arguments
LYCORIS_ALGOS: dict[str, dict] = {
    "lora": dict(algo="lora"),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor=4),
    "full": dict(algo="full"),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora"),
    "diag-oft": dict(algo="diag-oft", constraint=0.0),
    "boft": dict(algo="boft"),
    "dora": dict(algo="lora", dora_wd=True),
}


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """lycoris zero-initialises one factor (so a fresh adapter does nothing): fill every float
    parameter with seeded noise so the reference really changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=g) * scale
                if "dora_scale" in name or name.endswith("rescale"):
                    p.mul_(1 + noise)  # keep magnitudes near the real norms
                else:
                    p.copy_(noise)


def make_lycoris_reference(bench: TinyBench, label: str, out: Path, seed: int = 0) -> Reference:
    """A lycoris-lora network of algorithm ``label`` (:data:`LYCORIS_ALGOS`) on every Linear and
    Conv2d of a fresh UNet (dim 4, alpha 2), randomized (:func:`randomize_`), its output recorded and
    its weights saved to ``out/ref_<label>.safetensors`` (float32)."""
    from lycoris import create_lycoris

    from loradex.log import quiet

    unet = bench.fresh_unet()
    kw = dict(LYCORIS_ALGOS[label])
    with quiet(), lycoris_preset({"target_module": ["Linear", "Conv2d"], "target_name": []}):
        net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, **kw)
        net.apply_to()
    randomize_(net, seed)
    y_ref = bench.unet_out(unet)
    path = out / f"ref_{label}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return Reference(label, path, y_ref)


def make_peft_reference(bench: TinyBench, out: Path, seed: int = 0) -> Reference:
    """A LoRA made by peft on the UNet, saved by diffusers' own save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from loradex.log import quiet

    pipe = bench.fresh_pipe()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                     rank_pattern={"conv1": 2}, alpha_pattern={"conv2": 3})
    with quiet():
        pipe.unet.add_adapter(cfg)
    randomize_(pipe.unet, seed)
    # only the LoRA factors were meant to be random: restore the base weights
    base = bench.pipe.unet.state_dict()
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            key = n.replace(".base_layer", "")
            if "lora_" not in n and key in base:
                p.copy_(base[key])
    y_ref = bench.unet_out(pipe.unet)
    d = out / "ref_peft"
    with quiet():
        StableDiffusionPipeline.save_lora_weights(
            d, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True,
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        )
    return Reference("peft-lora (diffusers file)", d / "pytorch_lora_weights.safetensors", y_ref)


# ---- consumers: load a written file with the real tool and run the UNet ---------------------

def consume_diffusers(bench: TinyBench, path: Path) -> torch.Tensor:
    """UNet output after diffusers' ``load_lora_weights`` of ``path`` on a fresh pipeline."""
    from loradex.log import quiet

    pipe = bench.fresh_pipe()
    with quiet():
        pipe.load_lora_weights(str(path), adapter_name="demo")
    return bench.unet_out(pipe.unet)


def consume_lycoris(bench: TinyBench, path: Path) -> torch.Tensor:
    """UNet output after lycoris-lora's ``create_lycoris_from_weights`` of ``path`` (IA3 files:
    a network built with ``algo=ia3`` and its ``load_weights``, see the comment inside)."""
    from lycoris import create_lycoris, create_lycoris_from_weights

    from loradex.log import quiet

    unet = bench.fresh_unet()
    with quiet():
        if _is_ia3(path):
            # lycoris-lora 4.1.3's create_lycoris_from_weights cannot build IA3 modules (a known
            # defect, FORMATS.md §2): build the network with algo=ia3 and use its load_weights.
            with lycoris_preset({"target_module": ["Linear", "Conv2d"], "target_name": []}):
                net = create_lycoris(unet, 1.0, algo="ia3")
            net.apply_to()
            info = net.load_weights(str(path))
            if info.get("unexpected keys"):
                raise ValueError(f"unexpected keys {info['unexpected keys'][:3]}")
        else:
            net, _ = create_lycoris_from_weights(1.0, str(path), unet)
            net.apply_to()
    return bench.unet_out(unet)


def _is_ia3(path: Path) -> bool:
    from loradex.converters import safetensors_io as sio

    return any(k.endswith(".on_input") for k in sio.read_header(path).tensors)


def consume_lycoris_kohya(bench: TinyBench, path: Path) -> torch.Tensor:
    """kohya-named files of LyCORIS kinds: lycoris-lora's kohya entry point (what sd-scripts uses)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    from loradex.log import quiet

    if _is_ia3(path):
        return _consume_ia3_kohya(bench, path)
    pipe = bench.fresh_pipe()
    # lycoris-lora 4.1.3 builds a throw-away default network first, and its default targets match
    # diffusers' time_embedding twice (module type TimestepEmbedding and name
    # time_embedding.linear_1) -> "duplicated lora name". Its name targets are cleared meanwhile;
    # they do not affect which modules are loaded from the file.
    keep = LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME
    LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = []
    try:
        y = _consume_lycoris_kohya(bench, pipe, path, create_network_from_weights, quiet)
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = keep
    return y


def _consume_lycoris_kohya(bench, pipe, path, create_network_from_weights, quiet) -> torch.Tensor:
    with quiet():
        net, sd = create_network_from_weights(1.0, str(path), pipe.vae, pipe.text_encoder, pipe.unet, for_inference=True)
        net.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    return bench.unet_out(pipe.unet)


def _consume_ia3_kohya(bench: TinyBench, path: Path) -> torch.Tensor:
    """IA3 in kohya naming (SD1: ``lora_unet_<diffusers path>``): lycoris' wrapper with the
    ``lora_unet`` prefix and algo=ia3, then its own load_weights (see consume_lycoris)."""
    from lycoris import create_lycoris

    from loradex.log import quiet

    unet = bench.fresh_unet()
    with quiet(), lycoris_preset({"target_module": ["Linear", "Conv2d"], "target_name": [], "lora_prefix": "lora_unet"}):
        net = create_lycoris(unet, 1.0, algo="ia3")
        net.apply_to()
        info = net.load_weights(str(path))
    if info.get("unexpected keys"):
        raise ValueError(f"unexpected keys {info['unexpected keys'][:3]}")
    return bench.unet_out(unet)


def consume_peft(bench: TinyBench, path: Path) -> torch.Tensor:
    """UNet output after ``PeftModel.from_pretrained`` of the PEFT folder ``path``."""
    from peft import PeftModel

    from loradex.log import quiet

    unet = bench.fresh_unet()
    with quiet():
        model = PeftModel.from_pretrained(unet, str(path))
    return bench.unet_out(model.base_model.model)


def run_one(bench: TinyBench, ref: Reference, target: str, out: Path) -> Cell:
    """Read ``ref`` with loradex, write it as ``target`` (SVD at :data:`SVD_RANK` where the target
    cannot hold the kind), load the result with that format's real consumer and compare with the
    reference output. ``ok`` at a relative error <= 1e-4; ``approx`` for an SVD (the error is the
    measured loss); ``n/a`` when loradex refuses the write (e.g. a kind that depends on the base
    weights and a LoRA-only target); ``fail`` when the consumer refuses the file or the error is
    larger."""
    import loradex
    from loradex.errors import LoradexError

    adapter = loradex.load(ref.path, arch=bench.arch)
    ref.kinds = ",".join(sorted(adapter.kinds()))
    dst = out / (f"{ref.path.stem}.{target}" + ("" if target == "peft" else ".safetensors"))
    try:
        report = loradex.save(adapter, dst, target, rank=SVD_RANK, arch=bench.arch)
    except LoradexError as e:
        return Cell("n/a", None, str(e).split(";")[0][:80])
    how = "exact" if not report.approximated else f"svd r={SVD_RANK}"
    if report.exact and not report.approximated:
        how = "exact (converted)"
    consumer: Callable[[TinyBench, Path], torch.Tensor]
    if target == "diffusers":
        consumer = consume_diffusers
    elif target == "peft":
        consumer = consume_peft
    elif target == "lycoris":
        consumer = consume_lycoris
    else:
        kinds = set(loradex.load(dst, arch=bench.arch).kinds())
        plain = kinds <= {"lora"} and not any(
            getattr(p, "mid", None) is not None or getattr(p, "dora_scale", None) is not None
            for p in adapter.patches.values()
        )
        consumer = consume_diffusers if plain else consume_lycoris_kohya
        how += " (diffusers)" if plain else " (lycoris kohya loader)"
    try:
        y = consumer(bench, dst)
    except Exception as e:  # the consumer refused the file: a real failure of ours
        return Cell("fail", None, f"{type(e).__name__}: {str(e)[:80]}")
    err = bench.rel(y, ref.y_ref)
    if report.approximated:  # an SVD at SVD_RANK: the number is the measured loss, not a pass/fail
        return Cell("approx", err, how)
    return Cell("ok" if err <= 1e-4 else "fail", err, how)


def run_embeddings(bench: TinyBench, out: Path) -> dict[str, Cell]:
    """A 3-vector ``<sks>`` embedding written as A1111 ``.pt``, kohya and diffusers TI files, each
    loaded with diffusers' ``load_textual_inversion``: ``ok`` only when the three embedding rows come
    back bit-identical."""
    import loradex
    from loradex.core.adapter import Adapter, Embedding
    from loradex.log import quiet

    vec = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    ad = Adapter(embeddings={"<sks>": Embedding("<sks>", {"text_encoder": vec})}, arch=bench.arch.name)
    cells = {}
    for target, ext in (("a1111-ti", ".pt"), ("kohya-ti", ".safetensors"), ("diffusers-ti", ".safetensors")):
        dst = out / f"sks_{target}{ext}"
        loradex.save(ad, dst, target)
        pipe = bench.fresh_pipe()
        try:
            with quiet():
                pipe.load_textual_inversion(str(dst), token="<sks>")
            ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1", "<sks>_2"])
            rows = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
            err = float((rows - vec).abs().max())
            cells[target] = Cell("ok" if err == 0 else "fail", err, "load_textual_inversion")
        except Exception as e:
            cells[target] = Cell("fail", None, f"{type(e).__name__}: {str(e)[:80]}")
    return cells


def run_demo(labels: list[str] | None = None, targets: tuple[str, ...] = TARGETS, workdir: str | None = None,
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """The whole demo: every reference in ``labels`` (default: each of :data:`LYCORIS_ALGOS`, then
    ``peft-lora``) written to each of ``targets`` and checked (:func:`run_one`), then the TI formats
    (:func:`run_embeddings`). Files live in a temporary folder (under ``workdir`` when given), removed
    at the end; ``progress(label)`` is called before each reference."""
    result = DemoResult()
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        out = Path(d)
        bench = TinyBench()
        labels = labels if labels is not None else [*LYCORIS_ALGOS, "peft-lora"]
        for i, label in enumerate(labels):
            if progress:
                progress(label)
            ref = (make_peft_reference(bench, out, seed=i) if label == "peft-lora"
                   else make_lycoris_reference(bench, label, out, seed=i))
            result.rows[label] = {t: run_one(bench, ref, t, out) for t in targets}
        if progress:
            progress("textual inversion")
        result.embeddings = run_embeddings(bench, out)
    return result


def format_matrix(result: DemoResult) -> str:
    """The matrix as text: one row per reference, one column per target of :data:`TARGETS`, the
    TI line, and a legend of what the numbers are."""

    def cell(c: Cell) -> str:
        if c.status == "n/a":
            return "n/a (base-dependent)" if "base" in c.how else f"n/a ({c.how[:24]})"
        if c.error is None:
            return f"FAIL {c.how[:30]}"
        mark = {"ok": "ok", "approx": "svd"}.get(c.status, "FAIL")
        return f"{mark} {c.error:.1e}"

    w = 22
    lines = ["adapter".ljust(16) + "".join(t.ljust(w) for t in TARGETS)]
    for label, row in result.rows.items():
        lines.append(label.ljust(16) + "".join(cell(row[t]).ljust(w) if t in row else "-".ljust(w) for t in TARGETS))
    lines.append("")
    lines.append("textual inversion: " + ", ".join(f"{t} {cell(c)}" for t, c in result.embeddings.items()))
    lines.append("")
    lines.append("errors: ||y - y_ref|| / ||y_ref - y_base|| of the UNet output after loading the written file with the")
    lines.append("format's real consumer, against the reference tool's own forward pass; svd = approximated at rank "
                 f"{SVD_RANK} because the target cannot hold the kind; n/a = the kind depends on the base weights.")
    return "\n".join(lines)
