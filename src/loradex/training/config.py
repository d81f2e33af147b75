"""What a training run is: the methods, their default learning rates and output formats, and
``TrainConfig`` (every setting that decides the result).

It is its own module, below the loop and the methods, because both read it: the methods
(``training/methods/*``) need ``DEFAULT_LR`` and the config, and the loop imports the methods, so
keeping these in the loop made an import circle.

Option names and meanings follow kohya sd-scripts where it has the option (checked against
kohya-ss/sd-scripts at commit 48d368f, 2026-02-16: ``library/train_util.py``,
``library/custom_train_functions.py``, ``library/flux_train_utils.py``,
``library/sd3_train_utils.py``), so a kohya user's settings mean the same thing here; where
loradex differs it says so in the field's comment.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from loradex.errors import TrainingError

__all__ = ["DEFAULT_FORMAT", "DEFAULT_LR", "FLOW_SAMPLING", "LR_SCHEDULERS", "METHODS", "OPTIMIZERS", "RESUME_KEYS",
           "TrainConfig", "TrainingError", "WEIGHTING_SCHEMES", "config_defaults"]

METHODS = ("lora", "ti", "loha", "lokr", "pivotal", "dreambooth")
#: Learning rates that work for each method (diffusers' examples: LoRA 1e-4, TI 5e-4 x batch size,
#: DreamBooth 5e-6; tiny models tolerate more).
DEFAULT_LR = {"lora": 1e-4, "ti": 5e-3, "loha": 1e-4, "lokr": 1e-4, "pivotal": 1e-4, "dreambooth": 5e-6}
#: Default output format per method.
DEFAULT_FORMAT = {"lora": "kohya", "loha": "kohya", "lokr": "kohya", "pivotal": "kohya", "ti": "a1111-ti",
                  "dreambooth": "diffusers-pipeline"}
#: kohya's ``--optimizer_type`` names loradex trains with (train_util.get_optimizer); matched
#: case-insensitively, recorded in this spelling.
OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "Adafactor")
#: diffusers.optimization.get_scheduler names (kohya's ``--lr_scheduler``).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear")
#: kohya's FLUX ``--timestep_sampling`` choices (flux_train_utils.get_noisy_model_input_and_timesteps).
FLOW_SAMPLING = ("sigmoid", "uniform", "shift", "flux_shift", "sigma")
#: SD3's ``--weighting_scheme`` (kohya train_util / diffusers' train_dreambooth_lora_sd3.py).
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
#: kohya's ``--model_prediction_type`` values loradex trains ("additive" is refused: see TrainConfig).
PREDICTION_TYPES = ("raw", "sigma_scaled")
#: Settings a checkpoint must share with the run that resumes it: they decide the shapes of the
#: trained tensors, the optimizer's state or the random stream (the others, e.g. ``steps`` or
#: ``lr``, may change on resume). A checkpoint written before a key existed counts as having its
#: default.
RESUME_KEYS = ("method", "rank", "alpha", "targets", "text_encoder", "dora", "num_vectors", "token", "batch_size",
               "resolution", "seed", "optimizer", "shuffle_caption", "caption_dropout_rate", "noise_offset",
               "multires_noise_iterations", "timestep_sampling")


@dataclass
class TrainConfig:
    """Everything that decides the result (recorded in the output's metadata and lineage).

    Validated on construction, so a bad setting fails before any model is loaded. The less obvious
    fields: ``resolution`` in pixels (a multiple of 8; also the bucket area, ``resolution^2``; None:
    the base family's training resolution, SD1 512, SD2 768, SDXL/SD3/FLUX 1024); ``lr`` None means
    ``DEFAULT_LR[method]`` (Prodigy: 1.0), ``text_lr`` None means ``lr`` (pivotal: TI's default);
    ``targets`` are module-name suffixes of the denoiser in diffusers naming or the family's native
    one (FLUX: BFL ``img_attn.qkv``, ``linear1``; None: the family's ``lora_targets``);
    ``epochs`` (kohya ``--max_train_epochs``) overrides ``steps`` once the dataset's size is known;
    ``checkpoint_every`` / ``sample_every`` in steps, 0 = never (the last step is always included
    otherwise); ``sample_steps`` also drives the class images of ``prior_preservation``. Curation
    (``loradex.training.data``): ``min_size`` the short side in pixels (None: ``resolution // 2``),
    ``blur_threshold`` the variance of the Laplacian, ``dup_distance`` pHash bits (inclusive),
    ``faces`` None = detect when OpenCV is installed; ``curate=False`` drops only unreadable files.

    The kohya options (names as kohya spells them, with ``-`` on the CLI): optimizer
    (``optimizer``, ``optimizer_args`` as ``key=value`` strings read with ``ast.literal_eval``),
    LR schedule (``lr_scheduler``, ``lr_warmup_steps``: steps, or a fraction of the steps when
    below 1, ``lr_scheduler_num_cycles``), DDPM families (``min_snr_gamma``, ``v_parameterization``,
    ``zero_terminal_snr``), noise (``noise_offset``, ``multires_noise_iterations``,
    ``multires_noise_discount``), flow families (``timestep_sampling``, ``sigmoid_scale``,
    ``discrete_flow_shift``, ``model_prediction_type``, ``weighting_scheme``, ``logit_mean``,
    ``logit_std``, ``mode_scale``, ``guidance_scale``), captions (``shuffle_caption``,
    ``keep_tokens``, ``caption_dropout_rate``); ``ti_steps``: pivotal's embedding-only phase."""

    method: str = "lora"
    token: str = "sks"
    class_word: str | None = None
    steps: int = 500
    epochs: int | None = None  # kohya --max_train_epochs: overrides steps
    lr: float | None = None
    text_lr: float | None = None  # ti / pivotal: the embedding rows' learning rate
    batch_size: int = 1
    resolution: int | None = None  # None: the family's (Family.resolution)
    seed: int = 0
    rank: int = 4
    alpha: float | None = None  # default: rank (scale 1)
    targets: tuple[str, ...] | None = None
    text_encoder: bool = False  # lora/loha/lokr: adapters on the CLIP text encoder(s) too; dreambooth: fine-tune it
    dora: bool = False
    num_vectors: int = 1
    init_word: str | None = None
    ti_steps: int = 0  # pivotal: train only the embedding for this many steps, then both
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 8
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (CUDA only)
    max_grad_norm: float = 1.0
    # optimizer and learning-rate schedule
    optimizer: str = "AdamW"
    optimizer_args: tuple[str, ...] = ()
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    # the loss and the noise
    min_snr_gamma: float | None = None
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    # flow matching (FLUX, SD3)
    timestep_sampling: str = "sigmoid"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float | None = None  # FLUX's embedded guidance; None: the family's (3.5)
    # captions
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    # checkpoints and samples
    checkpoint_every: int = 0
    sample_every: int = 0
    sample_prompt: str | None = None
    sample_prompts: tuple[str, ...] = field(default_factory=tuple)  # several: one grid PNG per sample step
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
        if self.epochs is not None and self.epochs < 1:
            raise TrainingError(f"epochs {self.epochs} must be positive")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise TrainingError(f"resolution {self.resolution} must be a positive multiple of 8")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed precision {self.mixed_precision!r}: choose no, fp16 or bf16")
        if self.prior_preservation and not self.class_word:
            raise TrainingError("prior preservation needs --class-word (the class images' prompt)")
        if self.targets is not None:
            self.targets = tuple(self.targets)
        self.optimizer_args = tuple(self.optimizer_args or ())
        self.sample_prompts = tuple(self.sample_prompts or ())
        if not self.token or any(c.isspace() for c in self.token):
            raise TrainingError(f"token {self.token!r} must be one word")
        if self.method in ("ti", "pivotal") and self.token != self.token.lower():
            # the CLIP tokenizer lowercases prompts; diffusers then misses the extra vectors (FORMATS.md §3)
            raise TrainingError(f"token {self.token!r}: use lower case (CLIP lowercases prompts)")
        self._check_options()

    def _check_options(self) -> None:
        """The kohya options: names in their sets, numbers in their ranges (one line each)."""
        match = {o.lower(): o for o in OPTIMIZERS}.get(str(self.optimizer).lower())
        if match is None:
            raise TrainingError(f"optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        self.optimizer = match
        for a in self.optimizer_args:
            if "=" not in a or not a.split("=", 1)[0].strip():
                raise TrainingError(f"optimizer argument {a!r}: write key=value (e.g. weight_decay=0.01)")
        choices = (("lr scheduler", self.lr_scheduler, LR_SCHEDULERS),
                   ("timestep sampling", self.timestep_sampling, FLOW_SAMPLING),
                   ("weighting scheme", self.weighting_scheme, WEIGHTING_SCHEMES))
        for what, v, ok in choices:
            if v not in ok:
                raise TrainingError(f"{what} {v!r}: choose one of {', '.join(ok)}")
        if self.model_prediction_type == "additive":
            # kohya flux_train_network.py adds the noisy input to the prediction and compares it with
            # noise - latents, which a velocity model does not predict; its docs recommend raw
            raise TrainingError("model prediction type 'additive' is not trained (its target is not what FLUX predicts); "
                                "use raw (kohya's recommendation) or sigma_scaled")
        if self.model_prediction_type not in PREDICTION_TYPES:
            raise TrainingError(f"model prediction type {self.model_prediction_type!r}: choose raw or sigma_scaled")
        if self.lr_warmup_steps < 0 or (self.lr_warmup_steps >= 1 and float(self.lr_warmup_steps) % 1):
            raise TrainingError(f"lr warmup steps {self.lr_warmup_steps}: a whole number of steps, or a fraction below 1")
        if float(self.lr_warmup_steps).is_integer():
            self.lr_warmup_steps = int(self.lr_warmup_steps)
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            # diffusers' get_scheduler ignores warmup for "constant"; kohya's get_scheduler_fix refuses it
            raise TrainingError("--lr-warmup-steps needs a scheduler with warmup (constant_with_warmup, cosine, "
                                "cosine_with_restarts, linear)")
        if self.lr_scheduler_num_cycles < 1:
            raise TrainingError("lr scheduler cycles must be positive")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise TrainingError(f"min-SNR gamma {self.min_snr_gamma} must be positive (5 is the paper's)")
        if self.noise_offset is not None and self.noise_offset < 0:
            raise TrainingError(f"noise offset {self.noise_offset} must not be negative")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 0:
            raise TrainingError("multires noise iterations must not be negative")
        if not 0 < self.multires_noise_discount <= 1:
            raise TrainingError(f"multires noise discount {self.multires_noise_discount} must be in (0, 1]")
        if self.keep_tokens < 0:
            raise TrainingError("keep tokens must not be negative")
        if not 0.0 <= self.caption_dropout_rate <= 1.0:
            raise TrainingError(f"caption dropout rate {self.caption_dropout_rate} must be in [0, 1]")
        if self.sigmoid_scale <= 0 or self.discrete_flow_shift <= 0 or self.logit_std <= 0:
            raise TrainingError("sigmoid scale, discrete flow shift and logit std must be positive")
        if self.ti_steps < 0:
            raise TrainingError("ti steps must not be negative")
        if self.ti_steps and self.method != "pivotal":
            raise TrainingError("--ti-steps is pivotal tuning's embedding-only phase: use it with pivotal")
        if self.text_encoder and self.method in ("ti", "pivotal"):
            raise TrainingError(f"--text-encoder: {self.method} trains the new token's embedding, not the text encoder")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's default when none was given (Prodigy: 1.0, its designed value)."""
        if self.lr is not None:
            return self.lr
        return 1.0 if self.optimizer == "Prodigy" else DEFAULT_LR[self.method]

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or the rank (scale 1) when none was given."""
        return float(self.alpha) if self.alpha is not None else float(self.rank)

    @property
    def prompts_vary(self) -> bool:
        """True when a step's prompts are drawn anew (shuffled or dropped captions): text
        conditioning is then encoded per step rather than cached."""
        return self.shuffle_caption or self.caption_dropout_rate > 0

    @property
    def sampling_prompts(self) -> list[str]:
        """The prompts samples are drawn with (``sample_prompts``, else ``sample_prompt``, else
        the instance prompt)."""
        if self.sample_prompts:
            return list(self.sample_prompts)
        if self.sample_prompt:
            return [self.sample_prompt]
        return [f"a photo of {self.token}" + (f" {self.class_word}" if self.class_word else "")]

    def to_dict(self) -> dict:
        """The settings with defaults resolved (what metadata, lineage and checkpoints record)."""
        d = asdict(self)
        d["lr"] = self.learning_rate
        d["alpha"] = self.lora_alpha
        d["targets"] = list(self.targets) if self.targets else None
        d["optimizer_args"] = list(self.optimizer_args)
        d["sample_prompts"] = list(self.sample_prompts)
        return d


def config_defaults() -> dict:
    """Each field's default as ``to_dict`` records it (what a checkpoint written before a field
    existed is taken to have)."""
    out = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(TrainConfig)}
    out.update(targets=None, optimizer_args=[], sample_prompts=[])
    return out
