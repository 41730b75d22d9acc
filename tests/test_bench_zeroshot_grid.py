"""bench.zeroshot_grid on a tiny random model: reads labelled latents (Parquet, .pt), scores every policy per grid."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench import zeroshot_grid
from conftest import TINY


@pytest.fixture
def tiny_config(tmp_path):
    import json

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_accuracy_per_grid_and_policy(tmp_path, tiny_config, capsys):
    g = torch.Generator().manual_seed(0)
    small = torch.randn(6, 4, 16, 16, generator=g)  # the tiny config's trained grid
    torch.save({"latents": small, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}, tmp_path / "small.pt")
    big = torch.randn(5, 4, 32, 24, generator=g)
    pq.write_table(pa.table({"latent": pa.array(big.tolist()), "label": [0, 1, 2, 1, 0]}), tmp_path / "big.parquet")
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\n")

    rows = zeroshot_grid.main(["--model", str(tiny_config), "--latents", str(tmp_path / "small.pt"),
                               str(tmp_path / "big.parquet"), "--classnames", str(tmp_path / "classes.txt"),
                               "--templates", "simple", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "| big.parquet" in out
    assert [(r["grid"], r["policy"]) for r in rows] == [("16x16", "None"), ("16x16", "interpolate"), ("16x16", "pool"),
                                                        ("32x24", "interpolate"), ("32x24", "pool")]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in rows) and rows[-1]["n"] == 5
    # at the trained grid the policies are no-ops: the same accuracy
    assert rows[0]["top1"] == rows[1]["top1"] == rows[2]["top1"]


def test_unlabelled_parquet_is_refused(tmp_path, tiny_config):
    pq.write_table(pa.table({"latent": pa.array(torch.randn(2, 4, 16, 16).tolist())}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'label' column"):
        zeroshot_grid.read_labelled(tmp_path / "x.parquet")


# -- every argument and file is checked before any scoring: one line, exit 2 ------------------------------------
@pytest.fixture
def inputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save({"latents": torch.randn(3, 4, 16, 16, generator=g), "labels": torch.tensor([0, 1, 2])},
               tmp_path / "ok.pt")
    torch.save({"latents": torch.randn(2, 4, 16, 16, generator=g), "labels": torch.tensor([0, 3])},
               tmp_path / "label3.pt")
    torch.save({"latents": torch.randn(2, 4, 16, 16, generator=g), "labels": torch.tensor([0, -1])},
               tmp_path / "negative.pt")
    nan = torch.randn(2, 4, 16, 16, generator=g)
    nan[1, 0, 0, 0] = float("nan")
    torch.save({"latents": nan, "labels": torch.tensor([0, 1])}, tmp_path / "nan.pt")
    torch.save({"latents": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1])}, tmp_path / "rgb.pt")
    torch.save({"latents": torch.zeros(0, 4, 16, 16), "labels": torch.zeros(0, dtype=torch.long)}, tmp_path / "empty.pt")
    torch.save({"pixels": torch.zeros(1)}, tmp_path / "nokey.pt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)))
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\n")
    (tmp_path / "one.txt").write_text("cat\n")
    return tmp_path


@pytest.mark.parametrize("extra, needles", [
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--device", "bogus"], ["--device"]),
    (["--latents", "{d}/missing.pt"], ["no such file"]),
    (["--latents", "{d}/label3.pt"], ["label 3", "[0, 3)"]),
    (["--latents", "{d}/negative.pt"], ["label -1"]),
    (["--latents", "{d}/nan.pt"], ["NaN"]),
    (["--latents", "{d}/rgb.pt"], ["3 channels"]),
    (["--latents", "{d}/empty.pt"], ["no latents"]),
    (["--latents", "{d}/nokey.pt"], ["latents"]),
    (["--latents", "{d}/noise.pt"], ["noise.pt"]),
    (["--classnames", "{d}/missing.txt"], ["--classnames", "no such file"]),
    (["--classnames", "{d}/one.txt"], ["at least two class names"]),
    (["--checkpoint", "{d}/noise.pt"], ["noise.pt"]),
])
def test_bad_arguments_are_one_line_errors_before_scoring(inputs, tiny_config, capsys, monkeypatch, extra, needles):
    def fail(*args, **kwargs):
        raise AssertionError("scoring started before every argument was checked")

    monkeypatch.setattr(zeroshot_grid, "evaluate", fail)
    argv = ["--model", str(tiny_config), "--latents", str(inputs / "ok.pt"), "--classnames", str(inputs / "classes.txt"),
            "--templates", "simple", "--device", "cpu"]
    for flag, value in zip(extra[::2], extra[1::2]):  # a later flag of the same name replaces the default
        argv += [flag, value.format(d=inputs)]
    with pytest.raises(SystemExit) as exc:
        zeroshot_grid.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_model_or_checkpoint_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        zeroshot_grid.main(["--latents", __file__])
    assert exc.value.code == 2 and "pass --model, --checkpoint or both" in capsys.readouterr().err


def test_grid_that_is_not_whole_patches_is_pooled_not_interpolated(tmp_path, tiny_config, capsys):
    g = torch.Generator().manual_seed(0)
    torch.save({"latents": torch.randn(3, 4, 18, 15, generator=g), "labels": torch.tensor([0, 1, 1])}, tmp_path / "odd.pt")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    rows = zeroshot_grid.main(["--model", str(tiny_config), "--latents", str(tmp_path / "odd.pt"), "--classnames",
                               str(tmp_path / "classes.txt"), "--templates", "simple", "--device", "cpu"])
    assert [(r["grid"], r["policy"]) for r in rows] == [("18x15", "pool")]
    assert "not scored: odd.pt (18x15): interpolate needs whole 4x4 patches" in capsys.readouterr().out
