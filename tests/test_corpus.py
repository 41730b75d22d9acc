"""fastlclip.corpus: shards in, per-shard Parquet + manifest out, resumable; checked against the model itself."""

import builtins
import json
import os
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, official_state, open_clip_reference
from corpus_shards import latents, npy_bytes, npy_shard, parquet_shard, pt_bytes, pt_shard, write_tar

import fastlclip
from fastlclip import corpus
from fastlclip.corpus import __main__ as cli
from fastlclip.corpus import runner

PROMPTS = ["a photo of a cat", "a red car"]
CLASSES = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "epoch_34.pt"
    torch.save(official_state(open_clip_reference()), path)
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt):
    return fastlclip.load(TINY, ckpt)


def read(out, shard) -> dict:
    return pq.read_table(os.path.join(out, f"{shard}.parquet")).to_pydict()


def all_keys(out) -> list[str]:
    return [k for f in sorted(os.listdir(out)) if f.endswith(".parquet") for k in read(out, f[:-8])["key"]]


def test_columns_equal_the_model_on_the_same_latents(tmp_path, ckpt, model):
    x_pt, x_npy, x_pq, x_flat = latents(5, 1), latents(3, 2).half(), latents(4, 3), latents(2, 4)
    pt_shard(tmp_path / "a.tar", "a", x_pt)
    npy_shard(tmp_path / "b.tar", "b", x_npy.numpy())
    parquet_shard(tmp_path / "c.parquet", "c", x_pq)
    parquet_shard(tmp_path / "d.parquet", "d", x_flat, flat=True)
    out = tmp_path / "out"
    report = corpus.score([tmp_path / s for s in ("a.tar", "b.tar", "c.parquet", "d.parquet")], out, model=TINY,
                          pretrained=ckpt, prompts=PROMPTS, classes=CLASSES, safety=True, embeddings=True, batch_size=2)
    assert [r["status"] for r in report.records] == ["ok"] * 4 and report.rows == 14

    # The reference: the same weights in float64, the whole shard at once (other batch boundaries).
    ref = fastlclip.load(TINY, ckpt).double()
    txt = ref.encode_text(PROMPTS)
    clf = fastlclip.ZeroShotClassifier(ref, CLASSES, ["a photo of a {}."])
    checker = fastlclip.LatentSafetyChecker(ref, space="vae")
    for stem, x in (("a", x_pt), ("b", x_npy), ("c", x_pq), ("d", x_flat)):
        got = read(out, stem)
        assert got["key"] == [f"{stem}{i:04d}" for i in range(len(x))]
        with torch.no_grad():
            feats = ref.encode_latents(x.double(), space="vae")
            cos = (feats @ txt.T).numpy()
            probs = clf.probs(x.double(), space="vae").numpy()
            check = checker(x.double())
        for i in range(len(PROMPTS)):
            np.testing.assert_allclose(got[f"clip_cos_{i}"], cos[:, i], atol=1e-5)
        for j, c in enumerate(CLASSES):
            np.testing.assert_allclose(got[f"prob_{c}"], probs[:, j], atol=1e-5)
        assert got["label"] == [CLASSES[j] for j in probs.argmax(1)]
        for j, c in enumerate(check.categories):
            np.testing.assert_allclose(got[f"safety_{c}"], check.scores[:, j].numpy(), atol=1e-5)
        assert got["safety_flag"] == check.flagged.tolist()
        np.testing.assert_allclose(np.array(got["embedding"], dtype=np.float32), feats.numpy(), atol=2e-3)

    # space="diffusion" divides by the SDXL scaling factor, as encode_latents does.
    corpus.score([tmp_path / "a.tar"], tmp_path / "diff", model=model, prompts=PROMPTS[:1], space="diffusion",
                 progress=False)
    with torch.no_grad():
        want = (model.encode_latents(x_pt, space="diffusion") @ model.encode_text(PROMPTS[:1]).T)[:, 0].numpy()
    np.testing.assert_allclose(read(tmp_path / "diff", "a")["clip_cos_0"], want, atol=1e-5)


