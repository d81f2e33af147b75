"""Training: dataset curation (``data``), one loop (``loop``) and a method per format (``methods``).

    from loradex.training import TrainConfig, train, save_trained
    result = train("photos/", TrainConfig(method="lora", token="sks", class_word="dog", steps=800))
    save_trained(result, "sks.safetensors")            # kohya file with ModelSpec + ss_* metadata
"""

from loradex.training.data import DatasetReport, check_dataset, load_examples
from loradex.training.loop import (
           METHODS,
           TrainConfig,
           TrainingError,
           TrainResult,
           evaluate_loss,
           save_trained,
           train,
)

__all__ = ["METHODS", "DatasetReport", "TrainConfig", "TrainResult", "TrainingError", "check_dataset", "evaluate_loss",
           "load_examples", "save_trained", "train"]
