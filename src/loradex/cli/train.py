"""``loradex dataset check`` and ``loradex train``: thin wrappers of loradex.training."""

from __future__ import annotations

import click

from loradex.cli.app import cli, emit
from loradex.cli.options import device_option, dtype_option
from loradex.cli.registry import _bar, _registry, base_pipeline, output_path, save_as_option


@cli.group("dataset")
def dataset_group() -> None:
    """Inspect and curate a folder of training images."""


def _dataset_options(f):
    f = click.option("--faces/--no-faces", default=None,
                     help="detect faces and crop around them (default: when OpenCV is installed)")(f)
    f = click.option("--dup-distance", type=click.IntRange(0, 64), default=6, show_default=True,
                     help="near-duplicate: perceptual hashes at most this many bits apart (of 64)")(f)
    f = click.option("--blur-threshold", type=click.FloatRange(min=0), default=100.0, show_default=True,
                     help="blurry: variance of the Laplacian below this")(f)
    f = click.option("--min-size", type=click.IntRange(min=1), default=None,
                     help="too small: short side below this many pixels [default: 256; train: resolution/2]")(f)
    return f


@dataset_group.command("check")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--resolution", type=click.IntRange(min=8), default=512, show_default=True,
              help="training resolution (sets the aspect buckets)")