class _Payload:
    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_bad_samples_are_recorded_and_the_rest_scored(tmp_path, model):
    x = latents(4, 5)
    hostile = _Payload()
    hostile.marker = str(tmp_path / "pwned")
    nan = x[1].clone()
    nan[0, 0, 0] = float("nan")
    write_tar(tmp_path / "s.tar", [
        ("k0", {"latent.pt": pt_bytes(x[0])}),
        ("k1", {"latent.pt": pt_bytes(nan)}),
        ("k2", {"latent.pt": pt_bytes(torch.randn(4, 8, 8))}),
        ("k3", {"latent.pt": pt_bytes(hostile)}),
        ("k4", {"latent.pt": b"not a torch file"}),
        ("k5", {"txt": b"caption without latent"}),
        ("k6", {"latent.npy": npy_bytes(x[2].numpy())}),
        ("k6", {"latent.npy": npy_bytes(x[3].numpy())}),  # the same key again, later in the shard
        ("k7", {"latent.pt": pt_bytes(x[3].unsqueeze(0))}),  # (1, C, H, W) is accepted
        ("k0", {"latent.pt": pt_bytes(x[0])}),  # a key seen before
    ])
    report = corpus.score([tmp_path / "s.tar"], tmp_path / "out", model=model, prompts=PROMPTS[:1], progress=False)
    assert not os.path.exists(hostile.marker), "the pickle payload ran"
    (record,) = report.records
    assert record["status"] == "ok" and record["rows"] == 2
    bad = {b["key"]: b["error"] for b in record["bad"]}
    assert [b["key"] for b in record["bad"]] == ["k1", "k2", "k3", "k4", "k5", "k6", "k0"]
    assert "NaN" in bad["k1"] and "(4, 8, 8)" in bad["k2"] and "weights_only" in bad["k3"]
    assert "appears twice" in bad["k6"] and "no latent.pt or latent.npy" in bad["k5"]
    assert "duplicate key" in bad["k0"]
    assert read(tmp_path / "out", "s")["key"] == ["k0", "k7"]
    assert corpus.read_manifest(tmp_path / "out")[-1]["bad"] == record["bad"]

    strict = corpus.score([tmp_path / "s.tar"], tmp_path / "strict", model=model, prompts=PROMPTS[:1],
                          on_error="raise", progress=False)
    assert strict.records[0]["status"] == "error" and "'k1'" in strict.records[0]["error"]
    assert not os.path.exists(tmp_path / "strict" / "s.parquet")


def test_corrupt_shards_are_reported_while_the_others_complete(tmp_path, model, capsys):
    good = pt_shard(tmp_path / "good.tar", "g", latents(3, 6))
    pt_shard(tmp_path / "full.tar", "t", latents(6, 7))
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])  # inside a member's data
    (tmp_path / "edge.tar").write_bytes(data[:3 * 512])  # at a header boundary: tarfile alone stops silently
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    shards = [str(tmp_path / s) for s in ("cut.tar", "edge.tar", "good.tar", "junk.parquet")]
    report = corpus.score(shards, tmp_path / "out", model=model, prompts=PROMPTS[:1])
    status = {os.path.basename(r["shard"]): r["status"] for r in report.records}
    assert status == {"cut.tar": "error", "edge.tar": "error", "good.tar": "ok", "junk.parquet": "error"}
    assert "truncated" in next(r["error"] for r in report.failed if r["shard"].endswith("edge.tar"))
    assert sorted(os.listdir(tmp_path / "out")) == ["good.parquet", "inputs.jsonl", "manifest.jsonl", "run.json"]
    assert read(tmp_path / "out", "good")["key"] == good
    err = capsys.readouterr().err
    assert "1/4 cut.tar: error" in err and "good.tar: ok, 3 rows" in err


