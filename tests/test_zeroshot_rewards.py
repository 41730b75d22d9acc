"""Zero-shot classification and the ReNO rewards."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from fastlclip.grids import MODEL_DEFAULT
from conftest import TINY, tiny_noise_aware, tiny_open_clip, tiny_vae

LATENT = TINY["vision_cfg"]["image_size"] // 8


@pytest.fixture
def model(official_ckpt):
    return fastlclip.load(TINY, official_ckpt)


def test_imagenet_metadata_ready():
    assert len(fastlclip.imagenet_classnames()) == 1000
    templates = fastlclip.imagenet_templates()
    assert len(templates) == 80 and "goldfish" in templates[0]("goldfish")


def test_zero_shot_matches_manual_computation(model):
    names = ["cat", "dog", "car"]
    templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    clf = fastlclip.ZeroShotClassifier(model, names, templates)
    z = torch.randn(3, 4, LATENT, LATENT)
    with torch.no_grad():
        per = [F.normalize(model.encode_text([f"a photo of a {c}.", f"a drawing of a {c}."]).mean(0), dim=-1) for c in names]
        logits = model.logit_scale.exp() * model.encode_latents(z) @ torch.stack(per).T
        probs = clf.probs(z)
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert torch.equal(clf.predict(z), logits.argmax(-1))


def test_zero_shot_errors(model):
    with pytest.raises(ValueError, match="classnames is empty"):
        fastlclip.ZeroShotClassifier(model, [], ["{}"])
    with pytest.raises(ValueError, match="templates is empty"):
        fastlclip.ZeroShotClassifier(model, ["a"], [])


def test_latent_reward_value_and_gradient(model):
    reward = fastlclip.LatentCLIPReward(model, weighting=2.0)
    assert reward.weighting == 2.0
    assert not any(p.requires_grad for p in model.parameters())
    z = torch.randn(3, 4, LATENT, LATENT, requires_grad=True)
    loss = reward(z, "a red apple")
    with torch.no_grad():
        cos = model.encode_latents(z) @ model.encode_text(["a red apple"])[0]
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(100 - model.logit_scale.exp().item() * cos.mean().item(), abs=1e-4)
    assert torch.allclose(reward.score(z, "a red apple"), cos, atol=1e-6)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_latent_reward_gradient_matches_finite_difference(model):
    reward = fastlclip.LatentCLIPReward(model.double())
    z = torch.randn(1, 4, LATENT, LATENT, dtype=torch.float64, requires_grad=True)
    reward(z, "a cat").backward()
    d = torch.randn_like(z)
    eps = 1e-6
    with torch.no_grad():
        fd = (reward(z + eps * d, "a cat") - reward(z - eps * d, "a cat")) / (2 * eps)
    assert (z.grad * d).sum().item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_text_encoded_once_per_prompt_in_a_loop(model, monkeypatch):
    reward = fastlclip.LatentCLIPReward(model)
    calls = []
    orig = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda t, **k: calls.append(list(t)) or orig(t, **k))
    z = torch.randn(1, 4, LATENT, LATENT, requires_grad=True)
    for _ in range(50):
        reward(z, "an astronaut").backward()
    reward(z, "a horse")
    assert calls == [["an astronaut"], ["a horse"]]


def test_reward_prompt_count_checked(model):
    reward = fastlclip.LatentCLIPReward(model)
    with pytest.raises(ValueError, match="3 prompts for a batch of 2"):
        reward(torch.randn(2, 4, LATENT, LATENT), ["a", "b", "c"])
    per_sample = reward.score(torch.randn(2, 4, LATENT, LATENT), ["a", "b"])
    assert per_sample.shape == (2,)


@pytest.fixture
def pixel_clip():
    return tiny_open_clip()


def test_pixel_reward_is_decode_then_clip(pixel_clip):
    vae = tiny_vae()
    reward = fastlclip.PixelCLIPReward(vae, pixel_clip)
    z = torch.randn(2, 4, 6, 8, requires_grad=True)  # 48x64 px: short side resized to 32, centre-cropped
    loss = reward(z, "a cat")
    with torch.no_grad():
        img = (vae.decode(z / 0.13025).sample / 2 + 0.5).clamp(0, 1)
        img = F.interpolate(img, size=(32, 42), mode="bicubic", antialias=True)[..., :, 5:37]  # 64 * 32 / 48, floored
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        cos = F.normalize(pixel_clip.encode_image((img - mean) / std), dim=-1) @ F.normalize(
            pixel_clip.encode_text(fastlclip.tokenize(["a cat"])), dim=-1)[0]
    assert loss.item() == pytest.approx(100 - pixel_clip.logit_scale.exp().item() * cos.mean().item(), abs=1e-4)
    loss.backward()
    assert z.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vae.parameters())


# -- gaps found by mutation testing (issue 22 section 5) ----------------------------------------------------------


@pytest.fixture(scope="module")
def noise_aware():
    model = tiny_noise_aware(4)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    return model


def test_zero_shot_passes_space_resize_and_noise_level_to_the_tower(noise_aware):
    """Logits against float64 class weights written out (mean of normalised template embeddings,
    renormalised) and the tower's features for the same space, grid policy and noise level."""
    names, templates = ["cat", "dog", "car"], ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    clf = fastlclip.ZeroShotClassifier(noise_aware, names, templates, cache=False)
    with torch.no_grad():
        per = []
        for c in names:
            t = noise_aware.encode_text([f"a photo of a {c}.", f"a drawing of a {c}."], normalize=False).double()
            t = t / t.norm(dim=-1, keepdim=True)
            per.append(t.mean(0) / t.mean(0).norm())
        w = torch.stack(per)
        scale = torch.tensor(2.0, dtype=torch.float64).exp()
        z = torch.randn(2, 4, 20, 24, generator=torch.Generator().manual_seed(6))
        feats = noise_aware.encode_latents(z, space="vae", resize="pool", noise_level=0.7).double()
        want = scale * feats @ w.T
        got = clf.logits(z, space="vae", resize="pool", noise_level=0.7)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
        torch.testing.assert_close(clf.probs(z, space="vae", resize="pool", noise_level=0.7).double(), want.softmax(-1),
                                   rtol=0, atol=1e-5)
        assert torch.equal(clf.predict(z, space="vae", resize="pool", noise_level=0.7), want.argmax(-1))
        # the defaults: diffusion space, the model's grid policy (None: the trained 16x16 grid), clean latents
        z16 = 0.05 * z[..., :16, :16]  # small: the patch embedding's bias keeps the two spaces apart
        want16 = scale * noise_aware.encode_latents(z16, space="diffusion").double() @ w.T
        torch.testing.assert_close(clf.logits(z16).double(), want16, rtol=0, atol=2e-5)
        assert (want16 - scale * noise_aware.encode_latents(z16, space="vae").double() @ w.T).abs().max() > 1e-3
        with pytest.raises(ValueError, match="resize"):
            clf.logits(z)  # 20x24 is not the trained grid and the model's policy is None


