"""The GPU CI gate (``bench.ci_gate``, pytest-benchmark's own compare) fails on a median regression over 10%
and passes without one: shown on CPU with a deterministic fake timer, so the medians are exactly what we say."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

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


class Gate(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _gate_argv(folder, *args):
    return ["--baseline", str(folder / "baseline.json"), "--json", str(folder / "run.json"), "--tests",
            str(folder / "test_fake_benchmark.py"), "--marker", "", *args,
            "--", "--benchmark-timer=fake_timer.timer", "--benchmark-disable-gc", "--benchmark-warmup=off"]


def _gate_env(folder, step):
    """The inner pytest's environment: the fake timer importable, and none of this session's pytest-xdist or
    interpreter variables (pytest-benchmark switches itself off in what looks like an xdist worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "TRITON_INTERPRET"}
    return {**env, "FAKE_STEP": str(step), "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


@pytest.fixture
def gate(monkeypatch, capfd):
    """``gate(folder, step, *args)``: ``bench.ci_gate.main`` run in this process (its pytest run is a child, as
    always), with its exit status and what it and the child printed. One real command line is
    ``test_the_command_line_prints_one_line_without_a_traceback``."""
    from bench import ci_gate

    def run(folder, step, *args):
        capfd.readouterr()
        with monkeypatch.context() as m:
            for key in list(os.environ):
                m.delenv(key)
            for key, value in _gate_env(folder, step).items():
                m.setenv(key, value)
            try:
                rc = ci_gate.main(_gate_argv(folder, *args))
            except SystemExit as e:
                rc = e.code
        out, err = capfd.readouterr()
        return Gate(rc, out, err)

    return run


@pytest.fixture
def baseline(tmp_path, gate):
    (tmp_path / "fake_timer.py").write_text(textwrap.dedent(FAKE_TIMER))
    (tmp_path / "test_fake_benchmark.py").write_text(textwrap.dedent(BENCHMARK))
    proc = gate(tmp_path, 0.010, "--refresh")  # the documented refresh command writes the baseline
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "baseline.json").read_text())
    assert saved["benchmarks"][0]["stats"]["median"] == pytest.approx(0.010)
    return tmp_path


def test_gate_fails_on_a_20_percent_median_regression(baseline, gate):
    proc = gate(baseline, 0.012)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "--benchmark-compare-fail=median:10%" in out and "FAILED against" in out
    assert "Performance has regressed" in out
    run = json.loads((baseline / "run.json").read_text())
    assert run["benchmarks"][0]["stats"]["median"] == pytest.approx(0.012)


def test_gate_passes_on_a_5_percent_slowdown_and_without_one(baseline, gate):
    for step in (0.0105, 0.010, 0.008):
        proc = gate(baseline, step)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "PASSED against" in proc.stdout


def _fake_suite(tmp_path, test_code=BENCHMARK):
    (tmp_path / "fake_timer.py").write_text(textwrap.dedent(FAKE_TIMER))
    (tmp_path / "test_fake_benchmark.py").write_text(textwrap.dedent(test_code))


def test_gate_without_a_baseline_compared_nothing_and_fails(tmp_path, gate):
    _fake_suite(tmp_path)
    proc = gate(tmp_path, 0.010)
    assert proc.returncode == 1 and "FAILED: no baseline at" in proc.stdout and "nothing was compared" in proc.stdout
    assert (tmp_path / "run.json").is_file()  # the run's timings are kept for the refresh


