"""The GPU CI gate (``bench.ci_gate``, pytest-benchmark's own compare) fails on a median regression over 10%
and passes without one: shown on CPU with a deterministic fake timer, so the medians are exactly what we say."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]

FAKE_TIMER = """
import os
_now = [0.0]

def timer():
    # every call advances the clock by STEP: a round (one start, one end reading) lasts exactly STEP seconds
    _now[0] += float(os.environ["FAKE_STEP"])
    return _now[0]
"""

BENCHMARK = """
def test_kernel(benchmark):
    benchmark.pedantic(lambda: None, rounds=5, iterations=1)
"""


def _gate(tmp_path, step, *args):
    env = {**os.environ, "FAKE_STEP": str(step), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "bench.ci_gate", "--baseline", str(tmp_path / "baseline.json"), "--json",
           str(tmp_path / "run.json"), "--tests", str(tmp_path / "test_fake_benchmark.py"), "--marker", "", *args,
           "--", "--benchmark-timer=fake_timer.timer", "--benchmark-disable-gc", "--benchmark-warmup=off"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def baseline(tmp_path):
    (tmp_path / "fake_timer.py").write_text(textwrap.dedent(FAKE_TIMER))
    (tmp_path / "test_fake_benchmark.py").write_text(textwrap.dedent(BENCHMARK))
    proc = _gate(tmp_path, 0.010, "--refresh")  # the documented refresh command writes the baseline
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "baseline.json").read_text())
    assert saved["benchmarks"][0]["stats"]["median"] == pytest.approx(0.010)
    return tmp_path


def test_gate_fails_on_a_20_percent_median_regression(baseline):
    proc = _gate(baseline, 0.012)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "--benchmark-compare-fail=median:10%" in out and "FAILED against" in out
    assert "Performance has regressed" in out
    run = json.loads((baseline / "run.json").read_text())
    assert run["benchmarks"][0]["stats"]["median"] == pytest.approx(0.012)


def test_gate_passes_on_a_5_percent_slowdown_and_without_one(baseline):
    for step in (0.0105, 0.010, 0.008):
        proc = _gate(baseline, step)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "PASSED against" in proc.stdout


def test_gate_without_a_baseline_says_so_and_runs(tmp_path):
    (tmp_path / "fake_timer.py").write_text(textwrap.dedent(FAKE_TIMER))
    (tmp_path / "test_fake_benchmark.py").write_text(textwrap.dedent(BENCHMARK))
    proc = _gate(tmp_path, 0.010)
    assert proc.returncode == 0 and "no baseline at" in proc.stdout
    assert (tmp_path / "run.json").is_file()


def test_workflow_runs_the_gate_on_a_self_hosted_gpu_runner():
    text = (ROOT / ".github/workflows/gpu-ci.yml").read_text()
    assert "runs-on: [self-hosted, linux, gpu]" in text
    assert "python -m bench.ci_gate --json" in text and "--threshold 10" in text
    assert "bench.ci_gate --refresh" in text  # the documented refresh


def test_gpu_suite_parts_and_summary(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown part" in proc.stderr
    text = (ROOT / "bench/gpu_suite.sh").read_text()
    assert "quick)" in text and all(f"full{i})" in text for i in range(1, 6))
    from bench import suite_summary

    out = suite_summary.summary(tmp_path)  # a call whose steps all failed: said, never filled in
    assert "no reward JSON" in out and "no kernels JSON" in out and "no reno_cost JSON" in out
