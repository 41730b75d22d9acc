"""bench.reward: the CPU smoke run and the derived columns (ratios, % weight floor, % bf16 peak)."""

import pytest
import torch

from bench import reward as bench
from fastlclip import runtime
from bench.profiles import load_profiles


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
