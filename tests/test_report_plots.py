"""bench.report's ReNO cost figure: titled panels, resolution and iterations shown, log time axes, and result
file names that keep 512 px and 1024 px runs apart."""

import math

import pytest

from bench import report

pytest.importorskip("matplotlib")

ROWS = [{"pipeline": p, "reward": k, "reward_label": lab, "variant": f"{p} / eager", "seconds_per_image": s,
         "peak_allocated_gib": g}
        for p in ("reno", "fast") for (k, lab, s, g) in (("latent-b8", "Latent-ViT-B/8", 9.1, 20.0),
                                                          ("pixel-b32", "VAE + CLIP B/32", 11.6, 30.0))]
# per-image lower bounds (s): the L4 is ~15x slower than the H100/H200, the case that flattened them before
FLOORS = {gpu: [{"pipeline": p, "reward": k, "floor_s_per_image": base * f}
                for p in ("reno", "fast") for k, f in (("latent-b8", 1.0), ("pixel-b32", 1.6))]
          for gpu, base in (("h100", 0.3), ("h200", 0.25), ("l4", 4.5))}


def smoke_report(resolution="512x512"):
    rows = [{**r, "seconds_per_image": "not measured", "peak_allocated_gib": "not measured"} for r in ROWS]
    return {"results": rows, "floors": FLOORS, "floor_iterations": 50, "device": None,
            "settings": {"pipelines": ["reno", "fast"], "floor_resolution": resolution, "resolution": "64x64 (tiny)",
                         "iterations": 2}}


def measured_report():
    return {"results": ROWS, "floors": {}, "floor_iterations": 50, "device": "NVIDIA H100 80GB HBM3",
            "settings": {"pipelines": ["reno", "fast"], "floor_resolution": "1024x1024", "resolution": "1024x1024",
                         "iterations": 50}}


def _check(fig, *expected_in_title):
    title = fig._suptitle.get_text()
    for text in expected_in_title:
        assert text in title, title
    for ax in fig.axes:
        assert ax.get_title(), "every panel has a title"
        heights = [b.get_height() for b in ax.patches if math.isfinite(b.get_height())]
        if ax.get_yscale() == "log":  # the smallest bar stands clear of the axis, the largest fits
            low, high = ax.get_ylim()
            assert low < min(heights) and max(heights) <= high and math.log10(min(heights) / low) > 0.1


def test_lower_bound_figure_titles_resolution_iterations_and_log_scale():
    fig = report.reno_cost_figure(smoke_report("1024x1024"))
    _check(fig, "1024x1024", "50 iterations", "NOT a measurement")
    assert [ax.get_title() for ax in fig.axes] == ["pipeline 'reno'", "pipeline 'fast'"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"h100", "h200", "l4"}


def test_measured_figure_shows_device_resolution_and_iterations():
    fig = report.reno_cost_figure(measured_report())
    _check(fig, "H100", "1024x1024", "50 iterations")
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear"]


def test_plot_writes_a_png(tmp_path):
    path = report.plot_reno_cost(smoke_report(), tmp_path / "reno_cost.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_names_keep_resolutions_apart():
    assert report.result_stem("reno_cost", 512) == report.result_stem("reno_cost", "512x512") == "reno_cost"
    assert report.result_stem("reno_cost", "1024x1024") == report.result_stem("reno_cost", 1024) == "reno_cost_1024px"
