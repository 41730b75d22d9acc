"""fastlclip.corpus integrity: no invented scores, checked keys, inputs and outputs kept apart, exact resume
identity, odd members as bad samples, no writes through links, select's checks, one-line CLI errors."""

import io
import json
import os
import signal
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY
from corpus_shards import latents, npy_bytes, parquet_shard, pt_bytes, pt_shard, write_tar

import fastlclip
from fastlclip import corpus
from fastlclip.corpus import __main__ as cli


@pytest.fixture(scope="module")
def model(seeded_tiny_model):
    return seeded_tiny_model


def score(shards, out, model, **kw):
    kw.setdefault("prompts", ["a cat"])
    return corpus.score(shards, out, model=model, progress=False, **kw)


def keys_of(out, stem) -> list:
    return pq.read_table(os.path.join(out, f"{stem}.parquet")).column("key").to_pylist()


def bad_of(report) -> dict:
    return {b["key"]: b["error"] for b in report.bad_samples}


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err
    return code, err


def one_line(err: str) -> str:
    (line,) = err.strip().splitlines()
    return line


# -- no invented labels --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*weights are random")
def test_latents_that_overflow_the_model_dtype_or_the_model_are_bad_samples_never_labelled(tmp_path, model):
    x = latents(2, 1)
    write_tar(tmp_path / "s.tar", [
        ("k0", {"latent.pt": pt_bytes(x[0])}),
        ("f64", {"latent.pt": pt_bytes(torch.full((4, 16, 16), 1e300, dtype=torch.float64))}),  # inf in float32
        ("f32", {"latent.pt": pt_bytes(x[1] * 1e30)}),  # finite in float32, NaN inside the tower
        ("k1", {"latent.pt": pt_bytes(x[1])}),
    ])
    report = score([tmp_path / "s.tar"], tmp_path / "out", model, classes=["cat", "dog"], safety=True)
    assert report.records[0]["status"] == "ok" and keys_of(tmp_path / "out", "s") == ["k0", "k1"]
    bad = bad_of(report)
    assert "overflows torch.float32" in bad["f64"] and "1e+300" in bad["f64"]
    assert "overflowed inside the model" in bad["f32"] and "e+30" in bad["f32"]
    got = pq.read_table(tmp_path / "out" / "s.parquet").to_pydict()
    with torch.no_grad():  # the kept rows are the model's own values for k0 and k1, in float64
        ref = fastlclip.load(TINY).double()
        ref.load_state_dict(model.state_dict())
        want = (ref.encode_latents(x.double(), space="vae") @ ref.encode_text(["a cat"]).T)[:, 0].numpy()
    np.testing.assert_allclose(got["clip_cos_0"], want, atol=1e-5)

    strict = score([tmp_path / "s.tar"], tmp_path / "strict", model, on_error="raise")
    assert strict.records[0]["status"] == "error" and "'f64'" in strict.records[0]["error"]

    write_tar(tmp_path / "h.tar", [("k0", {"latent.pt": pt_bytes(x[0])}), ("big", {"latent.pt": pt_bytes(x[1] * 7e4)})])
    half = score([tmp_path / "h.tar"], tmp_path / "half", TINY, classes=["cat", "dog"], dtype="float16")
    assert keys_of(tmp_path / "half", "h") == ["k0"] and "overflows torch.float16" in bad_of(half)["big"]


# -- inputs and outputs ----------------------------------------------------------------------------------
def test_an_output_folder_equal_to_inside_or_holding_an_input_is_refused(tmp_path, model, capsys):
    (tmp_path / "in").mkdir()
    parquet_shard(tmp_path / "in" / "a.parquet", "a", latents(2, 2))
    for shard in (tmp_path / "in", tmp_path / "in" / "a.parquet"):  # a folder, a file
        for out in (tmp_path / "in", tmp_path / "in" / "sub", tmp_path, tmp_path / "in" / "a.parquet"):
            if out.name == "sub" and shard.is_file():
                continue  # beside the input file, not inside it: allowed
            with pytest.raises(ValueError, match="outputs and inputs would mix"):
                score([shard], out, model)
    assert sorted(os.listdir(tmp_path / "in")) == ["a.parquet"]
    code, err = run_cli(["score", tmp_path / "in", "--out", tmp_path / "in", "--model", "Latent-ViT-B-8-512",
                         "--prompts", "x"], capsys)
    assert code == 2 and "outputs and inputs would mix" in one_line(err)


def test_an_empty_or_damaged_output_is_not_done(tmp_path, model):
    pt_shard(tmp_path / "a.tar", "a", latents(2, 3))
    out = tmp_path / "out"
    score([tmp_path / "a.tar"], out, model)
    for damage in (b"", b"PAR1 torn"):
        (out / "a.parquet").write_bytes(damage)
        again = score([tmp_path / "a.tar"], out, model)
        assert [r["status"] for r in again.records] == ["ok"] and keys_of(out, "a") == ["a0000", "a0001"]
    assert [r["status"] for r in score([tmp_path / "a.tar"], out, model).records] == ["skipped"]


def test_inputs_that_are_not_regular_files_or_empty_paths_are_refused(tmp_path, model, capsys):
    pt_shard(tmp_path / "a.tar", "a", latents(1, 4))
    (tmp_path / "fifos").mkdir()
    os.mkfifo(tmp_path / "f.tar")
    os.mkfifo(tmp_path / "fifos" / "g.tar")
    def hung(*_):
        raise TimeoutError("the run hung on a FIFO")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # opening a FIFO would hang: fail instead
    try:
        for shards in ([tmp_path / "f.tar"], [tmp_path / "fifos"]):
            with pytest.raises(ValueError, match="not regular files"):
                score(shards, tmp_path / "out", model)
    finally:
        signal.alarm(0)
    with pytest.raises(ValueError, match="non-empty paths"):
        score([tmp_path / "a.tar", ""], tmp_path / "out", model)
    with pytest.raises(ValueError, match="non-empty folder path"):
        score([tmp_path / "a.tar"], "", model)
    code, err = run_cli(["score", tmp_path / "a.tar", "--out", "", "--model", "Latent-ViT-B-8-512", "--prompts", "x"],
                        capsys)
    assert code == 2 and "non-empty folder path" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_the_same_shard_given_twice_is_scored_once(tmp_path, model):
    (tmp_path / "in").mkdir()
    pt_shard(tmp_path / "in" / "a.tar", "a", latents(2, 5))
    os.symlink(tmp_path / "in" / "a.tar", tmp_path / "link.tar")
    report = score([tmp_path / "in" / "a.tar", tmp_path / "in", tmp_path / "link.tar"], tmp_path / "out", model)
    assert [os.path.basename(r["shard"]) for r in report.records] == ["a.tar"] and report.rows == 2


