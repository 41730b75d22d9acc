"""bench.corpus on CPU: a labelled smoke run whose JSON records the command that made it."""

import json

import pytest
import torch

from bench import corpus as bench_corpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_cpu_smoke_run_says_so_and_records_the_command(tmp_path, capsys):
    out = tmp_path / "corpus.json"
    argv = ["--workers", "1", "--shards", "2", "--per-shard", "3", "--batch-size", "2", "--no-ray", "--json", str(out)]
    assert bench_corpus.main(argv) == 0
    printed = capsys.readouterr().out
    assert "CPU SMOKE RUN" in printed and "NOT throughput results" in printed and "Ray: skipped" in printed
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m bench.corpus --workers 1") and report["smoke_test"]
    (row,) = report["rows"]
    assert row["rows"] == 6 and row["read_decode_s"] > 0 and row["model_s"] > 0
