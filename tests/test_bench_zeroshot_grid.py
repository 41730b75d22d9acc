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