@_dataset_options
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def dataset_check(root, resolution, min_size, blur_threshold, dup_distance, faces, as_json):
    """Report unreadable, too small, blurry and near-duplicate images, faces and aspect buckets
    of ROOT (images with optional .txt captions, and kohya repeat folders such as 10_sks person).
    The images kept are what `loradex train` uses."""
    from pathlib import Path

    from loradex.training.data import DEFAULT_MIN_SIZE, check_dataset, repeat_folder

    n = sum(1 for p in Path(root).iterdir() if p.is_file())
    n += sum(1 for d in Path(root).iterdir() if d.is_dir() and repeat_folder(d.name) for p in d.iterdir() if p.is_file())
    bar = _bar(as_json, total=n, desc="checking", unit="file")
    r = check_dataset(root, resolution=resolution, min_size=min_size or DEFAULT_MIN_SIZE,
                      blur_threshold=blur_threshold, dup_distance=dup_distance, faces=faces,
                      progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    lines = [f"{root}: {r.summary()}"]
    for i in r.images:
        name = f"{i.subset}/{Path(i.path).name}" if i.subset else Path(i.path).name
        if not i.readable:
            lines.append(f"  {name}: unreadable ({i.error})")
            continue
        what = ", ".join(i.issues) if i.issues else "ok"
        face = f", face at {i.faces[0][:2]}" if i.faces else ""
        lines.append(f"  {name}: {what}  {i.width}x{i.height}, blur {i.blur:.0f}, bucket "
                     f"{i.bucket[0]}x{i.bucket[1]}{face}")
    if r.kept():
        lines.append("buckets: " + ", ".join(f"{k} x{v}" for k, v in r.buckets().items()))
    if r.skipped:
        lines.append(f"not images: {', '.join(r.skipped[:10])}")
    emit(r.to_dict(), as_json, "\n".join(lines))


#: TrainConfig fields the command passes through under the same name
_CONFIG_FIELDS = (
    "token", "class_word", "steps", "epochs", "lr", "text_lr", "batch_size", "resolution", "seed", "rank", "alpha",
    "text_encoder", "dora", "init_word", "ti_steps", "prior_preservation", "prior_weight", "num_class_images",
    "gradient_checkpointing", "mixed_precision", "max_grad_norm", "optimizer", "lr_scheduler", "lr_warmup_steps",
    "lr_scheduler_num_cycles", "min_snr_gamma", "noise_offset", "multires_noise_iterations", "multires_noise_discount",
    "v_parameterization", "zero_terminal_snr", "timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
    "model_prediction_type", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
    "shuffle_caption", "keep_tokens", "caption_dropout_rate", "checkpoint_every", "sample_every", "min_size",
    "blur_threshold", "dup_distance", "faces",
)


def _kohya_options(f):
    """The options kohya users rely on (kohya's names with ``-``; see TrainConfig)."""
    from loradex.training.config import FLOW_SAMPLING, LR_SCHEDULERS, OPTIMIZERS, WEIGHTING_SCHEMES

    opts = [
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="train this many epochs instead of --steps (an epoch: every image x its folder's repeats)"),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS, case_sensitive=False), default="AdamW",
                     show_default=True, help="AdamW8bit needs bitsandbytes, Prodigy prodigyopt (lr defaults to 1.0)"),
        click.option("--optimizer-arg", "optimizer_args", multiple=True, metavar="KEY=VALUE",
                     help="optimizer argument, e.g. weight_decay=0.01 or betas=(0.9,0.99); repeatable"),
        click.option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS), default="constant", show_default=True),
        click.option("--lr-warmup-steps", type=click.FloatRange(min=0), default=0,
                     help="warmup steps (below 1: a fraction of the steps)"),
        click.option("--lr-scheduler-num-cycles", type=click.IntRange(min=1), default=1, show_default=True,
                     help="cosine_with_restarts: restarts"),
        click.option("--min-snr-gamma", type=float, default=None, help="min-SNR loss weighting (5 is the paper's); SD1/SD2/SDXL"),
        click.option("--noise-offset", type=float, default=None, help="offset noise strength (around 0.05-0.1)"),
        click.option("--multires-noise-iterations", type=click.IntRange(min=0), default=None,
                     help="pyramid (multires) noise levels (6-10)"),
        click.option("--multires-noise-discount", type=float, default=0.3, show_default=True),
        click.option("--v-parameterization", is_flag=True, help="learn v (SD1/SD2/SDXL bases whose scheduler says epsilon)"),
        click.option("--zero-terminal-snr", is_flag=True, help="rescale the betas to zero terminal SNR (use with v)"),
        click.option("--timestep-sampling", type=click.Choice(FLOW_SAMPLING), default="sigmoid", show_default=True,
                     help="FLUX/SD3: how sigmas are drawn"),
        click.option("--sigmoid-scale", type=float, default=1.0, show_default=True),
        click.option("--discrete-flow-shift", type=float, default=3.0, show_default=True,
                     help="FLUX/SD3: the shift of --timestep-sampling shift / sigma"),
        click.option("--model-prediction-type", type=click.Choice(["raw", "sigma_scaled", "additive"]), default="raw",
                     show_default=True, help="FLUX/SD3: raw velocity, or sigma_scaled (x0 with --weighting-scheme)"),
        click.option("--weighting-scheme", type=click.Choice(WEIGHTING_SCHEMES), default="uniform", show_default=True,
                     help="FLUX/SD3: density of --timestep-sampling sigma, loss weights of sigma_scaled"),
        click.option("--logit-mean", type=float, default=0.0, show_default=True),
        click.option("--logit-std", type=float, default=1.0, show_default=True),
        click.option("--mode-scale", type=float, default=1.29, show_default=True),
        click.option("--guidance-scale", type=float, default=None,
                     help="FLUX.1-dev's embedded guidance while training [default: 3.5; kohya's docs: 1.0]"),
        click.option("--shuffle-caption", is_flag=True, help="shuffle the comma-separated parts of each caption per step"),
        click.option("--keep-tokens", type=click.IntRange(min=0), default=0, show_default=True,
                     help="with --shuffle-caption: keep the first N parts in place"),
        click.option("--caption-dropout-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="train this fraction of steps on the empty prompt"),
        click.option("--ti-steps", type=click.IntRange(min=0), default=0, show_default=True,
                     help="pivotal: train only the embedding for N steps, then both"),
        click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="clip gradients to this norm (0: no clipping)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@cli.command("train")
@click.argument("method", type=click.Choice(["lora", "ti", "loha", "lokr", "pivotal", "dreambooth"]), required=False)
@click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="a TOML file of these options (or kohya's names: max_train_steps, network_dim...); flags override it")
@click.option("--base", default=None, metavar="BASE",
              help="a diffusers folder, a single-file checkpoint, a registry REF, a Hub id in the local cache, or an "
                   "embedded tiny model (tiny, tiny-sdxl, tiny-flux1, tiny-sd3) [default: tiny]")
@click.option("--data", "data", default=None, type=click.Path(),
              help="folder of images (+ optional .txt captions; kohya repeat folders such as 10_sks person) [required]")
@click.option("--token", default="sks", show_default=True, help="the trigger word (TI/pivotal: the new token)")
@click.option("--class-word", default=None, help="what the subject is (dog, person...): prompts, TI init, prior images")
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha [default: rank]")
@click.option("--lr", type=float, default=None, help="learning rate [default per method]")
@click.option("--text-lr", type=float, default=None, help="ti/pivotal: the embedding's learning rate")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--resolution", type=click.IntRange(min=8), default=None,
              help="training resolution [default: the family's (SD1 512, SD2 768, SDXL/FLUX/SD3 1024); 32 for tiny models]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--targets", default=None,
              help="comma-separated module names for LoRA, diffusers' (to_q,...) or the family's (FLUX: img_attn.qkv,"
                   "linear1,...) [default: to_q,to_k,to_v,to_out.0]")
@click.option("--text-encoder", is_flag=True,
              help="lora/loha/lokr: also train the CLIP text encoder(s); dreambooth: fine-tune them")