# -- keys ------------------------------------------------------------------------------------------------
def _gnu_tar(path, names_and_data) -> None:
    """A tar whose member names are raw bytes (GNU format), as other tools write them."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in names_and_data:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_keys_are_checked_where_they_are_read(tmp_path, model, capsys):
    x = latents(6, 6)
    _gnu_tar(tmp_path / "t.tar", [
        (b"good.latent.pt", pt_bytes(x[0])),
        (b"evil\nfake-key.latent.pt", pt_bytes(x[1])),  # would write a second line into the keep-list
        (b".latent.pt", pt_bytes(x[2])),  # key ''
        (b"dir/.latent.pt", pt_bytes(x[2])),  # key 'dir/'
        (b"\xff\xfe.latent.pt", pt_bytes(x[3])),  # not UTF-8
        (b"cr\rkey.latent.pt", pt_bytes(x[3])),
        (b"ok2.latent.pt", pt_bytes(x[4])),
    ])
    pq.write_table(pa.table({"key": pa.array(["p0", "p\n1", None, "", "p\u20284"], pa.string()),
                             "latent": pa.array(x[:5].tolist())}), tmp_path / "s.parquet")
    pq.write_table(pa.table({"key": pa.array([b"b0", b"\xff"], pa.binary()), "latent": pa.array(x[:2].tolist())}),
                   tmp_path / "b.parquet")
    out = tmp_path / "out"
    report = score([tmp_path / n for n in ("t.tar", "s.parquet", "b.parquet")], out, model)
    assert [r["status"] for r in report.records] == ["ok"] * 3
    assert keys_of(out, "t") == ["good", "ok2"] and keys_of(out, "s") == ["p0"] and keys_of(out, "b") == ["b0"]
    errors = [b["error"] for b in report.bad_samples]
    assert len(errors) == 5 + 4 + 1
    assert sum("control or line-break" in e for e in errors) == 4 and sum("empty key" in e for e in errors) == 3
    assert sum("not valid UTF-8" in e for e in errors) == 2 and sum("null" in e for e in errors) == 1
    json.dumps(corpus.read_manifest(out))  # the manifest stays valid JSON text
    code, _ = run_cli(["select", out, "--by", "clip_cos_0", "--threshold", "-2", "--out", tmp_path / "k.txt"], capsys)
    assert code == 0 and (tmp_path / "k.txt").read_text().splitlines() == ["b0", "p0", "good", "ok2"]


def test_a_key_in_two_shards_is_never_selected_twice(tmp_path, model, capsys):
    pt_shard(tmp_path / "a.tar", "k", latents(2, 7))
    pt_shard(tmp_path / "b.tar", "k", latents(2, 8))  # the same keys k0000, k0001
    score([tmp_path / "a.tar", tmp_path / "b.tar"], tmp_path / "out", model)
    with pytest.raises(ValueError, match="'k0000' is in both a.parquet and b.parquet"):
        corpus.select(tmp_path / "out", by="clip_cos_0", top_fraction=1.0)
    code, err = run_cli(["select", tmp_path / "out", "--by", "clip_cos_0", "--threshold", "-2", "--out",
                         tmp_path / "k.txt"], capsys)
    assert code == 2 and "is in both" in one_line(err) and not (tmp_path / "k.txt").exists()


# -- select ----------------------------------------------------------------------------------------------
def test_select_names_failed_and_unscored_shards_and_never_writes_into_the_scores(tmp_path, model, capsys,
                                                                                     monkeypatch):
    from fastlclip.corpus import runner

    for i in range(3):
        pt_shard(tmp_path / f"s{i}.tar", f"s{i}-", latents(2, 10 + i))
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    shards = [tmp_path / n for n in ("bad.tar", "s0.tar", "s1.tar", "s2.tar")]
    out = tmp_path / "out"
    real = runner.write_atomic

    def killed_at_s1(table, final):
        if final.name == "s1.parquet":
            raise KeyboardInterrupt
        real(table, final)

    monkeypatch.setattr(runner, "write_atomic", killed_at_s1)
    with pytest.raises(KeyboardInterrupt):
        score(shards, out, model)
    with pytest.raises(corpus.MissingShards) as e:
        corpus.select(out, by="clip_cos_0", threshold=-2)
    assert set(map(os.path.basename, e.value.missing)) == {"bad.tar", "s1.tar", "s2.tar"}
    assert "failed: ShardError" in e.value.missing[str(shards[0])]
    assert "not scored yet" in e.value.missing[str(shards[2])]
    assert corpus.select(out, by="clip_cos_0", threshold=-2, allow_missing=True) == ["s0-0000", "s0-0001"]
    code, err = run_cli(["select", out, "--by", "clip_cos_0", "--threshold", "-2", "--out", tmp_path / "k.txt"], capsys)
    assert code == 1 and "bad.tar (failed" in err and "s2.tar (not scored yet" in err

    before = (out / "s0.parquet").read_bytes()
    for keys_file in (out / "s0.parquet", out / "k.txt", out):
        code, err = run_cli(["select", out, "--by", "clip_cos_0", "--threshold", "0", "--out", keys_file,
                             "--allow-missing"], capsys)
        assert code == 2 and "inside the scores folder" in one_line(err)
    assert (out / "s0.parquet").read_bytes() == before and not (out / "k.txt").exists()
    code, err = run_cli(["select", out, "--by", "key", "--threshold", "0", "--out", tmp_path / "k.txt",
                         "--allow-missing"], capsys)
    assert code == 2 and "not a numeric or boolean column: 'key'" in one_line(err)
    for bad in (dict(top_fraction=True), dict(threshold=True), dict(top_fraction=np.True_)):
        with pytest.raises(ValueError, match="must"):
            corpus.select(out, by="clip_cos_0", allow_missing=True, **bad)


# -- resume identity -------------------------------------------------------------------------------------
def test_resume_refuses_another_member_checkpoint_or_model(tmp_path, model):
    x = latents(2, 20)
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"latent.pt": pt_bytes(x[i]), "latent.npy": npy_bytes(-x[i].numpy())})
                                   for i in range(2)])
    pt_shard(tmp_path / "b.tar", "b", latents(1, 21))
    score([tmp_path / "a.tar"], tmp_path / "m", model, member="latent.pt")
    with pytest.raises(ValueError, match=r"other settings \(member differ\)"):
        score([tmp_path / "a.tar", tmp_path / "b.tar"], tmp_path / "m", model, member="latent.npy")

    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    score([tmp_path / "a.tar"], tmp_path / "c", TINY, pretrained=ckpt)
    other = {k: v + 1 if k == "logit_scale" else v for k, v in model.state_dict().items()}
    torch.save(other, ckpt)  # replaced at the same path
    with pytest.raises(ValueError, match=r"other settings \(weights differ\)"):
        score([tmp_path / "b.tar"], tmp_path / "c", TINY, pretrained=ckpt)

    score([tmp_path / "a.tar"], tmp_path / "o", model)
    changed = fastlclip.load(TINY, ckpt)  # another in-memory model
    with pytest.raises(ValueError, match=r"other settings \(weights differ\)"):
        score([tmp_path / "b.tar"], tmp_path / "o", changed)
    assert [r["status"] for r in score([tmp_path / "b.tar"], tmp_path / "o", model).records] == ["ok"]


def test_a_shard_where_no_sample_has_the_member_is_an_error_not_done(tmp_path, model):
    pt_shard(tmp_path / "a.tar", "a", latents(2, 22))
    wrong = score([tmp_path / "a.tar"], tmp_path / "out", model, member="latent.npy")
    (record,) = wrong.records
    assert record["status"] == "error" and "no sample has a latent.npy member" in record["error"]
    assert not (tmp_path / "out" / "a.parquet").exists()
    fixed = score([tmp_path / "a.tar"], tmp_path / "out", model, member="latent.pt")
    assert [r["status"] for r in fixed.records] == ["ok"] and fixed.rows == 2


# -- odd members and columns -----------------------------------------------------------------------------
def test_one_odd_member_is_a_bad_sample_never_a_failed_shard(tmp_path, model):
    x = latents(3, 23)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on validating sparse tensors
        _gnu_tar(tmp_path / "t.tar", [
            (b"k0.latent.pt", pt_bytes(x[0])),
            (b"sparse.latent.pt", pt_bytes(x[1].to_sparse())),
            (b"meta.latent.pt", pt_bytes(torch.empty(4, 16, 16, device="meta"))),
            (b"\xe9t\xe9.latent.pt", pt_bytes(x[1])),  # latin-1 name
            (b"k1.latent.pt", pt_bytes(x[2])),
        ])
        storage = pa.array([x[0].flatten().tolist(), None, x[2].flatten().tolist()], pa.list_(pa.float32(), 4 * 16 * 16))
        tensors = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), (4, 16, 16)), storage)
        pq.write_table(pa.table({"key": ["p0", "p1", "p2"], "latent": tensors}), tmp_path / "f.parquet")
        report = score([tmp_path / "t.tar", tmp_path / "f.parquet"], tmp_path / "out", model)
    assert [r["status"] for r in report.records] == ["ok", "ok"]
    assert keys_of(tmp_path / "out", "t") == ["k0", "k1"] and keys_of(tmp_path / "out", "f") == ["p0", "p2"]
    bad = bad_of(report)
    assert "sparse" in bad["sparse"] and "meta" in bad["meta"] and bad["p1"] == "null latent"
    assert "not valid UTF-8" in bad["'\\udce9t\\udce9'"]


def test_string_and_bool_latent_columns_are_refused(tmp_path, model):
    pq.write_table(pa.table({"key": ["a"], "latent": pa.array([["1.0"] * 1024])}), tmp_path / "s.parquet")
    pq.write_table(pa.table({"key": ["a"], "latent": pa.array([[True] * 1024])}), tmp_path / "b.parquet")
    report = score([tmp_path / "s.parquet", tmp_path / "b.parquet"], tmp_path / "out", model)
    errors = [r["error"] for r in report.failed]
    assert len(errors) == 2 and "holds string values" in errors[0] and "holds bool values" in errors[1]


# -- links -----------------------------------------------------------------------------------------------
def test_nothing_is_written_through_a_planted_link(tmp_path, model):
    pt_shard(tmp_path / "a.tar", "a", latents(1, 24))
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep me")
    os.symlink(victim, out / "a.parquet.tmp")
    report = score([tmp_path / "a.tar"], out, model)
    assert report.records[0]["status"] == "ok" and victim.read_text() == "keep me"
    assert not (out / "a.parquet").is_symlink() and keys_of(out, "a") == ["a0000"]

    out2 = tmp_path / "out2"
    out2.mkdir()
    os.symlink(victim, out2 / "manifest.jsonl")
    with pytest.raises(ValueError, match="never writes through"):
        score([tmp_path / "a.tar"], out2, model)
    assert victim.read_text() == "keep me"


# -- command lines ---------------------------------------------------------------------------------------
def test_cli_argument_errors_exit_2_and_run_failures_exit_1_in_one_line(tmp_path, capsys, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    pt_shard(tmp_path / "a.tar", "a", latents(1, 25))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    base = ["score", tmp_path / "a.tar", "--model", config, "--classes", "cat", "dog"]
    code, err = run_cli([], capsys)
    assert code == 2 and one_line(err) == ("python -m fastlclip.corpus: error: the following arguments are required: "
                                           "command")
    code, err = run_cli([*base, "--out", tmp_path / "o1", "--templates", "{} and {}"], capsys)
    assert code == 2 and "template '{} and {}'" in one_line(err)
    code, err = run_cli([*base, "--out", tmp_path / "o2", "--engine", "ray", "--device", "gpu:0"], capsys)
    assert code == 2 and "not a torch device" in one_line(err)
    code, err = run_cli([*base, "--out", tmp_path / "o3", "--member", "latent.txt"], capsys)
    assert code == 2 and one_line(err).startswith("python -m fastlclip.corpus score: error: member must name")

    def killed(*args, **kwargs):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(corpus, "run_local", killed)
    code, err = run_cli([*base, "--out", tmp_path / "o4", "--workers", "2"], capsys)
    assert code == 1 and one_line(err) == (
        "python -m fastlclip.corpus score: error: the run failed (BrokenProcessPool: A process in the process pool was "
        "terminated abruptly); finished shards are kept: rerun the same command to resume")

    pytest.importorskip("ray")

    class RayTaskError(Exception):  # as Ray wraps a worker's error: a multi-line message, the cause inside
        cause = ValueError("the checkpoint does not fit the config")

    def ray_fails(*args, **kwargs):
        raise RayTaskError("ray::MapBatches(ShardScorer)() (pid=1, ip=1)\n  File x, line 1\nValueError: ...")

    monkeypatch.setattr(corpus, "run_ray", ray_fails)
    code, err = run_cli([*base, "--out", tmp_path / "o5", "--engine", "ray"], capsys)
    assert code == 1 and "ValueError: the checkpoint does not fit the config" in one_line(err)


def test_bench_corpus_checks_json_and_pretrained_before_any_work(tmp_path, capsys):
    from bench import corpus as bench_corpus

    for argv, pattern in ((["--json", str(tmp_path)], "is a folder"), (["--json", ""], "--json"),
                          (["--json", str(tmp_path / "f.txt" / "x.json")], "--json"),
                          (["--pretrained", str(tmp_path / "missing.pt")], "not found")):
        if "f.txt" in argv[-1]:
            (tmp_path / "f.txt").write_text("a file, not a folder")
        with pytest.raises(SystemExit) as e:
            bench_corpus.main(["--no-ray", "--shards", "1", *argv])
        captured = capsys.readouterr()
        assert e.value.code == 2 and pattern in one_line(captured.err) and "SMOKE" not in captured.out


def test_select_names_an_empty_or_damaged_output_instead_of_reading_it(tmp_path, model):
    for name in ("a", "b"):
        pt_shard(tmp_path / f"{name}.tar", name, latents(2, 26))
    out = tmp_path / "out"
    score([tmp_path / "a.tar", tmp_path / "b.tar"], out, model)
    (out / "b.parquet").write_bytes(b"")  # a shard's output emptied
    (out / "stray.parquet").write_bytes(b"PAR1 torn")  # a file no run wrote
    with pytest.raises(corpus.MissingShards) as e:
        corpus.select(out, by="clip_cos_0", threshold=-2)
    assert e.value.missing == {str(tmp_path / "b.tar"): "b.parquet is empty, unreadable or a link",
                               str(out / "stray.parquet"): "empty, unreadable or a link"}
    assert corpus.select(out, by="clip_cos_0", threshold=-2, allow_missing=True) == ["a0000", "a0001"]


# -- independent references for the readers and select (mutation testing found these gaps) ----------------
def test_parquet_reader_keys_batches_and_column_types(tmp_path):
    from fastlclip.corpus.readers import ShardError, read_shard

    def read(table, name="s.parquet"):
        pq.write_table(table, tmp_path / name)
        return list(read_shard(tmp_path / name))

    rows = np.arange(1030 * 3, dtype=np.float32).reshape(1030, 3)
    got = read(pa.table({"latent": pa.array(rows.tolist(), pa.list_(pa.float32()))}))  # no key column, 2 batches
    assert [s.key for s in got] == [f"s/{i}" for i in range(1030)]
    assert all(s.latent.dtype == torch.float32 and s.latent.tolist() == r.tolist() for s, r in zip(got, rows))

    got = read(pa.table({"key": pa.array([7, 8], pa.int64()), "latent": pa.array(rows[:2].tolist(), pa.large_list(pa.float64()))}))
    assert [(s.key, s.latent.dtype) for s in got] == [("7", torch.float64), ("8", torch.float64)]
    got = read(pa.table({"key": pa.array([b"a", b"b"], pa.large_binary()),
                         "latent": pa.array(rows[:2].tolist(), pa.list_(pa.float16(), 3))}))
    assert [s.key for s in got] == ["a", "b"] and got[0].latent.tolist() == [0, 1, 2]
    with pytest.raises(ShardError, match="keys must be text"):
        read(pa.table({"key": pa.array([1.5]), "latent": pa.array(rows[:1].tolist())}))
    with pytest.raises(ShardError, match="holds string values"):
        read(pa.table({"latent": pa.array([["1"]], pa.large_list(pa.string()))}))

    npy = [npy_bytes(rows[0]), None, b"garbage", npy_bytes(np.array(["x"]))]
    got = read(pa.table({"key": ["a", "b", "c", "d"], "latent": pa.array(npy, pa.binary())}))
    assert got[0].latent.tolist() == rows[0].tolist() and got[0].error is None
    assert got[1].error == "null latent" and "unreadable npy" in got[2].error and "not a number type" in got[3].error
    got = read(pa.table({"key": ["a", "b", "c", None], "latent": pa.array([[1.0, 2.0], [1.0, 2.0, 3.0], None, [1.0]])}))
    assert got[0].latent.tolist() == [1.0, 2.0] and got[1].latent.tolist() == [1.0, 2.0, 3.0]  # ragged
    assert got[2].error == "null latent" and got[3].error == "row 3: key is null, not text" and got[3].key == "None"
    got = read(pa.table({"key": ["a", "b"], "latent": pa.array([[1.0, None], [1.0, 2.0]])}))
    assert torch.isnan(got[0].latent[1]) and got[1].latent.tolist() == [1.0, 2.0]  # a null inside: NaN, a bad sample
    nulls = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), (1, 3)),
                                           pa.array([None, None], pa.list_(pa.float32(), 3)))
    assert [s.error for s in read(pa.table({"key": ["a", "b"], "latent": nulls}))] == ["null latent"] * 2


def test_select_scales_by_the_sign_and_breaks_ties_in_order(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"key": list("abcde"), "s": pa.array([0.1, 0.9, 0.5, 0.5, 0.5], pa.float32()),
                             "n": pa.array([1, 2, 3, 4, 5], pa.int64())}), out / "x.parquet")
    assert corpus.select(out, by="s", threshold=0.2) == ["b", "c", "d", "e"]
    assert corpus.select(out, by="-s", threshold=-0.3) == ["a"]
    assert corpus.select(out, by="-s", threshold=-0.5) == ["a", "c", "d", "e"]
    assert corpus.select(out, by="s", top_fraction=0.6) == ["b", "c", "d"]  # 3 rows: 0.9 and the first two 0.5s
    assert corpus.select(out, by="s", top_fraction=0.4) == ["b", "c"]
    assert corpus.select(out, by="n", threshold=4) == ["d", "e"]
    for bad in (dict(by="s", top_fraction=0), dict(by="", threshold=0), dict(by="-", threshold=0),
                dict(by=3, threshold=0), dict(by="s", threshold=float("nan"))):
        with pytest.raises(ValueError):
            corpus.select(out, **bad)


def test_tar_reader_directories_gzip_silent_truncation_and_pickled_npy(tmp_path):
    import gzip

    from fastlclip.corpus.readers import ShardError, read_shard

    x = np.arange(6, dtype=np.float32)
    with tarfile.open(tmp_path / "d.tar", "w") as tf:  # a directory entry first, then members
        tf.addfile(_dir_info("d"))
        for key in ("d/a", "d/b"):
            info = tarfile.TarInfo(f"{key}.latent.pth")
            data = pt_bytes(torch.from_numpy(x))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(read_shard(tmp_path / "d.tar", member="latent.pth"))
    assert [s.key for s in got] == ["d/a", "d/b"] and got[1].latent.tolist() == x.tolist()

    (tmp_path / "z.tar.gz").write_bytes(gzip.compress((tmp_path / "d.tar").read_bytes()))
    assert [s.key for s in read_shard(tmp_path / "z.tar.gz", member="latent.pth")] == ["d/a", "d/b"]

    data = (tmp_path / "d.tar").read_bytes()
    first = 512 + 512 * -(-len(pt_bytes(torch.from_numpy(x))) // 512)
    (tmp_path / "cut.tar").write_bytes(data[:512 + first])  # the directory and one whole member, no end marker
    with pytest.raises(ShardError, match="truncated tar"):
        list(read_shard(tmp_path / "cut.tar", member="latent.pth"))

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    payload = np.empty(1, dtype=object)
    payload[0] = _Exec(f"open({str(marker)!r}, 'w').write('x')")
    np.save(buf, payload, allow_pickle=True)
    write_tar(tmp_path / "p.tar", [("k", {"latent.npy": buf.getvalue()})])
    (s,) = read_shard(tmp_path / "p.tar")
    assert s.latent is None and "allow_pickle" in s.error and not marker.exists()


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_a_shard_of_only_bad_samples_writes_typed_empty_columns_and_its_settings(tmp_path, model):
    from fastlclip.corpus import writer

    nan = torch.full((4, 16, 16), float("nan"))
    write_tar(tmp_path / "a.tar", [("k0", {"latent.pt": pt_bytes(nan)})])
    old = os.umask(0o022)
    try:
        report = score([tmp_path / "a.tar"], tmp_path / "out", model, classes=["cat", "dog"], safety=True,
                       embeddings=True)
    finally:
        os.umask(old)
    assert report.records[0]["status"] == "ok" and report.rows == 0
    table = pq.read_table(tmp_path / "out" / "a.parquet")
    types = {f.name: str(f.type) for f in table.schema}
    assert types["key"] == "string" and types["clip_cos_0"] == "float" and types["prob_cat"] == "float"
    assert types["label"] == "string" and types["safety_flag"] == "bool" and types["embedding"].endswith("halffloat>[32]")
    meta = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items() if k.startswith(b"fastlclip.")}
    assert meta["fastlclip.settings"] == json.loads((tmp_path / "out" / "run.json").read_text())
    assert meta["fastlclip.shard"] == str(tmp_path / "a.tar") and meta["fastlclip.bad"][0]["key"] == "k0"
    for name in ("a.parquet", "manifest.jsonl", "run.json", "inputs.jsonl"):
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o644, name
    victim = tmp_path / "victim"
    victim.write_text("")
    os.symlink(victim, tmp_path / "link.jsonl")
    with pytest.raises(OSError):
        writer._append(tmp_path / "link.jsonl", {"a": 1})  # O_NOFOLLOW, even without check_folder first
    assert victim.read_text() == ""


# -- gaps found by mutation testing: writer ---------------------------------------------------------------
def test_build_table_columns_types_and_empty_shards_against_hand_written_tables():
    from fastlclip.corpus.writer import build_table

    names = ["clip_cos_0", "label", "safety_flag", "embedding", "latent_flat"]
    columns = {"clip_cos_0": [np.array([0.5], np.float32), np.array([-0.25], np.float64)],  # stored as float32
               "label": [np.array(["cat"], object), np.array(["dog"], object)],
               "safety_flag": [np.array([True]), np.array([False])],
               "embedding": [np.array([[1.0, 0.5]], np.float16), np.array([[-2.0, 0.25]], np.float16)],
               "latent_flat": [np.array([[1.5, 2.0, -3.0]], np.float16), np.array([[0.0, 4.0, 8.0]], np.float16)]}
    table = build_table(["a", "b"], columns, names, 2, {"shard": "s.tar", "bad": [{"key": "x"}]})
    assert [str(f.type) for f in table.schema] == ["string", "float", "string", "bool",
                                                   "fixed_size_list<item: halffloat>[2]",
                                                   "fixed_size_list<item: halffloat>[3]"]
    assert table.column_names == ["key", *names]
    assert table.to_pylist() == [
        {"key": "a", "clip_cos_0": 0.5, "label": "cat", "safety_flag": True, "embedding": [1.0, 0.5],
         "latent_flat": [1.5, 2.0, -3.0]},
        {"key": "b", "clip_cos_0": -0.25, "label": "dog", "safety_flag": False, "embedding": [-2.0, 0.25],
         "latent_flat": [0.0, 4.0, 8.0]}]
    assert table.schema.metadata == {b"fastlclip.shard": b'"s.tar"', b"fastlclip.bad": b'[{"key": "x"}]'}

    empty = build_table([], {}, names, 2, {})  # a shard whose every sample was bad
    assert empty.num_rows == 0 and [str(f.type) for f in empty.schema] == [
        "string", "float", "string", "bool", "fixed_size_list<item: halffloat>[2]", "float"]


def test_readable_output_wants_a_regular_scored_parquet_file(tmp_path):
    from fastlclip.corpus.writer import is_done, readable_output

    out = tmp_path / "out"
    out.mkdir()
    table = pa.table({"key": ["a"]})
    pq.write_table(table, out / "plain.parquet")  # a Parquet file no scoring run wrote: no fastlclip.shard
    assert not is_done(out, "in/plain.tar") and readable_output(out / "plain.parquet", scored=False)
    scored = table.replace_schema_metadata({"fastlclip.shard": '"in/good.tar"'})
    pq.write_table(scored, tmp_path / "good.parquet")
    os.symlink(tmp_path / "good.parquet", out / "good.parquet")  # a link to a good output is never done
    assert readable_output(tmp_path / "good.parquet") and not is_done(out, "in/good.tar")
    assert not readable_output(out / "good.parquet", scored=False)
    (out / "dir.parquet").mkdir()
    assert not is_done(out, "dir.tar") and not is_done(out, "missing.tar")


def test_write_atomic_reports_its_own_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from fastlclip.corpus import writer

    final = tmp_path / "a.parquet"

    def refuse(path):
        raise PermissionError(13, "refused", str(path))

    monkeypatch.setattr(writer, "_new_file", refuse)  # fails before the temporary file exists
    with pytest.raises(PermissionError, match="refused"):
        writer.write_atomic(pa.table({"key": ["a"]}), final)
    monkeypatch.undo()
    final.write_bytes(b"old")
    with pytest.raises(Exception):
        writer.write_atomic("not a table", final)  # fails mid-write: the old output stays, no .tmp is left
    assert final.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.parquet"]


def test_a_link_planted_after_the_check_is_never_followed(tmp_path, monkeypatch):
    from fastlclip.corpus import writer

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "a.parquet.tmp")
    monkeypatch.setattr(writer.os.path, "lexists", lambda p: False)  # the link appears between check and open
    with pytest.raises(FileExistsError):
        writer.write_atomic(pa.table({"key": ["a"]}), tmp_path / "a.parquet")
    assert victim.read_text() == "keep me"


def test_append_never_blocks_on_a_fifo_and_writes_any_value_as_text(tmp_path):
    import errno

    from fastlclip.corpus import writer

    fifo = tmp_path / "manifest.jsonl"
    os.mkfifo(fifo)

    def hung(*_):
        raise TimeoutError("blocked opening a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(OSError) as e:  # no reader: O_NONBLOCK makes the open fail at once (ENXIO)
            writer.append_manifest(tmp_path, {"shard": "a.tar"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert e.value.errno == errno.ENXIO

    out = tmp_path / "out"
    out.mkdir()
    writer.append_manifest(out, {"shard": tmp_path / "a.tar", "rows": 2})
    writer.append_manifest(out, {"shard": "b.tar", "rows": 0})
    assert (out / "manifest.jsonl").read_text() == (f'{{"shard": "{tmp_path / "a.tar"}", "rows": 2}}\n'
                                                    '{"shard": "b.tar", "rows": 0}\n')


def test_expected_shards_takes_inputs_first_then_manifest_only_shards(tmp_path):
    from fastlclip.corpus import writer

    writer.append_manifest(tmp_path, {"shard": "old/c.tar", "status": "ok"})  # before inputs.jsonl existed
    writer.append_manifest(tmp_path, {"shard": "other/a.tar", "status": "ok"})
    writer.record_inputs(tmp_path, "r1", ["in/a.tar", "in/b.parquet"])
    assert json.loads((tmp_path / "inputs.jsonl").read_text()) == {"run": "r1", "shards": ["in/a.tar", "in/b.parquet"]}
    with open(tmp_path / "inputs.jsonl", "a") as f:
        f.write('{"run": "r0"}\n')  # a line without shards
    assert writer.expected_shards(tmp_path) == {"a": "in/a.tar", "b": "in/b.parquet", "c": "old/c.tar"}


def test_run_file_is_replaced_without_outputs_and_its_refusal_names_keys_on_either_side(tmp_path):
    from fastlclip.corpus import writer

    writer.check_run_file(tmp_path, {"a": 1, "b": 2})
    writer.check_run_file(tmp_path, {"a": 1, "c": 3})  # no readable output yet: nothing to mix, replaced
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1, "c": 3}
    scored = pa.table({"key": ["k"]}).replace_schema_metadata({"fastlclip.shard": '"s.tar"'})
    pq.write_table(scored, tmp_path / "s.parquet")
    writer.check_run_file(tmp_path, {"a": 1, "c": 3})  # the same settings: resumes
    with pytest.raises(ValueError, match=r"\(a, b, c differ\)"):
        writer.check_run_file(tmp_path, {"a": 2, "b": 2})
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1, "c": 3}


# -- gaps found by mutation testing: readers --------------------------------------------------------------
def test_key_problem_and_split_key_against_hand_written_answers():
    from fastlclip.corpus.readers import key_problem, split_key

    assert [key_problem(k) for k in ("a", "dir/a b", "é.x", "a\u00a0b")] == [None] * 4
    assert key_problem(None) == "key is null, not text" and key_problem(5) == "key is int, not text"
    assert key_problem("") == key_problem("d/") == "empty key (a tar member's key is its file name up to the first dot)"
    assert key_problem("a\ud800") == "key is not valid UTF-8"
    for c in ("\n", "\r", "\x00", "\x7f", "\u2028", "\u2029"):  # Cc, Zl, Zp
        assert key_problem(f"a{c}b") == f"key holds the control or line-break character {c!r}"
    # webdataset: the key is the path up to the first dot of the basename (dots in folders stay in the key)
    assert split_key("shards.v1/000123.latent.pt") == ("shards.v1/000123", "latent.pt")
    assert split_key("a.b/c/README") == ("a.b/c/README", "")


def test_tar_reader_members_in_order_exact_messages_and_row_numbers(tmp_path):
    from fastlclip.corpus.readers import read_shard

    a, b = np.full(2, 1.0, np.float32), np.full(2, 2.0, np.float32)
    write_tar(tmp_path / "m.tar", [("both", {"latent.pt": pt_bytes(torch.from_numpy(a)), "latent.npy": npy_bytes(b)}),
                                   ("pt", {"latent.pt": pt_bytes(torch.from_numpy(a))}),
                                   ("none", {"txt": b"t", "cls": b"1"}),
                                   ("x\ny", {"latent.npy": npy_bytes(b)})])
    got = list(read_shard(tmp_path / "m.tar", member=["latent.npy", "latent.pt"]))  # tried in the order given
    assert [(s.key, s.latent.tolist() if s.latent is not None else None) for s in got[:2]] == [
        ("both", [2.0, 2.0]), ("pt", [1.0, 1.0])]
    assert got[2].error == "no latent.npy or latent.pt member (has: cls, txt)" and got[2].missing
    assert got[3].key == "'x\\ny'" and got[3].error == (
        "member 'x\\ny.latent.npy': key holds the control or line-break character '\\n'")
    assert [s.latent.tolist() for s in list(read_shard(tmp_path / "m.tar"))[:2]] == [[1.0, 1.0], [1.0, 1.0]]

    n = 2 * 1024 + 60  # three Parquet batches of 1024 rows: keys count rows across batches
    keys = [f"k{i}" for i in range(n)]
    keys[2100] = "bad\x00key"
    pq.write_table(pa.table({"key": keys, "latent": pa.array([[float(i)] for i in range(n)], pa.list_(pa.float32(), 1))}),
                   tmp_path / "r.parquet")
    got = list(read_shard(tmp_path / "r.parquet"))
    assert got[2100].error == "row 2100: key holds the control or line-break character '\\x00'"
    assert got[-1].key == f"k{n - 1}" and got[-1].latent.tolist() == [float(n - 1)]
    pq.write_table(pa.table({"latent": pa.array([[0.0]] * n, pa.list_(pa.float32()))}), tmp_path / "nokey.parquet")
    assert [s.key for s in read_shard(tmp_path / "nokey.parquet")][-2:] == [f"nokey/{n - 2}", f"nokey/{n - 1}"]


def test_parquet_lists_come_back_in_their_stored_dtype_and_ragged_rows_one_by_one(tmp_path):
    from fastlclip.corpus.readers import read_shard

    def read(values, type_):
        pq.write_table(pa.table({"latent": pa.array(values, type_)}), tmp_path / "s.parquet")
        return [s.latent for s in read_shard(tmp_path / "s.parquet")]

    got = read([[0.5, 1.5, -2.0], [3.0, 4.0, 5.0]], pa.list_(pa.float16(), 3))  # fixed-size lists: dense
    assert [(t.dtype, t.tolist()) for t in got] == [(torch.float16, [0.5, 1.5, -2.0]), (torch.float16, [3.0, 4.0, 5.0])]
    got = read([[[1.0, 2.0]], [[3.0, 4.0]]], pa.list_(pa.list_(pa.float32(), 2), 1))
    assert [(t.dtype, t.shape) for t in got] == [(torch.float32, (1, 2))] * 2 and got[1].tolist() == [[3.0, 4.0]]
    got = read([[1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32()))  # ragged, no nulls: one array per row
    assert [t.tolist() for t in got] == [[1.0, 2.0], [1.0, 2.0, 3.0]]
    assert read([], pa.list_(pa.float32())) == []


def test_image_members_decode_to_uint8_rgb_and_bad_ones_are_bad_samples(tmp_path):
    from PIL import Image

    from fastlclip.corpus.readers import read_shard

    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13  # (H, W, RGB)
    gray = np.array([[0, 128, 255]], np.uint8)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    write_tar(tmp_path / "i.tar", [("rgb", {"png": png(rgb)}), ("gray", {"png": png(gray)}), ("bad", {"png": b"no image"})])
    got = list(read_shard(tmp_path / "i.tar", member="png"))
    assert got[0].latent.dtype == torch.uint8 and got[0].latent.tolist() == rgb.transpose(2, 0, 1).tolist()
    assert got[0].latent.is_contiguous() and got[1].latent.tolist() == [gray.tolist()] * 3
    assert got[2].latent is None and got[2].error.startswith("unreadable png image: UnidentifiedImageError: ")
    from fastlclip.corpus.readers import decode_member

    assert decode_member(png(gray), "frame.PNG").tolist() == [gray.tolist()] * 3  # the last suffix, any case


def test_decode_member_spellings_and_a_tensor_saved_on_a_gpu(monkeypatch):
    from fastlclip.corpus.readers import decode_member

    t = torch.tensor([1.5, -2.0])
    for ext in ("pt", "pth", "latent.pt", "x.pth"):
        assert decode_member(pt_bytes(t), ext).tolist() == [1.5, -2.0], ext
    for ext in ("npy", "emb.npy"):
        assert decode_member(npy_bytes(t.numpy()), ext).tolist() == [1.5, -2.0], ext
    for ext in ("latent.txt", "ptx", "latent.NPY"):
        with pytest.raises(ValueError, match="neither .pt/.pth nor .npy"):
            decode_member(pt_bytes(t), ext)
    with monkeypatch.context() as m:  # written by torch.save on a GPU machine: its storages say cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        on_gpu = pt_bytes(t)
    got = decode_member(on_gpu, "latent.pt")  # read on the CPU wherever it was saved
    assert got.device.type == "cpu" and got.tolist() == [1.5, -2.0]


def test_a_tar_whose_members_are_followed_by_garbage_is_truncated(tmp_path):
    from fastlclip.corpus.readers import ShardError, read_shard

    write_tar(tmp_path / "a.tar", [("k", {"latent.npy": npy_bytes(np.zeros(2, np.float32))})])
    data = (tmp_path / "a.tar").read_bytes()
    end = 512 + 512 * -(-len(npy_bytes(np.zeros(2, np.float32))) // 512)  # the header and the data's blocks
    assert [s.key for s in read_shard(tmp_path / "a.tar")] == ["k"]
    for tail in (b"\xff" * 2048, bytes(512) + b"\xff" * 1536):  # no end marker: a header of garbage, half a marker
        (tmp_path / "g.tar").write_bytes(data[:end] + tail)
        with pytest.raises(ShardError, match="truncated tar"):
            list(read_shard(tmp_path / "g.tar"))


# -- gaps found by mutation testing: runner ---------------------------------------------------------------
def test_check_sample_shapes_dtypes_and_finiteness_against_hand_written_answers():
    from fastlclip.corpus.readers import Sample
    from fastlclip.corpus.runner import BadSample, check_sample

    shape = (2, 2, 2)
    x = torch.arange(8, dtype=torch.float32).reshape(shape)

    def bad(latent, dtype=None, error=None):
        with pytest.raises(BadSample) as e:
            check_sample(Sample("k", latent, error), shape, dtype)
        return str(e.value)

    assert check_sample(Sample("k", x), shape).tolist() == x.tolist()
    assert check_sample(Sample("k", x[None]), shape).tolist() == x.tolist()  # (1, C, H, W)
    assert check_sample(Sample("k", x.reshape(-1)), shape).tolist() == x.tolist()  # flat, as a Parquet list
    half = check_sample(Sample("k", x.double()), shape, torch.float16)
    assert half.dtype == torch.float16 and half.tolist() == x.tolist()
    assert check_sample(Sample("k", x.double()), shape).dtype == torch.float64  # no dtype: as stored
    assert bad(None, error="unreadable npy") == "unreadable npy"
    assert bad(x.to_sparse()).startswith("a torch.sparse_coo tensor on cpu")
    assert bad(torch.zeros(shape, device="meta")).startswith("a torch.strided tensor on meta")
    assert bad(torch.zeros(2, 2, 2, 2)) == "shape (2, 2, 2, 2), the model takes (2, 2, 2)"
    assert bad(torch.zeros(1, 8)) == "shape (1, 8), the model takes (2, 2, 2)"
    assert bad(torch.zeros(7)) == "shape (7,), the model takes (2, 2, 2)"
    assert bad(torch.zeros(shape, dtype=torch.int32)) == "dtype torch.int32, latents must be floating point"
    for v in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 1, 1] = v
        assert bad(y) == "NaN or Inf in the latent"
    big = x.clone()
    big[0, 0, 0] = -7e4
    assert bad(big, torch.float16) == "overflows torch.float16 (max |x| = 7e+04), the model's dtype"
    assert check_sample(Sample("k", big), shape, torch.bfloat16).dtype == torch.bfloat16


def test_finite_rows_and_progress_lines_against_hand_written_answers():
    from fastlclip.corpus.runner import finite_rows, progress_line

    cols = {"a": np.array([1.0, np.nan, 2.0, 3.0], np.float32), "label": np.array(["x"] * 4, object),
            "flag": np.array([True] * 4), "n": np.array([1, 2, 3, 4]),
            "emb": np.array([[1, 2], [0, 0], [np.inf, 0], [0, 0]], np.float16)}
    assert finite_rows(cols).tolist() == [True, False, False, True]
    assert finite_rows({"label": np.array(["x"], object), "flag": np.array([True])}) is None

    ok = {"shard": "/data/a.tar", "status": "ok", "rows": 10, "seconds": 4.0, "bad": [{"key": "k"}], "error": None}
    assert progress_line(ok, 3, 7) == "[fastlclip.corpus] 3/7 a.tar: ok, 10 rows, 1 bad samples skipped in 4.00 s (2 latents/s)"
    assert progress_line({**ok, "bad": [], "seconds": 0.0}, 1, 1) == "[fastlclip.corpus] 1/1 a.tar: ok, 10 rows in 0.00 s (inf latents/s)"
    assert progress_line({**ok, "status": "error", "error": "ShardError: cut"}, 2, 2) == "[fastlclip.corpus] 2/2 a.tar: error: ShardError: cut"
    assert progress_line({**ok, "status": "skipped"}, 1, 2) == "[fastlclip.corpus] 1/2 a.tar: skipped (output exists)"


# -- gaps found by mutation testing: scoring --------------------------------------------------------------
def test_check_prompts_and_columns_against_hand_written_answers(model):
    from fastlclip.corpus.scoring import ScoreSpec, check_prompts

    assert check_prompts(None, "prompts") == [] and check_prompts("a cat", "prompts") == ["a cat"]
    assert check_prompts(("a", "b"), "classes") == ["a", "b"]
    for bad in ([""], [" "], ["a", 3], [None]):
        with pytest.raises(ValueError, match="classes must be non-empty strings"):
            check_prompts(bad, "classes")
    with pytest.raises(ValueError, match=r"prompts repeat \['a', 'b'\]; each must be unique"):
        check_prompts(["b", "a", "c", "a", "b"], "prompts")

    scorer = ScoreSpec(model=model, prompts=["x", "y"], classes=["cat", "dog"], safety=True, embeddings=True).build("cpu")
    cats = [f"safety_{c}" for c in scorer.checker.categories]
    assert scorer.columns() == ["clip_cos_0", "clip_cos_1", "prob_cat", "prob_dog", "label", *cats, "safety_flag",
                                "embedding"]
    assert scorer.embed_dim == 32 and scorer.shape == (4, 16, 16) and scorer.model is model  # same device and dtype
    assert ScoreSpec(model=model, safety=True).build("cpu").columns() == [*cats, "safety_flag"]


def test_identity_and_fingerprint_against_hashlib(tmp_path, model, monkeypatch):
    import hashlib

    from fastlclip.corpus.scoring import ScoreSpec, fingerprint

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    spec = ScoreSpec(model="cfg-name", pretrained="w.pt", prompts=["p"], templates=("t {}",))
    assert spec.identity() == {"model": "cfg-name", "pretrained": str(ckpt), "weights": None, "prompts": ["p"],
                               "classes": [], "templates": None, "safety": False, "embeddings": False,
                               "space": "vae", "dtype": "float32"}
    other = ScoreSpec(model=model, pretrained="hf-hub:org/repo", classes=["c"], templates=("t {}",), safety=True)
    got = other.identity()
    assert got["model"] == "<LatentCLIP object>" and got["pretrained"] == "hf-hub:org/repo"
    assert got["templates"] == ["t {}"] and got["safety"] is True

    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    config = tmp_path / "c.json"
    config.write_text("{}")
    assert fingerprint(str(config), str(ckpt)) == {"config_sha256": sha(b"{}"), "pretrained_sha256": sha(b"weights")}
    assert fingerprint("cfg-name", "hf-hub:org/repo") == {} and fingerprint("cfg-name", None) == {}
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.bin").write_bytes(b"B")
    (folder / "sub" / "a.bin").write_bytes(b"A")
    want = sha(f"b.bin:{sha(b'B')};sub/a.bin:{sha(b'A')};".encode())
    assert fingerprint("cfg-name", str(folder)) == {"pretrained_sha256": want}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    digest = fingerprint(model, None)["model_sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, replaced next
        twin = fastlclip.load(TINY)
    twin.load_state_dict(state)
    assert fingerprint(twin, None) == {"model_sha256": digest}  # another object, the same weights
    with torch.no_grad():
        twin.logit_scale += 1
    assert fingerprint(twin, None)["model_sha256"] != digest
    import copy

    assert fingerprint(copy.deepcopy(model).half(), None)["model_sha256"] != digest  # the same weights in fp16


def test_default_device_is_local_ranks_gpu(monkeypatch):
    from fastlclip.corpus.scoring import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == "cuda:1"


def test_scorer_builds_the_named_checkpoint_in_the_asked_dtype_and_backend(tmp_path):
    """A config and checkpoint by path: the scores are the checkpoint's (not the seeded random weights), and the
    model is built in the spec's dtype and backend."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from fastlclip.corpus.scoring import ScoreSpec

    config, ckpt = tmp_path / "tiny.json", tmp_path / "w.safetensors"
    config.write_text(json.dumps(TINY))
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, saved as the checkpoint
        trained = fastlclip.load(TINY)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, ckpt)
    x = latents(3, 11)
    scorer = ScoreSpec(model=str(config), pretrained=str(ckpt), prompts=["a cat"]).build("cpu")
    with torch.no_grad():
        feats = trained.encode_latents(x, space="vae")  # the spec's default space: raw VAE samples
        want = F.normalize(feats, dim=-1) @ F.normalize(trained.encode_text(["a cat"]), dim=-1).T
    np.testing.assert_allclose(scorer(x)["clip_cos_0"], want[:, 0].numpy(), rtol=0, atol=1e-5)
    fast = ScoreSpec(model=str(config), pretrained=str(ckpt), dtype="bfloat16", backend="triton").build("cpu")
    assert fast.model.dtype == torch.bfloat16 and fast.model.backend == "triton"
    for k, v in trained.state_dict().items():
        assert torch.equal(fast.model.state_dict()[k], v.to(torch.bfloat16)), k


