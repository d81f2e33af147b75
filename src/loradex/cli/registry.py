"""Registry commands: add, ls, show, search, tag, untag, rm, export, lineage, verify, gc, push, pull.

Thin: each parses its arguments, calls one ``loradex.Registry`` method and prints (``--json`` for
the machine-readable form). Progress bars go to stderr, on a terminal only and never with ``--json``.
Also the helpers other commands use to take a REF where they take a path (``input_path``) and to
store what they write with ``--save-as NAME`` (``save_as_option``, ``output_path``, ``store_output``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from loradex.cli.app import cli, emit
from loradex.cli.options import device_option
from loradex.errors import FormatError, LoradexError, RegistryError

REF_HELP = "NAME (newest) | NAME@N | NAME:TAG | sha256 prefix"


def _registry(write: bool = True):
    """The registry; ``write=False`` for commands that only read: a home this process cannot write
    is then opened read-only instead of refused."""
    from loradex.registry import Registry

    return Registry(readonly=False if write else None)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items()) or "-"


def _bar(as_json: bool, **kw):
    """A tqdm bar on stderr when it is a terminal and the output is not JSON; else None."""
    if as_json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, **kw)


def _one_line(v) -> str:
    what = v.format or "?"
    parts = [what, v.arch or "arch unknown"]
    if v.kinds:
        parts.append(_counts(v.kinds))
    if v.embeddings:
        parts.append("embeddings " + ", ".join(v.embeddings[:4]))
    if v.artifact == "checkpoint":
        parts.append("checkpoint")
    tags = f" [{', '.join(v.tags)}]" if v.tags else ""
    return f"{v.ref}{tags}  {'; '.join(parts)}  {_size(v.size)}  sha256 {v.sha256[:12]}"


# ---- REF support and --save-as for commands that read or write adapters --------------------------
@contextlib.contextmanager
def input_path(arg: str) -> Iterator[tuple[Path, object]]:
    """A path on disk as is; otherwise a registry REF, checked out (hard links) for the duration.
    Yields (path, Version or None)."""
    p = Path(arg)
    if p.exists():
        _note_input(p)
        yield p, None
        return
    try:
        reg = _registry(write=False)
        v = reg.get(arg)
    except RegistryError as e:
        raise FormatError(f"{arg}: no such file or folder, and not a registry reference ({e})") from None
    with reg.checkout(v) as path:
        try:
            yield path, v
        except LoradexError as e:  # name the REF, never the temporary checkout
            from loradex.registry.refs import renamed

            raise renamed(e, {str(path): arg, str(path.parent): arg}) from None


def ref_arch(arch, version):
    """``--arch`` if given, else the architecture the registry recorded for the REF's version
    (adapters for custom bases cannot be detected from their keys alone), rebuilt from the
    catalogue's descriptor where this process does not know it."""
    if arch is not None or version is None or not getattr(version, "arch", None):
        return arch
    return _registry(write=False).arch(version.arch)


ARCH_HELP = ("architecture name: sd1, sd2, sdxl, flux1, sd3, sd3.5-medium, sd3.5-large, tiny (= tiny-sd1), "
             "tiny-sdxl, ... or a derived <family>-<hash>; detected when omitted")
BASE_HELP = ("the base model it is for: a diffusers folder, a checkpoint file, a registry REF or a Hub id in the "
             "local cache (its architecture is read from its own configs and sizes)")


def strict_option(f):
    """``--strict``: a source key that no patch kind, module or embedding explains is an error
    (without it such keys are listed by name in the report, never dropped silently)."""
    return click.option("--strict", is_flag=True,
                        help="refuse an input with keys loradex does not understand (they are listed either way)")(f)


def unexplained_lines(unexplained: dict, limit: int = 20, indent: str = "  ") -> list[str]:
    """Report lines for keys nothing explained: the first ``limit`` by name, then how many more
    (``--json`` carries every one)."""
    items = list(unexplained.items())
    out = [f"{indent}not understood: {k} ({why})" for k, why in items[:limit]]
    if len(items) > limit:
        out.append(f"{indent}... and {len(items) - limit} more keys not understood (--json lists all)")
    return out


def arch_options(f):
    """``--arch NAME`` and ``--base BASE``: the two ways to name the architecture of an input."""
    f = click.option("--base", "base", default=None, metavar="BASE", help=BASE_HELP)(f)
    return click.option("--arch", default=None, help=ARCH_HELP)(f)


