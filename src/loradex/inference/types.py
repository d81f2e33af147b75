"""The contract between the inference engine (engine.py) and its front ends (CLI, HTTP server, Ray).

A request names a prompt, the adapters to apply with their weights, and the sampling parameters.
``Engine.generate(list[GenerateRequest])`` takes any mix of requests (it groups them into batches of
compatible shape itself) and returns one image per request, in order. Front ends map the errors
below onto their own vocabulary: UnknownAdapterError -> HTTP 404, BadRequestError -> 400,
QueueFullError -> 429, CostLimitError -> 413, DeadlineError -> 504, RequestCancelled -> 499 (the
client went away: nobody reads the answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loradex.errors import LoradexError


class InferenceError(LoradexError):
    """Base of the inference errors."""


class UnknownAdapterError(InferenceError):
    """A REF or path that names no stored adapter (HTTP 404)."""


class BadRequestError(InferenceError):
    """Parameters out of range or of the wrong type (HTTP 400)."""


class QueueFullError(InferenceError):
    """The server's bounded queue is full (HTTP 429)."""


class CostLimitError(InferenceError):
    """The request would cost more compute than the server allows one request (HTTP 413)."""


class DeadlineError(InferenceError):
    """The request's deadline passed before its image was done; its work was stopped (HTTP 504)."""


class RequestCancelled(InferenceError):
    """The request was given up (its client disconnected, or it was cancelled); its work was stopped
    between two denoising steps. Also what a run control raises to stop a batch (see engine.py)."""


#: bounds a request must respect; an engine may narrow them (e.g. a tiny model's sizes)
LIMITS = {
    "steps": (1, 150),
    "width": (64, 2048),
    "height": (64, 2048),
    "guidance_scale": (0.0, 30.0),
    "adapters": 8,
    "weight": (-4.0, 4.0),
    "prompt_chars": 2000,
}


@dataclass
class GenerateRequest:
    """One image to make. ``adapters``: (REF or path, weight) pairs, stacked in order."""

    prompt: str
    adapters: list[tuple[str, float]] = field(default_factory=list)
    negative_prompt: str = ""
    steps: int = 20
    width: int = 512
    height: int = 512
    seed: int = 0
    guidance_scale: float = 7.5

    def validate(self) -> GenerateRequest:
        """Raise BadRequestError naming the first bad field; return self when all are in range."""

        def rng(name: str, value, lo, hi, kind=int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise BadRequestError(f"{name} must be {'a number' if kind is float else 'an integer'}")
            if not lo <= value <= hi:
                raise BadRequestError(f"{name} must be in [{lo}, {hi}], got {value}")

        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise BadRequestError("prompt and negative_prompt must be strings")
        if len(self.prompt) > LIMITS["prompt_chars"] or len(self.negative_prompt) > LIMITS["prompt_chars"]:
            raise BadRequestError(f"prompt longer than {LIMITS['prompt_chars']} characters")
        rng("steps", self.steps, *LIMITS["steps"])
        rng("width", self.width, *LIMITS["width"])
        rng("height", self.height, *LIMITS["height"])
        if self.width % 8 or self.height % 8:
            raise BadRequestError("width and height must be multiples of 8")
        rng("seed", self.seed, 0, 2**63 - 1)
        rng("guidance_scale", self.guidance_scale, *LIMITS["guidance_scale"], kind=float)
        if not isinstance(self.adapters, (list, tuple)) or len(self.adapters) > LIMITS["adapters"]:
            raise BadRequestError(f"adapters must be a list of at most {LIMITS['adapters']} (ref, weight) pairs")
        for item in self.adapters:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and item[0]):
                raise BadRequestError("each adapter must be a (ref, weight) pair")
            rng("adapter weight", item[1], *LIMITS["weight"], kind=float)
        return self

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one forward pass (a mixed-adapter batch)."""
        return (self.steps, self.width, self.height, float(self.guidance_scale))
