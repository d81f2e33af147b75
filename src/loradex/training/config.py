"""What a training run is: the methods, their default learning rates and output formats, and
``TrainConfig`` (every setting that decides the result).

It is its own module, below the loop and the methods, because both read it: the methods
(``training/methods/*``) need ``DEFAULT_LR`` and the config, and the loop imports the methods, so
keeping these in the loop made an import circle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loradex.errors import TrainingError

__all__ = ["DEFAULT_FORMAT", "DEFAULT_LR", "METHODS", "RESUME_KEYS", "TrainConfig", "TrainingError"]

METHODS = ("lora", "ti", "loha", "lokr", "pivotal", "dreambooth")
#: Learning rates that work for each method (diffusers' examples: LoRA 1e-4, TI 5e-4 x batch size,
#: DreamBooth 5e-6; tiny models tolerate more).
DEFAULT_LR = {"lora": 1e-4, "ti": 5e-3, "loha": 1e-4, "lokr": 1e-4, "pivotal": 1e-4, "dreambooth": 5e-6}
#: Default output format per method.
DEFAULT_FORMAT = {"lora": "kohya", "loha": "kohya", "lokr": "kohya", "pivotal": "kohya", "ti": "a1111-ti",
                  "dreambooth": "diffusers-pipeline"}
#: Settings a checkpoint must share with the run that resumes it: they decide the shapes of the
#: trained tensors or the random stream (the others, e.g. ``steps`` or ``lr``, may change on resume).
RESUME_KEYS = ("method", "rank", "alpha", "targets", "text_encoder", "dora", "num_vectors", "token", "batch_size",
               "resolution", "seed")


@dataclass
class TrainConfig:
    """Everything that decides the result (recorded in the output's metadata and lineage).

    Validated on construction, so a bad setting fails before any model is loaded. The less obvious
    fields: ``resolution`` in pixels (a multiple of 8; also the bucket area, ``resolution^2``);
    ``lr`` None means ``DEFAULT_LR[method]``, ``text_lr`` None means ``lr`` (pivotal: TI's default);
    ``targets`` are module-name suffixes of the denoiser (None: the family's ``lora_targets``);
    ``checkpoint_every`` / ``sample_every`` in steps, 0 = never (the last step is always included
    otherwise); ``sample_steps`` also drives the class images of ``prior_preservation``. Curation
    (``loradex.training.data``): ``min_size`` the short side in pixels (None: ``resolution // 2``),
    ``blur_threshold`` the variance of the Laplacian, ``dup_distance`` pHash bits (inclusive),
    ``faces`` None = detect when OpenCV is installed; ``curate=False`` drops only unreadable files."""

    method: str = "lora"
    token: str = "sks"
    class_word: str | None = None
    steps: int = 500
    lr: float | None = None
    text_lr: float | None = None  # ti / pivotal: the embedding rows' learning rate
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    rank: int = 4
    alpha: float | None = None  # default: rank (scale 1)
    targets: tuple[str, ...] | None = None
    text_encoder: bool = False  # lora: LoRA on the text encoder(s) too; dreambooth: fine-tune it
    dora: bool = False
    num_vectors: int = 1
    init_word: str | None = None
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 8
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (CUDA only)
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    sample_every: int = 0
    sample_prompt: str | None = None
    sample_steps: int = 20
    # dataset curation (the cleaned view of loradex.training.data)
    curate: bool = True
    min_size: int | None = None  # default resolution // 2
    blur_threshold: float = 100.0
    dup_distance: int = 6
    faces: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 1 or self.num_vectors < 1:
            raise TrainingError("steps, batch size, rank and vectors must be positive")
        if self.resolution < 8 or self.resolution % 8:
            raise TrainingError(f"resolution {self.resolution} must be a positive multiple of 8")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed precision {self.mixed_precision!r}: choose no, fp16 or bf16")
        if self.prior_preservation and not self.class_word:
            raise TrainingError("prior preservation needs --class-word (the class images' prompt)")
        if self.targets is not None:
            self.targets = tuple(self.targets)
        if not self.token or any(c.isspace() for c in self.token):
            raise TrainingError(f"token {self.token!r} must be one word")
        if self.method in ("ti", "pivotal") and self.token != self.token.lower():
            # the CLIP tokenizer lowercases prompts; diffusers then misses the extra vectors (FORMATS.md §3)
            raise TrainingError(f"token {self.token!r}: use lower case (CLIP lowercases prompts)")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default when none was given."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or the rank (scale 1) when none was given."""
        return float(self.alpha) if self.alpha is not None else float(self.rank)

    def to_dict(self) -> dict:
        """The settings with defaults resolved (what metadata, lineage and checkpoints record)."""
        d = asdict(self)
        d["lr"] = self.learning_rate
        d["alpha"] = self.lora_alpha
        d["targets"] = list(self.targets) if self.targets else None
        return d
