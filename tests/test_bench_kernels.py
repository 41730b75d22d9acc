"""``python -m bench.kernels`` on a machine without CUDA: its interpreter smoke check runs and checks values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command times the kernels instead")
def test_bench_kernels_runs_its_interpreter_check_without_cuda():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.kernels"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines == ["bench.kernels: no CUDA device, nothing to time (run it on a GPU machine).",
                     "interpreter smoke check passed: attention (causal and not) and patch_embed match PyTorch, fwd and bwd"]


def test_bench_kernels_smoke_check_fails_on_a_wrong_kernel(monkeypatch):
    """The smoke check compares values: a kernel off by a scale is an AssertionError, not a pass."""
    from bench import kernels as bench_kernels

    monkeypatch.setattr(bench_kernels, "attention_packed", lambda qkv, heads, causal: 1.01 * bench_kernels.attention_torch(
        *bench_kernels.split_heads(qkv, heads), causal=causal).flatten(2))
    with pytest.raises(AssertionError, match="attention"):
        bench_kernels.smoke_check()


def test_each_case_is_written_as_it_is_measured(tmp_path):
    """A run killed during its second case keeps the first case's rows on disk, marked incomplete."""
    import json

    from bench import kernels as bench_kernels

    def first(batch, size, dtype):
        return [{"kernel": "attention", "impl": "triton", "batch": batch, "L": size, "pass": "fwd", "ms": 0.5}]

    def killed(batch, size, dtype):
        raise KeyboardInterrupt  # what the step's timeout does

    out = tmp_path / "kernels.json"
    report = {"device": "test", "complete": False, "rows": []}
    with pytest.raises(KeyboardInterrupt):
        bench_kernels.run_cases([(first, 8, 65), (killed, 8, 257)], torch.bfloat16, None, report, out)
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and saved["note"] == "1 of 2 cases measured"
    assert [(r["L"], r["ms"], r["pct_peak"]) for r in saved["rows"]] == [(65, 0.5, "unknown")]