def test_score_hands_each_engine_its_shards_workers_and_scorer(tmp_path, model, monkeypatch):
    """Which engine runs what (recorders stand in for the engines): one local process gets the scorer built here;
    several local workers and Ray actors build their own; Ray shares all shards itself, local runs take this
    rank's share; a rank without shards runs nothing."""
    from conftest import record_engines
    from fastlclip.corpus.scoring import Scorer, ScoreSpec

    calls = record_engines(monkeypatch, corpus)
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    pt_shard(a, "a", latents(1, 1))
    pt_shard(b, "b", latents(1, 2))

    def run(out, shards=(a, b), **kw):
        score(list(shards), tmp_path / out, model, **kw)
        return calls[-1]

    one = run("one")
    assert (one["engine"], one["mine"], one["workers"]) == ("local", [str(a), str(b)], 1)
    assert isinstance(one["kw"]["scorer"], Scorer) and one["kw"]["scorer"].model is model
    assert (one["opts"].batch_size, one["opts"].on_error, one["opts"].column) == (256, "skip", "latent")
    assert isinstance(one["spec"], ScoreSpec) and one["spec"].model is model and callable(one["report"])
    two = run("two", workers=2, batch_size=5, on_error="raise", column="z", device="cpu", backend="triton")
    assert (two["engine"], two["workers"], two["kw"]) == ("local", 2, {})  # spawned workers build their own
    assert isinstance(two["spec"], ScoreSpec) and (two["spec"].device, two["spec"].backend) == ("cpu", "triton")
    assert callable(two["report"]) and two["spec"].prompts == ["a cat"]
    assert (two["opts"].batch_size, two["opts"].on_error, two["opts"].column) == (5, "raise", "z")
    lone = run("lone", shards=(a,), workers=2)
    assert lone["workers"] == 2 and isinstance(lone["kw"]["scorer"], Scorer)  # one shard: this process scores it
    pytest.importorskip("ray")
    ray = run("ray", engine="ray", workers=3)
    assert (ray["engine"], ray["mine"], ray["workers"], ray["kw"]) == ("ray", [str(a), str(b)], 3, {})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run("rank1")["mine"] == [str(b)]
    assert run("rank1-ray", engine="ray")["mine"] == [str(a), str(b)]
    count = len(calls)
    assert score([a], tmp_path / "none", model).ok == [] and len(calls) == count  # no shard for rank 1


