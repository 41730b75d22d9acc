"""bench.ensemble: counts against hand formulas, the ratio's direction, the JSON, the CLI's errors, the tiny --measure path.

The real-size counts run on the meta device (no weights, no timing); only the tiny stand-ins are ever timed here.
"""

import json

import pytest
import torch
from torch import nn

from bench import ensemble, flops


def conv(cin: int, cout: int, k: int, side: int) -> int:
    """FLOPs of a k x k convolution producing a side x side map: 2 per multiply-add."""
    return 2 * cin * cout * k * k * side * side


def vit_forward(tokens: int, width: int, layers: int, patch_flops: int, proj_flops: int = 0) -> tuple[int, int]:
    """(matmul + conv FLOPs, attention FLOPs) of a pre-norm ViT forward, MLP ratio 4: per layer 2 * tokens * 12 * width^2
    (qkv 3w^2, out w^2, MLP 8w^2) for the weights, 2 * 2 * tokens^2 * width for QK^T and AV over all heads."""
    return patch_flops + layers * 24 * tokens * width**2 + proj_flops, layers * 4 * tokens**2 * width


def sdxl_family_decoder(side: int, latent_channels: int, post_quant_conv: bool) -> int:
    """An AutoencoderKL decoder forward (block_out_channels 128, 256, 512, 512; 2 layers per block, so 3 resnets per
    up block; one-head mid attention over side^2 tokens), written out from the architecture, not from the code."""
    total = conv(latent_channels, latent_channels, 1, side) if post_quant_conv else 0
    total += conv(latent_channels, 512, 3, side)  # conv_in
    tokens = side * side
    total += 2 * 2 * conv(512, 512, 3, side)  # mid block: two resnets of two 3x3 convs
    total += 4 * 2 * tokens * 512 * 512 + 2 * 2 * tokens * tokens * 512  # mid attention: q, k, v, out; QK^T, AV
    prev, res = 512, side
    for i, c in enumerate([512, 512, 256, 128]):
        for j in range(3):
            cin = prev if j == 0 else c
            total += conv(cin, c, 3, res) + conv(c, c, 3, res) + (conv(cin, c, 1, res) if cin != c else 0)
        prev = c
        if i < 3:  # upsample x2, then a 3x3 conv at the new size
            res *= 2
            total += conv(c, c, 3, res)
    return total + conv(128, 3, 3, res)  # conv_out


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """Real sizes on the meta device: flow_grpo (two ViT-H-14, one ViT-L-14) on SD3 latents at 512 px."""
    out = tmp_path_factory.mktemp("ensemble")
    report = ensemble.main(["--ensemble", "flow_grpo", "--px", "512", "--space", "sd3", "--out", str(out)])
    return report, out


def test_trunk_and_heads_match_the_vit_formula():
    # Latent-ViT-B/8 on 64x64 latents: 8x8 patches -> 64 + 1 tokens, width 768, 12 layers; no CLIP projection
    for channels, space in ((4, "sdxl"), (16, "flux1")):
        w = ensemble.trunk_work(space, 64)
        mm, attn = vit_forward(65, 768, 12, patch_flops=2 * channels * 8 * 8 * 768 * 64)
        assert w.forward_flops == mm + attn
        # the backward to the latents: each matmul / conv once more (grad of its input), attention twice more
        assert w.total_flops == 2 * mm + 3 * attn
    # 1024 px: the tower over the whole 128x128 grid, 256 + 1 tokens
    mm, attn = vit_forward(257, 768, 12, patch_flops=2 * 4 * 8 * 8 * 768 * 256)
    assert ensemble.trunk_work("sdxl", 128).forward_flops == mm + attn
    heads = ensemble.heads_work(("pickscore", "hpsv2.1", "clip-l14"))
    assert heads.forward_flops == 2 * 768 * (1024 + 1024 + 768)
    assert heads.weight_bytes == 2 * 768 * (1024 + 1024 + 768)


def test_teacher_towers_match_the_vit_formula(real_report):
    # ViT-L/14 at 224 px: 16x16 patches + 1 = 257 tokens, width 1024, 24 layers, projection 1024 -> 768 on the class token
    mm, attn = vit_forward(257, 1024, 24, patch_flops=2 * 3 * 14 * 14 * 1024 * 256, proj_flops=2 * 1024 * 768)
    assert real_report[0]["components"]["ViT-L-14 (224 px)"]["forward_flops"] == mm + attn
    # ViT-H/14: width 1280, 32 layers, projection to 1024
    mm, attn = vit_forward(257, 1280, 32, patch_flops=2 * 3 * 14 * 14 * 1280 * 256, proj_flops=2 * 1280 * 1024)
    h14 = real_report[0]["components"]["ViT-H-14 (224 px)"]
    assert h14["forward_flops"] == mm + attn and h14["total_flops"] == 2 * mm + 3 * attn
    # BLIP ViT-L/16 (ImageReward): 14x14 + 1 = 197 tokens, no projection
    mm, attn = vit_forward(197, 1024, 24, patch_flops=2 * 3 * 16 * 16 * 1024 * 196)
    assert ensemble.tower_work("blip-vit-l16", 1024).forward_flops == mm + attn


def test_vae_decode_matches_the_architecture(real_report):
    sd3 = real_report[0]["components"]["sd3 VAE decode (64x64 -> 512 px)"]
    assert sd3["forward_flops"] == sdxl_family_decoder(64, 16, post_quant_conv=False)
    assert ensemble.decoder_work("sdxl", 64).forward_flops == sdxl_family_decoder(64, 4, post_quant_conv=True)
    # the same decode as bench.flops counts it (diffusers' own decode call)
    assert ensemble.decoder_work("sdxl", 64).total_flops == flops.decode_work("sdxl", False, 64).total_flops


