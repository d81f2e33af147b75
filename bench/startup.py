"""Start-up time of the CLI, against ``python -c pass`` measured in the same run.

    python bench/startup.py [--runs 7] [--sdxl]

Goals (issue "work the way kohya, ComfyUI, A1111... users already work", item 9): ``loradex --help``
and ``loradex COMMAND --help`` under 0.3 s (shell completion pays it on every TAB), ``inspect`` of a
LoRA under 1 s. Each figure is the median wall time of ``--runs`` fresh processes, with the user+sys
CPU time next to it (what a loaded machine does not inflate), and the time over the bare interpreter.
``--sdxl`` adds ``inspect`` of a synthetic SDXL kohya LoRA (rank 32 on every attention Linear and
resnet conv of the UNet and both text encoders, fp16: ``bench/convert.py``'s input at rank 32, about
250 MB): the whole file is hashed and scanned for NaN/Inf, so its size shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str], runs: int) -> tuple[float, float]:
    """Median wall and CPU (user+sys of the child) seconds of ``runs`` fresh processes."""
    walls, cpus = [], []
    for _ in range(runs):
        before = os.times()
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - t0)
        after = os.times()
        cpus.append((after.children_user - before.children_user) + (after.children_system - before.children_system))
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sdxl", action="store_true", help="also inspect a ~230 MB SDXL LoRA (rank 32, fp16)")
    args = ap.parse_args()
    exe = [sys.executable, "-m", "loradex"]
    with tempfile.TemporaryDirectory() as d:
        lora = Path(d) / "lora.safetensors"
        subprocess.run([*exe, "demo", "--help"], check=True, stdout=subprocess.DEVNULL)
        # a LoRA to inspect: one rank-8 module per attention projection of the embedded tiny model
        subprocess.run([sys.executable, "-c", (
            "import torch, loradex\n"
            "from loradex.core.adapter import Adapter\n"
            "from loradex.core.kinds.lora import LoraPatch\n"
            "from loradex.tiny import tiny_arch\n"
            "a = tiny_arch('sd1')\n"
            "mods = [m for m in a.modules if m.startswith('unet.') and m.endswith(('to_q', 'to_k', 'to_v', 'to_out.0'))]\n"
            "p = {m: LoraPatch(up=torch.randn(a.module(m).shape[0], 8), down=torch.randn(8, a.module(m).shape[1]),"
            " alpha=4.0) for m in mods}\n"
            f"loradex.save(Adapter(p, arch=a.name), {str(lora)!r}, 'kohya')\n")], check=True)
        base_wall, base_cpu = _run([sys.executable, "-c", "pass"], args.runs)
        rows = [
            ("loradex --help", [*exe, "--help"], 0.3),
            ("loradex convert --help", [*exe, "convert", "--help"], 0.3),
            ("loradex train --help", [*exe, "train", "--help"], 0.3),
            ("loradex inspect LORA", [*exe, "inspect", str(lora)], 1.0),
        ]
        if args.sdxl:
            from convert import make_input  # bench/convert.py's synthetic SDXL LoRA

            big = Path(d) / "sdxl_r32.safetensors"
            make_input(str(big), 32)
            rows.append((f"loradex inspect SDXL LoRA ({big.stat().st_size / 1e6:.0f} MB)", [*exe, "inspect", str(big)], 1.0))
        print(f"python -c pass: {base_wall * 1000:.0f} ms wall, {base_cpu * 1000:.0f} ms CPU")
        for label, cmd, goal in rows:
            wall, cpu = _run(cmd, args.runs)
            ok = "met" if wall < goal else ("met in CPU time (loaded machine)" if cpu < goal else "NOT met")
            print(f"{label:26s} {wall:6.3f} s wall ({wall - base_wall:+.3f} s over python), {cpu:6.3f} s CPU;"
                  f" goal < {goal} s: {ok}")


if __name__ == "__main__":
    main()
