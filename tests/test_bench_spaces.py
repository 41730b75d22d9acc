"""The decode-vs-latent-tower counts per latent space (issue 33 part 4; bench/spaces.py, bench.reno_cost --counts,
bench.reward --counts): every space in both tables at 512 and 1024 px, a decode counted against a hand count, the
tower's token grid on a 32x space, FLUX.2's decode against the plain AutoencoderKL it wraps, and the CLI checks.
Meta-device counts only (no weights, nothing timed)."""

import json
from pathlib import Path

import pytest

import fastlclip
from bench import flops, reno_cost, reward, spaces
from test_bench_cli import _one_line_error

NEW = ["qwen-image", "flux2", "sana", "dcae-f32c32-in", "dcae-f32c32-mix"]
OLD = ["sdxl", "sd15", "sd3", "flux1"]


def _table_rows(md: str) -> set[tuple[str, str]]:
    """(space, px) of each body row of the markdown counts table."""
    rows = set()
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and cells[1].isdigit():
            rows.add((cells[0], cells[1]))
    return rows


def test_every_space_in_both_tables_at_512_and_1024_px(tmp_path, capsys):
    assert spaces.SPACES == OLD + NEW
    report = reno_cost.main(["--counts", "--out", str(tmp_path)])
    folder = tmp_path / "counts"
    saved = json.loads((folder / "reno_cost_spaces.json").read_text())
    assert saved["command"] == f"python -m bench.reno_cost --counts --out {tmp_path}" and saved["date"]
    assert {(r["space"], r["px"]) for r in saved["rows"]} == {(s, px) for s in OLD + NEW for px in (512, 1024)}
    expected = {(s, str(px)) for s in OLD + NEW for px in (512, 1024)}
    assert _table_rows((folder / "reno_cost_spaces.md").read_text()) == expected
    for r in report["rows"]:
        assert r["decode"]["parts"] == [flops.DECODER_LABELS[r["space"]]]  # the decode alone
        assert r["decode_over_tower"]["total_flops"] > 100  # every decode is > 100x the tower's FLOPs
        assert r["decode"]["total_flops"] == flops.decode_work(r["space"], False, r["latent"][1]).total_flops
    by = {(r["space"], r["px"]): r for r in report["rows"]}
    assert by["sana", 512]["latent"] == [32, 16, 16] and by["flux2", 1024]["latent"] == [32, 128, 128]
    assert by["flux2", 512]["decode_input"].startswith("packed tokens 1x1024x128")
    # the decode grows about 4x from 512 to 1024 px (4x the pixels; mid-block attention, quadratic, adds a little)
    for s in NEW:
        assert 3.9 < by[s, 1024]["decode"]["total_flops"] / by[s, 512]["decode"]["total_flops"] < 4.3

    out = tmp_path / "r" / "reward_spaces.json"
    rep = reward.counts_run(reward.parse_args(["--counts", "--out", str(out)]), ["--counts"])
    assert _table_rows(out.with_suffix(".md").read_text()) == expected
    assert json.loads(out.read_text())["command"] == "python -m bench.reward --counts"
    clip = flops.open_clip_tower_work("ViT-B-32", False).total_flops
    for r in rep["rows"]:  # the reward step: the same decode plus CLIP ViT-B/32
        assert r["decode"]["total_flops"] == by[r["space"], r["px"]]["decode"]["total_flops"] + clip
        assert r["tower"] == by[r["space"], r["px"]]["tower"]
    assert "decode + CLIP ViT-B-32" in capsys.readouterr().out


def test_dc_ae_decode_matches_a_hand_count():
    # A tiny DC-AE: latent 4 -> conv_in 16, ResBlock(16), interpolate-upsample conv 16 -> 8, ResBlock(8), conv_out 8 -> 3.
    cfg = {"_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 4, "attention_head_dim": 8,
           "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
           "encoder_block_out_channels": [8, 16], "decoder_block_out_channels": [8, 16],
           "encoder_layers_per_block": [1, 1], "decoder_layers_per_block": [1, 1],
           "encoder_qkv_multiscales": [[], []], "decoder_qkv_multiscales": [[], []],
           "upsample_block_type": "interpolate", "downsample_block_type": "conv"}
    s = 4  # latent side; the image is 2s
    macs = 9 * (s * s * 4 * 16  # conv_in
                + 2 * s * s * 16 * 16  # ResBlock(16): conv1, conv2
                + (2 * s) ** 2 * 16 * 8  # the upsample's conv after the nearest interpolation
                + 2 * (2 * s) ** 2 * 8 * 8  # ResBlock(8)
                + (2 * s) ** 2 * 8 * 3)  # conv_out
    w = flops.decoder_work_of(cfg, s, "tiny DC-AE")
    assert w.forward_flops == 2 * macs
    assert w.total_flops == 2 * w.forward_flops  # backward: the input gradient only (weights frozen)


