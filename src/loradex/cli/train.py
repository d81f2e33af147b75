"""``loradex dataset check`` and ``loradex train``: thin wrappers of loradex.training."""

from __future__ import annotations

import click

from loradex.cli import cli, emit
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
    of ROOT (images with optional .txt captions). The images kept are what `loradex train` uses."""
    from pathlib import Path

    from loradex.training.data import DEFAULT_MIN_SIZE, check_dataset

    n = sum(1 for p in Path(root).iterdir() if p.is_file())
    bar = _bar(as_json, total=n, desc="checking", unit="file")
    r = check_dataset(root, resolution=resolution, min_size=min_size or DEFAULT_MIN_SIZE,
                      blur_threshold=blur_threshold, dup_distance=dup_distance, faces=faces,
                      progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    lines = [f"{root}: {r.summary()}"]
    for i in r.images:
        name = Path(i.path).name
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


@cli.command("train")
@click.argument("method", type=click.Choice(["lora", "ti", "loha", "lokr", "pivotal", "dreambooth"]))
@click.option("--base", default=None, metavar="BASE",
              help="a diffusers folder, a single-file checkpoint, a registry REF, a Hub id in the local cache, or an "
                   "embedded tiny model (tiny, tiny-sdxl, tiny-flux1, tiny-sd3) [default: tiny]")
@click.option("--data", "data", required=True, type=click.Path(), help="folder of images (+ optional .txt captions)")
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
@click.option("--targets", default=None, help="comma-separated module names for LoRA [default: to_q,to_k,to_v,to_out.0]")
@click.option("--text-encoder", is_flag=True, help="lora: also train LoRA on the text encoder(s); dreambooth: fine-tune it")
@click.option("--dora", is_flag=True, help="lora/pivotal: DoRA (weight-decomposed LoRA)")
@click.option("--vectors", type=click.IntRange(min=1), default=1, show_default=True, help="ti/pivotal: vectors per token")
@click.option("--init-word", default=None, help="ti/pivotal: initial embedding [default: the class word]")
@click.option("--prior-preservation", is_flag=True, help="add the prior loss on generated class images (needs --class-word)")
@click.option("--prior-weight", type=float, default=1.0, show_default=True)
@click.option("--num-class-images", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="CUDA only (ignored on CPU)")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, help="write work-dir/checkpoint-N every N steps")
@click.option("--sample-every", type=click.IntRange(min=0), default=0, help="write work-dir/samples/step-N.png every N steps")
@click.option("--sample-prompt", default=None)
@click.option("--resume", default=None, type=click.Path(), help="a checkpoint folder, or a work dir (its newest checkpoint)")
@click.option("--work-dir", default=None, type=click.Path(), help="checkpoints, samples, class images [default: OUT.work]")
@click.option("--no-curate", is_flag=True, help="train on every readable image (no blur/duplicate/size filtering)")
@_dataset_options
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda when available]")
@click.option("-o", "--output", "dst", default=None, type=click.Path(), help="output file (dreambooth: folder)")
@click.option("--to", "to", default=None, help="output format [default: kohya; ti: a1111-ti; dreambooth: diffusers folder]")
@save_as_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def train_cmd(method, base, data, token, class_word, steps, rank, alpha, lr, text_lr, batch_size, resolution, seed,
              targets, text_encoder, dora, vectors, init_word, prior_preservation, prior_weight, num_class_images,
              gradient_checkpointing, mixed_precision, checkpoint_every, sample_every, sample_prompt, resume, work_dir,
              no_curate, min_size, blur_threshold, dup_distance, faces, device, dst, to, save_as, as_json):
    """Train METHOD (lora, ti, loha, lokr, pivotal, dreambooth) on the curated images of --data and
    write it with ModelSpec + ss_* metadata; --save-as stores it with its lineage (base, dataset
    hash, hyperparameters)."""
    import contextlib
    from pathlib import Path

    from loradex.training import TrainConfig, save_trained, train
    from loradex.training.config import DEFAULT_FORMAT

    if not Path(data).is_dir():
        raise click.BadParameter(f"{data}: not a folder", param_hint="--data")
    with contextlib.ExitStack() as stack:
        source, b, tiny = base_pipeline(stack, base, "train")
        if resolution is None:  # a tiny model's VAE halves, so 32 px is a 16x16 latent: seconds on a CPU
            resolution = 32 if tiny else b.arch.family.resolution
        cfg = TrainConfig(
            method=method, token=token, class_word=class_word, steps=steps, lr=lr, text_lr=text_lr,
            batch_size=batch_size, resolution=resolution, seed=seed, rank=rank, alpha=alpha,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else None,
            text_encoder=text_encoder, dora=dora, num_vectors=vectors, init_word=init_word,
            prior_preservation=prior_preservation, prior_weight=prior_weight, num_class_images=num_class_images,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            checkpoint_every=checkpoint_every, sample_every=sample_every, sample_prompt=sample_prompt,
            curate=not no_curate, min_size=min_size, blur_threshold=blur_threshold, dup_distance=dup_distance,
            faces=faces,
        )
        fmt = to or DEFAULT_FORMAT[method]
        folder = method == "dreambooth" or fmt.lower() == "peft"
        identity = b.identity if b is not None else "tiny-sd1"
        out = stack.enter_context(output_path(dst, save_as, folder=folder))
        if dst is None and method == "ti":  # A1111 names an embedding after its file: name it after the token
            out = out.with_name(f"{token}{out.suffix}")
        if not folder and out.suffix == "" and dst is not None:
            raise click.BadParameter(f"{dst}: give the output file a name ending in .safetensors (or .pt)",
                                     param_hint="-o")
        # work folder: next to -o OUT, else ./NAME.work (not inside --save-as's temporary folder)
        where = Path(dst) if dst else Path.cwd() / (save_as or "train")
        wd = work_dir or (str(where) + ".work" if (checkpoint_every or sample_every or prior_preservation) else None)
        result = train(data, cfg, base=source, work_dir=wd, resume=resume, device=device, progress=not as_json)
        # the run's last checkpoint is marked complete only once the output is written and stored
        written = save_trained(result, out, format=to, base_model=identity, complete=False)
        params = {**{k: v for k, v in cfg.to_dict().items() if v is not None}, "base": base or "tiny",
                  "dataset_sha256": result.dataset.fingerprint() if result.dataset is not None else None}
        saved = None
        if save_as:
            parents = [b.version or b.path] if b is not None and b.path is not None else []
            saved = _registry().add(Path(written["paths"][0]), save_as, parents=parents, operation="train",
                                    params=params, arch=result.ctx.arch, trigger_words=[token], base_model=identity,
                                    source=str(b.path if b is not None and b.path else identity))
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
        "config": cfg.to_dict(),
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