def chosen_arch(stack: contextlib.ExitStack, arch: str | None, base: str | None, version=None):
    """``(arch, base)`` for a command's ``--arch``/``--base`` and its input's REF version: the
    ``--base``'s arch (the base resolved for the command's duration), else ``--arch``, else the
    REF's recorded arch, else None (detected from the file)."""
    if base is None:
        return ref_arch(arch, version), None
    from loradex.bases import resolve_base

    b = stack.enter_context(resolve_base(base))
    if arch is not None and arch != b.arch.name:
        raise click.UsageError(f"--arch {arch} and --base {base} ({b.arch.name}) disagree; give one of them")
    return b.arch, b


def save_as_option(f):
    """``--save-as NAME``: the decorator that adds it to a command writing an adapter or model
    (``merge``, ``resize``, ``extract``, ``bake``...). The command passes it to
    :func:`output_path` and :func:`store_output`, which store the output as NAME with lineage."""
    return click.option("--save-as", "save_as", default=None, metavar="NAME",
                        help="also store the result in the registry as NAME (with its lineage)")(f)


def _note_input(p: Path) -> None:
    """Remember an input file of the running command, so that its output cannot overwrite it."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.find_root().meta.setdefault("loradex.inputs", []).append(p)


#: File name endings of weights files: an output named with one the format does not write is refused
#: (``-o x.ckpt --to kohya`` would put safetensors bytes under a pickle's name).
WEIGHT_ENDINGS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def force_option(f):
    """``--force``: let the command replace an existing output (never one of its inputs)."""
    return click.option("--force", is_flag=True, help="replace OUT if it exists (never an input of the command)")(f)


def safe_output(dst: str | os.PathLike, folder: bool = False, fmt: str | None = None) -> Path:
    """The path a command may write for ``-o dst``: refused (exit 2) when it is one of the
    command's inputs, or exists and ``--force`` was not given; for a file format, a name without a
    weights ending gets the format's ending and one the format does not write is refused; missing
    parent folders are created. ``fmt`` is the ``--to`` name (its converter's ``suffixes``)."""
    p = Path(dst)
    if not folder and fmt is not None:
        from loradex.converters import converters, resolve_name

        with contextlib.suppress(LoradexError):
            allowed = tuple(getattr(converters()[resolve_name(fmt)], "suffixes", (".safetensors",)))
            # a name that means another format for an embeddings-only adapter (a1111 -> a1111-ti)
            allowed += tuple(s for c in converters().values() if fmt.lower() in c.embedding_aliases
                             for s in c.suffixes if s not in allowed)
            if p.suffix.lower() not in allowed:
                if p.suffix.lower() in WEIGHT_ENDINGS:
                    raise click.UsageError(f"{p}: a {fmt} file is written as {' or '.join(allowed)}, not "
                                           f"{p.suffix}; name it {p.stem}{allowed[0]}")
                p = p.with_name(p.name + allowed[0])
    ctx = click.get_current_context(silent=True)
    inputs = ctx.find_root().meta.get("loradex.inputs", []) if ctx is not None else []
    for i in inputs:
        same = p.resolve() == i.resolve()
        with contextlib.suppress(OSError):
            same = same or (p.exists() and os.path.samefile(p, i))
        if same:
            raise click.UsageError(f"{p} is an input of this command: write the output elsewhere (nothing was changed)")
    force = bool(ctx.params.get("force")) if ctx is not None else False
    if p.exists() and not force:
        raise click.UsageError(f"{p} exists: pass --force to replace it, or choose another -o")
    if not p.parent.exists():
        try:
            p.parent.mkdir(parents=True)
        except OSError as e:
            raise click.UsageError(f"cannot create the folder {p.parent} ({e.strerror})") from None
    return p


@contextlib.contextmanager
def output_path(dst: str | None, save_as: str | None, folder: bool = False, fmt: str | None = None
                ) -> Iterator[Path]:
    """Where a command writes: ``dst`` as :func:`safe_output` allows it, or (only ``--save-as``
    given) a temporary path in the registry's folder, removed once stored."""
    if dst is not None:
        yield safe_output(dst, folder, fmt)
        return
    if save_as is None:
        raise click.UsageError("give -o OUT, --save-as NAME, or both")
    from loradex.registry import validate_name

    validate_name(save_as)
    reg = _registry()
    d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-out-", dir=reg.tmp))
    try:
        yield d / (save_as if folder else f"{save_as}.safetensors")
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def base_pipeline(stack: contextlib.ExitStack, base: str | None, what: str):
    """What a pipeline-loading command (train, generate, serve) loads for ``--base``:
    ``(source for converters.pipeline.load_pipeline, Base or None, tiny)``. No ``--base``: the
    embedded tiny SD1 model; an embedded tiny name: that tiny pipeline; otherwise the base's folder
    or file (a REF stays checked out, a Hub id is its cached snapshot)."""
    if base is None:
        return "tiny", None, True
    from loradex.bases import resolve_base
    from loradex.core.archs import tiny_names

    b = stack.enter_context(resolve_base(base))
    if b.path is not None:
        return b.path, b, False
    if b.arch.name in tiny_names():
        return b.arch.name, b, True
    return b.require_path(what), b, False


def recorded_base(version):
    """The base a REF's version was stored with, carried over to what is made from it (a ``Base``
    with only its identity), or None."""
    if version is None or not getattr(version, "base_model", None):
        return None
    from loradex.bases import Base

    return Base(version.base_model, None, version.base_model)


def store_output(path: Path, save_as: str, operation: str, parents: list, params: dict, arch=None, base=None):
    """Add what a command wrote as the next version of ``save_as``; lineage: ``parents`` (Versions,
    REFs or paths) -> it, by ``operation`` with ``params``; ``arch`` (name or Arch) and ``base``
    (a resolved ``Base``: its identity is recorded as the base model) when the command knew them."""
    return _registry().add(path, save_as, parents=parents, operation=operation, params=params, arch=arch,
                           base_model=base.identity if base is not None else None)


# ---- commands --------------------------------------------------------------------------------------
@cli.command("add")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", default=None, help="the adapter's name (for a folder of files: a prefix of their names)")
@click.option("--tag", "tags", multiple=True, help="point this tag (e.g. prod) at the new version; repeatable")
@click.option("--description", default=None, help="what the adapter is (goes into model cards)")
@click.option("--trigger", "triggers", multiple=True, help="a trigger word or phrase; repeatable")
@click.option("--label", "labels", multiple=True, help="a searchable label (style, character...); repeatable")
@arch_options
@click.option("--base-model", default=None, help="record this as its base model (a Hub id or a name) without reading it")
@click.option("--follow-links", is_flag=True,
              help="in a folder, follow symlinks that lead out of it too (loops are still detected)")
@click.option("--allow-nonfinite", is_flag=True, help="store adapters holding NaN/Inf values anyway")
@click.option("--link", is_flag=True,
              help="store without copying when the registry is on the same file system (still hashed): a reflink "
                   "where the file system clones (btrfs, XFS: a copy-on-write copy, your file stays yours), else a "
                   "hard link -- then the blob IS your file, made read-only (chmod 0444) like every blob. Do not "
                   "edit a hard-linked file in place afterwards: that changes the stored version (every read of "
                   "it, and `loradex verify`, report the damage); tools that save to a new file and rename it are "
                   "safe. On another file system it is copied as usual, with a warning. Sketches are deferred "
                   "(see --sketch)")
@click.option("--sketch/--no-sketch", default=None,
              help="store the similarity sketch of each new version now (default: yes, but not with --link: the "
                   "sketch of an SDXL-size file costs more than hashing it); a version without one is sketched by "
                   "`loradex similar` or `loradex reindex` when first needed")
@strict_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON report")
def add_cmd(path, name, tags, description, triggers, labels, arch, base, base_model, follow_links, allow_nonfinite,
            link, sketch, strict, as_json):
    """Store PATH in the registry: an adapter, embedding or checkpoint file, a PEFT adapter folder, a
    diffusers pipeline folder, or a folder of such files (e.g. A1111's models/Lora: every file
    loradex recognises is imported -- A1111 embedding images (.png) too -- the rest reported, preview
    images included). With --base, every file is read against that base's architecture and the base
    is recorded, so later commands on the REF need no --base. Only regular files are read (a FIFO,
    device or socket is refused, or skipped in a folder); symlinks in a folder are followed only
    inside it, unless --follow-links. With --link, files are linked into the registry instead of
    copied (see --link; hashed all the same)."""
    with contextlib.ExitStack() as stack:
        _add(stack, path, name, tags, description, triggers, labels, arch, base, base_model, follow_links, strict,
             as_json, allow_nonfinite, link, sketch)


def _add(stack, path, name, tags, description, triggers, labels, arch, base, base_model, follow_links, strict,
         as_json, allow_nonfinite=False, link=False, sketch=None):
    from loradex.registry.scan import check_importable, is_folder_artifact

    check_importable(Path(path))  # before anything opens it: a FIFO would block, a device never end
    arch, b = chosen_arch(stack, arch, base)
    if b is not None:
        if base_model is not None and base_model != b.identity:
            raise click.UsageError("--base and --base-model name different bases; give one of them")
        base_model = b.identity
    reg = _registry()
    p = Path(path)
    if p.is_dir() and not is_folder_artifact(p):
        files = _bar(as_json, desc="importing", unit="file")

        def on_file(rel: str, status: str) -> None:
            if files is not None:
                files.set_postfix_str(rel[-40:])
                files.update(1)

        try:
            report = reg.add_many(p, prefix=name, tags=tags, arch=arch, base_model=base_model,
                                  follow_links=follow_links, on_file=on_file, allow_nonfinite=allow_nonfinite,
                                  link=link, sketch=sketch)
        finally:
            if files is not None:
                files.close()
        text = [f"added {len(report.added)}, already stored {len(report.existing)}, skipped {len(report.skipped)}"
                + (f"; {report.linked} linked, not copied (now read-only)" if link else "")]
        text += [f"  added    {_one_line(v)}" for v in report.added]
        text += [f"  stored   {_one_line(v)}" for v in report.existing]
        text += [f"  skipped  {rel}: {why}" for rel, why in report.skipped]
        text += [f"  same tensors (AutoV3): {' = '.join(g)}" for g in report.same_tensors()]
        emit(report.to_dict(), as_json, "\n".join(text))
        return
    if name is None:
        raise click.UsageError("--name NAME is required when adding one artifact")
    if strict:
        from loradex.converters.checkpoint import describe_checkpoint

        if describe_checkpoint(p, derive=False) is None:  # an adapter or embedding: every key must be read
            from loradex.api import load

            load(p, arch=arch, strict=True)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    bar = _bar(as_json, total=size, unit="B", unit_scale=True, desc=f"hashing {p.name}") if size > (64 << 20) else None
    try:
        v = reg.add(p, name, tags=tags, description=description, trigger_words=list(triggers) or None,
                    labels=list(labels) or None, arch=arch, base_model=base_model, follow_links=follow_links,
                    progress=bar.update if bar is not None else None, allow_nonfinite=allow_nonfinite, link=link,
                    sketch=sketch)
    finally:
        if bar is not None:
            bar.close()
    out = reg.show(v)
    lines = [f"stored {_one_line(v)}"]
    if link and p.is_file() and v.layout == "file":
        blob, here = reg.store.path(v.sha256).stat(), p.stat()
        if (blob.st_dev, blob.st_ino) == (here.st_dev, here.st_ino):
            lines.append(f"  linked: the blob is {p} itself (a hard link, now read-only; do not edit it in place)")
    lines += [f"  {n}" for n in out["identity_notes"]]
    lines += [f"  note: {n}" for n in v.notes[:10]]
    if len(v.notes) > 10:
        lines.append(f"  note: ... and {len(v.notes) - 10} more (loradex show {v.ref} --json)")
    emit(out, as_json, "\n".join(lines))


@cli.command("ls")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def ls_cmd(name, as_json):
    """List adapters (newest version, tags), or the versions of NAME."""
    reg = _registry(write=False)
    if name:
        vs = reg.versions(name)
        emit([v.to_dict(metadata=False) for v in vs], as_json, "\n".join(_one_line(v) for v in vs))
        return
    rows = reg.list()
    text = [f"{r['name']}  v{r['latest']} ({r['versions']} version{'s' if r['versions'] != 1 else ''})  "
            f"{r['format'] or '?'} {r['arch'] or '?'} {_counts(r['kinds'])}  {_size(r['size'])}"
            + (f"  tags: {', '.join(r['tags'])}" if r["tags"] else "") for r in rows]
    emit(rows, as_json, "\n".join(text) if text else "(empty registry)")


@cli.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def show_cmd(ref, as_json):
    """Everything about a version: identity (sha256, Civitai AutoV1/V2/V3, CRC32, kohya sshs),
    format, arch, kinds, ranks, tags, metadata, lineage, and versions with the same tensors."""
    d = _registry(write=False).show(ref)
    h = d["hashes"]
    a = d["adapter"]
    lines = [
        f"{d['ref']}" + (f"  [{', '.join(d['tags'])}]" if d["tags"] else ""),
        f"  artifact:    {d['artifact']} ({d['layout']}) {d['filename']}",
        f"  format:      {d['format']}",
        f"  arch:        {d['arch'] or 'unknown'}" + (f"   base model: {d['base_model']}" if d["base_model"] else ""),
        f"  kinds:       {_counts(d['kinds'])}   modules: {d['modules']}   ranks: {_counts(d['ranks'])}",
        f"  size:        {_size(d['size'])} ({d['size']} bytes)",
        f"  sha256:      {d['sha256']}",
    ]
    if d["layout"] == "file":
        lines.append(f"  civitai:     AutoV1 {h['autov1']}  AutoV2 {h['autov2']}  AutoV3 {h['autov3'] or '-'}  "
                     f"CRC32 {h['crc32']}")
        if h["sshs_model_hash"]:
            lines.append(f"  kohya:       sshs_model_hash {h['sshs_model_hash'][:16]}...  "
                         f"sshs_legacy_hash {h['sshs_legacy_hash']}")
    else:
        lines.append(f"  files:       {len(d.get('files', []))} (sha256 is of the manifest)")
    if d["embeddings"]:
        lines.append(f"  embeddings:  {', '.join(d['embeddings'])}")
    if a["description"]:
        lines.append(f"  description: {a['description']}")
    if a["trigger_words"]:
        lines.append(f"  triggers:    {', '.join(a['trigger_words'])}")
    if a["labels"]:
        lines.append(f"  labels:      {', '.join(a['labels'])}")
    lines.append(f"  created:     {d['created']}")
    for e in d["parents"]:
        lines.append(f"  made by:     {e['operation']} from {e['parent'] or e['source']}"
                     + (f" {e['params']}" if e["params"] else ""))
    lines += [f"  identity:    {n}" for n in d["identity_notes"]]
    if d["same_bytes"]:
        lines.append(f"  identity:    same bytes as {', '.join(d['same_bytes'])}")
    meta = d["metadata"]
    if meta:
        shown = [k for k in ("modelspec.title", "modelspec.architecture", "ss_output_name", "ss_network_module",
                             "ss_network_dim", "ss_network_alpha", "ss_base_model_version") if k in meta]
        lines.append(f"  metadata:    {len(meta)} keys" + "".join(f"; {k}={meta[k][:60]}" for k in shown))
    lines += [f"  note:        {n}" for n in d["notes"][:5]]
    emit(d, as_json, "\n".join(lines))


@cli.command("search")
@click.argument("query", required=False, default="")
@click.option("--arch", default=None, help="only this architecture (sd1, sd2, sdxl, flux1, ...)")
@click.option("--kind", default=None, help="only versions with this kind (lora, loha, lokr, ..., embedding, checkpoint)")
@click.option("--base", default=None, help="only this base model (substring)")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
@click.option("--similar-to", "similar_to", default=None, metavar="REF",
              help="only adapters whose update is close to REF's (see `loradex similar`), closest first")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def search_cmd(query, arch, kind, base, limit, similar_to, as_json):
    """Full-text search over names, descriptions, trigger words, labels and file titles; the newest
    matching version of each adapter. With --similar-to, only those among the adapters closest to
    REF (estimated cosine of the whole updates, printed), best first."""
    reg = _registry(write=False)
    if similar_to is None:
        vs = reg.search(query, arch=arch, kind=kind, base=base, limit=limit)
        emit([v.to_dict(metadata=False) for v in vs], as_json, "\n".join(_one_line(v) for v in vs) or "(no match)")
        return
    hits = {h.ref: h.cosine for h in reg.similar(similar_to, top=max(4 * limit, 200)).hits}
    vs = [v for v in reg.search(query, arch=arch, kind=kind, base=base, limit=10000) if v.ref in hits]
    vs = sorted(vs, key=lambda v: -hits[v.ref])[:limit]
    emit([{**v.to_dict(metadata=False), "cosine": hits[v.ref]} for v in vs], as_json,
         "\n".join(f"{hits[v.ref]:+.3f}  {_one_line(v)}" for v in vs) or "(no match)")


@cli.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def tag_cmd(ref, tag, as_json):
    """Point TAG (e.g. prod) of the adapter at REF's version, moving it if it pointed elsewhere."""
    v = _registry().tag(ref, tag)
    emit(v.to_dict(metadata=False), as_json, f"{v.name}:{tag} -> {v.ref}")


@cli.command("untag")
@click.argument("name")
@click.argument("tag", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def untag_cmd(name, tag, as_json):
    """Remove a tag: `untag NAME TAG` or `untag NAME:TAG`."""
    _registry().untag(name, tag)
    shown = f"{name}:{tag}" if tag else name
    emit({"removed": shown}, as_json, f"removed tag {shown}")


@cli.command("rm")
@click.argument("ref")
@click.option("--all", "all_versions", is_flag=True, help="remove every version of the name")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def rm_cmd(ref, all_versions, as_json):
    """Remove a version (REF) or, with --all, every version of a name. Bytes are freed by `gc`."""
    gone = _registry().remove(ref, all_versions=all_versions)
    emit({"removed": [v.ref for v in gone]}, as_json, "removed " + ", ".join(v.ref for v in gone)
         + " (run `loradex gc` to free the space)")


@cli.command("export")
@click.argument("ref")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="output file or folder")
@click.option("--to", default=None, help="convert to this format (kohya, diffusers, peft, lycoris, ...); default: the stored bytes")
@click.option("--rank", type=int, default=None, help="SVD rank for kinds the target cannot hold exactly")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None, help="cast the output tensors")
@arch_options
@force_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def export_cmd(ref, out, to, rank, dtype, arch, base, force, as_json):
    """Write a stored version to OUT: the exact stored bytes (checked against the catalogue as they
    are copied), or converted with --to. OUT may be an existing folder (the file keeps its stored
    name there); an existing file is replaced only with --force."""
    reg = _registry(write=False)
    v = reg.get(ref)
    folder = v.layout != "file" if to is None else to.lower() == "peft"
    target = Path(out)
    if target.is_dir() and not folder:
        target = target / (v.filename or f"{v.name}.safetensors")
    if not (folder and target.is_dir() and not any(target.iterdir())):
        out = str(safe_output(target, folder=folder, fmt=to))
    with contextlib.ExitStack() as stack:
        arch, _ = chosen_arch(stack, arch, base)
        res = reg.export(v, out, to=to, rank=rank, dtype=dtype, arch=arch)
    if to is None:
        emit({"ref": v.ref, "path": str(res), "sha256": v.sha256}, as_json, f"wrote {res} ({v.ref}, {_size(v.size)})")
    else:
        d = res.to_dict()
        d.update(ref=v.ref, path=out)
        emit(d, as_json, f"wrote {out} ({res.target}) from {v.ref}: {res.summary()}")