def test_stopped_run_resumes_with_exactly_the_rest(tmp_path, model, monkeypatch):
    expected = []
    for i in range(5):
        expected += pt_shard(tmp_path / f"s{i}.tar", f"s{i}-", latents(3, 10 + i))
    shards = [str(tmp_path / f"s{i}.tar") for i in range(5)]
    out = tmp_path / "out"
    real_write, calls = runner.write_atomic, []

    def dies_after_two(table, final):
        calls.append(final.name)
        if len(calls) == 3:  # killed mid-write: a half-written temporary file, no output
            final.with_name(final.name + ".tmp").write_bytes(b"PAR1 half")
            raise KeyboardInterrupt
        real_write(table, final)

    monkeypatch.setattr(runner, "write_atomic", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        corpus.score(shards, out, model=model, prompts=PROMPTS[:1], progress=False)
    monkeypatch.setattr(runner, "write_atomic", real_write)
    assert sorted(f for f in os.listdir(out) if f.endswith(".parquet")) == ["s0.parquet", "s1.parquet"]
    assert os.path.exists(out / "s2.parquet.tmp")

    second = corpus.score(shards, out, model=model, prompts=PROMPTS[:1], progress=False)
    assert [os.path.basename(r["shard"]) for r in second.skipped] == ["s0.tar", "s1.tar"]
    assert [os.path.basename(r["shard"]) for r in second.ok] == ["s2.tar", "s3.tar", "s4.tar"]
    keys = all_keys(out)
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
    runs = [r["run"] for r in corpus.read_manifest(out)]
    assert len(runs) == 2 + 5 and runs[2:] == [second.records[0]["run"]] * 5

    with pytest.raises(ValueError, match="other settings.*prompts"):
        corpus.score(shards, out, model=model, prompts=PROMPTS, progress=False)


def test_rank_split_covers_every_shard_once(tmp_path, model, monkeypatch):
    expected = []
    (tmp_path / "in").mkdir()
    for i in range(3):
        expected += npy_shard(tmp_path / "in" / f"r{i}.tar", f"r{i}-", latents(2, 20 + i).numpy())
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        report = corpus.score(tmp_path / "in", tmp_path / "out", model=model, embeddings=True, progress=False)
        done.append([os.path.basename(r["shard"]) for r in report.ok])
    assert done == [["r1.tar"], ["r0.tar", "r2.tar"]]
    assert sorted(all_keys(tmp_path / "out")) == sorted(expected)


def test_local_worker_processes_give_the_same_rows(tmp_path, ckpt):
    for i in range(2):
        pt_shard(tmp_path / f"w{i}.tar", f"w{i}-", latents(3, 30 + i))
    shards = [str(tmp_path / f"w{i}.tar") for i in range(2)]
    one = corpus.score(shards, tmp_path / "one", model=TINY, pretrained=ckpt, prompts=PROMPTS, progress=False)
    two = corpus.score(shards, tmp_path / "two", model=TINY, pretrained=ckpt, prompts=PROMPTS, workers=2,
                       progress=False)
    assert len(one.ok) == len(two.ok) == 2 and len({r["pid"] for r in two.ok} - {os.getpid()}) >= 1
    for s in ("w0", "w1"):
        a, b = read(tmp_path / "one", s), read(tmp_path / "two", s)
        assert a["key"] == b["key"]
        np.testing.assert_allclose(a["clip_cos_1"], b["clip_cos_1"], atol=1e-6)


def test_select_threshold_and_top_fraction(tmp_path):
    import pyarrow as pa

    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"key": ["a", "b", "c"], "s": pa.array([0.1, 0.5, float("nan")], pa.float32()),
                             "safety_flag": [False, True, True]}), out / "x.parquet")
    pq.write_table(pa.table({"key": ["d", "e"], "s": pa.array([0.5, 0.3], pa.float32()),
                             "safety_flag": [False, False]}), out / "y.parquet")
    (out / "z.parquet.tmp").write_bytes(b"half")  # never read
    assert corpus.select(out, by="s", threshold=0.3) == ["b", "d", "e"]
    assert corpus.select(out, by="-safety_flag", threshold=0) == ["a", "d", "e"]
    assert corpus.select(out, by="s", top_fraction=0.2) == ["b"]  # int(0.2 * 5) = 1; tie b/d: file order
    assert corpus.select(out, by="s", top_fraction=0.6) == ["b", "d", "e"]
    assert corpus.select(out, by="s", top_fraction=1.0) == ["a", "b", "d", "e"]  # NaN never
    with pytest.raises(ValueError, match="exactly one"):
        corpus.select(out, by="s", threshold=0.1, top_fraction=0.5)
    with pytest.raises(ValueError, match="no column 'nope'"):
        corpus.select(out, by="nope", threshold=0)


def _one_error_line(capsys, code, pattern):
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err


