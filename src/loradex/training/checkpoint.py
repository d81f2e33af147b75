"""Checkpoints: what ``--resume`` needs to continue a run bit for bit, and the mark that a run's
output was written.

A checkpoint is a folder ``checkpoint-N``:

* ``trainable.safetensors``: the trained tensors by name (``Method.state``);
* ``optimizer.safetensors``: every optimizer state tensor as ``<param index>.<key>``, plus the
  loop generator's state (``__generator__``) and torch's global CPU RNG (``__torch_rng__``);
* ``state.json``: step, the rest of the epoch's batch order, the losses so far, the optimizer's
  param groups and non-tensor state, the learning-rate schedule's state, the GradScaler's state
  and the config;
* ``complete.json`` (only in the run's last checkpoint, written after the output): the outputs the
  run wrote. It is written last, so its presence means the output exists.

Only safetensors and JSON: nothing is unpickled on ``--resume``. A checkpoint is written into a
temporary sibling folder and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from loradex.errors import LoradexError, TrainingError
from loradex.training.config import RESUME_KEYS, TrainConfig, config_defaults

logger = logging.getLogger(__name__)

STATE, TRAINABLE, OPTIMIZER, COMPLETE = "state.json", "trainable.safetensors", "optimizer.safetensors", "complete.json"
_GEN, _TORCH_RNG = "__generator__", "__torch_rng__"
_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` steps (what ``find_checkpoint`` orders by)."""
    return f"checkpoint-{step}"


# ---- optimizer and RNG state ---------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict, list]:
    """``(tensors, scalars, param_groups)`` of an optimizer's ``state_dict``, flattened to
    ``<param index>.<key>`` names: tensors go to safetensors, the rest to JSON (no pickle)."""
    osd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, scalars, osd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, param_groups: list, tensors: dict[str, torch.Tensor],
                      scalars: dict) -> None:
    """Load what ``optimizer_state`` flattened back into ``optimizer`` (names starting with ``__``
    are not optimizer state: they are skipped)."""
    osd: dict = {"param_groups": param_groups, "state": {}}
    for k, v in tensors.items():
        if k.startswith("__"):
            continue
        idx, key = k.split(".", 1)
        osd["state"].setdefault(int(idx), {})[key] = v
    for k, v in scalars.items():
        idx, key = k.split(".", 1)
        osd["state"].setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict(osd)


def rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The loop generator's state and torch's global CPU RNG state (dropout and anything else
    drawing from the global generator), as tensors for the checkpoint."""
    return {_GEN: gen.get_state(), _TORCH_RNG: torch.get_rng_state()}


def restore_rng(gen: torch.Generator, tensors: dict[str, torch.Tensor]) -> None:
    """Set the generator and the global CPU RNG to what ``rng_state`` saved."""
    gen.set_state(tensors[_GEN])
    torch.set_rng_state(tensors[_TORCH_RNG])


# ---- folders -------------------------------------------------------------------------------------
def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the folders themselves, so a folder renamed into place
    afterwards is on disk whole (the rename alone does not order the data before it)."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    """fsync a folder's entry list (makes a rename inside it durable)."""
    from loradex.fsutil import fsync_path

    fsync_path(path)


def replace_folder(tmp: Path, folder: Path) -> None:
    """Rename the finished folder ``tmp`` to ``folder``. An existing ``folder`` is first renamed
    aside (and removed after), so a crash leaves either the old or the new one, never neither."""
    old = None
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- save / find / load --------------------------------------------------------------------------
def save_checkpoint(folder: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    gen: torch.Generator, queue: list[list[int]], losses: list[float], cfg: TrainConfig,
                    scaler=None, lr_scheduler=None) -> None:
    """Write the checkpoint folder ``folder`` (see the module docstring) atomically."""
    from loradex.converters import safetensors_io as sio

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sio.save({k: v.detach().contiguous() for k, v in trainable.items()}, tmp / TRAINABLE)
    tensors, scalars, groups = optimizer_state(optimizer)
    tensors.update(rng_state(gen))
    sio.save(tensors, tmp / OPTIMIZER)
    state = {"step": step, "queue": queue, "losses": losses, "param_groups": groups,
             "scalars": scalars, "config": cfg.to_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None}
    sio.write_text(json.dumps(state), tmp / STATE)
    fsync_dir(tmp)
    replace_folder(tmp, folder)
    logger.debug("wrote %s", folder)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint folder, else its newest ``checkpoint-N`` child.
    A ``.tmp`` folder (possibly half-written) is never a checkpoint; a ``checkpoint-N.old`` is one
    (a finished checkpoint moved aside by :func:`replace_folder`) and is used when a crash between
    that function's two renames left no ``checkpoint-N``."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    if p.is_dir():
        cks = [(int(m.group(1)), c.name.endswith(".old"), c) for c in p.iterdir()
               if (m := _NAME.fullmatch(c.name.removesuffix(".old"))) and (c / STATE).is_file()]
        if cks:  # the newest step; at equal steps the folder itself before its .old copy
            return max(cks, key=lambda x: (x[0], not x[1]))[2]
    raise TrainingError(f"--resume {path}: not a checkpoint folder (no state.json) nor a folder of checkpoint-N")