def _tree_lines(node: dict, indent: str = "") -> list[str]:
    out = []
    for e in node["parents"]:
        origin = e["parent"] or e["source"]
        params = f" {e['params']}" if e["params"] else ""
        out.append(f"{indent}<- {e['operation']}{params} <- {origin}")
        if "node" in e:
            out += _tree_lines(e["node"], indent + "   ")
    return out


@cli.command("lineage")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def lineage_cmd(ref, as_json):
    """How a version was made (its parents, recursively, with each operation and its parameters)
    and what was made from it."""
    t = _registry(write=False).lineage(ref)
    lines = [t["ref"], *_tree_lines(t, "  ")]
    lines += [f"  -> {c['operation']} -> {c['child']}" for c in t["children"]]
    emit(t, as_json, "\n".join(lines))


@cli.command("verify")
@click.option("--quick", is_flag=True, help="check presence and sizes only, do not re-hash")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def verify_cmd(quick, as_json):
    """Re-hash every stored blob against the catalogue. Exit 1 (naming the versions) when a blob is
    missing, truncated or changed; orphan blobs and stale temporary files are reported for `gc`."""
    reg = _registry(write=False)
    total = sum(p.stat().st_size for _, p in reg.store.iter_blobs()) if not quick else 0
    bar = _bar(as_json, total=total, unit="B", unit_scale=True, desc="verifying") if total > (64 << 20) else None
    r = reg.verify(quick=quick, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    lines = [f"{'ok' if r['ok'] else 'PROBLEMS'}: {r['blobs_checked']} blobs, {_size(r['bytes_checked'])} "
             + ("checked (sizes only)" if quick else "re-hashed")]
    lines += [f"  {', '.join(p['versions']) or 'registry'}: {p['problem']}" for p in r["problems"]]
    if r["orphan_blobs"] or r["stale_temp_files"]:
        lines.append(f"  {len(r['orphan_blobs'])} unreferenced blobs, {len(r['stale_temp_files'])} stale temporary "
                     "files (`loradex gc` removes them)")
    emit(r, as_json, "\n".join(lines))
    if not r["ok"]:
        sys.exit(1)


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="only report what would be removed")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def gc_cmd(dry_run, as_json):
    """Remove blobs no version references and temporary files left by killed imports."""
    r = _registry().gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    emit(r, as_json, f"{verb} {len(r['removed_blobs'])} blobs and {len(r['removed_temp_files'])} temporary files "
                     f"({_size(r['freed_bytes'])})")


