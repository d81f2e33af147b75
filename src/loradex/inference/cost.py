"""What one request costs the engine, in seconds of its own measured compute.

Why seconds and not "pixels x steps": the cost of a step is not linear in pixels. Self-attention
is quadratic in the latent tokens, and the embedded tiny model's VAE downsamples only 2x (latent
tokens = pixels / 4), so on it 64 px -> 128 px (4x the pixels) costs 11.6x per step, and a
512 px request (64x the pixels of 64 px) costs thousands of times more (issue 12: 64 px in 0.45 s,
256 px in 64 s, 512 px not done after 580 s). A limit on pixels x steps would either refuse
reasonable requests or let those through.

The model: a request of ``P = width * height`` pixels, ``steps`` steps and ``m`` denoiser samples per
step (2 with classifier-free guidance) costs

    seconds = head + steps * m * (a * P + b * P^2) + (c * P + e * P^2)

``a, b``: one sample's denoising step (convolutions and projections linear in P, attention
quadratic); ``c, e``: the VAE decode and post-processing; ``head``: prompt encoding and set-up.
They are fitted to the server's own timings: at start-up (``calibrate``) it runs a few small
requests alone (two sizes bracketing the front end's default size, 3 steps, no guidance) and reads
the time of each step from the pipeline's step callback and of the decode from what follows the
last step; afterwards every request that runs alone (large ones do) adds its own timings, so the
fit follows the machine (threads, load, a GPU) and corrects the extrapolation with real sizes.
Fitting is a least squares on relative errors with non-negative coefficients (two unknowns each).

The estimate decides admission (above the server's limit: HTTP 413 with the limit and the largest
size that fits), the scheduler's lane (small requests are micro-batched; large ones run one at a
time and yield to small ones between steps: batcher.py) and the backlog ``/healthz`` reports.
An estimate that is off is not a hazard: a request also carries a deadline, checked between steps.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from loradex.inference.types import CostLimitError, GenerateRequest

log = logging.getLogger(__name__)

#: default limit on one request's estimated compute, unless the server's default request costs more
DEFAULT_MAX_REQUEST_SECONDS = 10.0
#: the default limit is at least this many times the cost of the front end's default request
DEFAULT_REQUEST_MARGIN = 2.0
#: sizes kept for the online fit (the calibration points are always kept)
MAX_POINTS = 16


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b) >= 0`` minimising the relative error of ``a * x + b * x^2`` over ``(x, y)`` points."""
    pts = [(x, y) for x, y in points if x > 0 and y > 0]
    if not pts:
        return 0.0, 0.0
    # rows f = (x / y, x^2 / y), target 1 (relative error)
    s11 = sum((x / y) ** 2 for x, y in pts)
    s12 = sum((x / y) * (x * x / y) for x, y in pts)
    s22 = sum((x * x / y) ** 2 for x, y in pts)
    t1 = sum(x / y for x, y in pts)
    t2 = sum(x * x / y for x, y in pts)
    det = s11 * s22 - s12 * s12
    if len(pts) >= 2 and det > 1e-12 * s11 * s22:
        a = (t1 * s22 - t2 * s12) / det
        b = (s11 * t2 - s12 * t1) / det
        if a >= 0 and b >= 0:
            return a, b

    # one term only: take the better of the two single-term fits
    def err(a_: float, b_: float) -> float:
        return sum(((a_ * x + b_ * x * x) - y) ** 2 / (y * y) for x, y in pts)

    lin, quad = (t1 / s11, 0.0), (0.0, t2 / s22)
    return min(lin, quad, key=lambda ab: err(*ab))


@dataclass
class _Point:
    step: float  # seconds per sample-step
    tail: float  # seconds of decode + post-processing
    head: float  # seconds before the first step's own work (prompt encoding ...)
    seen: float  # monotonic time of the last update (for eviction)
    pinned: bool = False