# -- gaps found by mutation testing: engines --------------------------------------------------------------
def test_rank_split_against_hand_written_shares():
    from fastlclip.corpus.engines import rank_split

    shards = ["c", "a", "b", "d", "e"]
    assert rank_split(shards, {}) == shards  # no RANK / WORLD_SIZE: every shard, in the order given
    assert rank_split(shards, {"WORLD_SIZE": "3", "RANK": "1"}) == ["b", "e"]
    assert rank_split(shards, {"WORLD_SIZE": "3", "RANK": "2"}) == ["c"]
    assert rank_split(shards, {"WORLD_SIZE": "2"}) == ["a", "c", "e"]  # RANK defaults to 0
    assert rank_split(shards, {"RANK": "0"}) == ["a", "b", "c", "d", "e"]  # WORLD_SIZE defaults to 1
    with pytest.raises(ValueError, match=r"RANK='x' and WORLD_SIZE='2' must be integers"):
        rank_split(shards, {"WORLD_SIZE": "2", "RANK": "x"})
    for env in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "2", "RANK": "-1"}, {"WORLD_SIZE": "0", "RANK": "0"},
                {"RANK": "1"}):
        with pytest.raises(ValueError, match=r"must lie in \[0, WORLD_SIZE="):
            rank_split(shards, env)