def test_flux2_decode_is_the_kl_decoder_from_packed_tokens():
    side = 8
    flux2 = flops.decode_work("flux2", False, side)
    kl = fastlclip.get_vae_config("flux2")
    kl = {k: v for k, v in kl.items() if k not in ("_class_name", "patch_size", "batch_norm_eps", "batch_norm_momentum")}
    plain = flops.decoder_work_of({"_class_name": "AutoencoderKL", **kl}, side, "KL")
    assert (flux2.forward_flops, flux2.total_flops, flux2.weight_bytes) == (plain.forward_flops, plain.total_flops,
                                                                           plain.weight_bytes)
    sdxl = flops.decode_work("sdxl", False, side)
    # conv_in reads 32 channels instead of 4 (into 512, 3x3), post_quant_conv is 32x32 + bias instead of 4x4 + bias
    assert flux2.weight_bytes - sdxl.weight_bytes == 2 * ((32 - 4) * 512 * 9 + (32 * 32 + 32) - (4 * 4 + 4))


def test_tower_on_a_32x_space_reads_64_tokens_at_512_px():
    geo = spaces.tower_geometry("sana", 512)
    assert geo == {"channels": 32, "grid": 16, "patch": 2, "tokens": 65}
    assert spaces.tower_geometry("sana", 1024)["tokens"] == spaces.tower_geometry("sdxl", 1024)["tokens"] == 257
    b8 = "Latent-ViT-B-8-512"
    sdxl, sana = flops.latent_tower_work(b8, False), flops.latent_tower_work(b8, False, None, "sana")
    # same 64 patches + class token: only the patch conv differs, 8x8x4 = 256 vs 2x2x32 = 128 inputs per patch into
    # width 768 (2 FLOPs per MAC, forward, and again for the input gradient)
    assert sdxl.forward_flops - sana.forward_flops == 2 * 64 * (256 - 128) * 768
    assert sdxl.total_flops - sana.total_flops == 2 * 2 * 64 * (256 - 128) * 768
    assert spaces.tower_geometry("flux2", 512) == {"channels": 32, "grid": 64, "patch": 8, "tokens": 65}
    doc = (spaces.__doc__ or "") + spaces.DEFINITIONS["tower"]
    assert "patch 2" in doc and "64 tokens + the class token at 512 px" in doc
    page = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()
    for space in ("sana", "dcae-f32c32-in", "dcae-f32c32-mix"):  # the docs' rows say what the code counts
        assert f"| {space} | 512 | {geo['channels']}x{geo['grid']}x{geo['grid']} | {geo['patch']} / {geo['tokens']} |" in page


@pytest.mark.parametrize("main, argv, needles", [
    (reno_cost.main, ["--counts", "--space", "sd4"], ["--space", "sd4"]),
    (reward.main, ["--counts", "--space", "sd4"], ["--space", "sd4"]),
    (reno_cost.main, ["--counts", "--px", "500"], ["--px", "multiple of 64"]),
    (reward.main, ["--counts", "--px", "0"], ["--px"]),
    (reno_cost.main, ["--space", "sana"], ["only with --counts"]),
    (reward.main, ["--px", "512"], ["only with --counts"]),
    (reno_cost.main, ["--counts", "--iterations", "3", "--full-size"], ["--full-size", "--iterations"]),
    (reward.main, ["--counts", "--models", "Latent-ViT-B-8-512"], ["--models"]),
    (reward.main, ["--counts", "--warmup", "1"], ["--warmup"]),
])
def test_counts_arguments_are_checked_first(capsys, main, argv, needles):
    _one_line_error(capsys, main, argv, *needles)
