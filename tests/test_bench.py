"""The benchmarks run (tiny sizes) and print what the README quotes: a GPU machine lent for a
few minutes must not be where a broken benchmark is found. Speed itself is never asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_bench_pipeline_splits_a_run_into_its_phases():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_pipeline import phases

    lines = [(2.0, "fcn demo: the whole pipeline"),
             (10.0, "Task run 'train-32s' - stage 32s: 4 steps on 2 worker(s) (CPU, gloo)"),
             (25.0, "(RayTrainWorker pid=1) [32s] step 1/4  loss 3.0"),
             (31.0, "(RayTrainWorker pid=1) [32s] step 4/4  loss 2.0"),
             (40.0, "Task run 'train-16s' - stage 16s: 2 steps on 2 worker(s) (CPU, gloo)"),
             (50.0, "(RayTrainWorker pid=2) [16s] step 1/2  loss 2.0"),
             (52.0, "(RayTrainWorker pid=2) [16s] step 2/2  loss 1.0"),
             (55.0, "Task run 'evaluate-32s' - evaluating CKPT on DATA"),
             (70.0, "FCN-32s       0.924     0.631    0.529    0.868"),
             (70.0, "FCN-16s       0.941     0.819    0.653    0.904")]
    got = phases(lines, total=75.0)
    assert got == {"total": 75.0, "start": 2.0, "ingest": 8.0,
                   "32s start": 15.0, "32s steps": 6.0, "32s end": 9.0,
                   "16s start": 10.0, "16s steps": 2.0, "16s end": 3.0,
                   "evaluate + register + Prefect": 20.0,
                   "32s mean IU": 0.529, "16s mean IU": 0.653}
    # Stages chained in one worker group: the chain's line starts the first, each later
    # stage's task line starts it.
    chained = [(t, text.replace("stage 32s: 4 steps", "stages 32s, 16s: 4 (32s) + 2 (16s) steps")
                .replace("stage 16s: 2 steps on 2 worker(s) (CPU, gloo)",
                         "stage 16s: in the same worker group, from CKPT"))
               for t, text in lines]
    assert phases(chained, total=75.0) == got


def test_bench_stage_start_times_both_starts_from_their_lines():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_stage_start import figures, marks

    lines = [(1.0, "Ray: a local Ray (2 CPUs, 1 node(s), job 01000000)"),
             (10.0, "FLOOR fit"),
             (15.5, "(RayTrainWorker pid=3) FLOOR loop"),
             (16.5, "(RayTrainWorker pid=3) FLOOR optimizer"),
             (20.0, "stage 32s: 2 (32s) steps on 2 worker(s) (CPU, gloo), from random init"),
             (27.0, "(RayTrainWorker pid=4) [32s] step 1/2  loss 3.0  lr 0.0003  9.0 img/s"),
             (27.5, "(RayTrainWorker pid=4) [32s] step 2/2  loss 2.0  lr 0.0003  9.0 img/s")]
    assert figures(marks(lines)) == {
        "floor: fit -> train function": 5.5, "floor: fit -> optimizer built": 6.5,
        "ours: fit -> first step": 7.0, "ours / floor (optimizer built)": 7.0 / 6.5}


@pytest.mark.slow  # starts Ray and an MLflow store
def test_bench_stage_start_runs_both_trainers():
    out = subprocess.run([sys.executable, "bench/bench_stage_start.py", "--runs", "1",
                          "--settle", "0", "--workers", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         check=True).stdout
    rows = {line[:34].strip(): float(line[34:]) for line in out.splitlines()[-4:]}
    assert sorted(rows) == ["floor: fit -> optimizer built", "floor: fit -> train function",
                            "ours / floor (optimizer built)", "ours: fit -> first step"], out
    assert all(v > 0 for v in rows.values()), rows


@pytest.mark.slow  # starts Ray and an MLflow store
def test_bench_predict_times_each_case_and_prints_the_ratio():
    out = subprocess.run([sys.executable, "bench/bench_predict.py", "--images", "3", "--size",
                          "32", "--runs", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    rows = {line[:30].strip(): float(line[30:].split()[0]) for line in out.splitlines()
            if line.startswith(("one image", "folder, "))}
    assert sorted(rows) == ["folder, Ray from the start", "folder, registry",
                            "one image, checkpoint", "one image, registry",
                            "one image, registry, no cache"], out
    assert all(v > 0 for v in rows.values()) and "from the start = " in out


def test_bench_shift_stitch_scores_every_row_of_a_demo_project(tmp_path):
    """A demo-like project (an ingested synthetic set, a run with 32s/16s/8s final
    checkpoints): each row is scored and the table printed; without a run it says how to
    make one."""
    import torch

    from fcn_core import fcn8s, fcn16s, fcn32s
    from pipelines.ingest import IngestConfig, ingest
    from pipelines.train.checkpoint import write_checkpoint

    ingest(IngestConfig(dataset="synthetic", root=tmp_path / "raw", out=tmp_path / "shards",
                        synthetic_size=(32, 32), synthetic_counts=(2, 3)), log=lambda m: None)
    cmd = [sys.executable, "bench/bench_shift_stitch.py", "--project", str(tmp_path),
           "--factors", "1,2", "--repeats", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "run `.venv/bin/fcn demo --project-dir" in r.stderr
    torch.manual_seed(0)
    for stage, build in (("32s", fcn32s), ("16s", fcn16s), ("8s", fcn8s)):
        write_checkpoint(str(tmp_path / "runs" / "demo-x" / stage / "final" / "checkpoint.pt"),
                         build(width=1 / 16), config={"dataset": "synthetic", "input": "rgb"})
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    rows = [ln.split()[0:2] for ln in out.splitlines() if ln.startswith("FCN-") and "x" in ln]
    assert [" ".join(r) for r in rows] == ["FCN-32s 32", "FCN-32s, shift-and-stitch",
                                           "FCN-16s 16", "FCN-8s 8"], out
    assert "demo-x on " in out and "(3 images)" in out


def test_cpu_of_tests_gives_each_test_the_cpu_of_the_processes_it_started(tmp_path):
    """bench/cpu_of_tests.py runs pytest and charges a test with its own and its children's
    CPU: here one test burns 3 s of CPU in a subprocess, another only sleeps; in one
    session and in two (xdist, whose controller also sees every test start)."""
    (tmp_path / "test_burn.py").write_text(
        "import subprocess, sys, time\n\n"
        "def test_burns():\n"
        "    subprocess.run([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
        "while time.process_time() - t < 3: pass'], check=True)\n\n"
        "def test_sleeps():\n"
        "    time.sleep(1.5)\n")
    for sessions in ("0", "2"):
        out = subprocess.run([sys.executable, "bench/cpu_of_tests.py", "--top", "5", "--",
                              str(tmp_path / "test_burn.py"), "-n", sessions, "-p",
                              "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        rows = {ln.split()[2].split("::")[-1]: (float(ln.split()[0]), float(ln.split()[1]))
                for ln in out.splitlines() if "test_burn.py::" in ln}
        # its subprocess's CPU counted for it (a loaded machine's late sample can give the
        # next test the last half second); the sleep's wall time is not CPU
        assert rows["test_burns"][0] >= 2.4, out
        assert rows.get("test_sleeps", (0.0, 0.0))[0] < 1.0, out
        assert "\nCPU " in out and "kind of process" in out, out
        sessions_line = next(ln for ln in out.splitlines() if ln.startswith("CPU "))
        assert len(sessions_line.split(": ")[1].split(", ")) == max(1, int(sessions)), \
            sessions_line


def test_cpu_of_tests_report_splits_samples_between_sessions_and_tests():
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_of_tests import kind, report

    clock = ['["start", "t.py::a", 10.0, 1]', '["end", "t.py::a", 20.0, 1]',
             '["start", "t.py::b", 20.0, 1]', '["end", "t.py::b", 30.0, 1]',
             '["start", "t.py::c", 10.0, 2]', '["end", "t.py::c", 15.0, 2]']
    samples = [(12.0, 1, "ray::TrainController", 4.0), (25.0, 1, "fcn", 2.0),
               (14.0, 2, "python", 1.0), (40.0, 2, "python", 0.5), (12.0, None, "weed", 3.0)]
    out = report(samples, clock, top=10)
    lines = out.splitlines()
    assert lines[0] == "CPU 10 s in all; sessions (CPU s / wall s of their tests): 6/20, 2/5"
    assert "    4.0    10.0  t.py::a" in out and "    2.0    10.0  t.py::b" in out
    assert "    1.0     5.0  t.py::c" in out
    assert "    0.5     0.0  (between tests: collection, fixtures)" in out
    assert "    3.0     0.0  (not under a pytest session)" in out
    assert kind("ray::RayTrainWorker.get_metadata") == "ray::RayTrainWorker"
    assert kind("/v/bin/python /v/bin/mlflow server --host 127.0.0.1") == "mlflow"