@dataclass
class Checkpoint:
    """A checkpoint as read back: where the run was (step, batch order, losses) and the tensors
    and state that put the method, the optimizer, the RNGs and the GradScaler back there."""

    folder: Path
    step: int
    queue: list[list[int]]
    losses: list[float]
    trainable: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]  # optimizer state tensors and the RNG states
    param_groups: list
    scalars: dict
    scaler: dict | None
    lr_scheduler: dict | None = None  # None: written before schedules were recorded (a constant rate)

    def restore(self, optimizer: torch.optim.Optimizer, gen: torch.Generator, scaler=None) -> None:
        """Load the optimizer state, the RNG states and (with fp16) the GradScaler's state. The
        trained tensors are the method's to load (``Method.load_state``)."""
        restore_optimizer(optimizer, self.param_groups, self.tensors, self.scalars)
        restore_rng(gen, self.tensors)
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)

    def completion(self) -> dict | None:
        """The completion mark (``complete.json``: the outputs written), or None."""
        return completion(self.folder)


def load_checkpoint(folder: Path, cfg: TrainConfig) -> Checkpoint:
    """Read ``folder`` and check it was made with the settings of ``cfg`` that must not change on
    resume (``RESUME_KEYS``); unreadable files and other settings are ``TrainingError``s."""
    from loradex.converters import safetensors_io as sio

    try:
        state = sio.read_json(folder / STATE)
        trainable = sio.load(folder / TRAINABLE)
        tensors = sio.load(folder / OPTIMIZER)
        saved = state.get("config", {})
        mine, default = cfg.to_dict(), config_defaults()
        differ = [k for k in RESUME_KEYS if saved.get(k, default.get(k)) != mine.get(k)]
        ck = Checkpoint(folder, int(state["step"]), state["queue"], list(state["losses"]), trainable, tensors,
                        state["param_groups"], state["scalars"], state.get("scaler"), state.get("lr_scheduler"))
    except (OSError, LoradexError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrainingError(f"--resume {folder}: unreadable checkpoint ({e})") from None
    if differ:
        raise TrainingError(f"--resume {folder}: the checkpoint was made with other settings ({', '.join(differ)})")
    if _GEN not in tensors or _TORCH_RNG not in tensors:
        raise TrainingError(f"--resume {folder}: unreadable checkpoint (no RNG state)")
    return ck


# ---- completion ----------------------------------------------------------------------------------
def mark_complete(folder: str | Path, step: int, outputs: list[str], **extra) -> None:
    """Mark the run's last checkpoint complete once its output is written: ``complete.json`` with
    the step and the outputs (``extra``: e.g. the registry version it was stored as). Written
    atomically and last, so a complete mark implies the output exists."""
    from loradex.converters import safetensors_io as sio

    folder = Path(folder)
    sio.write_text(json.dumps({"step": step, "outputs": list(outputs), **extra}, sort_keys=True), folder / COMPLETE)
    fsync_dir(folder)
    logger.debug("marked %s complete", folder)


def completion(folder: str | Path) -> dict | None:
    """The completion mark of a checkpoint folder, or None when the run's output was not (known
    to be) written from it."""
    from loradex.converters import safetensors_io as sio

    p = Path(folder) / COMPLETE
    if not p.is_file():
        return None
    try:
        return sio.read_json(p)
    except (OSError, LoradexError):
        return None
