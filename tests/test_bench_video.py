"""bench.video (issue 34): a video clip's decode against the latent tower on its latent frames. Meta-device counts
on small latents, the clips' geometry, the measurement path on stand-in modules, the CLI checks."""

import json

import pytest
import torch
from torch import nn

from bench import flops, video
from test_bench_cli import _one_line_error


def test_the_full_clips_latents_and_tower_tokens():
    wan, ltx = video.CLIPS["wan2.1"], video.CLIPS["ltx-video"]
    assert (wan.frames, wan.height, wan.width) == (81, 480, 832) and wan.latent_shape() == (1, 16, 21, 60, 104)
    assert (ltx.frames, ltx.height, ltx.width) == (121, 512, 768) and ltx.latent_shape() == (1, 128, 16, 16, 24)
    # Wan: patch 8 over 60x104 -> 7x13 patches, 4 latent rows unread; LTX (32x): patch 2 over 16x24 -> 8x12
    assert video.tower_tokens("wan2.1", wan.latent_shape()) == {
        "batch": 21, "patch": 8, "patches": 91, "tokens_per_frame": 92, "unread_latent_rows": 4, "unread_latent_cols": 0}
    assert video.tower_tokens("ltx-video", ltx.latent_shape())["tokens_per_frame"] == 97
    with pytest.raises(ValueError, match="does not fit"):
        video.Clip("wan2.1", 80, 480, 832, "").latent_shape()  # 80 frames: not 1 + 4k


def test_tower_runs_once_per_latent_frame():
    one = video.side_work("tower", "ltx-video", (1, 128, 1, 4, 4))
    three = video.side_work("tower", "ltx-video", (1, 128, 3, 4, 4))
    assert three.forward_flops == 3 * one.forward_flops and three.weight_bytes == one.weight_bytes
    # per frame, the image tower's work but for the patch conv: on LTX-Video (128 channels, patch 2) each patch reads
    # 2x2x128 = 512 inputs into width 768, on SDXL (4 channels, patch 8) 8x8x4 = 256
    sdxl = flops.latent_tower_work("Latent-ViT-B-8-512", False, 16)  # 2x2 patches, like a 4x4 LTX frame
    assert one.forward_flops - sdxl.forward_flops == 2 * 4 * (512 - 256) * 768


def test_wan_decode_of_one_latent_frame_is_qwen_images_decode():
    # Qwen-Image's VAE is Wan 2.1's architecture: two diffusers classes, one count
    wan = video.side_work("decode", "wan2.1", (1, 16, 1, 8, 8))
    qwen = flops.decode_work("qwen-image", False, 8)
    assert (wan.forward_flops, wan.total_flops, wan.weight_bytes) == (qwen.forward_flops, qwen.total_flops,
                                                                      qwen.weight_bytes)
    two = video.side_work("decode", "wan2.1", (1, 16, 2, 8, 8))  # 1 + 4 video frames
    assert two.forward_flops > 3 * wan.forward_flops


class _Stand(nn.Module):
    def __init__(self, side):
        super().__init__()
        self.side = side
        self.conv = nn.Conv3d(128, 3 if side == "decode" else 8, 1)

    def decode_path(self):
        return self

    def forward(self, z):
        return self.conv(z)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(video, "build", lambda side, space: _Stand(side).eval().requires_grad_(False))
    monkeypatch.setattr(video, "FRESH_PROCESS", False)
    monkeypatch.setattr(video, "SHORT_CLIPS", {"ltx-video": video.Clip("ltx-video", 9, 64, 64, "stand-in")})
    video.side_work.cache_clear()
    yield
    video.side_work.cache_clear()


def test_counts_and_measure_write_json_and_markdown(tmp_path, capsys, stand_ins):
    report = video.main(["--clips", "ltx-video", "--tiny", "--measure", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "video.json").read_text())
    assert saved["command"] == f"python -m bench.video --clips ltx-video --tiny --measure --out {tmp_path}"
    (row,) = saved["rows"]
    assert row["latents"] == [1, 128, 2, 2, 2]
    # a 1x1x1 conv 128 -> 3 over 2x2x2 positions: 2 * 8 * 128 * 3 FLOP forward, as much again for the input gradient
    assert row["decode"]["forward_flops"] == 2 * 8 * 128 * 3 and row["decode"]["total_flops"] == 2 * 2 * 8 * 128 * 3
    assert row["decode_over_tower"]["forward_flops"] == pytest.approx(3 / 8)
    (m,) = report["measured"]
    assert m["measured"]["decode"]["status"] == m["measured"]["tower"]["status"] == "ok"
    assert m["measured"]["decode"]["ms"] > 0 and len(m["measured"]["decode"]["ms_each"]) == 2
    assert saved["device"]["name"].startswith("CPU (")
    md = (tmp_path / "video.md").read_text()
    assert "ltx-video 9 frames 64x64" in md and "Measured forward (no gradient)" in md
    assert "latent tower" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needles", [
    (["--clips", "hunyuan"], ["--clips", "hunyuan"]),
    (["--clips"], ["--clips"]),
    (["--out", "/proc/nope"], ["--out"]),
])
def test_arguments_are_checked_first(capsys, argv, needles):
    _one_line_error(capsys, video.main, argv, *needles)


def test_measure_child_runs_a_side_on_the_cpu(stand_ins):
    out = video.measure_child("tower", "ltx-video", [1, 128, 2, 2, 2], torch.get_num_threads())
    assert out["status"] == "ok" and out["dtype"] == "float32" and len(out["ms_each"]) == 2
    assert out["peak_rss_gib"] > 0
