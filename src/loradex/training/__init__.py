"""Training: dataset curation (``data``), one loop (``loop``) and a method per format (``methods``).

    from loradex.training import TrainConfig, train, save_trained
    result = train("photos/", TrainConfig(method="lora", token="sks", class_word="dog", steps=800))
    save_trained(result, "sks.safetensors")            # kohya file with ModelSpec + ss_* metadata

The rooms, each importing only those listed before it: ``config`` (``TrainConfig``, ``METHODS``,
``DEFAULT_LR``), ``context`` (the base, its arch, device and dtype), ``objective`` (what is
learnt, ``evaluate_loss``), ``checkpoint`` (resume state, completion mark), ``methods``, ``output``
(``save_trained``), ``loop`` (``Trainer``, ``train``).
"""

from loradex.errors import TrainingError
from loradex.training.config import METHODS, TrainConfig
from loradex.training.data import DatasetReport, check_dataset, load_examples
from loradex.training.loop import Trainer, TrainResult, train
from loradex.training.objective import evaluate_loss
from loradex.training.output import save_trained

__all__ = ["METHODS", "DatasetReport", "TrainConfig", "TrainResult", "Trainer", "TrainingError", "check_dataset",
           "evaluate_loss", "load_examples", "save_trained", "train"]
