"""Issue 34 parts 2 and 4: zero-shot classification of clips and corpus scoring of video shards.

References, float64: each latent frame converted by the pipelines' own code and read by the image tower alone
(tests/test_video_scoring.py's ``frame_features``), class weights built by hand from the text tower, the pooling
and softmax written out here; the corpus columns against ``LatentCLIPReward`` and ``ZeroShotClassifier`` on the
same clips.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import fastlclip
import tiny_spaces as ts
import tiny_video as tv
from corpus_shards import npy_bytes, pt_bytes, write_tar
from fastlclip import corpus
from fastlclip.corpus import __main__ as corpus_cli
from fastlclip.corpus import runner
from test_video_scoring import frame_features
from test_video_spaces import ltx_pack_latents

CLASSES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a video of a {}."]
PROMPTS = ["a dog running on a beach", "a red car at night"]
FRAMES = 9  # 3 latent frames in every tiny space with 4x time; LTX-Video (8x): 17


@pytest.fixture(scope="module", params=tv.SPACES)
def world(request):
    name = request.param
    vae = tv.tiny_vae(name).double()
    return name, vae, tv.model(vae, name).double()


def class_weights(model):
    """Per class: the mean of its templates' normalised text features, renormalised (float64)."""
    rows = [F.normalize(model.encode_text([t.format(c) for t in TEMPLATES]).double(), dim=-1).mean(0) for c in CLASSES]
    return F.normalize(torch.stack(rows), dim=-1)


def hand_logits(name, vae, model, z, pool):
    """(B, classes): logit scale x the pooled per-frame cosines to each class, all by hand in float64."""
    cos = frame_features(name, vae, model, z).double() @ class_weights(model).T  # (B, T, classes)
    pooled = cos.mean(1) if pool == "mean" else cos.amin(1)
    return model.logit_scale.exp().double() * pooled, model.logit_scale.exp().double() * cos