@cli.command("push")
@click.argument("ref")
@click.option("--repo-id", required=True, help="the Hub repository, e.g. you/my-lora")
@click.option("--private", is_flag=True, help="create the repository private")
@click.option("--to", type=click.Choice(["diffusers", "kohya"]), default=None,
              help="weights layout: diffusers (pytorch_lora_weights.safetensors, default) or kohya (every LyCORIS kind)")
@click.option("--license", default=None, help="card license (default by architecture)")
@click.option("--dry-run", is_flag=True, help="write the folder that would be uploaded to -o DIR, upload nothing")
@click.option("-o", "--output", "out", default=None, type=click.Path(), help="with --dry-run: the folder to write")
@click.option("--samples", type=click.IntRange(0, 64), default=0, show_default=True, metavar="N",
              help="render N sample images on the version's recorded base (it must be here) into samples/ and the "
                   "card's widget")
@click.option("--sample-prompt", "sample_prompts", multiple=True, metavar="TEXT",
              help="prompt of the samples (repeatable: cycled) [default: the card's instance prompt]")
@device_option
@arch_options
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def push_cmd(ref, repo_id, private, to, license, dry_run, out, samples, sample_prompts, device, arch, base, as_json):
    """Publish a version on the Hugging Face Hub with a model card: base model (the one the registry
    recorded, or --base, when it is on the Hub), trigger words (or kohya's most frequent tags), a
    usage snippet for the uploaded format, and --samples rendered on that base. The token comes
    from huggingface_hub (HF_TOKEN or `hf auth login`) and is never printed or stored."""
    from loradex.registry import hub

    if out is not None and not dry_run:
        raise click.UsageError("-o is for --dry-run (the upload is made from a temporary folder)")
    if sample_prompts and not samples:
        raise click.UsageError("--sample-prompt needs --samples N")
    with contextlib.ExitStack() as stack:
        arch, b = chosen_arch(stack, arch, base)
        r = hub.push(_registry(), ref, repo_id, private=private, to=to, dry_run=dry_run, out_dir=out, license=license,
                     arch=arch, samples=samples, sample_prompts=sample_prompts, device=device,
                     base_model=b.identity if b is not None else None)
    if dry_run:
        text = f"wrote {r['folder']} (would upload to {repo_id}): {', '.join(r['files'])}"
    else:
        text = f"pushed {r['ref']} to {r['url']} ({', '.join(r['files'])})" + (
            f"\n  commit {r['commit_url']}" if r.get("commit_url") else "")
    emit(r, as_json, text)


@cli.command("pull")
@click.argument("repo")
@click.option("--name", required=True, help="store it under this name")
@click.option("--file", "filename", default=None, help="the file (or sub-folder) of the repo to store")
@click.option("--tag", "tags", multiple=True, help="point this tag at the new version; repeatable")
@click.option("--arch", default=None, help=ARCH_HELP)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def pull_cmd(repo, name, filename, tags, arch, as_json):
    """Download REPO (ID or ID@REVISION) with huggingface_hub (its cache, HF_HUB_OFFLINE honoured) and
    store it as NAME, the source and commit recorded in lineage."""
    reg = _registry()
    v = reg.pull(repo, name, filename=filename, tags=tags, arch=arch)
    out = reg.show(v)
    src = out["parents"][0]["source"] if out["parents"] else repo
    emit(out, as_json, f"stored {_one_line(v)}\n  from {src}")
