"""The optimizer and the learning-rate schedule of a run: kohya's ``--optimizer_type`` /
``--optimizer_args`` / ``--lr_scheduler`` / ``--lr_warmup_steps`` with kohya's meanings
(``library/train_util.py`` ``get_optimizer`` and ``get_scheduler_fix``, kohya-ss/sd-scripts at
48d368f), and the ``ss_optimizer`` string kohya writes for it.

* ``AdamW``: ``torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8)``, fused on CUDA and foreach on
  the CPU (what loradex always used; the per-group weight decay is the method's);
* ``AdamW8bit``: ``bitsandbytes.optim.AdamW8bit`` (needs bitsandbytes: a TrainingError otherwise);
* ``Prodigy``: ``prodigyopt.Prodigy`` (needs prodigyopt; its learning rate defaults to 1.0);
* ``Adafactor``: ``transformers.optimization.Adafactor`` with ``scale_parameter=False,
  relative_step=False, warmup_init=False`` and the run's learning rate: the settings kohya's docs
  give for LoRA training. kohya's own default (``relative_step=True``) ignores the learning rate
  and swaps in ``AdafactorSchedule``; loradex refuses ``relative_step=True`` rather than silently
  training another schedule.

``optimizer_args`` (``key=value``, values read with ``ast.literal_eval`` as kohya does) go to the
optimizer's constructor; ``weight_decay`` there replaces the method's decay on the groups that have
one (a TI embedding group keeps 0, which keeps every other token row bit-identical).

The schedule is diffusers' ``get_scheduler`` (a ``LambdaLR``); the warmup is steps, or a fraction
of the run's steps when below 1 (kohya's ``int_or_float``). ``constant`` multiplies by exactly 1,
so a run without a schedule trains bit for bit as before schedules existed.
"""

from __future__ import annotations

import ast

import torch

from loradex.errors import TrainingError
from loradex.training.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "describe_optimizer", "parse_optimizer_args", "restore_scheduler"]


def parse_optimizer_args(args) -> dict:
    """``["key=value", ...]`` -> ``{key: value}`` with each value read by ``ast.literal_eval``
    (kohya's rule), a bare word kept as a string."""
    out = {}
    for a in args:
        k, _, v = str(a).partition("=")
        k, v = k.strip(), v.strip()
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _import(module: str, what: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrainingError(f"--optimizer {what} needs {extra} (pip install {extra})") from None


def build_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device
                    ) -> tuple[torch.optim.Optimizer, str]:
    """``(optimizer, its ss_optimizer description)`` over the method's parameter groups."""
    kw = parse_optimizer_args(cfg.optimizer_args)
    if "weight_decay" in kw:
        wd = kw.pop("weight_decay")
        groups = [dict(g, weight_decay=wd) if g.get("weight_decay", 0.0) else g for g in groups]
    lr = cfg.learning_rate
    name = cfg.optimizer
    extra: dict = {}
    if name == "AdamW":
        cls = torch.optim.AdamW
        shown = {"betas": (0.9, 0.999), "eps": 1e-8, **kw}
        extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    elif name == "AdamW8bit":
        cls = _import("bitsandbytes", name, "bitsandbytes").optim.AdamW8bit
        shown = {"betas": (0.9, 0.999), "eps": 1e-8, **kw}
    elif name == "Prodigy":
        cls = _import("prodigyopt", name, "prodigyopt").Prodigy
        shown = dict(kw)
    else:  # Adafactor
        from transformers.optimization import Adafactor as cls

        shown = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kw}
        if shown["relative_step"] or shown["warmup_init"]:
            raise TrainingError("Adafactor relative_step=True / warmup_init=True ignores --lr (kohya's default swaps in "
                                "AdafactorSchedule); train with relative_step=False and an --lr")
    try:
        opt = cls(groups, lr=lr, **shown, **extra)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"--optimizer {name} {' '.join(cfg.optimizer_args)}: {e}") from None
    return opt, describe_optimizer(cls, shown, groups)


def describe_optimizer(cls, kwargs: dict, groups: list[dict]) -> str:
    """kohya's ``ss_optimizer``: ``<module>.<class>(<key=value,...>)`` with the arguments given,
    plus the weight decay of the groups (one value, or one per group when they differ)."""
    shown = dict(kwargs)
    decays = [g.get("weight_decay", 0.0) for g in groups]
    if "weight_decay" not in shown:
        shown["weight_decay"] = decays[0] if len(set(decays)) == 1 else tuple(decays)
    args = ",".join(f"{k}={v}" for k, v in shown.items())
    return f"{cls.__module__}.{cls.__name__}({args})"


def warmup_steps(cfg: TrainConfig) -> int:
    """``lr_warmup_steps`` in steps (a fraction below 1 is of the run's steps, as kohya reads it)."""
    w = cfg.lr_warmup_steps
    return int(w * cfg.steps) if 0 < w < 1 else int(w)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' ``get_scheduler(cfg.lr_scheduler)`` over ``cfg.steps`` steps (a ``LambdaLR``)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg),
                         num_training_steps=cfg.steps, num_cycles=cfg.lr_scheduler_num_cycles)


def restore_scheduler(scheduler, state: dict | None, step: int) -> None:
    """Put the schedule back at ``step``: its saved state when the checkpoint has one, else (a
    checkpoint from before schedules were recorded: it trained a constant rate) the position only.
    The groups' rates are then those of the schedule at ``step`` (the same numbers a run that never
    stopped has when its total is unchanged; the new total's when a run is extended)."""
    if state:
        scheduler.load_state_dict(state)
    else:
        scheduler.last_epoch = step
    for g, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def current_lrs(scheduler) -> list[float]:
    """The learning rate of each group for the next step."""
    return [float(g["lr"]) for g in scheduler.optimizer.param_groups]
