"""fastlclip.corpus on Ray Data: the same rows as the local engine, and the same resuming."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, official_state, open_clip_reference
from corpus_shards import latents, npy_shard, parquet_shard, pt_shard

from fastlclip import corpus

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs on a 2-core machine; actors take fractions, so Ray Data's own tasks never starve.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_engine_gives_the_local_rows_and_resumes(tmp_path, cluster, capsys):
    ckpt = tmp_path / "epoch_34.pt"
    torch.save(official_state(open_clip_reference()), ckpt)
    pt_shard(tmp_path / "a.tar", "a", latents(3, 1))
    npy_shard(tmp_path / "b.tar", "b", latents(2, 2).half().numpy())
    parquet_shard(tmp_path / "c.parquet", "c", latents(3, 3))
    (tmp_path / "d.tar").write_bytes(b"not a tar")
    shards = [str(tmp_path / s) for s in ("a.tar", "b.tar", "c.parquet", "d.tar")]
    kw = dict(model=TINY, pretrained=str(ckpt), prompts=["a cat"], classes=["cat", "dog"], safety=True,
              embeddings=True, batch_size=2)
    corpus.score(shards, tmp_path / "local", **kw)
    remote = corpus.score(shards, tmp_path / "ray", engine="ray", workers=2, **kw)
    status = {os.path.basename(r["shard"]): r["status"] for r in remote.records}
    assert status == {"a.tar": "ok", "b.tar": "ok", "c.parquet": "ok", "d.tar": "error"}
    assert len({r["pid"] for r in remote.records} - {os.getpid()}) >= 1  # scored inside actors
    assert "d.tar: error" in capsys.readouterr().err
    for stem in ("a", "b", "c"):
        want = pq.read_table(tmp_path / "local" / f"{stem}.parquet")
        got = pq.read_table(tmp_path / "ray" / f"{stem}.parquet")
        assert got.schema.names == want.schema.names and got["key"].equals(want["key"])
        for name in want.schema.names[1:]:
            a, b = want[name].to_pylist(), got[name].to_pylist()
            if name in ("label", "safety_flag"):
                assert a == b
            else:
                np.testing.assert_allclose(np.array(b, dtype=np.float64), np.array(a, dtype=np.float64), atol=1e-6)

    os.remove(tmp_path / "ray" / "b.parquet")
    again = corpus.score(shards, tmp_path / "ray", engine="ray", workers=1, **kw)
    status = {os.path.basename(r["shard"]): r["status"] for r in again.records}
    assert status == {"a.tar": "skipped", "b.tar": "ok", "c.parquet": "skipped", "d.tar": "error"}
    keys = [k for s in ("a", "b", "c") for k in pq.read_table(tmp_path / "ray" / f"{s}.parquet")["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == 8
