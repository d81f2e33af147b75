"""Registry benchmark: import throughput against the byte-path floor, add --link against the hash
floor, and lookups at 10,000 versions.

    python bench/registry.py            # 1,000 small adapters imported; 10,000 versions for the lookups
    python bench/registry.py --big      # + 20 SDXL-size LoRA files (100..400 MiB: ~5 GiB, ~10 GiB at peak)
    python bench/registry.py --big --big-files 6 --big-mb 100..400 --versions 1000   # a smaller big run
    python bench/registry.py --full     # 10,000 distinct files, every one fully imported (slow)

1. Makes ``--adapters`` small kohya LoRA files (real files: loradex's kohya writer on the tiny SD
   model, then the same keys with different values and metadata per file).
2. Floors, same files, same run (each a few lines of plain Python, see ``byte_floor``): the
   *byte-path floor* -- every file read once, the two SHA-256 the Civitai identities need (whole
   file = AutoV2, data section = AutoV3 / kohya's sshs_model_hash) fed from that read, written to a
   folder on the registry's file system, one ``syncfs`` at the end -- and the *hash floor* (read +
   both SHA-256, nothing written). ``shutil.copyfile`` baselines are printed for reference.
3. Imports them: ``Registry.add_many`` (the folder import: one read feeding every hash, description
   from the header where the bytes lie in the store, NaN/Inf check, similarity sketch, one syncfs
   and one transaction per batch) into a fresh registry, against the byte-path floor (goal <= 1.5x);
   ``add_many(link=True)`` (add --link: hard links or reflinks, hashed in place) into another,
   against the hash floor (goal <= 1.1x). ``--repeat N`` interleaves N rounds (floors, import,
   link) and reports medians. Then a sample of single ``Registry.add`` calls (fsync per blob), and
   with ``--ckpt-mb`` a single-file checkpoint import, its checked export and ``path()``.
4. ``--big``: the same comparisons on ``--big-files`` SDXL-shaped kohya LoRAs (986 modules, fp16)
   of ``--big-mb LO..HI`` MiB (ranks chosen to match; goals: import <= 1.2x the byte-path floor,
   add --link <= 1.1x the hash floor). Free space is checked first (the files, plus one copy).
5. Grows the catalogue to ``--versions`` versions (each adapter gets more versions; by default the
   extra versions reuse files already imported under other names, so the bytes and description
   are found, not recomputed; ``--full`` imports distinct files throughout) and times ``get``
   (NAME, NAME@N, NAME:TAG, sha prefix), ``versions`` and ``search`` (a name, a word matching
   every adapter, kind / arch filters), milliseconds p50 / p99 over ``--lookups`` calls each.

Figures are printed as ratios against the floors measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def make_files(out: Path, n: int, rank: int, seed: int = 0, start: int = 0) -> list[Path]:
    """n distinct kohya LoRA files for the tiny SD model (same keys, different values/metadata)."""
    from safetensors.torch import load_file, save_file

    import loradex
    from loradex.converters import safetensors_io as sio
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch
    from loradex.tiny import tiny_arch

    arch = tiny_arch("sd1")
    base = out / "_base.safetensors"
    if not base.exists():
        g = torch.Generator().manual_seed(seed)
        patches = {}
        for name, info in arch.modules.items():
            if len(info.shape) == 2:
                o, i = info.shape
                patches[name] = LoraPatch(up=torch.randn(o, rank, generator=g) * 0.01,
                                          down=torch.randn(rank, i, generator=g) * 0.01, alpha=torch.tensor(rank / 2))
        loradex.save(Adapter(patches, arch=arch.name), base, "kohya")
    tensors = load_file(base)
    meta = dict(sio.read_header(base).metadata)
    key = next(k for k in sorted(tensors) if k.endswith("lora_down.weight"))
    files = []
    for i in range(start, start + n):
        t = dict(tensors)
        t[key] = tensors[key].clone()
        t[key].view(-1)[0] = float(i)  # different bytes, same structure
        p = out / f"adapter_{i:05d}.safetensors"
        save_file(t, p, metadata={**meta, "ss_output_name": f"adapter_{i:05d}", "modelspec.title": f"adapter {i}"})
        files.append(p)
    return files


def copy_baselines(files: list[Path], work: Path) -> dict[str, float]:
    from loradex.registry.store import _syncfs

    out = {}
    for label in ("copy", "copy+fsync", "copy+syncfs"):
        d = work / f"copy_{label}"
        d.mkdir()
        t0 = time.perf_counter()
        for f in files:
            dst = d / f.name
            shutil.copyfile(f, dst)
            if label == "copy+fsync":
                fd = os.open(dst, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        if label == "copy+syncfs":
            _syncfs(d)
        out[label] = time.perf_counter() - t0
        shutil.rmtree(d)
    return out


def byte_floor(files: list[Path], dest: Path | None, chunk: int = 4 << 20) -> float:
    """Seconds to read every file once, feed both SHA-256 (whole file; data section after the
    8-byte length and the header) from that read and -- with ``dest`` -- write it into ``dest`` and
    ``syncfs`` once at the end: the least any import that stores and identifies the bytes does."""
    from loradex.registry.store import _syncfs

    t0 = time.perf_counter()
    for f in files:
        whole, data = hashlib.sha256(), hashlib.sha256()
        out = open(dest / f.name, "wb") if dest is not None else None  # noqa: SIM115
        with open(f, "rb") as src:
            skip = None
            pos = 0
            while buf := src.read(chunk):
                whole.update(buf)
                if skip is None:
                    skip = 8 + int.from_bytes(buf[:8], "little")
                if pos + len(buf) > skip:
                    data.update(memoryview(buf)[max(0, skip - pos):])
                pos += len(buf)
                if out is not None:
                    out.write(buf)
        if out is not None:
            out.close()
        whole.digest(), data.digest()
    if dest is not None:
        _syncfs(dest)
    return time.perf_counter() - t0


def make_big_files(out: Path, n: int, lo_mb: int, hi_mb: int, seed: int = 0) -> list[Path]:
    """``n`` SDXL-shaped kohya LoRA files (the 986 attention/MLP modules a full kohya LoRA trains,
    fp16) whose sizes spread from ``lo_mb`` to ``hi_mb`` MiB (ranks chosen to match), each with
    its own bytes and metadata."""
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.archs import get_arch
    from loradex.core.kinds.lora import LoraPatch

    keep = ("attn1", "attn2", "ff.net", "proj_in", "proj_out", "self_attn", "mlp")
    mods = [(name, tuple(info.shape)) for name, info in get_arch("sdxl").modules.items()
            if info.type == "linear" and len(info.shape) == 2 and any(k in name for k in keep)]
    per_rank = sum(o + i for _, (o, i) in mods) * 2 / 2**20  # MiB per unit of rank, fp16
    ranks = [max(1, round((lo_mb + (hi_mb - lo_mb) * k / max(1, n - 1)) / per_rank)) for k in range(n)]
    top = max(ranks)
    g = torch.Generator().manual_seed(seed)
    ups = {m: torch.empty(o, top, dtype=torch.float16).uniform_(-0.01, 0.01, generator=g) for m, (o, i) in mods}
    downs = {m: torch.empty(top, i, dtype=torch.float16).uniform_(-0.01, 0.01, generator=g) for m, (o, i) in mods}
    files = []
    for k, r in enumerate(ranks):
        patches = {}
        for m, _ in mods:
            up, down = ups[m][:, :r].contiguous(), downs[m][:r].contiguous()
            patches[m] = LoraPatch(up=up, down=down, alpha=torch.tensor(r / 2))
        first = patches[mods[0][0]]
        first.up.view(-1)[0] = float(k + 1) / 1024  # bytes of its own
        p = out / f"sdxl_lora_{k:02d}_r{r}.safetensors"
        loradex.save(Adapter(patches, arch="sdxl", metadata={"ss_output_name": p.stem}), p, "kohya")
        files.append(p)
    return files


def goal(ratio: float, limit: float) -> str:
    """``goal <= 1.5x: met`` / ``NOT met``."""
    return f"goal <= {limit}x: {'met' if ratio <= limit else 'NOT met'}"


def clocked(fn, spent: list[float]):
    """``fn`` adding the seconds each call takes to ``spent[0]``."""
    def run(*a):
        t = time.perf_counter()
        try:
            return fn(*a)
        finally:
            spent[0] += time.perf_counter() - t
    return run


def import_rounds(files: list[Path], src: Path, work: Path, repeat: int, label: str) -> dict[str, list[float]]:
    """``repeat`` interleaved rounds of: byte-path floor, hash floor, ``add_many`` into a fresh
    registry, ``add_many(link=True)`` into another (each removed after); seconds per round."""
    from loradex.registry import Registry
    from loradex.registry.describe import describe_path

    describe_path(files[0])  # arch tables warm, as in a long-running process
    out: dict[str, list[float]] = {"floor": [], "hash": [], "import": [], "link": [], "import_sketch": [],
                                   "link_sketch": []}
    for k in range(repeat):
        dest = work / f"floor_{label}_{k}"
        dest.mkdir()
        out["floor"].append(byte_floor(files, dest))
        shutil.rmtree(dest)
        out["hash"].append(byte_floor(files, None))
        for kind in ("import", "link"):
            home = work / f"home_{label}_{kind}_{k}"
            home.mkdir()
            reg = Registry(home)
            spent = [0.0]  # the similarity sketches (issue 16), timed apart: main-thread time of the hooks
            for hook in ("sketch_files", "store_sketches"):
                setattr(reg._ingest, hook, clocked(getattr(reg._ingest, hook), spent))
            t0 = time.perf_counter()
            report = reg.add_many(src, link=kind == "link")
            out[kind].append(time.perf_counter() - t0)
            out[f"{kind}_sketch"].append(spent[0])
            assert len(report.added) == len(files), report.skipped[:3]
            if kind == "link":
                assert report.linked == len(files), f"linked {report.linked} of {len(files)}"
            reg.close()
            shutil.rmtree(home)
    for f in files:  # add --link made them read-only (they are the blobs): writable again
        f.chmod(0o644)
    return out


def report_rounds(r: dict[str, list[float]], n: int, what: str, import_goal: float) -> None:
    """Print medians of ``import_rounds`` per file and the ratios next to their goals."""
    med = {k: statistics.median(v) for k, v in r.items()}
    per = {k: v / n * 1000 for k, v in med.items()}
    runs = f" (medians of {len(r['floor'])} rounds)" if len(r["floor"]) > 1 else ""
    print(f"{what}{runs}:")
    print(f"  byte-path floor (read once + both SHA-256 + write + one syncfs): {med['floor']:.2f} s = {per['floor']:.2f} ms/file")
    print(f"  hash floor (read once + both SHA-256):                           {med['hash']:.2f} s = {per['hash']:.2f} ms/file")
    ri, rl = med["import"] / med["floor"], med["link"] / med["hash"]
    print(f"  import (add_many):        {med['import']:.2f} s = {per['import']:.2f} ms/file = {ri:.2f}x the byte-path floor "
          f"({goal(ri, import_goal)})")
    print(f"  add --link (add_many):    {med['link']:.2f} s = {per['link']:.2f} ms/file = {rl:.2f}x the hash floor "
          f"({goal(rl, 1.1)})")
    si, sl = med["import_sketch"], med["link_sketch"]
    print(f"  of which similarity sketches (main thread, while the workers go on): {si:.2f} s / {sl:.2f} s; "
          f"the rest alone would be {(med['import'] - si) / med['floor']:.2f}x / {(med['link'] - sl) / med['hash']:.2f}x")


def timed(fn, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return ts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--adapters", type=int, default=1000, help="adapters to import (default 1000)")
    ap.add_argument("--versions", type=int, default=10000, help="catalogue size for the lookups (default 10000)")
    ap.add_argument("--full", action="store_true", help="import a distinct file for every version (slow)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the files (sets their size)")
    ap.add_argument("--lookups", type=int, default=500, help="calls per lookup kind (default 500)")
    ap.add_argument("--single", type=int, default=50, help="files imported one by one with Registry.add")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds of floors / import / link (medians)")
    ap.add_argument("--ckpt-mb", type=int, default=256, help="size of the single-file checkpoint import (0: skip)")
    ap.add_argument("--big", action="store_true", help="also import SDXL-size LoRA files (see --big-files/--big-mb)")
    ap.add_argument("--big-files", type=int, default=20, help="with --big: how many (default 20)")
    ap.add_argument("--big-mb", default="100..400", help="with --big: their sizes, LO..HI MiB (default 100..400)")
    ap.add_argument("--workdir", default=None, help="where to put the files and the registry (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the files and the registry (the path is printed)")
    args = ap.parse_args(argv)
    lo_mb, _, hi_mb = args.big_mb.partition("..")
    lo_mb, hi_mb = int(lo_mb), int(hi_mb or lo_mb)

    from loradex.registry import Registry
    from loradex.registry import db as rdb
    from loradex.registry.describe import DescriptionCache, describe_path
    from loradex.registry.linking import Slots
    from loradex.registry.store import BlobStore

    work = Path(tempfile.mkdtemp(prefix="loradex-bench-", dir=args.workdir))
    try:
        if args.big:  # the files and one stored copy of them, with room to spare
            need = args.big_files * (lo_mb + hi_mb) / 2 * 2**20 * 2.2
            free = shutil.disk_usage(work).free
            if free < need:
                print(f"--big needs about {need / 2**30:.1f} GiB free in {work}, there are {free / 2**30:.1f} GiB: "
                      "fewer --big-files or a smaller --big-mb")
                return 2
        t0 = time.perf_counter()
        src = work / "Lora"
        src.mkdir()
        files = make_files(src, args.adapters, args.rank)
        size = files[0].stat().st_size
        (src / "_base.safetensors").unlink()
        print(f"files: {len(files)} kohya LoRA files of {size / 1024:.0f} KiB (tiny SD model, rank {args.rank}), "
              f"made in {time.perf_counter() - t0:.1f} s")

        base = copy_baselines(files, work)
        print(f"for reference, shutil.copyfile of the same files: {base['copy'] * 1000:.0f} ms plain, "
              f"{base['copy+fsync'] * 1000:.0f} ms with an fsync per file, {base['copy+syncfs'] * 1000:.0f} ms with one syncfs")
        rounds = import_rounds(files, src, work, args.repeat, "small")
        print()
        report_rounds(rounds, len(files), f"{len(files)} small files", 1.5)

        # where the time goes: the byte path alone (into slots, as the import does: stream + both
        # hashes + rename into place + one syncfs; no parsing, no rows), the description alone
        store = BlobStore(work / "bytes_only" / "blobs")
        store.ensure()
        slots = Slots(store.tmp_dir)
        t0 = time.perf_counter()
        for f in files:
            store.commit(store.ingest(f, slots=slots, keep=True), durable=False)
        store.sync()
        t_bytes = time.perf_counter() - t0
        slots.close()
        memo = DescriptionCache()
        describe_path(files[0], cache=memo)
        t0 = time.perf_counter()
        for f in files[:200]:
            describe_path(f, cache=memo)
        t_desc = (time.perf_counter() - t0) / min(200, len(files))
        t_import = statistics.median(rounds["import"])
        # the byte path and the description are timed alone, one file after another; the import
        # overlaps them on worker threads, so what is left can be negative: hidden behind the bytes
        rest = (t_import - t_bytes) / len(files) * 1000 - t_desc * 1000
        print(f"  where it goes (each part timed alone, on one thread): bytes (read + every hash + blob in place + "
              f"syncfs) {t_bytes / len(files) * 1000:.2f} ms/file; description through loradex.api "
              f"{t_desc * 1000:.2f} ms/file; kohya hashes, NaN check, sketches and catalogue rows "
              + (f"{rest:.2f} ms/file" if rest > 0 else "hidden behind the bytes (the import overlaps them)"))

        home = work / "home"
        home.mkdir()
        reg = Registry(home)
        report = reg.add_many(src)
        single_dir = work / "single"
        single_dir.mkdir()
        singles = make_files(single_dir, args.single, args.rank, start=10_000_000)
        t0 = time.perf_counter()
        for i, f in enumerate(singles):
            reg.add(f, f"single-{i}")
        t_single = (time.perf_counter() - t0) / len(singles)
        print(f"single Registry.add (fsync per blob): {t_single * 1000:.2f} ms/file "
              f"= {t_single / (base['copy+fsync'] / len(files)):.2f}x copy+fsync per file")

        if args.ckpt_mb:
            from safetensors.torch import save_file

            big = work / "big" / "dreambooth.safetensors"
            big.parent.mkdir()
            save_file({"model.diffusion_model.out.2.weight": torch.randn(args.ckpt_mb << 18)}, big)
            def copy_big(sync: bool) -> float:
                dst = work / "big" / "copy.safetensors"
                t0 = time.perf_counter()
                shutil.copyfile(big, dst)
                if sync:
                    fd = os.open(dst, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                t = time.perf_counter() - t0
                dst.unlink()
                return t

            t_bc, t_bcf = copy_big(False), copy_big(True)
            t0 = time.perf_counter()
            bv = reg.add(big, "dreambooth")
            t_bi = time.perf_counter() - t0
            t_bc, t_bcf = min(t_bc, copy_big(False)), min(t_bcf, copy_big(True))  # best of two, around the import
            print(f"import of a {big.stat().st_size >> 20} MiB single-file checkpoint ({bv.format}, header-only "
                  f"description, fsync): {t_bi:.2f} s = {t_bi / t_bc:.1f}x plain copy ({t_bc:.2f} s), "
                  f"{t_bi / t_bcf:.2f}x copy+fsync ({t_bcf:.2f} s)")
            # integrity on the way out: export hashes while it copies (one pass), checked against
            # the catalogue; path() hashes a blob once per process, then answers from its stat
            from loradex.registry.store import VERIFIED

            out = work / "big" / "exported.safetensors"
            VERIFIED.clear()  # forget what the import checked: measure a cold export
            t0 = time.perf_counter()
            reg.export(bv, out)
            t_ex = time.perf_counter() - t0
            out.unlink()
            t_bc = min(t_bc, copy_big(False))
            VERIFIED.clear()
            t0 = time.perf_counter()
            reg.path(bv)
            t_p1 = time.perf_counter() - t0
            t0 = time.perf_counter()
            reg.path(bv)
            t_p2 = time.perf_counter() - t0
            print(f"checked export of it: {t_ex:.2f} s = {t_ex / t_bc:.2f}x plain copy (sha256 verified in the same pass, "
                  f"plus fsync); path(): first {t_p1:.2f} s (hashed), then {t_p2 * 1e3:.2f} ms (this process checked it)")
            big.unlink()

        if args.big:
            bdir = work / "big_loras"
            bdir.mkdir()
            t0 = time.perf_counter()
            bfiles = make_big_files(bdir, args.big_files, lo_mb, hi_mb)
            total = sum(f.stat().st_size for f in bfiles)
            print()
            print(f"big files: {len(bfiles)} SDXL-shaped kohya LoRAs, {lo_mb}..{hi_mb} MiB ({total / 2**30:.2f} GiB), "
                  f"made in {time.perf_counter() - t0:.1f} s")
            report_rounds(import_rounds(bfiles, bdir, work, args.repeat, "big"), len(bfiles),
                          f"{len(bfiles)} SDXL-size files", 1.2)
            shutil.rmtree(bdir)

        # grow to --versions versions
        names = [v.name for v in report.added]
        per = max(1, args.versions // len(names))
        t0 = time.perf_counter()
        extra = 0
        if args.full:
            more_dir = work / "more"
            more_dir.mkdir()
            for k in range(1, per):
                batch = make_files(more_dir, len(names), args.rank, start=k * 100_000)
                for name, f in zip(names, batch):
                    reg.add(f, name)
                    f.unlink()
                    extra += 1
        else:
            for k in range(1, per):
                for i, name in enumerate(names):
                    reg.add(files[(i + k) % len(files)], name)  # bytes already stored: found, not re-parsed
                    extra += 1
        t_grow = time.perf_counter() - t0
        total = rdb.count_versions(reg.db)
        how = "distinct files, fully imported" if args.full else "files already stored under other names"
        print(f"grew to {total} versions: {extra} adds of {how} in {t_grow:.1f} s ({t_grow / max(1, extra) * 1000:.2f} ms each)")
        rng = random.Random(0)
        for n in names[::10]:
            reg.tag(f"{n}@{per}", "prod")
        shas = rdb.all_shas(reg.db)
        tagged = names[::10]
        checks = {
            "get(NAME)": lambda: reg.get(rng.choice(names)),
            "get(NAME@N)": lambda: reg.get(f"{rng.choice(names)}@{rng.randint(1, per)}"),
            "get(NAME:TAG)": lambda: reg.get(f"{rng.choice(tagged)}:prod"),
            "get(sha256 prefix)": lambda: reg.get(rng.choice(shas)[:12]),
            "versions(NAME)": lambda: reg.versions(rng.choice(names)),
            "search(name)": lambda: reg.search(rng.choice(names)),
            "search(word in all, limit 50)": lambda: reg.search("adapter"),
            "search(kind=lora, limit 50)": lambda: reg.search("", kind="lora"),
            "search(word + arch + kind)": lambda: reg.search(rng.choice(names), arch="tiny-sd1", kind="lora"),
        }
        print()
        print(f"lookups at {total} versions ({len(names)} adapters), {args.lookups} calls each, milliseconds:")
        worst = 0.0
        for label, fn in checks.items():
            fn()
            ts = timed(fn, args.lookups)
            worst = max(worst, pct(ts, 99))
            print(f"  {label:32s} p50 {statistics.median(ts):6.3f}   p99 {pct(ts, 99):6.3f}")
        print(f"  worst p99 {worst:.2f} ms = {worst / 5:.2f}x the 5 ms goal")
        t0 = time.perf_counter()
        v = reg.verify(quick=True)
        print(f"verify --quick: {time.perf_counter() - t0:.2f} s, ok={v['ok']}")
        reg.close()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
