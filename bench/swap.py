"""Benchmark: adapter swap latency of the inference engine vs diffusers, on the tiny pipeline.

Same tiny SD pipeline (loradex.tiny) and the same adapter files for every method: diffusers-format
LoRA files (rank 4 on the UNet's attention to_q/to_k/to_v/to_out.0, random factors, written by
loradex's diffusers writer).

* engine (hit): make a CPU-cached adapter active: ``Engine.activate`` = resolve + cache lookup + copy
  into a slot (slots are emptied between iterations, untimed, so every iteration copies).
* engine (miss): the same with an empty CPU tier (parse the file, convert, copy).
* diffusers load + set: ``pipe.load_lora_weights(file, adapter_name=...)`` + ``pipe.set_adapters``
  (the adapter is deleted after, untimed, so one adapter stays loaded).
* diffusers hotswap: ``pipe.enable_lora_hotswap(target_rank=4)`` before the first load, then
  ``load_lora_weights(file, adapter_name="hot", hotswap=True)`` (diffusers' fastest swap; UNet only).
* scaling: engine swap with 1, 10, 100, 1000 adapters in the CPU tier, vs diffusers ``set_adapters``
  (switching between already loaded adapters) with 1, 10, 50 adapters loaded, and the time
  diffusers takes to load the N-th adapter.

Printed: p50 / p99 per method and the ratios (goals: >= 50x faster than load + set_adapters, no slower
than hotswap, flat from 1 to 1,000 cached adapters).

    python bench/swap.py [--repeat 30] [--cached 1,10,100,1000] [--loaded 1,10,50] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
RANK = 4


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def summary(xs: list[float]) -> dict:
    return {"p50_ms": pct(xs, 50) * 1e3, "p99_ms": pct(xs, 99) * 1e3, "n": len(xs)}


def make_files(out: Path, n: int, arch) -> list[str]:
    import loradex
    from loradex.core.adapter import Adapter
    from loradex.core.kinds.lora import LoraPatch

    mods = {name: info for name, info in arch.modules.items()
            if name.startswith("unet.") and name.endswith(TARGETS) and info.type == "linear"}
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        patches = {name: LoraPatch(up=torch.randn(info.shape[0], RANK, generator=g) * 0.05,
                                   down=torch.randn(RANK, info.shape[1], generator=g) * 0.05, alpha=float(RANK))
                   for name, info in mods.items()}
        p = out / f"a{i:04d}.safetensors"
        loradex.save(Adapter(patches=patches, arch=arch.name), p, "diffusers", arch=arch)
        paths.append(str(p))
    return paths


def time_engine(engine, refs: list[str], repeat: int) -> list[float]:
    times = []
    for i in range(repeat):
        for s in range(engine.slots):  # untimed: every timed activation must copy into a slot
            engine.bank.clear_slot(s)
        ref = refs[i % len(refs)]
        t0 = time.perf_counter()
        with engine.activate([[(ref, 1.0)]]):
            t1 = time.perf_counter()
        times.append(t1 - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--cached", default="1,10,100,1000", help="CPU-tier sizes for the engine scaling run")
    ap.add_argument("--loaded", default="1,10,50", help="loaded-adapter counts for diffusers set_adapters")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cached = [int(x) for x in args.cached.split(",")]
    loaded = [int(x) for x in args.loaded.split(",")]

    from loradex.inference.engine import Engine
    from loradex.tiny import quiet, tiny_arch, tiny_sd_pipeline

    torch.set_grad_enabled(False)
    arch = tiny_arch("sd1")
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        files = make_files(Path(d), max(cached + loaded + [args.repeat]), arch)
        pool = files[: max(args.repeat, 8)]

        # ---- engine: CPU-tier hits and misses ----
        eng = Engine(tiny_sd_pipeline(), max_rank=16, slots=4)
        eng.prefetch(pool)
        res["engine_hit"] = summary(time_engine(eng, pool, args.repeat))
        st = eng.stats()
        res["engine_slot_copy"] = {"p50_ms": st["swap_latency_p50_s"] * 1e3, "p99_ms": st["swap_latency_p99_s"] * 1e3}
        cold = Engine(tiny_sd_pipeline(), max_rank=16, slots=4, cache_bytes=0)
        res["engine_miss"] = summary(time_engine(cold, pool, args.repeat))

        # ---- diffusers: load_lora_weights + set_adapters ----
        pipe = tiny_sd_pipeline()
        times = []
        with quiet():
            for i in range(args.repeat):
                name = f"adapter_{i}"
                t0 = time.perf_counter()
                pipe.load_lora_weights(pool[i % len(pool)], adapter_name=name)
                pipe.set_adapters([name], [1.0])
                times.append(time.perf_counter() - t0)
                pipe.delete_adapters(name)
        res["diffusers_load_set"] = summary(times)

        # ---- diffusers: hotswap ----
        pipe = tiny_sd_pipeline()
        times = []
        with quiet():
            pipe.enable_lora_hotswap(target_rank=RANK)
            pipe.load_lora_weights(pool[0], adapter_name="hot")
            for i in range(args.repeat):
                t0 = time.perf_counter()
                pipe.load_lora_weights(pool[(i + 1) % len(pool)], adapter_name="hot", hotswap=True)
                times.append(time.perf_counter() - t0)
        res["diffusers_hotswap"] = summary(times)

        # ---- scaling with the number of resident adapters ----
        res["engine_by_cached"] = {}
        for n in cached:
            e = Engine(tiny_sd_pipeline(), max_rank=16, slots=4)
            e.prefetch(files[:n])
            res["engine_by_cached"][n] = summary(time_engine(e, files[:n], args.repeat))
        res["diffusers_set_by_loaded"] = {}
        res["diffusers_nth_load_ms"] = {}
        pipe = tiny_sd_pipeline()
        have = 0
        with quiet():
            for n in loaded:
                while have < n:
                    t0 = time.perf_counter()
                    pipe.load_lora_weights(files[have], adapter_name=f"adapter_{have}")
                    last = time.perf_counter() - t0
                    have += 1
                res["diffusers_nth_load_ms"][n] = last * 1e3
                times = []
                for i in range(args.repeat):
                    t0 = time.perf_counter()
                    pipe.set_adapters([f"adapter_{i % n}"], [1.0])
                    times.append(time.perf_counter() - t0)
                res["diffusers_set_by_loaded"][n] = summary(times)

    hit = res["engine_hit"]["p50_ms"]
    res["ratios"] = {
        "load_set_over_engine": res["diffusers_load_set"]["p50_ms"] / hit,
        "hotswap_over_engine": res["diffusers_hotswap"]["p50_ms"] / hit,
        "engine_flatness": res["engine_by_cached"][cached[-1]]["p50_ms"] / res["engine_by_cached"][cached[0]]["p50_ms"],
        "diffusers_set_growth": res["diffusers_set_by_loaded"][loaded[-1]]["p50_ms"]
        / res["diffusers_set_by_loaded"][loaded[0]]["p50_ms"],
        "diffusers_load_growth": res["diffusers_nth_load_ms"][loaded[-1]] / res["diffusers_nth_load_ms"][loaded[0]],
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return

    def row(label: str, s: dict) -> str:
        return f"  {label:<44} p50 {s['p50_ms']:8.3f} ms   p99 {s['p99_ms']:8.3f} ms"

    r = res["ratios"]
    print(f"swap latency, tiny SD pipeline, {len(pool)} LoRA files (rank {RANK}, UNet attention), "
          f"{args.repeat} swaps each, {torch.get_num_threads()} CPU threads")
    print(row("engine: swap from the CPU tier (activate)", res["engine_hit"]))
    print(row("  of which the slot copy", res["engine_slot_copy"]))
    print(row("engine: swap from disk (cache cold)", res["engine_miss"]))
    print(row("diffusers: load_lora_weights + set_adapters", res["diffusers_load_set"]))
    print(row("diffusers: load_lora_weights(hotswap=True)", res["diffusers_hotswap"]))
    print(f"engine swap: {r['load_set_over_engine']:.0f}x faster than load_lora_weights + set_adapters (goal >= 50x)")
    print(f"engine swap: {r['hotswap_over_engine']:.1f}x faster than diffusers hotswap (goal >= 1x)")
    print("scaling:")
    for n, s in res["engine_by_cached"].items():
        print(row(f"engine, {n} adapters in the CPU tier", s))
    for n, s in res["diffusers_set_by_loaded"].items():
        print(row(f"diffusers set_adapters, {n} loaded", s) + f"   (loading adapter #{n}: {res['diffusers_nth_load_ms'][n]:.1f} ms)")
    print(f"engine at {cached[-1]} / at {cached[0]} cached: {r['engine_flatness']:.2f}x (flat = 1); "
          f"diffusers set_adapters at {loaded[-1]} / at {loaded[0]} loaded: {r['diffusers_set_growth']:.2f}x, "
          f"loading adapter #{loaded[-1]} / #{loaded[0]}: {r['diffusers_load_growth']:.2f}x")


if __name__ == "__main__":
    main()