# -- gaps found by mutation testing: the package's argument checks -----------------------------------------
def test_expand_inputs_against_hand_written_lists(tmp_path):
    d = tmp_path / "d"
    (d / "x.tar").mkdir(parents=True)  # a folder named like a shard is not a shard
    for name in ("b.tar", "a.parquet", "c.TGZ", "notes.txt"):
        (d / name).write_bytes(b"")
    assert corpus.expand_inputs(d) == [str(d / "a.parquet"), str(d / "b.tar"), str(d / "c.TGZ")]
    assert corpus.expand_inputs(str(d / "b.tar")) == [str(d / "b.tar")]
    os.symlink(d / "b.tar", tmp_path / "link.tar")
    assert corpus.expand_inputs([d / "b.tar", d, tmp_path / "link.tar"]) == [
        str(d / "b.tar"), str(d / "a.parquet"), str(d / "c.TGZ")]  # the same shard kept once, at its first place
    with pytest.raises(ValueError, match="no input shards given"):
        corpus.expand_inputs([])
    with pytest.raises(ValueError, match=r"non-empty paths, got \['', ' '\]"):
        corpus.expand_inputs([d / "b.tar", "", " "])
    with pytest.raises(ValueError, match="non-empty paths"):
        corpus.expand_inputs([3])
    missing = [str(tmp_path / f"m{i}.tar") for i in range(6)]
    with pytest.raises(FileNotFoundError) as e:
        corpus.expand_inputs(missing + [d / "notes.txt"])
    assert str(e.value) == f"input shards not found: {', '.join(missing[:5])} ... (6 in all)"
    with pytest.raises(FileNotFoundError) as e:
        corpus.expand_inputs(missing[:5])
    assert str(e.value) == f"input shards not found: {', '.join(missing[:5])}"
    os.mkfifo(tmp_path / "f.tar")
    with pytest.raises(ValueError, match=f"not regular files .*: {tmp_path / 'f.tar'}$"):
        corpus.expand_inputs([tmp_path / "f.tar", d / "notes.txt"])
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match=f"Parquet \\(.parquet\\) shards: {d / 'notes.txt'}, {tmp_path / 'e'}/ \\(no"):
        corpus.expand_inputs([d / "notes.txt", tmp_path / "e"])
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="b.tar and .*b.parquet would both write b.parquet"):
        corpus.expand_inputs([d / "b.tar", tmp_path / "b.parquet"])