# --- zero-shot ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["mean", "min"])
def test_zero_shot_of_a_clip_is_the_softmax_of_its_pooled_frame_logits(world, pool):
    name, vae, model = world
    clf = fastlclip.ZeroShotClassifier(model, CLASSES, TEMPLATES, cache=False, pooling=pool)
    z = tv.clips(vae, batch=3, frames=3, seed=1)
    want, per_frame = hand_logits(name, vae, model, z, pool)
    with torch.no_grad():
        torch.testing.assert_close(clf.logits(z).double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(clf.probs(z).double(), want.softmax(-1), rtol=1e-5, atol=1e-6)
        assert clf.predict(z).tolist() == want.argmax(-1).tolist()
        torch.testing.assert_close(clf.frame_logits(z).double(), per_frame, rtol=1e-5, atol=1e-4)
        # frames= checks T (3 latent frames); LTX-Video's packed tokens are its grid
        space = model.latent_space
        torch.testing.assert_close(clf.logits(z, frames=space.video_frames(3)), clf.logits(z), rtol=0, atol=0)
        if name == "ltx-video":
            tokens = ltx_pack_latents(z)
            torch.testing.assert_close(clf.probs(tokens, frames=space.video_frames(3), height=4, width=4),
                                       clf.probs(z), rtol=0, atol=0)
            predicted = clf.predict(tokens, frames=space.video_frames(3), height=4, width=4)
            assert predicted.tolist() == want.argmax(-1).tolist()
    # the pooling is not decoration: the other one gives other probabilities
    other = hand_logits(name, vae, model, z, "min" if pool == "mean" else "mean")[0]
    assert (other.softmax(-1) - want.softmax(-1)).abs().max() > 1e-4


def test_zero_shot_gradients_reach_every_clip_and_frame():
    vae = tv.tiny_vae("wan2.1")
    model = tv.model(vae, "wan2.1")
    clf = fastlclip.ZeroShotClassifier(model, CLASSES, TEMPLATES, cache=False)
    z = tv.clips(vae, batch=2, frames=3, dtype=torch.float32).requires_grad_(True)
    (grad,) = torch.autograd.grad(clf.probs(z)[:, 0].sum(), z)
    assert (grad.abs().flatten(3).amax(-1).amax(1) > 0).all()  # (B, T): every clip and latent frame


def test_zero_shot_refuses_what_the_space_does_not_take():
    vae = tv.tiny_vae("wan2.1")
    clf = fastlclip.ZeroShotClassifier(tv.model(vae, "wan2.1"), CLASSES, TEMPLATES, cache=False)
    with pytest.raises(ValueError, match=r"'wan2.1'.*video space.*\(2, 16, 4, 4\).*latents\[:, :, None\]"):
        clf.predict(torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"'wan2.1'.*8 channels, expected 16"):
        clf.probs(torch.randn(2, 8, 3, 4, 4))
    with pytest.raises(ValueError, match=r"'wan2.1': 9 frames are 3 latent frames.*got T = 2"):
        clf.logits(torch.randn(2, 16, 2, 4, 4), frames=9)
    with pytest.raises(ValueError, match="pooling must be one of 'mean', 'min'"):
        fastlclip.ZeroShotClassifier(clf.model, CLASSES, TEMPLATES, cache=False, pooling="max")
    # an image model refuses clips, frames= and frame_logits, naming its space
    image = fastlclip.ZeroShotClassifier(ts.model(ts.tiny_vae("sana"), "sana"), CLASSES, TEMPLATES, cache=False)
    with pytest.raises(ValueError, match=r"'sana' latent space is an image space: got 5-D latents \(2, 8, 3, 16, 16\)"):
        image.probs(torch.randn(2, 8, 3, 16, 16))
    with pytest.raises(ValueError, match=r"frames=9 is for clips of a video space; the model's 'sana'"):
        image.logits(torch.randn(2, 8, 16, 16), frames=9)
    with pytest.raises(ValueError, match=r"frame_logits .* 'sana' latent space is an image space"):
        image.frame_logits(torch.randn(2, 8, 16, 16))


# --- corpus ---------------------------------------------------------------------------------------------------

def read(out, stem) -> dict:
    return pq.read_table(os.path.join(out, f"{stem}.parquet")).to_pydict()


def check_columns(got, model, z, pool="mean", atol=1e-5):
    """Every column against the consumers themselves on the clips ``z`` (float64 model)."""
    reward = fastlclip.LatentCLIPReward(model, pooling=pool)
    clf = fastlclip.ZeroShotClassifier(model, CLASSES, ["a photo of a {}."], cache=False, pooling=pool)
    t = z.shape[2]
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            np.testing.assert_allclose(got[f"clip_cos_{i}"], reward.score(z, p).numpy(), atol=atol)
            np.testing.assert_allclose(np.array(got[f"frame_clip_cos_{i}"]), reward.frame_scores(z, p).numpy(),
                                       atol=atol)
        probs, frame = clf.probs(z).numpy(), clf.frame_logits(z).softmax(-1).numpy()
        feats = model.encode_latents(z).numpy()
    for j, c in enumerate(CLASSES):
        np.testing.assert_allclose(got[f"prob_{c}"], probs[:, j], atol=atol)
        np.testing.assert_allclose(np.array(got[f"frame_prob_{c}"]), frame[:, :, j], atol=atol)
        assert all(len(v) == t for v in got[f"frame_prob_{c}"])
    assert got["label"] == [CLASSES[j] for j in probs.argmax(1)]
    np.testing.assert_allclose(np.array(got["embedding"], dtype=np.float32), feats, atol=2e-3)


def score(shards, out, model, **kw):
    kw = {"prompts": PROMPTS, "classes": CLASSES, "embeddings": True, "space": "diffusion", "frames": FRAMES,
          "progress": False, **kw}
    return corpus.score(shards, out, model=model, **kw)


@pytest.fixture(scope="module")
def wan():
    vae = tv.tiny_vae("wan2.1").double()
    return vae, tv.model(vae, "wan2.1").double()


def test_corpus_scores_wan_clips_as_the_reward_and_classifier_do(tmp_path, wan):
    """Clips stored as .pt, as .npy with a batch axis, as nested and flat Parquet lists, scored in diffusion space
    in batches of 2: the pooled columns are the reward's score and the classifier's probabilities, the frame
    columns their per-frame values, the embedding each frame's feature; ``pooling="min"`` as the reward's."""
    vae, model = wan
    z = tv.clips(vae, batch=5, frames=3, seed=2, dtype=torch.float32)
    write_tar(tmp_path / "a.tar", [(f"a{i}", {"latent.pt": pt_bytes(z[i].clone())}) for i in range(3)]
              + [(f"a{i}", {"latent.npy": npy_bytes(z[i:i + 1].numpy())}) for i in range(3, 5)])
    pq.write_table(pa.table({"key": [f"c{i}" for i in range(5)], "latent": pa.array(z.tolist())}),
                   tmp_path / "c.parquet")
    pq.write_table(pa.table({"key": [f"f{i}" for i in range(5)], "latent": pa.array(z.reshape(5, -1).tolist())}),
                   tmp_path / "f.parquet")
    shards = [tmp_path / s for s in ("a.tar", "c.parquet", "f.parquet")]
    report = score(shards, tmp_path / "out", model, batch_size=2)
    assert [r["status"] for r in report.records] == ["ok"] * 3 and report.rows == 15 and not report.bad_samples
    for stem in ("a", "c", "f"):
        check_columns(read(tmp_path / "out", stem), model, z.double())
    schema = pq.read_schema(tmp_path / "out" / "a.parquet")
    assert schema.field("frame_clip_cos_0").type == pa.list_(pa.float32(), 3)
    assert schema.field("embedding").type == pa.list_(pa.list_(pa.float16(), model.cfg.embed_dim), 3)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["frames"] == FRAMES

    score(shards[:1], tmp_path / "min", model, pooling="min")
    check_columns(read(tmp_path / "min", "a"), model, z.double(), pool="min")
    # VAE space reads what the VAE decodes (the pipeline's conversion of every frame)
    raw = model.latent_space.to_vae(z)
    write_tar(tmp_path / "v.tar", [(f"v{i}", {"latent.pt": pt_bytes(raw[i].clone())}) for i in range(5)])
    score([tmp_path / "v.tar"], tmp_path / "vae", model, space="vae")
    np.testing.assert_allclose(read(tmp_path / "vae", "v")["clip_cos_1"], read(tmp_path / "out", "a")["clip_cos_1"],
                               atol=1e-5)


def test_corpus_reads_ltx_video_tokens_and_grids(tmp_path):
    """LTX-Video's diffusion latents as its pipeline's tokens ``(T h w, 128)`` (here 8 channels) or as the grid, mixed
    in one batch: the same scores as the reward on the grid; flat storage is a bad sample (the layout is unknown)."""
    vae = tv.tiny_vae("ltx-video").double()
    model = tv.model(vae, "ltx-video").double()
    z = tv.clips(vae, batch=4, frames=3, seed=3, dtype=torch.float32)
    tokens = ltx_pack_latents(z)
    write_tar(tmp_path / "l.tar", [("l0", {"latent.pt": pt_bytes(tokens[0].clone())}),
                                   ("l1", {"latent.pt": pt_bytes(z[1].clone())}),
                                   ("l2", {"latent.pt": pt_bytes(tokens[2:3].clone())}),
                                   ("l3", {"latent.pt": pt_bytes(z[3].clone())}),
                                   ("flat", {"latent.pt": pt_bytes(tokens[0].reshape(-1).clone())})])
    report = score([tmp_path / "l.tar"], tmp_path / "out", model, frames=model.latent_space.video_frames(3),
                   batch_size=3)
    assert report.rows == 4 and [b["key"] for b in report.bad_samples] == ["flat"]
    assert "flat storage does not say which" in report.bad_samples[0]["error"]
    got = read(tmp_path / "out", "l")
    assert got["key"] == ["l0", "l1", "l2", "l3"]
    check_columns(got, model, z.double())


def test_corpus_records_clips_of_another_shape_as_bad_samples_naming_the_space(tmp_path, wan):
    vae, model = wan
    z = tv.clips(vae, batch=2, frames=3, seed=4, dtype=torch.float32)
    long = tv.clips(vae, batch=1, frames=5, dtype=torch.float32)[0]
    write_tar(tmp_path / "s.tar", [("ok", {"latent.pt": pt_bytes(z[0].clone())}),
                                   ("long", {"latent.pt": pt_bytes(long)}),
                                   ("narrow", {"latent.pt": pt_bytes(z[1, :8].clone())}),
                                   ("frame", {"latent.pt": pt_bytes(z[1, :, 0].clone())})])
    write_tar(tmp_path / "bad.tar", [("only", {"latent.pt": pt_bytes(long)})])
    report = score([tmp_path / "bad.tar", tmp_path / "s.tar"], tmp_path / "out", model)
    bad = {b["key"]: b["error"] for b in report.bad_samples}
    assert set(bad) == {"only", "long", "narrow", "frame"}
    space = "clips (C, T, h, w) of the 'wan2.1' video space, T = 3 latent frames for frames=9"
    assert bad["long"] == f"shape (16, 5, 4, 4), the model takes (16, 3, 4, 4): {space}"
    assert bad["narrow"] == f"shape (8, 3, 4, 4), the model takes (16, 3, 4, 4): {space}"
    assert bad["frame"] == f"shape (16, 4, 4), the model takes (16, 3, 4, 4): {space}"
    assert read(tmp_path / "out", "s")["key"] == ["ok"]
    # a shard with no good clip still writes the run's columns with their types
    empty = pq.read_table(tmp_path / "out" / "bad.parquet")
    assert empty.num_rows == 0 and empty.schema == pq.read_schema(tmp_path / "out" / "s.parquet")
    strict = score([tmp_path / "s.tar"], tmp_path / "strict", model, on_error="raise")
    assert strict.records[0]["status"] == "error" and "'wan2.1' video space" in strict.records[0]["error"]


def test_a_stopped_video_run_resumes_with_exactly_the_rest(tmp_path, wan, monkeypatch):
    vae, model = wan
    shards = []
    for i in range(3):
        z = tv.clips(vae, batch=2, frames=3, seed=10 + i, dtype=torch.float32)
        write_tar(tmp_path / f"s{i}.tar", [(f"s{i}-{j}", {"latent.pt": pt_bytes(z[j].clone())}) for j in range(2)])
        shards.append(str(tmp_path / f"s{i}.tar"))
    out = tmp_path / "out"
    real_write, calls = runner.write_atomic, []

    def dies_on_the_second(table, final):
        calls.append(final.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(table, final)

    monkeypatch.setattr(runner, "write_atomic", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        score(shards, out, model)
    monkeypatch.setattr(runner, "write_atomic", real_write)
    first = read(out, "s0")
    second = score(shards, out, model)
    assert [os.path.basename(r["shard"]) for r in second.skipped] == ["s0.tar"]
    assert [os.path.basename(r["shard"]) for r in second.ok] == ["s1.tar", "s2.tar"]
    assert read(out, "s0") == first
    fresh = score(shards, tmp_path / "fresh", model)
    assert fresh.rows == 6
    for stem in ("s0", "s1", "s2"):
        assert read(out, stem) == read(tmp_path / "fresh", stem)
    # another frame count or pooling is another run: refused rather than mixed
    for other in ({"frames": 13}, {"pooling": "min"}):
        with pytest.raises(ValueError, match=f"other settings \\({next(iter(other))} differ"):
            score(shards, out, model, **other)


@pytest.mark.parametrize("kw, match", [
    ({"frames": None}, r"reads clips of the 'wan2.1' video space: pass frames= \(--frames\).*T = 1 \+ \(F - 1\) / 4"),
    ({"frames": 8}, r"'wan2.1': 8 frames do not fit its causal 4x temporal layout .*use 5 or 9 frames"),
    ({"frames": 0}, "frames must be a positive integer, got 0"),
    ({"safety": True}, r"safety is not scored on clips .*'wan2.1' video space"),
    ({"pooling": "max"}, "pooling must be one of 'mean', 'min'"),
])
def test_corpus_arguments_are_checked_before_any_output(tmp_path, wan, kw, match):
    vae, model = wan
    write_tar(tmp_path / "s.tar", [("k", {"latent.pt": pt_bytes(tv.clips(vae, batch=1, dtype=torch.float32)[0])})])
    with pytest.raises(ValueError, match=match):
        score([tmp_path / "s.tar"], tmp_path / "out", model, **kw)
    assert not (tmp_path / "out").exists()


def test_an_image_model_refuses_frames_and_pooling(tmp_path):
    model = ts.model(ts.tiny_vae("sana"), "sana")
    write_tar(tmp_path / "s.tar", [("k", {"latent.pt": pt_bytes(torch.randn(8, 16, 16))})])
    for kw, match in (({"frames": 9}, r"frames=9 is the video frame count of clips; .*'sana' image space"),
                      ({"pooling": "min"}, r"pooling='min' pools a clip's frames; .*'sana' image space")):
        with pytest.raises(ValueError, match=match):
            corpus.score([tmp_path / "s.tar"], tmp_path / "out", model=model, prompts=PROMPTS, progress=False, **kw)
        assert not (tmp_path / "out").exists()


def test_corpus_command_line_scores_clips(tmp_path, capsys):
    """``python -m fastlclip.corpus score --frames 9 --pooling min`` from a config JSON (random weights, seeded as
    every worker seeds them); without --frames it stops in one line, exit 2, before any output."""
    vae = tv.tiny_vae("wan2.1")
    path = tmp_path / "wan.json"
    path.write_text(json.dumps(tv.model_config(vae, "wan2.1")))
    z = tv.clips(vae, batch=3, frames=3, seed=5, dtype=torch.float32)
    write_tar(tmp_path / "w.tar", [(f"w{i}", {"latent.pt": pt_bytes(z[i].clone())}) for i in range(3)])
    argv = ["score", str(tmp_path / "w.tar"), "--out", str(tmp_path / "out"), "--model", str(path), "--prompts",
            *PROMPTS, "--classes", *CLASSES, "--embeddings", "--space", "diffusion", "--pooling", "min"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        assert corpus_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pass frames= (--frames)" in err[0] and not (tmp_path / "out").exists()
        assert corpus_cli.main([*argv, "--frames", "9", "--batch-size", "2"]) == 0, capsys.readouterr().err
        torch.manual_seed(0)
        model = fastlclip.load(str(path)).double()
    check_columns(read(tmp_path / "out", "w"), model, z.double(), pool="min")