def test_gate_fails_when_every_test_is_skipped(baseline, gate):
    """No CUDA device: every GPU test skips, pytest exits 0, and the gate must not pass."""
    (baseline / "test_fake_benchmark.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.skip(reason="needs a CUDA GPU")
        def test_kernel(benchmark):
            benchmark(lambda: None)
    """))
    proc = gate(baseline, 0.010)
    assert proc.returncode == 1 and "FAILED: no test ran (1 skipped)" in proc.stdout, proc.stdout + proc.stderr


def test_gate_fails_when_tests_ran_but_no_benchmark(baseline, gate):
    (baseline / "test_fake_benchmark.py").write_text("def test_correct():\n    assert True\n")
    proc = gate(baseline, 0.010)
    assert proc.returncode == 1 and "but no benchmark did" in proc.stdout, proc.stdout + proc.stderr


def test_gate_fails_when_no_benchmark_is_in_the_baseline(baseline, gate):
    (baseline / "test_fake_benchmark.py").write_text(textwrap.dedent(BENCHMARK).replace("test_kernel", "test_other"))
    proc = gate(baseline, 0.010)
    assert proc.returncode == 1 and "none of this run's 1 benchmarks is in the baseline" in proc.stdout


@pytest.mark.parametrize("content, why", [
    (bytes(range(256)) * 4, "not JSON"),
    (b"[]", "no benchmarks in it"),
    (b'{"benchmarks": []}', "no benchmarks in it"),
    (b'{"benchmarks": [{"fullname": "t.py::test_kernel", "stats": {"median": "fast"}}]}', "no positive finite median"),
    (b'{"benchmarks": [{"fullname": "t.py::test_kernel", "stats": {"median": 0}}]}', "no positive finite median"),
    (b'{"benchmarks": [{"stats": {"median": 1.0}}]}', "has no fullname"),
])
def test_bad_baseline_is_one_line_and_exit_2_before_running(tmp_path, content, why, gate):
    _fake_suite(tmp_path, "raise SystemExit('the tests ran')\n")
    (tmp_path / "baseline.json").write_bytes(content)
    proc = gate(tmp_path, 0.010)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and f"baseline {tmp_path / 'baseline.json'}: " in proc.stderr and why in proc.stderr
    assert "--refresh" in proc.stderr


def test_the_command_line_prints_one_line_without_a_traceback(tmp_path):
    """The other tests call ``main`` in this process; this one runs the real command line once."""
    _fake_suite(tmp_path, "raise SystemExit('the tests ran')\n")
    (tmp_path / "baseline.json").write_bytes(b"[]")
    proc = subprocess.run([sys.executable, "-m", "bench.ci_gate", *_gate_argv(tmp_path)], cwd=ROOT,
                          env=_gate_env(tmp_path, 0.010), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no benchmarks in it" in proc.stderr


def test_refresh_that_measured_nothing_keeps_the_old_baseline(baseline, gate):
    before = (baseline / "baseline.json").read_bytes()
    (baseline / "test_fake_benchmark.py").write_text("def test_correct():\n    assert True\n")
    proc = gate(baseline, 0.020, "--refresh")
    assert proc.returncode == 1 and "no benchmark did" in proc.stdout
    assert (baseline / "baseline.json").read_bytes() == before


def test_gate_runs_every_gpu_marked_test_file(monkeypatch, tmp_path):
    """By default the gate runs `pytest -m gpu` over all of tests/, so the gpu-marked tests outside tests/gpu run."""
    from bench import ci_gate

    calls = []
    monkeypatch.setattr(ci_gate.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert ci_gate.main(["--baseline", str(tmp_path / "none.json"), "--json", str(tmp_path / "run.json")]) == 1
    cmd = calls[0]
    assert cmd[cmd.index("no:cacheprovider") + 1] == "tests" and cmd[-2:] == ["-m", "gpu"]
    for name in ("runtime", "model", "latent_grids", "reno", "bench_reno_cost"):
        assert "pytest.mark.gpu" in (ROOT / f"tests/test_{name}.py").read_text(), name


def test_workflow_runs_the_gate_on_a_self_hosted_gpu_runner():
    text = (ROOT / ".github/workflows/gpu-ci.yml").read_text()
    assert "runs-on: [self-hosted, linux, gpu]" in text
    assert "python -m bench.ci_gate --json" in text and "--threshold 10" in text
    assert "bench.ci_gate --refresh" in text  # the documented refresh


def test_gpu_suite_parts_and_summary(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "nope", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown part" in proc.stderr
    text = (ROOT / "bench/gpu_suite.sh").read_text()
    assert "quick)" in text and all(f"full{i})" in text for i in range(1, 6))
    from bench import suite_summary

    out = suite_summary.summary(tmp_path)  # a call whose steps all failed: said, never filled in
    assert "no reward JSON" in out and "no kernels JSON" in out and "no reno_cost JSON" in out


def _no_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0


@pytest.mark.skipif(not _no_gpu(), reason="a GPU is visible: the suite would run")
def test_gpu_suite_without_cuda_says_so_in_one_line_and_fails(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "quick", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no CUDA device" in proc.stderr and "nothing was run" in proc.stderr
    assert list(out.iterdir()) == []


def test_gpu_suite_needs_an_output_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "quick"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no output folder given" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "quick", str(blocker / "out")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is not writable" in proc.stderr


def test_gpu_suite_speaks_of_itself_only():
    """Its header describes the offline route in neutral terms (which wheels, installed without an index), and it
    writes only into the output folder it is given: one archive and one summary per part."""
    text = (ROOT / "bench/gpu_suite.sh").read_text()
    for foreign in ("../shared", "run(", "carry=", "/tmp/", "device tool"):
        assert foreign not in text, foreign
    assert "pip download" in text and "--no-index" in text and ".whl" in text
    assert 'results-$PART.tgz' in text and 'summary-$PART.txt' in text
    assert "mktemp -d" in text  # staging outside $OUT: at most two files come back, none nested


def test_precompile_lists_its_jobs_and_reports_a_failed_one():
    from bench import precompile

    proc = subprocess.run([sys.executable, "-m", "bench.precompile", "--list", "--batch", "8", "--lengths", "65", "257",
                           "77"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cases = precompile.cases([8], [65, 257, 77], "bf16")
    assert proc.stdout.strip().splitlines()[-1] == f"{len(cases) * precompile.CONFIGS_PER_CASE} jobs"
    assert ("attention", (1, 77, 8, True), "bf16") in cases and ("patch_embed", (1, 8, "fp32"), "bf16") in cases
    assert len(cases) == len(set(cases)) == 6  # the reward's attention at sequence 65 is bench.kernels' own
    case, index, _, error = precompile.run_case(("attention", (1, 65, 12, False), "bf16"), 3)
    if not __import__("torch").cuda.is_available():
        assert error and index == 3  # no CUDA here: reported, not raised