def test_check_out_device_templates_member_and_counts(tmp_path, monkeypatch):
    from fastlclip.corpus import _positive_int, check_device, check_member, check_out, check_templates

    inp = tmp_path / "in"
    inp.mkdir()
    assert check_out(tmp_path / "out", [inp]) == tmp_path / "out"
    assert check_out(str(tmp_path / "in2"), [inp]) == tmp_path / "in2"  # a sibling whose name starts alike
    for out, how in ((inp, "is"), (inp / "o", "is inside"), (tmp_path, "holds")):
        with pytest.raises(ValueError, match=f"the output folder {out} {how} the input {inp}:"):
            check_out(out, [tmp_path.parent / "unrelated.tar", inp])
    for out in ("", " ", None):
        with pytest.raises(ValueError, match="out must be a non-empty folder path"):
            check_out(out, [inp])

    check_device(None, "local")
    check_device("cpu", "local")
    with pytest.raises(ValueError, match="'gpu:0' is not a torch device"):
        check_device("gpu:0", "ray")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_device("cuda", "ray")  # Ray's workers may have GPUs that this machine lacks
    with pytest.raises(ValueError, match="'cuda', but CUDA is not available here"):
        check_device("cuda", "local")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda", "local")
    check_device("cuda:1", "local")
    with pytest.raises(ValueError, match="'cuda:2', but there are 2 CUDA devices"):
        check_device("cuda:2", "local")

    check_templates(["a photo of a {}.", "{0}", "{} {{braces}}"])
    for t in ("{} and {}", "no class", "{name}", "{", "{0.x}"):
        with pytest.raises(ValueError, match="must take the class name through one"):
            check_templates(["a {}", t])

    for m in (None, "latent.pt", "x.pth", "emb.npy", "pt", "pth", "npy"):
        check_member(m)
    for m in ("latent.txt", "", "xpt", 3, ("latent.pt",)):
        with pytest.raises(ValueError, match="member must name a .pt, .pth or .npy tar member"):
            check_member(m)

    assert _positive_int(1, "workers") == 1 and _positive_int(7, "workers") == 7
    for v in (0, -1, True, 1.0, "2", None):
        with pytest.raises(ValueError, match=f"workers must be a positive integer, got {v!r}"):
            _positive_int(v, "workers")


def test_score_report_sums_against_hand_written_records():
    records = [{"shard": "a", "status": "ok", "rows": 3, "bad": [{"key": "k", "error": "e"}]},
               {"shard": "b", "status": "error", "rows": 0, "bad": []},
               {"shard": "c", "status": "skipped", "rows": 5},
               {"shard": "d", "status": "ok", "rows": 4, "bad": [{"key": "j", "error": "f"}]}]
    report = corpus.ScoreReport(records)
    assert [r["shard"] for r in report.ok] == ["a", "d"] and [r["shard"] for r in report.failed] == ["b"]
    assert [r["shard"] for r in report.skipped] == ["c"] and report.rows == 7
    assert report.bad_samples == [{"shard": "a", "key": "k", "error": "e"}, {"shard": "d", "key": "j", "error": "f"}]


# -- gaps found by mutation testing: the command line -----------------------------------------------------
def test_error_line_against_hand_written_lines():
    assert cli.error_line(ValueError("first\nsecond")) == "ValueError: first"
    assert cli.error_line(ValueError("first\nsecond"), with_type=False) == "first"
    assert cli.error_line(KeyError("name")) == "KeyError: name" and cli.error_line(ValueError()) == "ValueError: "
    outer = RuntimeError("outer")
    outer.__cause__ = ValueError("  \n inner cause\nmore")
    assert cli.error_line(outer) == "ValueError: inner cause"
    quiet = RuntimeError("outer")
    quiet.__cause__ = ValueError(" ")  # a cause that says nothing: the outer error
    assert cli.error_line(quiet) == "RuntimeError: outer"
    a, b = RuntimeError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a  # a cycle ends
    assert cli.error_line(a) == "ValueError: b"
    c = KeyError("c")
    a.__cause__, b.__cause__, c.__cause__ = b, c, b  # a cycle after the first error ends too

    def hung(*_):
        raise TimeoutError("error_line loops on a cycle of causes")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        assert cli.error_line(a) == "KeyError: c"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert cli.error_line(FileNotFoundError(2, "No such file")) == "FileNotFoundError: [Errno 2] No such file"

    class Wrapped(Exception):  # Ray's errors carry the worker's error as .cause, without __cause__
        cause = ValueError("the checkpoint does not fit the config")

    assert cli.error_line(Wrapped("wrapper")) == "ValueError: the checkpoint does not fit the config"

    class Outer(Exception):  # a wrapper of a wrapper: .cause followed at every level
        cause = Wrapped("inner wrapper")

    assert cli.error_line(Outer("outer")) == "ValueError: the checkpoint does not fit the config"

    class RayTaskError(Exception):
        pass

    RayTaskError.__module__ = "ray.exceptions"
    many = ("ray::MapBatches() (pid=1)\n  File x, line 1\nKeyError: 'k'\nTypeError: t\nfoo.BarError: the worker's own"
            "\n  tail")
    assert cli.error_line(RayTaskError(many)) == "foo.BarError: the worker's own"  # the last one
    assert cli.error_line(RayTaskError("ray::X()\nValueError: two lines")) == "ValueError: two lines"
    assert cli.error_line(RayTaskError("ValueError: one line")) == "RayTaskError: ValueError: one line"
    assert cli.error_line(RayTaskError("one line only")) == "RayTaskError: one line only"
    assert cli.error_line(RayTaskError("no\nerror lines")) == "RayTaskError: no"
    assert cli.error_line(Exception(many)) == "Exception: ray::MapBatches() (pid=1)"  # only Ray's own errors


def test_cli_score_passes_every_setting_and_summarises_in_one_line(tmp_path, capsys, model):
    import hashlib

    x = latents(3, 30)
    x[1, 0, 0, 0] = float("nan")
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"latent.pt": pt_bytes(x[i].clone()), "latent.npy": b"x"})
                                   for i in range(3)])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    argv = ["score", tmp_path / "a.tar", "--out", out, "--model", config, "--pretrained", ckpt, "--prompts", "a cat",
            "--classes", "cat", "dog", "--templates", "a {}", "--safety", "--embeddings", "--space", "diffusion",
            "--member", "latent.pt", "--column", "lat", "--batch-size", "1"]
    code, err = run_cli(argv, capsys)
    assert code == 0 and err.strip().splitlines()[-1] == (
        f"[fastlclip.corpus] 1 shards scored (2 rows, 1 bad samples skipped), 0 already done, 0 failed; "
        f"manifest: {out / 'manifest.jsonl'}")
    sha = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert json.loads((out / "run.json").read_text()) == {
        "model": str(config), "pretrained": str(ckpt), "weights": {"config_sha256": sha(config),
                                                                   "pretrained_sha256": sha(ckpt)},
        "prompts": ["a cat"], "classes": ["cat", "dog"], "templates": ["a {}"], "safety": True, "embeddings": True,
        "space": "diffusion", "dtype": "float32", "member": "latent.pt", "column": "lat"}
    names = pq.read_table(out / "a.parquet").column_names
    assert names[:5] == ["key", "clip_cos_0", "prob_cat", "prob_dog", "label"] and names[-2:] == ["safety_flag", "embedding"]
    assert len(names) > 7 and all(n.startswith("safety_") for n in names[5:-1])
    code, err = run_cli(argv, capsys)
    assert code == 0 and "] 0 shards scored (0 rows, 0 bad samples skipped), 1 already done, 0 failed;" in err
    code, err = run_cli([*argv[:3], tmp_path / "strict", *argv[4:], "--on-error", "raise"], capsys)
    assert code == 1 and "0 shards scored (0 rows, 0 bad samples skipped), 0 already done, 1 failed;" in err


def test_cli_select_writes_one_key_a_line_or_fails_in_one_line(tmp_path, capsys):
    out = tmp_path / "scores"
    out.mkdir()
    pq.write_table(pa.table({"key": ["a", "b", "c"], "s": pa.array([0.1, 0.9, 0.5], pa.float32())}),
                   out / "x.parquet")
    code, err = run_cli(["select", out, "--by", "s", "--threshold", "0.4", "--out", tmp_path / "k.txt"], capsys)
    assert code == 0 and (tmp_path / "k.txt").read_text() == "b\nc\n"
    assert one_line(err) == f"[fastlclip.corpus] 2 keys -> {tmp_path / 'k.txt'}"
    code, err = run_cli(["select", out, "--by", "s", "--top-fraction", "0.34", "--out", tmp_path / "t.txt"], capsys)
    assert code == 0 and (tmp_path / "t.txt").read_text() == "b\n"
    code, err = run_cli(["select", out, "--by", "s", "--threshold", "2", "--out", tmp_path / "none.txt"], capsys)
    assert code == 0 and (tmp_path / "none.txt").read_text() == ""
    code, err = run_cli(["select", out, "--by", "s", "--threshold", "0", "--out", tmp_path / "no" / "k.txt"], capsys)
    assert code == 1 and one_line(err).startswith(
        f"python -m fastlclip.corpus select: error: cannot write {tmp_path / 'no' / 'k.txt'}: ")
    for keys_file, why in (("", "--out must be a file path, got ''"), (tmp_path, "is a folder; pass a file path"),
                           (out / "k.txt", "is inside the scores folder")):
        code, err = run_cli(["select", out, "--by", "s", "--threshold", "0", "--out", keys_file], capsys)
        assert code == 2 and why in one_line(err) and one_line(err).startswith("python -m fastlclip.corpus select: error: ")
    code, err = run_cli(["select", tmp_path / "nothing", "--by", "s", "--threshold", "0", "--out", tmp_path / "k2.txt"],
                        capsys)
    assert code == 2 and not (tmp_path / "k2.txt").exists()


# -- gaps found by mutation testing: process_shard with a hand-checkable scorer ---------------------------
class _SumScorer:
    """Scores a (2, 2, 2) latent by its sum; a latent of sevens 'overflows inside the model' (NaN)."""

    shape, dtype, embed_dim = (2, 2, 2), torch.float32, 2

    def __init__(self):
        from fastlclip.corpus.scoring import ScoreSpec

        self.spec, self.calls = ScoreSpec(model="sum", prompts=["p"]), []

    def columns(self):
        return ["clip_cos_0", "embedding"]

    def __call__(self, latents):
        self.calls.append(len(latents))
        sums = latents.sum(dim=(1, 2, 3)).numpy()
        return {"clip_cos_0": np.where(latents[:, 0, 0, 0].numpy() == 7, np.nan, sums).astype(np.float32),
                "embedding": latents.reshape(len(latents), -1)[:, :2].half().numpy()}


