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


# -- gaps found by mutation testing (issue 22 section 5) ----------------------------------------------------------


def test_the_digest_covers_every_text_tower_weight_and_nothing_else(model):
    """Every text-tower tensor changes the key, wherever it sits in the state dict (the text tower's
    weights come after ``logit_scale`` and the image tower's); the image tower and ``logit_scale`` do not."""
    from fastlclip.zeroshot import text_tower_digest

    base = text_tower_digest(model)
    params = dict(model.named_parameters())
    text = [n for n in params if not n.startswith("visual.") and n != "logit_scale"]
    assert {"token_embedding.weight", "ln_final.bias", "transformer.resblocks.1.mlp.c_proj.weight"} <= set(text)
    for name in [*text, "logit_scale", "visual.latent_vit.proj", "visual.latent_vit.conv1.weight"]:
        p = params[name]
        with torch.no_grad():
            old = p.flatten()[-1].item()
            p.view(-1)[-1] += 0.5
            changed = text_tower_digest(model) != base
            p.view(-1)[-1] = old
        assert changed == (name in text), name
    assert text_tower_digest(model) == base


def _cache_file(model, tmp_path):
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path)
    (file,) = tmp_path.glob("zeroshot-*.safetensors")
    return file


@pytest.mark.parametrize("bad", [torch.zeros(2, 32), torch.zeros(3, 32, 1), torch.zeros(3),
                                 torch.zeros(3, 32, dtype=torch.float64)])
def test_a_cache_file_of_the_wrong_shape_or_dtype_is_encoded_again(model, tmp_path, caplog, bad):
    from safetensors.torch import save_file

    want = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=False).weights
    file = _cache_file(model, tmp_path)
    save_file({"weights": bad}, str(file))
    with caplog.at_level(logging.WARNING, logger="fastlclip.zeroshot"):
        got = fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=tmp_path).weights
    assert torch.equal(got, want)
    assert caplog.messages == [f"zero-shot cache {file} holds {tuple(bad.shape)} {bad.dtype}, not (3, D) float32; "
                               "encoding again"]


def test_cache_reads_and_writes_are_logged_with_the_file(model, tmp_path, caplog):
    folder = tmp_path / "new" / "nested"  # missing parents are made
    with caplog.at_level(logging.INFO, logger="fastlclip.zeroshot"):
        fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=folder)
        (file,) = folder.glob("zeroshot-*.safetensors")
        assert caplog.messages == [f"zero-shot class weights cached in {file}"]
        caplog.clear()
        fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=folder)
        assert caplog.messages == [f"zero-shot class weights read from {file}"]
        caplog.clear()
        file.write_bytes(b"\x00" * 4)
        fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=folder)
    assert caplog.messages[0].startswith(f"zero-shot cache {file} is unreadable (SafetensorError: ")
    assert caplog.messages[0].endswith("); encoding the prompts again")


def _recorded_batches(monkeypatch, model):
    """encode_text recorded (batch lengths), giving fixed random features: no text tower runs."""
    sizes = []

    def encode_text(texts, normalize=True):
        sizes.append(len(texts))
        return torch.randn(len(texts), TINY["embed_dim"])

    monkeypatch.setattr(model, "encode_text", encode_text)
    return sizes


def test_default_batches_are_256_prompts_and_over_four_of_them_cache(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTLCLIP_CACHE", str(tmp_path))
    sizes = _recorded_batches(monkeypatch, model)
    names = [f"class {i}" for i in range(205)]
    templates = ["a photo of a {}.", "a {}.", "the {}.", "art of the {}.", "a drawing of a {}."]  # 1025 prompts
    fastlclip.ZeroShotClassifier(model, names, templates)
    assert sizes == [256, 256, 256, 256, 1]
    assert len(list((tmp_path / "zeroshot").glob("*.safetensors"))) == 1 and "zero-shot text" in capsys.readouterr().err


@pytest.mark.parametrize("classes, large", [(4, False), (5, True)])  # 8 prompts: 4 batches of 2; 10: 5 batches
def test_more_than_four_batches_is_large(model, tmp_path, monkeypatch, capsys, classes, large):
    monkeypatch.setenv("FASTLCLIP_CACHE", str(tmp_path))
    sizes = _recorded_batches(monkeypatch, model)
    fastlclip.ZeroShotClassifier(model, [f"c{i}" for i in range(classes)], TEMPLATES, batch_size=2)
    assert sizes == [2] * classes
    assert (tmp_path / "zeroshot").exists() is large and ("zero-shot text" in capsys.readouterr().err) is large


def test_the_same_texts_grouped_into_other_classes_have_their_own_cache(model, tmp_path, caplog):
    """2 classes x 2 templates and 4 classes x 1 template can give the same prompt list: the template count
    is part of the key, so neither reads the other's (wrongly shaped) weights."""
    a = fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a {}.", "the {}."], cache=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastlclip.zeroshot"):
        b = fastlclip.ZeroShotClassifier(model, ["a cat.", "the cat.", "a dog.", "the dog."], ["{}"], cache=tmp_path)
    assert a.weights.shape[0] == 2 and b.weights.shape[0] == 4 and caplog.messages == []
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("progress, batch_size, shown", [(True, 256, True), (False, 1, False)])
def test_progress_forces_the_bar_on_or_off(model, tmp_path, capsys, progress, batch_size, shown):
    fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, batch_size=batch_size, progress=progress, cache=False)
    assert ("zero-shot text" in capsys.readouterr().err) is shown


def test_an_unwritable_cache_names_the_file_and_the_error(model, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="fastlclip.zeroshot"):
        fastlclip.ZeroShotClassifier(model, NAMES, TEMPLATES, cache=blocker / "sub")
    (msg,) = caplog.messages
    assert msg.startswith(f"zero-shot cache {blocker / 'sub'}/zeroshot-") and ".safetensors could not be written ([Errno" \
        in msg and msg.endswith("); the classifier works without it"), msg
