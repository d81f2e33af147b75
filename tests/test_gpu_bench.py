"""bench/gpu.py, the GPU benchmark: its ``--cpu-smoke`` run (the same code paths with tiny UNets on
the CPU) gives every section with numbers, and one failing or slow section does not stop the rest."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCH))


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def timing(d: dict) -> bool:
    return number(d["p50"]) and number(d["p99"]) and 0 < d["p50"] <= d["p99"]


@pytest.mark.slow
def test_cpu_smoke_reports_every_section_with_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--cpu-smoke", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == res
    assert res["mode"] == "cpu-smoke" and res["errors"] == []
    assert set(res["sections"]) == {"sd15", "sdxl", "compile", "train"}
    assert all(s["status"] == "ok" for s in res["sections"].values())
    assert "[compile]" in proc.stderr and "eager backend" in proc.stderr  # the table, and what the CPU run skips
    for size in ("sd15", "sdxl"):
        s = res["sections"][size]
        assert s["params"] > 0 and s["slot_bytes"] > 0 and number(s["build_s"])
        for key in ("engine_cpu_tier", "engine_from_disk", "diffusers_load_set", "diffusers_hotswap"):
            assert timing(s["swap_ms"][key]), (size, key)
        assert all(number(v) and v > 0 for v in s["images_per_s"].values()) and len(s["images_per_s"]) == 3
        assert all(number(v) and v > 0 for v in s["ratios"].values())
        assert s["mixed_vs_alone_max_abs_diff"] < 1e-4  # float32 on the CPU: the rows agree
        p = s["patch_mode"]
        assert p["mode"] == "patch" and p["changed"] and p["restored_exact"] is True
        assert timing(p["apply_ms"]) and timing(p["restore_ms"]) and number(p["first_apply_ms"])
        assert s["memory"]["peak_bytes"] > 0
    c = res["sections"]["compile"]
    assert c["backend"] == "eager" and c["recompiles"] == 0 and c["new_graphs"] == 0
    assert c["swaps"] == res["settings"]["compile_swaps"]  # one adapter copied into a slot per call
    assert number(c["compile_s"]) and timing(c["swap_and_step_ms"]) and number(c["speedup"])
    t = res["sections"]["train"]
    for which in ("loradex", "reference"):
        assert number(t[which]["steps_per_s"]) and t[which]["steps_per_s"] > 0 and t[which]["peak"] > 0
    assert number(t["speed_ratio"]) and number(t["memory_ratio"])


def test_a_failing_section_reports_its_error_and_the_next_one_runs(gpu):
    run = gpu.Run(gpu.parse(["--cpu-smoke"]))
    results: dict = {}

    def broken(run, work, res):
        res["partial"] = 1.0
        raise RuntimeError("boom")

    def slow(run, work, res):
        time.sleep(5)

    def fine(run, work, res):
        res["value"] = 2.0

    gpu.run_section(run, "sd15", broken, 60, results)
    t = time.perf_counter()
    gpu.run_section(run, "sdxl", slow, 0.3, results)
    assert time.perf_counter() - t < 3
    gpu.run_section(run, "compile", fine, 60, results)
    assert results["sd15"]["status"] == "error" and "RuntimeError: boom" in results["sd15"]["error"]
    assert results["sd15"]["partial"] == 1.0  # what was measured before the failure is kept
    assert results["sdxl"]["status"] == "error" and "SectionTimeout" in results["sdxl"]["error"]
    assert results["compile"] == {"value": 2.0, "status": "ok", "seconds": results["compile"]["seconds"]}
    run.args.budget = 0
    gpu.run_section(run, "train", fine, 60, results)
    assert results["train"]["status"] == "skipped"


def test_cpu_smoke_settings_are_small_and_sections_checked(gpu):
    a = gpu.parse(["--cpu-smoke"])
    assert a.batch <= 4 and a.steps <= 2 and a.compile_swaps <= 10 and a.sections == list(gpu.SECTIONS)
    g = gpu.parse([])
    assert g.batch == 8 and g.compile_swaps == 100 and g.budget <= 540
    with pytest.raises(SystemExit):
        gpu.parse(["--sections", "sd15,nope"])