def test_process_shard_batches_drops_and_records_against_hand_written_rows(tmp_path):
    from fastlclip.corpus.runner import ShardOptions, process_shard

    full = lambda v: pt_bytes(torch.full((2, 2, 2), v))  # noqa: E731
    write_tar(tmp_path / "t.tar", [("k0", {"latent.pt": full(1.0)}), ("k1", {"latent.pt": full(2.0)}),
                                   ("k2", {"latent.pt": pt_bytes(torch.zeros(3))}), ("k3", {"latent.pt": full(7.0)}),
                                   ("k4", {"latent.pt": full(3.0)}), ("k0", {"latent.pt": full(5.0)}),
                                   ("k6", {"latent.pt": full(4.0)})])
    out, scorer = tmp_path / "out", _SumScorer()
    out.mkdir()
    opts = ShardOptions(out=str(out), batch_size=2, run_id="r1")
    record = process_shard(str(tmp_path / "t.tar"), scorer, opts)
    assert scorer.calls == [2, 2, 1]
    table = pq.read_table(out / "t.parquet")
    assert table.to_pydict() == {"key": ["k0", "k1", "k4", "k6"], "clip_cos_0": [8.0, 16.0, 24.0, 32.0],
                                 "embedding": [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]}
    bad = [{"key": "k2", "error": "shape (3,), the model takes (2, 2, 2)"},
           {"key": "k3", "error": "the model's output is NaN or Inf (the latent overflowed inside the model; "
                                  "max |x| = 7)"},
           {"key": "k0", "error": "duplicate key in this shard"}]
    assert {k: record[k] for k in ("shard", "run", "pid", "status", "rows", "bad", "error", "output")} == {
        "shard": str(tmp_path / "t.tar"), "run": "r1", "pid": os.getpid(), "status": "ok", "rows": 4, "bad": bad,
        "error": None, "output": str(out / "t.parquet")}
    for k in ("read_s", "model_s", "write_s"):
        assert 0 < record[k] <= record["seconds"] and record[k] == round(record[k], 6), k
    meta = {k.decode(): json.loads(v) for k, v in table.schema.metadata.items()}
    assert meta == {"fastlclip.shard": str(tmp_path / "t.tar"), "fastlclip.bad": bad, "fastlclip.settings": {
        **scorer.spec.identity(), "member": None, "column": "latent"}}
    assert corpus.read_manifest(out) == [record]

    again = process_shard(str(tmp_path / "t.tar"), scorer, opts)
    assert scorer.calls == [2, 2, 1] and {k: again[k] for k in again if k not in ("pid", "shard")} == {
        "run": "r1", "status": "skipped", "rows": 0, "bad": [], "error": None, "output": str(out / "t.parquet"),
        "seconds": 0.0, "read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    assert corpus.read_manifest(out) == [record, again]


def test_process_shard_failures_are_records_with_one_line_errors(tmp_path):
    from fastlclip.corpus.runner import ShardOptions, process_shard

    full = lambda v: pt_bytes(torch.full((2, 2, 2), v))  # noqa: E731
    write_tar(tmp_path / "t.tar", [("k0", {"latent.pt": full(1.0)}), ("k3", {"latent.pt": full(7.0)}),
                                   ("k2", {"latent.pt": pt_bytes(torch.zeros(3))})])
    write_tar(tmp_path / "empty.tar", [])

    def run(shard, **kw):
        return process_shard(str(tmp_path / shard), _SumScorer(), ShardOptions(out=str(tmp_path / "out"), **kw))

    (tmp_path / "out").mkdir()
    raised = run("t.tar", on_error="raise", batch_size=4)
    assert raised["status"] == "error" and raised["rows"] == 0 and raised["error"] == (
        "BadSample: sample 'k2': shape (3,), the model takes (2, 2, 2)")
    raised = run("t.tar", on_error="raise", batch_size=2)  # the overflow is found first, in the first batch
    assert raised["error"] == ("BadSample: sample 'k3': the model's output is NaN or Inf (the latent overflowed "
                               "inside the model; max |x| = 7)")
    wrong = run("t.tar", member="latent.npy")
    assert wrong["status"] == "error" and wrong["error"] == (
        "BadSample: no sample has a latent.npy member (first: no latent.npy member (has: latent.pt)); "
        "pass member= (--member) to name the latent member")
    assert not (tmp_path / "out" / "t.parquet").exists()
    empty = run("empty.tar")
    assert empty["status"] == "ok" and empty["rows"] == 0 and pq.read_table(tmp_path / "out" / "empty.parquet").num_rows == 0

    class Checking(_SumScorer):
        def check(self, sample):  # a scorer's own reading rule
            if sample.key == "k2":
                raise TypeError("boom")
            return torch.full((2, 2, 2), 0.5)

    write_tar(tmp_path / "c.tar", [("k1", {"latent.pt": full(7.0)}), ("k2", {"latent.pt": full(1.0)})])
    record = process_shard(str(tmp_path / "c.tar"), Checking(), ShardOptions(out=str(tmp_path / "out")))
    assert record["bad"] == [{"key": "k2", "error": "unusable latent (TypeError: boom)"}]
    assert pq.read_table(tmp_path / "out" / "c.parquet").column("clip_cos_0").to_pylist() == [4.0]


def test_the_writer_works_where_the_platform_lacks_nofollow_and_nonblock(tmp_path, monkeypatch):
    from fastlclip.corpus import writer

    monkeypatch.delattr(os, "O_NOFOLLOW", raising=False)  # e.g. Windows: the getattr fallbacks apply
    monkeypatch.delattr(os, "O_NONBLOCK", raising=False)
    writer.append_manifest(tmp_path, {"shard": "a.tar"})
    writer.write_atomic(pa.table({"key": ["a"]}), tmp_path / "a.parquet")
    monkeypatch.undo()
    assert writer.read_manifest(tmp_path) == [{"shard": "a.tar"}]
    assert pq.read_table(tmp_path / "a.parquet").column("key").to_pylist() == ["a"]


def test_score_computes_only_what_is_asked_in_this_process(tmp_path, model):
    pt_shard(tmp_path / "a.tar", "a", latents(2, 31))
    report = corpus.score([tmp_path / "a.tar"], tmp_path / "out", model=model, prompts=["x"], progress=False)
    assert report.records[0]["pid"] == os.getpid()
    assert pq.read_table(tmp_path / "out" / "a.parquet").column_names == ["key", "clip_cos_0"]  # no safety, no embedding


def test_run_local_builds_its_scorer_when_given_none_and_reports_each_shard(tmp_path, model):
    from fastlclip.corpus.engines import run_local
    from fastlclip.corpus.runner import ShardOptions
    from fastlclip.corpus.scoring import ScoreSpec

    for name in ("a", "b"):
        pt_shard(tmp_path / f"{name}.tar", name, latents(1, 32))
    (tmp_path / "out").mkdir()
    reported = []
    records = run_local([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], ScoreSpec(model=model, prompts=["x"]),
                        ShardOptions(out=str(tmp_path / "out")), 1, reported.append)
    assert [r["status"] for r in records] == ["ok", "ok"] and reported == records
    assert {r["pid"] for r in records} == {os.getpid()} and keys_of(tmp_path / "out", "b") == ["b0000"]


class _InlinePool:
    """``ProcessPoolExecutor`` run in this process: it records how ``run_local`` built it, runs the initializer
    once (one worker) and every submitted call at once, so the spawned-worker branch is seen by the tests'
    own interpreter (and by mutation testing, whose mutants spawned processes do not import)."""

    made: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _InlinePool.made.append(self)
        kwargs["initializer"](*kwargs["initargs"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        future.set_result(fn(*args))
        return future


def test_run_local_with_workers_hands_the_spec_to_spawned_workers(tmp_path, model, monkeypatch):
    from fastlclip.corpus import engines
    from fastlclip.corpus.runner import ShardOptions
    from fastlclip.corpus.scoring import Scorer, ScoreSpec

    monkeypatch.setattr(engines, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(engines, "_WORKER", None)
    _InlinePool.made = []
    threads = torch.get_num_threads()
    for name in ("a", "b"):  # two shards and two workers: the smallest run that is spread over processes
        pt_shard(tmp_path / f"{name}.tar", name, latents(2, 33))
    (tmp_path / "out").mkdir()
    spec, opts, reported = ScoreSpec(model=model, prompts=["x"]), ShardOptions(out=str(tmp_path / "out")), []
    shards = [str(tmp_path / f"{name}.tar") for name in ("a", "b")]
    try:
        records = engines.run_local(shards, spec, opts, 2, reported.append)
        worker_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    (pool,) = _InlinePool.made
    kw = pool.kwargs
    assert kw["max_workers"] == 2 and kw["mp_context"].get_start_method() == "spawn"
    assert kw["initializer"] is engines._init_worker
    got_spec, got_opts, workers, counter = kw["initargs"]
    assert got_spec is spec and got_opts is opts and workers == 2 and counter.value == 1  # one worker started
    assert worker_threads == max(1, (os.cpu_count() or 1) // 2)  # a CPU worker takes its share of the cores
    assert engines._WORKER[1] is opts and isinstance(engines._WORKER[0], Scorer)  # built from the spec, in the worker
    assert sorted(r["shard"] for r in records) == sorted(shards) and reported == records
    assert all(r["status"] == "ok" and r["rows"] == 2 for r in records)
    assert keys_of(tmp_path / "out", "b") == ["b0000", "b0001"]


def test_each_spawned_worker_takes_its_own_gpu_or_its_share_of_the_cores(monkeypatch):
    """``_init_worker`` as the pool calls it, once per worker: the n-th worker builds on ``cuda:n % devices`` when
    the spec names no device; on the CPU each of ``workers`` takes ``cpu_count // workers`` threads."""
    import multiprocessing as mp
    from types import SimpleNamespace

    from fastlclip.corpus import engines

    built = []
    spec = SimpleNamespace(device=None, build=lambda device=None: built.append(device) or f"scorer on {device}")
    counter = mp.get_context("spawn").Value("i", 0)
    monkeypatch.setattr(engines, "_WORKER", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for _ in range(3):
        engines._init_worker(spec, "opts", 3, counter)
    assert built == ["cuda:0", "cuda:1", "cuda:0"] and counter.value == 3
    assert engines._WORKER == ("scorer on cuda:0", "opts")
    spec.device = "cuda:1"  # a device named in the spec is every worker's
    engines._init_worker(spec, "opts", 3, counter)
    assert built[-1] == "cuda:1"

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engines.os, "cpu_count", lambda: 8)
    try:
        for device, workers, expected in ((None, 2, 4), ("cpu", 3, 2), ("cpu", 16, 1)):
            spec.device = device
            torch.set_num_threads(7)
            engines._init_worker(spec, "opts", workers, counter)
            assert torch.get_num_threads() == expected and built[-1] == device
        spec.device = "cuda:0"  # a GPU worker leaves the thread count alone
        engines._init_worker(spec, "opts", 2, counter)
        assert torch.get_num_threads() == 1 and built[-1] == "cuda:0"
    finally:
        torch.set_num_threads(threads)


def test_run_local_keeps_one_shard_or_one_worker_in_this_process(tmp_path, model, monkeypatch):
    from fastlclip.corpus import engines
    from fastlclip.corpus.runner import ShardOptions
    from fastlclip.corpus.scoring import ScoreSpec

    monkeypatch.setattr(engines, "ProcessPoolExecutor", _InlinePool)
    _InlinePool.made = []
    pt_shard(tmp_path / "a.tar", "a", latents(1, 34))
    (tmp_path / "out").mkdir()
    records = engines.run_local([str(tmp_path / "a.tar")], ScoreSpec(model=model, prompts=["x"]),
                                ShardOptions(out=str(tmp_path / "out")), 4, lambda r: None)
    assert _InlinePool.made == [] and records[0]["pid"] == os.getpid() and records[0]["status"] == "ok"


def test_process_shard_times_with_a_clock_that_moves_only_in_the_model(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fastlclip.corpus import runner

    clock, read = SimpleNamespace(now=100.0), runner.read_shard
    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def slow_read(*args, **kwargs):  # a second per sample read
        for sample in read(*args, **kwargs):
            clock.now += 1.0
            yield sample

    monkeypatch.setattr(runner, "read_shard", slow_read)

    class Slow(_SumScorer):
        def __call__(self, latents):
            clock.now += 10.0
            return super().__call__(latents)

    full = lambda v: pt_bytes(torch.full((2, 2, 2), v))  # noqa: E731
    write_tar(tmp_path / "t.tar", [(f"k{i}", {"latent.pt": full(float(i))}) for i in range(5)] +
              [("k5", {"txt": b"no latent"})])  # the last sample lacks the member: the others still count
    pq.write_table(pa.table({"key": ["p"], "emb": pa.array([[0.5] * 8], pa.list_(pa.float32(), 8))}),
                   tmp_path / "p.parquet")
    (tmp_path / "out").mkdir()
    opts = runner.ShardOptions(out=str(tmp_path / "out"), batch_size=2, column="emb")
    record = runner.process_shard(str(tmp_path / "t.tar"), Slow(), opts)
    assert record["status"] == "ok" and record["rows"] == 5 and [b["key"] for b in record["bad"]] == ["k5"]
    assert {k: record[k] for k in ("seconds", "read_s", "model_s", "write_s")} == {
        "seconds": 36.0, "read_s": 6.0, "model_s": 30.0, "write_s": 0.0}  # six samples, three batches of ten
    record = runner.process_shard(str(tmp_path / "p.parquet"), Slow(), opts)  # the Parquet column named by opts
    assert record["status"] == "ok" and pq.read_table(tmp_path / "out" / "p.parquet").column("clip_cos_0").to_pylist() == [4.0]


def test_score_argument_errors_name_the_argument(tmp_path, model, monkeypatch):
    (tmp_path / "in").mkdir()
    pt_shard(tmp_path / "in" / "a.tar", "a", latents(1, 33))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    good = dict(model=model, prompts=["x"], progress=False)
    for kw, message in ((dict(workers=0), "workers must be a positive integer, got 0"),
                        (dict(batch_size=True), "batch_size must be a positive integer, got True"),
                        (dict(dtype="float64"), "dtype must be 'float32', 'float16' or 'bfloat16', got 'float64'"),
                        (dict(device="cuda"), "device 'cuda', but CUDA is not available here; pass device='cpu'"),
                        (dict(column=""), "column must name the Parquet latent column, got ''"),
                        (dict(column=None), "column must name the Parquet latent column, got None"),
                        (dict(prompts=["x", ""]), "prompts must be non-empty strings, got ['']"),
                        (dict(prompts=None, classes=["c", "c"]), "classes repeat ['c']"),
                        (dict(classes=["c"], templates=[" "]), "templates must be non-empty strings, got [' ']")):
        with pytest.raises(ValueError) as e:
            corpus.score(tmp_path / "in", tmp_path / "out", **{**good, **kw})
        assert str(e.value).startswith(message), (kw, str(e.value))
    with pytest.raises(ValueError) as e:  # a folder given as one path: its own path, not its characters
        corpus.score(str(tmp_path / "in"), tmp_path / "in" / "out", **good)
    assert str(e.value).startswith(f"the output folder {tmp_path / 'in' / 'out'} is inside the input {tmp_path / 'in'}:")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match=f"pretrained checkpoint not found: {tmp_path / 'missing.pt'}$"):
        corpus.score(tmp_path / "in", tmp_path / "out", pretrained=tmp_path / "missing.pt", **good)
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(ValueError, match="is not a regular file or folder"):
        corpus.score(tmp_path / "in", tmp_path / "out", pretrained=tmp_path / "fifo.pt", **good)
    assert not (tmp_path / "out").exists()
    report = corpus.score(str(tmp_path / "in"), tmp_path / "bf16", dtype="bfloat16", **good)
    assert report.rows == 1 and json.loads((tmp_path / "bf16" / "run.json").read_text())["dtype"] == "bfloat16"
    report = corpus.score(tmp_path / "in", tmp_path / "hub", pretrained="hf-hub:org/repo", **good)  # not a local path
    assert report.rows == 1 and json.loads((tmp_path / "hub" / "run.json").read_text())["pretrained"] == "hf-hub:org/repo"
    report = corpus.score(tmp_path / "in", tmp_path / "emb", model=model, embeddings=True, progress=False)
    assert pq.read_table(tmp_path / "emb" / "a.parquet").column_names == ["key", "embedding"]  # embeddings alone


def test_scorer_copies_a_model_in_another_dtype_and_leaves_the_callers_alone(model):
    from fastlclip.corpus.scoring import ScoreSpec

    scorer = ScoreSpec(model=model, prompts=["x"], dtype="bfloat16").build("cpu")
    assert scorer.model is not model and scorer.model.dtype == torch.bfloat16 and scorer.dtype == torch.bfloat16
    assert model.dtype == torch.float32 and model.check_finite
    cols = scorer(torch.zeros(2, 4, 16, 16))
    assert list(cols) == ["clip_cos_0"] and cols["clip_cos_0"].dtype == np.float32


def test_expand_inputs_names_a_fifo_inside_a_folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.tar").write_bytes(b"")
    os.mkfifo(d / "f.tar")
    os.mkfifo(tmp_path / "g.tar")
    with pytest.raises(ValueError) as e:
        corpus.expand_inputs([tmp_path / "g.tar", d])
    assert str(e.value) == f"not regular files (a FIFO, device or socket is never read): {tmp_path / 'g.tar'}, {d / 'f.tar'}"


def test_a_config_given_as_a_path_object_is_recorded_as_its_path(tmp_path):
    from pathlib import Path

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    pt_shard(tmp_path / "a.tar", "a", latents(1, 34))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        corpus.score([tmp_path / "a.tar"], tmp_path / "out", model=Path(config), prompts=["x"], progress=False)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["model"] == str(config)


def test_score_makes_nested_output_folders_and_records_its_run_in_inputs(tmp_path, model):
    pt_shard(tmp_path / "a.tar", "a", latents(1, 35))
    out = tmp_path / "x" / "y" / "out"
    report = corpus.score([tmp_path / "a.tar"], out, model=model, prompts=["x"], progress=False)
    (line,) = [json.loads(t) for t in (out / "inputs.jsonl").read_text().splitlines()]
    assert line == {"run": report.records[0]["run"], "shards": [str(tmp_path / "a.tar")]} and len(line["run"]) == 12


def test_a_checkpoint_that_does_not_load_is_an_argument_error_before_any_write(tmp_path, capsys):
    pt_shard(tmp_path / "a.tar", "a", latents(1, 36))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    code, err = run_cli(["score", tmp_path / "a.tar", "--out", tmp_path / "out", "--model", config, "--pretrained",
                         tmp_path / "bad.pt", "--prompts", "x"], capsys)
    assert code == 2 and one_line(err).startswith("python -m fastlclip.corpus score: error: ")
    assert not (tmp_path / "out").exists()


def test_score_splits_by_rank_numbers_its_progress_and_may_have_nothing_to_do(tmp_path, model, monkeypatch, capsys):
    for name in ("b", "a"):
        pt_shard(tmp_path / f"{name}.tar", name, latents(1, 37))
    shards = [tmp_path / "b.tar", tmp_path / "a.tar"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert corpus.score(shards, tmp_path / "out", model=model, prompts=["x"]).records == []  # sorted: a, b; none left
    monkeypatch.setenv("RANK", "1")
    report = corpus.score(shards, tmp_path / "out", model=model, prompts=["x"])
    assert [os.path.basename(r["shard"]) for r in report.records] == ["b.tar"]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    capsys.readouterr()
    corpus.score(shards, tmp_path / "out", model=model, prompts=["x"])
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[fastlclip.corpus] 1/2 b.tar: skipped (output exists)", lines[1]]
    assert lines[1].startswith("[fastlclip.corpus] 2/2 a.tar: ok, 1 rows in ")


def test_drop_torn_tail_cuts_exactly_the_bytes_after_the_last_newline(tmp_path):
    """Long files (the backwards scan crosses its 64 KiB reads), a file that is one torn line, a whole file left
    alone (no warning), a whole record without its newline kept, and a FIFO never opened."""
    from fastlclip.corpus import writer

    path = tmp_path / "manifest.jsonl"
    whole = b"".join(json.dumps({"shard": f"s{i}.tar", "pad": "x" * 50}).encode() + b"\n" for i in range(2000))
    assert len(whole) > 2 * 65536
    for torn in (b'{"shard": "s', b'{"shard": "' + b"y" * 70000, b'{"shard": "' + b"y" * 65536 * 2):
        path.write_bytes(whole + torn)
        with pytest.warns(UserWarning, match=rf"line 2001: dropped a torn last line \({len(torn)} bytes"):
            writer.drop_torn_tail(path)
        assert path.read_bytes() == whole
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            writer.drop_torn_tail(path)  # nothing torn: untouched, silent
        assert path.read_bytes() == whole
    path.write_bytes(b'{"shard": "a.t')
    with pytest.warns(UserWarning, match=r"line 1: dropped a torn last line \(14 bytes"):
        writer.drop_torn_tail(path)
    assert path.read_bytes() == b""
    path.write_bytes(b'{"shard": "a.tar"}\n{"shard": "b.tar"}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.drop_torn_tail(path)
    assert path.read_bytes() == b'{"shard": "a.tar"}\n{"shard": "b.tar"}\n'
    fifo = tmp_path / "inputs.jsonl"
    os.mkfifo(fifo)
    writer.drop_torn_tail(fifo)  # returns at once: a FIFO is not a regular file
    writer.drop_torn_tail(tmp_path / "absent.jsonl")


def test_a_short_manifest_write_stops_the_run_and_the_next_run_cuts_it(tmp_path, monkeypatch):
    from fastlclip.corpus import writer

    writer.append_manifest(tmp_path, {"shard": "a.tar"})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]))  # the disk fills mid-line
    with pytest.raises(OSError, match=r"manifest.jsonl: only 7 of the 19 bytes of a record were written"):
        writer.append_manifest(tmp_path, {"shard": "b.tar"})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"line 2: dropped a torn last line \(7 bytes"):
        writer.drop_torn_tail(tmp_path / "manifest.jsonl")
    writer.append_manifest(tmp_path, {"shard": "b.tar"})
    assert writer.read_manifest(tmp_path) == [{"shard": "a.tar"}, {"shard": "b.tar"}]
