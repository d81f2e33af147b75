"""Inference: one base pipeline, adapters hot-swapped into fixed LoRA slots (engine.py), a tiered
cache (cache.py), and the HTTP / Ray front ends (server.py, ray_serve.py). types.py is their contract."""

from loradex.inference.types import (
    BadRequestError,
    CostLimitError,
    DeadlineError,
    GenerateRequest,
    InferenceError,
    QueueFullError,
    RequestCancelled,
    UnknownAdapterError,
)


def __getattr__(name: str):
    # Engine pulls in torch/diffusers: imported on first use so the front ends' contract stays light
    if name == "Engine":
        from loradex.inference.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["BadRequestError", "CostLimitError", "DeadlineError", "Engine", "GenerateRequest", "InferenceError",
           "QueueFullError", "RequestCancelled", "UnknownAdapterError"]