class CostModel:
    """Seconds a request costs the engine (see the module docstring). ``samples(req)``: denoiser
    samples per step for a request (the engine's ``samples``: 2 with CFG)."""

    def __init__(self, samples=None) -> None:
        self._samples = samples or (lambda r: 2 if r.guidance_scale > 1.0 else 1)
        self._lock = threading.Lock()
        self._points: dict[int, _Point] = {}
        self.a = self.b = self.c = self.e = 0.0
        self.head = 0.0
        self.observations = 0

    # ---- fitting ------------------------------------------------------------------------------------
    def add(self, pixels: int, step: float, tail: float, head: float = 0.0, *, pinned: bool = False,
            weight: float = 1.0) -> None:
        """A measurement at ``pixels``: one sample-step took ``step`` s, the decode ``tail`` s, the
        set-up ``head`` s. Repeated sizes are averaged exponentially (``weight`` of the new one)."""
        with self._lock:
            now = time.monotonic()
            p = self._points.get(pixels)
            if p is None:
                self._points[pixels] = _Point(step, tail, head, now, pinned)
            else:
                w = min(1.0, max(0.0, weight))
                p.step += w * (step - p.step)
                p.tail += w * (tail - p.tail)
                p.head += w * (head - p.head)
                p.seen, p.pinned = now, p.pinned or pinned
            if len(self._points) > MAX_POINTS:
                old = min((k for k, v in self._points.items() if not v.pinned),
                          key=lambda k: self._points[k].seen, default=None)
                if old is not None:
                    del self._points[old]
            pts = sorted(self._points.items())
            self.a, self.b = _fit([(float(k), v.step) for k, v in pts])
            self.c, self.e = _fit([(float(k), v.tail) for k, v in pts])
            # the smallest: a first run at a new size also pays one-off kernel set-up (oneDNN
            # primitives, cuDNN plans) before its first step, which is not a per-request cost
            self.head = max(0.0, min(v.head for _, v in pts))

    def observe(self, request: GenerateRequest, step_seconds: list[float], tail_seconds: float) -> None:
        """The timings of a request that ran alone: each step's seconds (the first includes the
        set-up), and the seconds after the last step."""
        if not step_seconds:
            return
        m = self._samples(request)
        rest = step_seconds[1:] or step_seconds
        step = sorted(rest)[len(rest) // 2] / m
        head = max(0.0, step_seconds[0] - step * m)
        self.observations += 1
        self.add(request.width * request.height, step, max(0.0, tail_seconds), head, weight=0.3)

    # ---- estimates ----------------------------------------------------------------------------------
    def step_seconds(self, request: GenerateRequest) -> float:
        """One denoising step of ``request`` (all its samples)."""
        px = float(request.width * request.height)
        return self._samples(request) * (self.a * px + self.b * px * px)

    def estimate(self, request: GenerateRequest) -> float:
        """Seconds ``request`` costs when it runs alone."""
        px = float(request.width * request.height)
        return self.head + request.steps * self.step_seconds(request) + self.c * px + self.e * px * px

    def largest_side(self, request: GenerateRequest, limit: float) -> int:
        """The largest square side (a multiple of 8) at the request's steps and guidance whose
        estimate fits ``limit`` (0 when none)."""
        m = self._samples(request)
        qa = request.steps * m * self.b + self.e  # coefficient of P^2
        qb = request.steps * m * self.a + self.c  # coefficient of P
        room = limit - self.head
        if room <= 0:
            return 0
        if qa > 0:
            px = (-qb + math.sqrt(qb * qb + 4 * qa * room)) / (2 * qa)
        elif qb > 0:
            px = room / qb
        else:
            return 2048
        return int(math.sqrt(max(px, 0.0)) // 8 * 8)

    def check(self, request: GenerateRequest, limit: float | None, option: str = "--max-request-seconds") -> float:
        """The estimate of ``request``; CostLimitError naming the limit when it is above ``limit``."""
        cost = self.estimate(request)
        if limit is not None and cost > limit:
            side = self.largest_side(request, limit)
            fits = (f"at {request.steps} steps the largest square that fits is {side}x{side}" if side >= 64
                    else f"use fewer than {request.steps} steps")
            cfg = ", guidance on" if self._samples(request) > 1 else ""
            raise CostLimitError(
                f"request too costly: {request.width}x{request.height} at {request.steps} steps{cfg} would take "
                f"about {cost:.1f} s of this server's compute; the limit is {limit:.1f} s per request "
                f"({option}); {fits}")
        return cost

    def default_limit(self, defaults: dict | None) -> float:
        """``DEFAULT_MAX_REQUEST_SECONDS``, or more when the front end's default request costs more
        than half of that (the default request is always admitted)."""
        req = GenerateRequest("x", **{k: v for k, v in (defaults or {}).items()
                                      if k in ("steps", "width", "height", "guidance_scale")})
        return max(DEFAULT_MAX_REQUEST_SECONDS, DEFAULT_REQUEST_MARGIN * self.estimate(req))

    def describe(self) -> dict:
        """The fitted coefficients (seconds per step per pixel and per pixel^2, decode, head) and how
        many points and observations the fit rests on: what ``/healthz`` reports."""
        with self._lock:
            return {"step_s_per_px": self.a, "step_s_per_px2": self.b, "decode_s_per_px": self.c,
                    "decode_s_per_px2": self.e, "head_s": self.head, "points": len(self._points),
                    "observations": self.observations}

    # ---- calibration --------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, engine, defaults: dict | None = None, steps: int = 3) -> CostModel:
        """Measure ``engine`` at two sizes bracketing the default size (the larger is the default
        side, at least 96 px; the smaller half of it, at least 64 px), one request alone each,
        ``steps`` steps without guidance, after a warm-up run at the smaller size (the set-up time
        is read at that one; at the larger the first step also pays one-off kernel set-up, and only
        the steps after it are used)."""
        model = cls(samples=getattr(engine, "samples", None))
        side = int((defaults or {}).get("width", 512))
        hi = max(96, side // 8 * 8)
        lo = max(64, hi // 2 // 8 * 8)
        t0 = time.perf_counter()
        timings: list[tuple[int, list[float], float]] = []

        class _Probe:
            def __init__(self) -> None:
                self.marks: list[float] = []

            def wanted(self, idx) -> bool:
                return True

            def step(self, idx, i, n, suspend) -> None:
                self.marks.append(time.perf_counter())

        for px, n_steps, keep in ((lo, 1, False), (lo, steps, True), (hi, steps, True)):
            probe = _Probe()
            req = GenerateRequest("calibration", steps=n_steps, width=px, height=px, seed=0, guidance_scale=1.0)
            start = time.perf_counter()
            engine.run([req], output_type="pil", control=probe)
            end = time.perf_counter()
            if keep and probe.marks:
                marks = probe.marks
                timings.append((px * px, [b - a for a, b in zip([start, *marks[:-1]], marks)], end - marks[-1]))
        for pixels, step_times, tail in timings:
            rest = step_times[1:] or step_times
            step = sorted(rest)[len(rest) // 2]
            model.add(pixels, step, tail, max(0.0, step_times[0] - step), pinned=True)
        if not timings:  # a pipeline without step callbacks: the whole run as one "step" per step
            log.warning("cost model: the pipeline reports no steps; estimates are coarse")
        log.info("cost model calibrated in %.1f s at %d and %d px: %s", time.perf_counter() - t0, lo, hi,
                 model.describe())
        return model
