"""ZeroShotClassifier's on-disk cache of class weights and its progress bar."""

import logging

import pytest
import torch

import fastlclip
from conftest import TINY

pytestmark = pytest.mark.filterwarnings("ignore:.*the weights are random")
NAMES, TEMPLATES = ["cat", "dog", "car"], ["a photo of a {}.", lambda c: f"a drawing of a {c}."]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return fastlclip.load(TINY)


def _no_text(monkeypatch, model):
    def refuse(*args, **kwargs):
        raise AssertionError("encode_text called although the cache holds the class weights")
    monkeypatch.setattr(model, "encode_text", refuse)


def test_cached_weights_are_read_back_without_encoding(model, tmp_path, monkeypatch):
    first = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path)
    assert torch.equal(first.weights, fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=False).weights)
    (file,) = tmp_path.glob("zeroshot-*.safetensors")
    _no_text(monkeypatch, model)
    again = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path)
    assert torch.equal(again.weights, first.weights)
    assert list(tmp_path.iterdir()) == [file]


def test_the_key_is_the_text_tower_and_the_prompts(model, tmp_path):
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path)
    with torch.no_grad():
        model.visual.latent_vit.proj.add_(1.0)  # the image tower does not change class weights
        model.logit_scale.add_(1.0)
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    fastlclip.ZeroShotClassifier(model, NAMES[::-1], TEMPLATES, cache=tmp_path)            # class order
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES[:1], cache=tmp_path)              # templates
    fastlclip.ZeroShotClassifier(model, NAMES, [lambda c: f"a sketch of a {c}."] * 2, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 4
    with torch.no_grad():
        model.text_projection.mul_(2.0)  # the text tower's weights
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 5
    assert fastlclip.zeroshot.text_tower_digest(model) != fastlclip.zeroshot.text_tower_digest(model.bfloat16())


def test_an_unreadable_cache_file_is_encoded_again_and_replaced(model, tmp_path, caplog):
    want = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path).weights
    (file,) = tmp_path.glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="fastlclip.zeroshot"):
        got = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path).weights
    assert "unreadable" in caplog.text and torch.equal(got, want)
    assert torch.equal(fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path).weights, want)


def test_default_caches_only_large_jobs_and_shows_progress(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLCLIP_CACHE", str(tmp_path))
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES)  # 6 prompts, one batch: neither cache nor bar
    assert not (tmp_path / "zeroshot").exists() and "zero-shot text" not in capsys.readouterr().err
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, batch_size=1)  # 6 batches: both
    assert len(list((tmp_path / "zeroshot").glob("zeroshot-*.safetensors"))) == 1
    assert "zero-shot text" in capsys.readouterr().err
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, batch_size=1)  # read back: no bar
    assert "zero-shot text" not in capsys.readouterr().err


def test_an_unwritable_cache_warns_and_still_classifies(model, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="fastlclip.zeroshot"):
        clf = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=blocker / "sub")
    assert "could not be written" in caplog.text and clf.weights.shape == (3, TINY["embed_dim"])