@pytest.mark.parametrize("args, pattern", [
    (["score", "missing.tar", "--out", "o", "--model", "Latent-ViT-B-8-512", "--prompts", "x"], "not found: missing.tar"),
    (["score", "{tar}", "--out", "o", "--model", "Latent-ViT-B-8-512", "--prompts", "x", "--workers", "0"], "workers"),
    (["score", "{tar}", "--out", "o", "--model", "Latent-ViT-B-8-512", "--prompts", "x", "--batch-size", "-1"], "batch_size"),
    (["score", "{tar}", "--out", "o", "--model", "Latent-ViT-B-8-512", "--engine", "spark"], "invalid choice: 'spark'"),
    (["score", "{tar}", "--out", "o", "--model", "no-such-model", "--prompts", "x"], "unknown model"),
    (["score", "{tar}", "--out", "o", "--model", "Latent-ViT-B-8-512"], "nothing to compute"),
    (["select", "{dir}", "--by", "s", "--threshold", "1", "--top-fraction", "0.5", "--out", "k"], "not allowed with"),
    (["select", "{dir}", "--by", "s", "--out", "k"], "one of the arguments --threshold --top-fraction is required"),
    (["select", "{dir}", "--by", "s", "--top-fraction", "2", "--out", "k"], "top_fraction must lie in (0, 1]"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, pattern):
    tar = tmp_path / "t.tar"
    pt_shard(tar, "t", latents(1, 0))
    args = [a.format(tar=tar, dir=tmp_path) for a in args]
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code
    _one_error_line(capsys, code, pattern)
    assert not os.path.exists("o") and not os.path.exists(tmp_path / "o")


def test_cli_scores_selects_and_fails_on_a_corrupt_shard(tmp_path, ckpt, capsys):
    keys = pt_shard(tmp_path / "a.tar", "a", latents(4, 40))
    (tmp_path / "b.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:700])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    argv = ["score", str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), "--out", str(out), "--model", str(config),
            "--pretrained", ckpt, "--prompts", "a cat", "--safety", "--batch-size", "3"]
    assert cli.main(argv) == 1  # b.tar failed
    err = capsys.readouterr().err
    assert "b.tar: error" in err and "1 failed" in err
    select = ["select", str(out), "--by", "clip_cos_0", "--top-fraction", "0.5", "--out", str(tmp_path / "k.txt")]
    assert cli.main(select) == 1 and not (tmp_path / "k.txt").exists()  # b.tar's keys would silently vanish
    assert "b.tar (failed: ShardError" in capsys.readouterr().err
    assert cli.main([*select, "--allow-missing"]) == 0
    picked = (tmp_path / "k.txt").read_text().split()
    cos = read(out, "a")["clip_cos_0"]
    assert sorted(picked) == sorted(k for k, _ in sorted(zip(keys, cos), key=lambda kv: -kv[1])[:2])


def test_ray_engine_missing_says_how_to_install(tmp_path, monkeypatch, model):
    import sys

    pt_shard(tmp_path / "a.tar", "a", latents(1, 0))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'fastlclip\[ray\]'"):
        corpus.score([tmp_path / "a.tar"], tmp_path / "out", model=model, prompts=["x"], engine="ray")
    assert not os.path.exists(tmp_path / "out")


def test_tar_keys_follow_webdataset(tmp_path):
    from fastlclip.corpus.readers import read_shard, split_key

    assert split_key("dir/sub/000123.latent.pt") == ("dir/sub/000123", "latent.pt")
    assert split_key("abc.txt") == ("abc", "txt")
    write_tar(tmp_path / "x.tar", [("d/k1", {"txt": b"t", "emb.npy": npy_bytes(np.zeros(3)),
                                             "latent.npy": npy_bytes(np.ones((4, 16, 16), np.float16))})])
    (s,) = list(read_shard(tmp_path / "x.tar", member="emb.npy"))
    assert s.key == "d/k1" and s.latent.shape == (3,)
    with tarfile.open(tmp_path / "x.tar") as tf:
        assert len(tf.getmembers()) == 3


def _jsonl(path) -> list[dict]:
    """Every line of ``path`` parsed on its own: a valid JSONL file ends with a newline and has no torn line."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_torn_last_manifest_line_is_dropped_and_the_resumed_run_keeps_every_finished_shard(tmp_path, model):
    """A run killed while writing its last manifest line: reading names the file and line; the resumed run cuts
    the torn tail (warning so), keeps every complete line byte for byte, and never appends onto the torn line."""
    expected = {}
    for i in range(4):
        expected[f"s{i}"] = pt_shard(tmp_path / f"s{i}.tar", f"s{i}-", latents(2, 50 + i))
    shards = [str(tmp_path / f"s{i}.tar") for i in range(4)]
    out = tmp_path / "out"
    corpus.score(shards[:3], out, model=model, prompts=PROMPTS[:1], progress=False)
    manifest = out / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    manifest.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # killed 25 bytes into s2's line

    with pytest.warns(UserWarning, match=rf"{re.escape(str(manifest))}, line 3: torn last line"):
        assert [os.path.basename(r["shard"]) for r in corpus.read_manifest(out)] == ["s0.tar", "s1.tar"]

    with pytest.warns(UserWarning, match=rf"{re.escape(str(manifest))}, line 3: dropped a torn last line \(25 bytes"):
        second = corpus.score(shards, out, model=model, prompts=PROMPTS[:1], progress=False)
    assert [os.path.basename(r["shard"]) for r in second.ok] == ["s3.tar"]
    assert [os.path.basename(r["shard"]) for r in second.skipped] == ["s0.tar", "s1.tar", "s2.tar"]

    assert manifest.read_bytes().startswith(b"".join(lines[:2]))  # every complete line kept as it was
    records = _jsonl(manifest)
    assert len(records) == 2 + 4
    ok = [os.path.basename(r["shard"]) for r in records if r["status"] == "ok"]
    assert sorted(ok) == ["s0.tar", "s1.tar", "s3.tar"]  # each scored once; s2's ok line was the torn one
    assert {os.path.basename(r["shard"]) for r in records} == {f"s{i}.tar" for i in range(4)}
    assert sorted(all_keys(out)) == sorted(k for keys in expected.values() for k in keys)
    assert sorted(corpus.select(out, by="clip_cos_0", threshold=-2)) == sorted(all_keys(out))


def test_a_torn_inputs_line_is_dropped_and_a_whole_last_line_without_newline_kept(tmp_path, model):
    pt_shard(tmp_path / "a.tar", "a-", latents(2, 60))
    out = tmp_path / "out"
    corpus.score([tmp_path / "a.tar"], out, model=model, prompts=PROMPTS[:1], progress=False)
    inputs = out / "inputs.jsonl"
    first = inputs.read_bytes()
    inputs.write_bytes(first + b'{"run": "x", "shar')
    manifest = out / "manifest.jsonl"
    manifest.write_bytes(manifest.read_bytes().rstrip(b"\n"))  # a whole record, its newline missing: kept
    with pytest.warns(UserWarning, match=rf"{re.escape(str(inputs))}, line 2: dropped a torn last line"):
        corpus.score([tmp_path / "a.tar"], out, model=model, prompts=PROMPTS[:1], progress=False)
    runs = _jsonl(inputs)
    assert inputs.read_bytes().startswith(first) and len(runs) == 2 and all(r["shards"] for r in runs)
    assert [r["status"] for r in _jsonl(manifest)] == ["ok", "skipped"]


def test_a_corrupt_manifest_line_is_named_by_select_and_refused_by_score(tmp_path, model, capsys):
    """A bad line before the end (e.g. a torn line an older version appended onto): file and line, never a raw
    JSONDecodeError, and the resumed run refuses before any work rather than add to the folder."""
    pt_shard(tmp_path / "a.tar", "a-", latents(2, 70))
    out = tmp_path / "out"
    corpus.score([tmp_path / "a.tar"], out, model=model, prompts=PROMPTS[:1], progress=False)
    manifest = out / "manifest.jsonl"
    good = manifest.read_bytes()
    for bad, why in ((b'{"shard": "a.tar", "sta{"shard": "b.tar"}\n', "not a JSON record"),
                     (b"[1, 2]\n", "not a JSON object"), (b'{"status": "ok"}\n', "a manifest record names no shard")):
        manifest.write_bytes(good + bad + good)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(manifest))}, line 2: {why}.*delete that line"):
            corpus.select(out, by="clip_cos_0", threshold=0)
        code = cli.main(["select", str(out), "--by", "clip_cos_0", "--threshold", "0", "--out", str(tmp_path / "k")])
        _one_error_line(capsys, code, f"{manifest}, line 2: {why}")
        before = manifest.read_bytes()
        with pytest.raises(ValueError, match=rf"^{re.escape(str(manifest))}, line 2: {why}"):
            corpus.score([tmp_path / "a.tar"], out, model=model, prompts=PROMPTS[:1], progress=False)
        assert manifest.read_bytes() == before