def test_imagenet_simple_templates_are_open_clips_short_list():
    got = [t("cat") for t in fastlclip.imagenet_templates(simple=True)]
    assert got == ["itap of a cat.", "a bad photo of the cat.", "a origami cat.", "a photo of the large cat.",
                   "a cat in a video game.", "art of the cat.", "a photo of the small cat."]


def test_default_cache_dir_follows_fastlclip_cache_then_xdg_then_home(monkeypatch, tmp_path):
    from pathlib import Path

    from fastlclip.zeroshot import default_cache_dir

    monkeypatch.setenv("FASTLCLIP_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "own" / "zeroshot"
    monkeypatch.setenv("FASTLCLIP_CACHE", "")
    assert default_cache_dir() == tmp_path / "xdg" / "fastlclip" / "zeroshot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == Path(tmp_path / "home" / ".cache" / "fastlclip" / "zeroshot")


def test_predict_and_probs_hand_their_arguments_to_logits(noise_aware, monkeypatch):
    """On the tiny model the space rarely moves the argmax, so the hand-over itself is checked."""
    clf = fastlclip.ZeroShotClassifier(noise_aware, ["cat", "dog"], ["a photo of a {}."], cache=False)
    seen = []

    def logits(latents, **kwargs):
        seen.append(kwargs)
        return torch.tensor([[0.0, 1.0], [3.0, -1.0]])

    monkeypatch.setattr(clf, "logits", logits)
    z = torch.zeros(2, 4, 16, 16)
    assert clf.predict(z, space="vae", resize="pool", noise_level=0.3).tolist() == [1, 0]
    torch.testing.assert_close(clf.probs(z, space="vae", resize="interpolate", noise_level=0.1)[0],
                               torch.tensor([1 / (1 + math.e), math.e / (1 + math.e)]))
    clf.predict(z, height=16, width=8)  # a packed space's latent height and width (issue 33)
    assert seen == [{"space": "vae", "resize": "pool", "noise_level": 0.3, "height": None, "width": None, "frames": None},
                    {"space": "vae", "resize": "interpolate", "noise_level": 0.1, "height": None, "width": None,
                     "frames": None},
                    {"space": "diffusion", "resize": MODEL_DEFAULT, "noise_level": None, "height": 16, "width": 8,
                     "frames": None}]