@click.option("--dora", is_flag=True, help="lora/pivotal: DoRA (weight-decomposed LoRA)")
@click.option("--vectors", type=click.IntRange(min=1), default=1, show_default=True, help="ti/pivotal: vectors per token")
@click.option("--init-word", default=None, help="ti/pivotal: initial embedding [default: the class word]")
@click.option("--prior-preservation", is_flag=True, help="add the prior loss on generated class images (needs --class-word)")
@click.option("--prior-weight", type=float, default=1.0, show_default=True)
@click.option("--num-class-images", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="CUDA only (ignored on CPU)")
@_kohya_options
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, help="write work-dir/checkpoint-N every N steps")
@click.option("--sample-every", type=click.IntRange(min=0), default=0,
              help="write work-dir/samples/step-N.png every N steps (one grid of every --sample-prompt)")
@click.option("--sample-prompt", "sample_prompt", multiple=True, help="a sample prompt; repeatable")
@click.option("--resume", default=None, type=click.Path(), help="a checkpoint folder, or a work dir (its newest checkpoint)")
@click.option("--work-dir", default=None, type=click.Path(), help="checkpoints, samples, class images [default: OUT.work]")
@click.option("--no-curate", is_flag=True, help="train on every readable image (no blur/duplicate/size filtering)")
@_dataset_options
@device_option
@click.option("-o", "--output", "dst", default=None, type=click.Path(), help="output file (dreambooth: folder)")
@click.option("--to", "to", default=None, help="output format [default: kohya; ti: a1111-ti; dreambooth: diffusers folder]")
@dtype_option("fp32")
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def train_cmd(method, **opts):
    """Train METHOD (lora, ti, loha, lokr, pivotal, dreambooth) on the curated images of --data and
    write it with ModelSpec + ss_* metadata; --save-as stores it with its lineage (base, dataset
    hash, hyperparameters and kohya's dataset facts). --config FILE reads the options from TOML
    (loradex's or kohya's names); flags given on the command line win."""
    import contextlib
    from pathlib import Path

    from loradex.devices import resolve_device
    from loradex.training import TrainConfig, save_trained, train
    from loradex.training.config import DEFAULT_FORMAT

    if opts["config_file"]:
        file_method = _apply_config(opts)
        method = method or file_method
    if method is None:
        raise click.UsageError("METHOD is required (lora, ti, loha, lokr, pivotal, dreambooth; or method = ... in --config)")
    o = opts
    data, base, dst, save_as, as_json = o["data"], o["base"], o["dst"], o["save_as"], o["as_json"]
    if data is None:
        raise click.UsageError("--data is required (on the command line or in --config)")
    if not Path(data).is_dir():
        raise click.BadParameter(f"{data}: not a folder", param_hint="--data")
    src = click.get_current_context().get_parameter_source
    if o["dtype"] and method == "dreambooth":
        raise click.UsageError("--dtype casts adapter and embedding outputs; dreambooth writes a diffusers pipeline "
                               "folder, which --dtype does not cast yet")
    if o["epochs"] is not None and src("steps") is click.core.ParameterSource.COMMANDLINE \
            and src("epochs") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --steps or --epochs, not both")
    with contextlib.ExitStack() as stack:
        source, b, tiny = base_pipeline(stack, base, "train")
        if o["resolution"] is None:  # a tiny model's VAE halves, so 32 px is a 16x16 latent: seconds on a CPU
            o["resolution"] = 32 if tiny else b.arch.family.resolution
        targets = o["targets"]
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip()) or None
        cfg = TrainConfig(
            method=method, targets=targets, num_vectors=o["vectors"], optimizer_args=tuple(o["optimizer_args"]),
            sample_prompts=tuple(o["sample_prompt"]), curate=not o["no_curate"],
            **{k: o[k] for k in _CONFIG_FIELDS},
        )
        fmt = o["to"] or DEFAULT_FORMAT[method]
        folder = method == "dreambooth" or fmt.lower() == "peft"
        identity = b.identity if b is not None else "tiny-sd1"
        out = stack.enter_context(output_path(dst, save_as, folder=folder))
        if dst is None and method == "ti":  # A1111 names an embedding after its file: name it after the token
            out = out.with_name(f"{cfg.token}{out.suffix}")
        if not folder and out.suffix == "" and dst is not None:
            raise click.BadParameter(f"{dst}: give the output file a name ending in .safetensors (or .pt)",
                                     param_hint="-o")
        # work folder: next to -o OUT, else ./NAME.work (not inside --save-as's temporary folder)
        where = Path(dst) if dst else Path.cwd() / (save_as or "train")
        needs_work = cfg.checkpoint_every or cfg.sample_every or cfg.prior_preservation
        wd = o["work_dir"] or (str(where) + ".work" if needs_work else None)
        result = train(data, cfg, base=source, work_dir=wd, resume=o["resume"], device=resolve_device(o["device"]),
                       progress=not as_json)
        # the run's last checkpoint is marked complete only once the output is written and stored
        written = save_trained(result, out, format=o["to"], base_model=identity, complete=False)
        if o["dtype"]:
            _cast_outputs(written["paths"], o["dtype"], result.ctx.arch)
        params = {**{k: v for k, v in cfg.to_dict().items() if v is not None}, "base": base or "tiny",
                  "dataset_sha256": result.dataset.fingerprint() if result.dataset is not None else None,
                  **result.facts(), **({"dtype": o["dtype"]} if o["dtype"] else {})}
        saved = None
        if save_as:
            parents = [b.version or b.path] if b is not None and b.path is not None else []
            saved = _registry().add(Path(written["paths"][0]), save_as, parents=parents, operation="train",
                                    params=params, arch=result.ctx.arch, trigger_words=[cfg.token],
                                    base_model=identity, source=str(b.path if b is not None and b.path else identity))
        result.mark_complete(written["paths"] if dst else [], **({"saved_as": saved.ref} if saved is not None else {}))
    losses = result.losses
    k = max(1, min(10, len(losses) // 4))
    d = {
        "method": method, "steps": result.steps_done, "resumed_from": result.started_step or None,
        "seconds": round(result.seconds, 2), "losses": losses,
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
        "images": len(result.examples), "dataset": result.dataset.summary() if result.dataset else None,
        "dataset_sha256": params["dataset_sha256"], "outputs": written["paths"] if dst else [],
        "format": written["format"], "samples": result.samples, "checkpoints": result.checkpoints,
        "config": cfg.to_dict(), "facts": result.facts(),
    }
    text = [f"trained {method} for {result.steps_done} steps in {result.seconds:.1f} s on {len(result.examples)} "
            f"images ({d['dataset']}); loss {d['loss_first']:.4f} -> {d['loss_last']:.4f}"]
    if result.started_step and result.started_step == result.steps_done:
        text.append(f"resumed at the run's last step ({result.steps_done}): nothing left to train, output written")
    if dst:
        text.append(f"wrote {', '.join(written['paths'])} ({written['format']})")
    if saved is not None:
        d["saved_as"] = saved.to_dict(metadata=False)
        text.append(f"stored as {saved.ref} (sha256 {saved.sha256[:12]})")
    text += [f"sample: {s}" for s in result.samples[-3:]]
    emit(d, as_json, "\n".join(text))


def _cast_outputs(paths: list[str], dtype: str, arch) -> None:
    """``--dtype``: rewrite each adapter / embedding file just written with its tensors in ``dtype``
    (same format and metadata; the kohya/ModelSpec hashes are recomputed; atomic, like every write)."""
    from loradex.api import load, save

    for p in paths:
        adapter = load(p, arch=arch)
        save(adapter, p, adapter.source_format, dtype=dtype)


def _apply_config(opts: dict) -> str | None:
    """Fill ``opts`` from ``--config``: each key of the file becomes its option's value unless the
    option was given on the command line, converted and checked by the option's own click type.
    Unknown keys (and kohya keys loradex has no counterpart for) are one-line errors; kohya keys
    that change nothing here are named on stderr. Returns the file's ``method`` (None if unset),
    which a METHOD on the command line overrides."""
    from loradex.training.configfile import read_config

    ctx = click.get_current_context()
    values, ignored, written = read_config(opts["config_file"])
    params = {p.name: p for p in ctx.command.params}
    aliases = {"vectors": "vectors", "num_vectors": "vectors", "output": "dst", "optimizer_arg": "optimizer_args",
               "sample_prompts": "sample_prompt", "curate": None}
    unknown = []
    method = values.pop("method", None)
    if method is not None:
        method = click.Choice(["lora", "ti", "loha", "lokr", "pivotal", "dreambooth"]).convert(method, None, ctx)
    for key, value in values.items():
        name = aliases.get(key, key)
        if key == "curate":
            name, value = "no_curate", not value
        elif key == "targets" and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if name not in params or name in ("config_file", "method"):
            unknown.append(written[key])
            continue
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            continue
        param = params[name]
        if param.multiple and not isinstance(value, (list, tuple)):
            value = [value]
        try:
            opts[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise click.BadParameter(f"{written[key]} = {value!r} in {opts['config_file']}: {e.message}") from None
    if unknown:
        raise click.UsageError(f"--config {opts['config_file']}: unknown key(s) {', '.join(sorted(unknown))}")
    if ignored:
        click.echo(f"note: --config: kohya settings with no effect here skipped: {', '.join(sorted(ignored))}",
                   err=True)
    return method
