"""``loradex train --config FILE``: a whole run in a TOML file (read with the standard library's
``tomllib``), each key an option of ``loradex train`` (``steps``, ``lr-scheduler`` or
``lr_scheduler``) or the kohya sd-scripts name of one (``max_train_steps``, ``network_dim``,
``learning_rate``, ``optimizer_type``...: ``KOHYA_KEYS``), so a kohya ``config.toml`` mostly works as
is. Tables (kohya's dataset configs nest ``[general]`` / ``[[datasets]]``) are flattened: their
keys count as top-level keys. Flags given on the command line override the file.

kohya keys about how kohya itself runs (caching, attention kernels, logging, output naming, data
loader workers: ``KOHYA_IGNORED``) have no loradex counterpart and change nothing in the result:
they are reported and skipped. Any other unknown key is an error, so a setting that would change
the training is never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

from loradex.errors import TrainingError

__all__ = ["KOHYA_IGNORED", "KOHYA_KEYS", "read_config"]

#: kohya sd-scripts argument -> ``loradex train`` option (underscored)
KOHYA_KEYS = {
    "train_data_dir": "data", "pretrained_model_name_or_path": "base", "max_train_steps": "steps",
    "max_train_epochs": "epochs", "learning_rate": "lr", "unet_lr": "lr", "network_dim": "rank",
    "network_alpha": "alpha", "train_batch_size": "batch_size", "optimizer_type": "optimizer",
    "prior_loss_weight": "prior_weight", "sample_every_n_steps": "sample_every",
    "save_state_every_n_steps": "checkpoint_every",
}
#: kohya keys with no effect on what is trained here (reported, then skipped)
KOHYA_IGNORED = frozenset({
    "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
    "sdpa", "xformers", "mem_eff_attn", "persistent_data_loader_workers", "max_data_loader_n_workers",
    "save_model_as", "save_precision", "logging_dir", "log_with", "log_prefix", "output_dir", "output_name",
    "network_module", "enable_bucket", "bucket_no_upscale", "bucket_reso_steps", "min_bucket_reso",
    "max_bucket_reso", "caption_extension", "highvram", "lowram", "save_every_n_epochs", "save_every_n_steps",
    "save_last_n_steps", "save_last_n_epochs", "full_fp16", "full_bf16", "fp8_base", "huggingface_repo_id",
    "wandb_run_name", "training_comment", "no_metadata", "save_state", "max_token_length", "clip_skip",
})


def read_config(path: str | Path) -> tuple[dict, list[str], dict[str, str]]:
    """``(options, ignored, written)``: the file's settings by ``loradex train`` option name
    (underscored; kohya names translated, ``resolution = "512,512"`` read as 512,
    ``network_train_unet_only`` as ``text_encoder = not it``), the kohya keys skipped, and for each
    option the key as the file spells it (for messages). Unreadable TOML or an unknown key ->
    TrainingError (one line). Checking the names against the command's options is the caller's."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"--config {p}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainingError(f"--config {p}: not TOML ({e})") from None
    flat: dict = {}
    _flatten(raw, flat)
    out: dict = {}
    written: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in flat.items():
        k = key.strip().replace("-", "_")
        if k in KOHYA_IGNORED:
            ignored.append(key)
            continue
        if k == "network_train_unet_only":
            k, value = "text_encoder", not bool(value)
        elif k == "resolution" and isinstance(value, str):
            value = _resolution(p, value)
        elif k == "sample_prompt" and isinstance(value, str):
            value = [value]
        elif k == "sample_prompts" and isinstance(value, str):  # kohya: a file of prompts, one a line
            k, value = "sample_prompt", _prompts_file(p, value)
        out[KOHYA_KEYS.get(k, k)] = value
        written[KOHYA_KEYS.get(k, k)] = key
    return out, ignored, written


def _flatten(table: dict, out: dict) -> None:
    """Top-level keys, and the keys of nested tables / arrays of tables, into ``out``."""
    for k, v in table.items():
        if isinstance(v, dict):
            _flatten(v, out)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                _flatten(x, out)
        else:
            out[k] = v


def _resolution(path: Path, value: str) -> int:
    """kohya's ``"W,H"`` (or ``"N"``): loradex trains square buckets of area N^2, so W must equal H."""
    parts = [x.strip() for x in value.split(",") if x.strip()]
    try:
        nums = [int(x) for x in parts]
    except ValueError:
        raise TrainingError(f"--config {path}: resolution {value!r} is not a number") from None
    if not nums or len(set(nums)) != 1:
        raise TrainingError(f"--config {path}: resolution {value!r}: loradex trains at one square size (area N^2)")
    return nums[0]


def _prompts_file(config: Path, value: str) -> list[str]:
    """kohya's ``sample_prompts`` file (relative to the config's folder): one prompt a line, kohya's
    per-line options (`` --w 512 --s 20``...) and ``#`` comments left out."""
    path = Path(value) if Path(value).is_absolute() else config.parent / value
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TrainingError(f"--config {config}: sample_prompts {value!r} ({e})") from None
    prompts = [line.split(" --", 1)[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [x for x in prompts if x]
