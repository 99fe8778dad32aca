"""The benchmarks run (tiny sizes) and print what the README quotes: a GPU machine lent for a
few minutes must not be where a broken benchmark is found. Speed itself is never asserted."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_runs_and_prints_its_table():
    out = subprocess.run(
        [sys.executable, "bench/bench_model.py", "--width", "0.0625", "--size", "32",
         "--iters", "1", "--modes", "fp32,bf16-cl", "--no-reference"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "torch flop_counter" in out and "'3 x forward' would say" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("fcn8s ")]
    assert [r[1] for r in rows] == ["fp32", "bf16-cl"]
    assert all(float(r[3]) > 0 and float(r[6]) > 0 for r in rows), rows


def test_gpu_check_compares_two_devices_and_passes_on_equal_ones():
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "mean IU difference 0.00e+00" in out and out.strip().endswith("PASS"), out
