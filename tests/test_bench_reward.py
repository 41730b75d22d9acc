"""bench.reward: the CPU smoke run and the derived columns (ratios, % weight floor, % bf16 peak)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import reward as bench
from fastlclip import runtime
from bench.profiles import load_profiles
from test_bench_cli import _one_line_error

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path runs only without CUDA")
def test_cpu_smoke_run(capsys):
    assert bench.main(["--fidelity-steps", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No CUDA device: nothing is timed on a GPU")
    assert "No JSON written" in out and "Random weights" in out and "CHECK FAILED" not in out
    assert "Tiny-decoder fidelity (tiny models, CPU;" in out and "must be repeated" in out
    table = out[out.index("model "):]  # the table comes last
    for system in ("reference eager", "fastlclip eager", "SDXL VAE decode + CLIP ViT-B-32",
                   "TAESD-XL decode + CLIP ViT-B-32"):
        assert system in table
    assert table.count(" ok") == 8  # 4 systems x (reward b1, forward b4)


def test_ratios_floor_and_peak():
    h100 = load_profiles()["h100"]
    common = dict(weight_bytes=170_000_000, forward_flops_per_image=11_000_000_000)
    rows = [
        bench.Row("B/8", bench.REFERENCE, "reward", 1, ms=2.0, **common),
        bench.Row("B/8", "fastlclip graph", "reward", 1, ms=0.5, **common),
        bench.Row("B/8", bench.REFERENCE, "forward", 256, ms=10.0, **common),
        bench.Row("B/8", "fastlclip graph", "forward", 256, ms=5.0, **common),
        bench.Row("B/8", "fastlclip compile", "forward", 256, status="OOM", **common),
        bench.Row("decode-then-CLIP", "SDXL VAE decode + CLIP ViT-B-32", "reward", 1, ms=40.0, weight_bytes=1),
    ]
    bench.add_ratios(rows, h100)
    assert rows[1].speedup_vs_reference == pytest.approx(4.0) and rows[1].relative_to == "B/8 reference eager"
    floor_ms = 2 * 170e6 / 3.35e12 * 1e3
    assert rows[1].pct_weight_floor == pytest.approx(100 * floor_ms / 0.5)
    assert rows[3].pct_bf16_peak == pytest.approx(100 * 11e9 * 256 / 5e-3 / 989e12)
    assert rows[3].pct_weight_floor is None and rows[1].pct_bf16_peak is None
    assert rows[4].speedup_vs_reference is None and rows[4].pct_bf16_peak is None
    assert rows[5].speedup_vs_reference == pytest.approx(2.0 / 40.0)  # against the first model's reference
    bench.add_ratios(rows, None)  # no profile: no floors, ratios still
    assert rows[1].speedup_vs_reference == pytest.approx(4.0)


def test_compile_mode_winner():
    rows = [bench.Row("B/8", f"fastlclip compile mode={m}", "reward", 1, ms=ms)
            for m, ms in (("default", 1.0), ("max-autotune-no-cudagraphs", None))]
    rows += [bench.Row("B/8", "fastlclip compile", "reward", 1, ms=0.2),
             bench.Row("B/8", "fastlclip compile", "reward", 4, ms=0.1)]
    assert bench.compile_mode_winner(rows) == {"B/8": {"mode": runtime.DEFAULT_COMPILE_MODE, "ms": 0.2}}
    rows[0].ms = 0.15
    assert bench.compile_mode_winner(rows) == {"B/8": {"mode": "default", "ms": 0.15}}


def test_write_report(tmp_path):
    import json

    from bench.profiles import select

    selection = select("auto", "NVIDIA H100 80GB HBM3", load_profiles())
    rows = [bench.Row("B/8", bench.REFERENCE, "reward", 1, ms=2.0, weight_bytes=1)]
    checks = {("B/8", "fastlclip graph"): {"loss_abs_diff": 0.01, "cos_grad": 0.9999, "ok": True}}
    out = bench.write_report(rows, checks, ["--quick"], "NVIDIA H100 80GB HBM3", selection, tmp_path / "r.json")
    report = json.loads(out.read_text())
    assert report["profile"]["name"] == "h100" and report["command"].endswith("-m bench.reward --quick")
    assert report["weights"].startswith("Random weights") and report["rows"][0]["ms"] == 2.0
    assert report["checks"] == [{"model": "B/8", "system": "fastlclip graph", "loss_abs_diff": 0.01, "cos_grad": 0.9999,
                                 "ok": True}]
    assert report["definitions"].startswith("Tasks:")


# -- --full-size: the real sizes on the CPU (tested here on tiny stand-ins; the real sizes run from the command line)
@pytest.mark.parametrize("argv, needles", [
    (["--full-size", "--backends", "graph"], ["--backends", "CUDA run"]),
    (["--full-size", "--reward-batches", "4"], ["--reward-batches"]),
    (["--full-size", "--forward-batches", "64", "--quick"], ["--forward-batches", "--quick"]),
    (["--full-size", "--compile-modes", "default"], ["--compile-modes"]),
    (["--full-size", "--gpu", "h100"], ["--gpu"]),
    (["--full-size", "--fidelity-steps", "10"], ["--fidelity-steps"]),
    (["--full-size", "--baselines", "reference-compile"], ["reference-compile", "CUDA baseline"]),
    (["--full-size", "--models", "Latent-ViT-B-4-512"], ["Latent-ViT-B-4-512", "not timed here"]),
    (["--full-size", "--repeats", "0"], ["--repeats"]),
    (["--full-size", "--warmup", "-1"], ["--warmup"]),
    (["--full-size", "--threads", "0"], ["--threads"]),
    (["--repeats", "2"], ["--repeats", "only with --full-size"]),
    (["--warmup", "1", "--threads", "2"], ["--warmup", "--threads", "only with --full-size"]),
])
def test_full_size_bad_combinations_are_one_line_errors_before_any_work(capsys, monkeypatch, argv, needles):
    def fail(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(bench, "full_size_run", fail)
    monkeypatch.setattr(bench, "_run", fail)
    _one_line_error(capsys, bench.main, argv, *needles)


def test_full_size_out_that_is_a_folder_is_refused(capsys, tmp_path):
    _one_line_error(capsys, bench.main, ["--full-size", "--out", str(tmp_path)], "--out", "is a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="--full-size is refused with CUDA")
def test_full_size_defaults_and_the_cuda_run_defaults_unchanged():
    args = bench.parse_args(["--full-size"])
    assert args.models == ["Latent-ViT-B-8-512"] and args.baselines == ["ViT-B-32", "taesd-ViT-B-32"]
    assert (args.warmup, args.repeats, args.threads) == (1, 3, torch.get_num_threads())
    assert args.out == bench.PROFILES_DIR / "results" / "cpu" / "reward.json"
    assert args.backends is None and args.reward_batches is None  # nothing of the CUDA run
    args = bench.parse_args([])
    assert args.models == list(bench.MODELS) and args.backends == list(bench.BACKENDS)
    assert args.baselines == list(bench.BASELINES) and args.reward_batches == [1, 4, 16]
    assert args.forward_batches == [64, 256] and args.gpu == "auto" and args.quick is False
    assert args.fidelity_steps == 300 and args.compile_modes == list(runtime.COMPILE_MODES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--full-size is refused with CUDA")
def test_full_size_report_on_tiny_stand_ins(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setattr(bench, "STAND_INS", True)
    monkeypatch.setattr(bench, "FRESH_PROCESS", False)  # one fresh process is tested below; three would be slow
    threads = torch.get_num_threads()
    argv = ["--full-size", "--warmup", "0", "--repeats", "2", "--threads", "1", "--out", str(tmp_path / "r.json")]
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads  # the in-process run gives the threads back
    out = capsys.readouterr().out
    assert "TINY STAND-INS" in out and "Wrote" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True and report["mode"] == "cpu-full-size (tiny stand-ins)"
    assert report["command"] == "python -m bench.reward " + " ".join(argv) and report["date"]
    device = report["device"]
    assert device["name"] == f"CPU ({device['cpu_model']}, {device['cores_usable']} cores)"
    assert device["torch_threads"] == 1 and report["settings"]["torch_threads"] == 1
    assert report["settings"]["warmup_steps"] == 0 and report["settings"]["timed_steps"] == 2
    assert report["dtype"] == "float32" and report["definitions"].startswith("``--full-size``")
    rows = report["rows"]
    assert [r["system"] for r in rows] == ["Latent-ViT-B/8", "SDXL VAE decode + CLIP ViT-B/32",
                                           "TAESD-XL decode + CLIP ViT-B/32"]
    assert [r["decoder"] for r in rows] == [None, "vae", "taesd"]
    for r in rows:
        assert r["status"] == "ok" and r["torch_threads"] == 1
        assert len(r["ms_each"]) == 2 and r["warmup_ms_each"] == [] and r["ms"] > 0
        assert r["latents"] == [1, 4, 8, 8] and r["relative_to"] == "Latent-ViT-B/8"
        assert r["time_vs_latent"] == pytest.approx(r["ms"] / rows[0]["ms"])
        assert r["peak_rss_gib"] > 0 and r["memory_method"]
        assert r["load_average_1_5_15_min_at_end"] is None or len(r["load_average_1_5_15_min_at_end"]) == 3
    assert rows[0]["time_vs_latent"] == 1.0
    table = out[out.index("system "):]
    assert all(r["system"] in table for r in rows)


def test_full_size_ratios_skip_failed_rows():
    rows = [{"system": "SDXL VAE decode + CLIP ViT-B/32", "kind": "pixel", "ms": 30.0, "peak_rss_gib": 8.0},
            {"system": "Latent-ViT-B/8", "kind": "latent", "ms": 2.0, "peak_rss_gib": 1.0},
            {"system": "TAESD-XL decode + CLIP ViT-B/32", "kind": "pixel", "status": "error: killed"}]
    bench.full_size_ratios(rows)
    assert rows[0]["time_vs_latent"] == 15.0 and rows[0]["peak_rss_vs_latent"] == 8.0
    assert rows[0]["relative_to"] == "Latent-ViT-B/8" and rows[1]["time_vs_latent"] == 1.0
    assert rows[2]["time_vs_latent"] is None and rows[2]["relative_to"] is None
    assert "error: killed" in bench.full_size_table(rows)


def test_in_fresh_process_returns_the_result_or_the_error():
    result = bench.in_fresh_process("bench.report:cpu_device", {"threads": 3})
    assert result["torch_threads"] == 3 and result["name"].startswith("CPU (")
    failed = bench.in_fresh_process("bench.report:cpu_device", {"no_such_argument": 1})
    assert failed["status"].startswith("error: TypeError")


_PEAK_RSS = """
import json, torch
from bench.reward import PeakRSS
with PeakRSS() as mem:
    x = torch.ones(64 * 2**20)  # 256 MiB, touched
    del x
print(json.dumps(dict(peak=mem.peak_gib, before=mem.before_gib, method=mem.method)))
"""


def test_peak_rss_sees_torch_allocations():
    """In a fresh interpreter, as the benches measure: a long-lived test worker may hold freed pages resident that
    the allocation reuses, so its resident memory need not grow."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    assert mem["peak"] > 0 and mem["method"]
    if mem["method"].startswith("VmHWM"):  # Linux: the block's own peak
        assert mem["peak"] - mem["before"] >= 0.2


def test_cpu_step_times_counts_warmup_and_repeats():
    calls = []
    times = bench.cpu_step_times(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times["ms_each"]) == 3 and len(times["warmup_ms_each"]) == 2
    assert times["ms"] == sorted(times["ms_each"])[1]