def test_saved_bytes_are_what_autograd_keeps():
    # frozen linears keep nothing of their input (the gradient to it needs only the weight); GELU keeps its input
    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.empty(2, 8, device="meta", requires_grad=True)
    w = flops._count("mlp", mlp, lambda: mlp(x))
    assert w.saved_bytes == 2 * 16 * flops.BF16_BYTES
    # to [0, 1]: the clamp keeps its input, 3 x px^2
    assert ensemble.to_unit_work(512).saved_bytes == 3 * 512 * 512 * flops.BF16_BYTES


def test_report_structure_and_ratio_direction(real_report):
    report, out = real_report
    saved = json.loads((out / "ensemble.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    assert (out / "ensemble.md").read_text().startswith("# bench.ensemble")
    assert saved["command"] == "python -m bench.ensemble --ensemble flow_grpo --px 512 --space sd3 --out " + str(out)
    assert saved["measured"] is False and saved["device"] is None and saved["tiny"] is False
    assert set(saved["definitions"]) >= {"flops", "weight_bytes_per_pass", "saved_activation_bytes"}
    assert any("ImageReward" in s for s in saved["left_out"])
    assert [t["key"] for t in saved["ensembles"]["flow_grpo"]["teacher_details"]] == ["pickscore", "hpsv2.1", "clip-l14"]
    (row,) = saved["rows"]
    assert (row["ensemble"], row["px"], row["space"], row["latent_side_grid"]) == ("flow_grpo", 512, "sd3", 64)
    roles = [c["role"] for c in row["decode"]["components"]]
    assert roles == ["decode", "to [0, 1]", "preprocess", "preprocess", "preprocess", "PickScore", "HPSv2.1",
                     "CLIP ViT-L/14"]  # flow_grpo's scorers each resize for themselves
    assert [c["role"] for c in row["latent"]["components"]] == ["trunk", "heads"]
    comps = saved["components"]
    decode_flops = sum(comps[c["name"]]["total_flops"] for c in row["decode"]["components"])
    assert row["decode"]["flops_forward_backward"] == decode_flops
    for key in ensemble.RATIO_KEYS:  # decode side over latent side, and the decode side is the larger
        assert row["decode_over_latent"][key] == pytest.approx(row["decode"][key] / row["latent"][key])
        assert row["decode_over_latent"][key] > 1
    assert row["decode"]["weight_bytes_forward_backward"] == 2 * row["decode"]["weight_bytes_per_pass"]
    assert row["decode"]["params"] == pytest.approx(49.5e6 + 2 * 632e6 + 304e6, rel=0.01)


def test_reno_shares_one_preprocessing():
    parts = ensemble.side_parts(ensemble.ENSEMBLES["reno"], "sdxl", 512, tiny=True)
    roles = [r for r, _ in parts["decode"]]
    assert roles.count("preprocess") == 1
    assert roles[-4:] == ["HPSv2.1", "ImageReward", "CLIP ViT-H/14", "PickScore"]


def test_ratios_are_decode_over_latent():
    lat = {k: 2 for k in ensemble.RATIO_KEYS}
    dec = {k: 10 for k in ensemble.RATIO_KEYS}
    assert set(ensemble.ratios(dec, lat).values()) == {5.0}
    assert set(ensemble.ratios(dec, {**lat, "saved_activation_bytes": 0}).values()) == {5.0, None}


@pytest.fixture
def no_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(ensemble, "count_rows", fail)


@pytest.mark.parametrize("argv, needle", [
    (["--ensemble", "dpo"], "--ensemble"),
    (["--px", "500"], "multiple of 64"),
    (["--px", "0"], "multiple of 64"),
    (["--px", "big"], "image side"),
    (["--px", "8192"], "4096"),
    (["--space", "taesdxl"], "--space"),
    (["--measure", "--bogus"], "--bogus"),
])
def test_bad_arguments_are_one_line_errors(capsys, no_work, argv, needle):
    with pytest.raises(SystemExit) as exc:
        ensemble.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_unwritable_out_is_refused_before_any_work(capsys, no_work, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        ensemble.main(["--out", str(tmp_path / "file")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_defaults():
    args = ensemble.parse_args([])
    assert (args.ensemble, args.px, args.space) == (["reno", "flow_grpo"], [512, 1024], ["sdxl", "sd3", "flux1"])
    assert not args.measure and not args.tiny


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_tiny_measure_times_both_sides_on_the_cpu(tmp_path, capsys):
    report = ensemble.main(["--tiny", "--measure", "--ensemble", "reno", "--px", "512", "--space", "sd3",
                            "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "TINY STAND-INS" in out and "Measured on CPU" in out
    assert report["measured"] is True and report["device"].startswith("CPU")
    (row,) = report["rows"]
    m = row["measured"]
    assert m["latent"]["status"] == m["decode"]["status"] == "ok"
    assert m["latent"]["ms"] > 0 and m["decode"]["ms"] > 0
    assert m["decode_over_latent_time"] == pytest.approx(m["decode"]["ms"] / m["latent"]["ms"])
    assert m["dtype"] == "float32"
    assert json.loads((tmp_path / "ensemble.json").read_text())["rows"][0]["measured"]["latent"]["ms"] == m["latent"]["ms"]


def test_heads_give_one_slot_per_teacher_dim():
    with torch.device("meta"):
        heads = ensemble.build_heads(ensemble.ENSEMBLES["reno"].teachers, tiny=False)
    assert heads(torch.empty(1, 768, device="meta")).shape == (1, 4 * 1024)
