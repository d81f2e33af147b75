"""Training: dataset curation (``data``), one loop (``loop``) and a method per format (``methods``).

    from loradex.training import TrainConfig, train, save_trained
    result = train("photos/", TrainConfig(method="lora", token="sks", class_word="dog", steps=800))
    save_trained(result, "sks.safetensors")            # kohya file with ModelSpec + ss_* metadata

The rooms, each importing only those listed before it: ``config`` (``TrainConfig``, ``METHODS``,
``DEFAULT_LR``; ``configfile`` reads a TOML run), ``captions`` (kohya's caption shuffling and
dropout, ``ss_tag_frequency``), ``context`` (the base, its arch, device and dtype), ``objective``
(what is learnt: noise, timesteps, loss weights; ``evaluate_loss``), ``optim`` (optimizer and LR
schedule), ``checkpoint`` (resume state, completion mark), ``methods``, ``sampling`` (sample grids),
``output`` (``save_trained``), ``loop`` (``Trainer``, ``train``). ``data`` (curation, kohya repeat
folders) stands apart: it needs none of them.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

from loradex.errors import TrainingError

#: Public name -> its module, imported on first use (PEP 562): ``loradex train --help`` and the
#: light modules (``config``, ``data``) do not pay the torch/diffusers import of the loop.
_LAZY = {
    **dict.fromkeys(("METHODS", "TrainConfig"), "loradex.training.config"),
    **dict.fromkeys(("DatasetReport", "check_dataset", "load_examples"), "loradex.training.data"),
    **dict.fromkeys(("Trainer", "TrainResult", "train"), "loradex.training.loop"),
    "evaluate_loss": "loradex.training.objective",
    "save_trained": "loradex.training.output",
}

if TYPE_CHECKING:
    from loradex.training.config import METHODS, TrainConfig
    from loradex.training.data import DatasetReport, check_dataset, load_examples
    from loradex.training.loop import Trainer, TrainResult, train
    from loradex.training.objective import evaluate_loss
    from loradex.training.output import save_trained


def __getattr__(name: str):
    """Import a public name's module on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loradex.training' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["METHODS", "DatasetReport", "TrainConfig", "TrainResult", "Trainer", "TrainingError", "check_dataset",
           "evaluate_loss", "load_examples", "save_trained", "train"]
