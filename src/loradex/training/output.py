"""Writing what a run trained: ``save_trained`` (the format per method, ModelSpec + ``ss_*``
metadata), atomically, and then the completion mark in the run's last checkpoint.

The order is the point: output first (temporary file or folder, fsync, rename), mark second. A run
killed between its last checkpoint and the end of the write has an unmarked last checkpoint, and
``--resume`` from it writes the output (``loop.Trainer`` does not retrain a finished run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from loradex.errors import TrainingError
from loradex.training.config import DEFAULT_FORMAT

logger = logging.getLogger(__name__)


def save_trained(result, out: str | Path, format: str | None = None, title: str | None = None,
                 base_model: str | None = None, *, complete: bool = True) -> dict:
    """Write what ``result`` (a ``TrainResult``) trained to ``out`` with loradex's writers
    (ModelSpec + ss_* metadata).

    ``dreambooth``: a diffusers pipeline folder (written to a temporary sibling, fsynced, then
    renamed). ``pivotal`` as ``diffusers``: the LoRA file plus ``<stem>_emb.safetensors``
    (diffusers-ti), because diffusers' ``load_lora_weights`` rejects a file with ``bundle_emb`` keys;
    as kohya the embedding is bundled. ``base_model``: the base's identity (registry REF, Hub id or
    path), recorded as ``loradex.base_model``. ``complete``: then mark the run's last checkpoint
    complete (``TrainResult.mark_complete``); a caller that stores the output further (the CLI's
    ``--save-as``) passes False and marks it itself afterwards.
    Returns ``{"paths": [every file or folder written], "format": the format used, "report": the
    writer's ConversionReport (None for dreambooth)}``. A ``ti`` run asked for ``kohya`` /
    ``diffusers`` / ``a1111`` gets that tool's TI format."""
    written = _write(result, Path(out), format, title, base_model)
    logger.debug("wrote %s (%s)", ", ".join(written["paths"]), written["format"])
    if complete:
        result.mark_complete(written["paths"])
    return written


def _write(result, out: Path, format: str | None, title: str | None, base_model: str | None) -> dict:
    import loradex

    cfg = result.ctx.cfg
    fmt = (format or DEFAULT_FORMAT[cfg.method]).lower()
    if cfg.method == "dreambooth":
        if fmt not in ("diffusers-pipeline", "diffusers"):
            raise TrainingError(f"dreambooth writes a diffusers pipeline folder, not {fmt!r} "
                                "(extract a LoRA from it with loradex extract)")
        _save_pipeline_folder(result, out)
        return {"paths": [str(out)], "format": "diffusers-pipeline", "report": None}
    adapter = result.export()
    if base_model:
        adapter.metadata["loradex.base_model"] = base_model
    title = title or out.stem
    if cfg.method == "ti" and fmt in ("kohya", "diffusers", "a1111"):
        fmt = {"kohya": "kohya-ti", "diffusers": "diffusers-ti", "a1111": "a1111-ti"}[fmt]
    paths = [str(out)]
    if cfg.method == "pivotal" and fmt in ("diffusers", "peft"):
        from loradex.core.adapter import Adapter

        emb = Adapter(embeddings=adapter.embeddings, metadata=dict(adapter.metadata), arch=adapter.arch)
        emb_path = out.with_name(f"{out.stem}_emb.safetensors")
        loradex.save(emb, emb_path, format="diffusers-ti", title=title)
        paths.append(str(emb_path))
        adapter.embeddings = {}
    report = loradex.save(adapter, out, format=fmt, title=title)  # loradex's writers are atomic
    return {"paths": paths, "format": fmt, "report": report}


def _save_pipeline_folder(result, out: Path) -> None:
    """The fine-tuned pipeline as a diffusers folder plus ``loradex_training.json``: written into
    ``.<name>.tmp``, fsynced and renamed, so ``out`` appears whole or not at all."""
    from loradex.converters import safetensors_io as sio
    from loradex.log import quiet
    from loradex.training.checkpoint import fsync_dir, fsync_tree

    pipe = result.export()
    if out.exists():
        raise TrainingError(f"{out} exists: dreambooth writes a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet():
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    sio.write_text(json.dumps(result.method.metadata, indent=1, sort_keys=True), tmp / "loradex_training.json")
    fsync_tree(tmp)
    os.replace(tmp, out)
    fsync_dir(out.parent)
