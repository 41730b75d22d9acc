"""``LatentCLIPReward.score`` for RL loops: ``batch_size`` chunking (against a float64 reference), the LRU text cache,
``scale``, per-latent noise levels across chunks, and the ``reads_latents`` marker."""

import copy
import math

import pytest
import torch

import fastlclip
from fastlclip.reno import LatentCLIPLoss

from conftest import TINY, tiny_model_with_trained_scale, tiny_noise_aware, tiny_open_clip, tiny_vae


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_trained_scale()


def float64_cosines(model, latents, prompts):
    """The cosines of a float64 copy of ``model``, prompts repeated as one list."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        return (m.encode_latents(latents.double()) * m.encode_text(prompts)).sum(-1)


def test_batch_size_chunks_give_the_same_scores(model):
    reward = fastlclip.LatentCLIPReward(model)
    x = torch.randn(7, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo of thing {i}" for i in range(6)] + ["a dog"]
    want = float64_cosines(model, torch.cat([x, x]), prompts + ["a dog"] * 7)
    for batch_size in (None, 1, 3, 7, 100):
        got = reward.score(x, prompts, batch_size=batch_size)
        assert got.shape == (7,)
        torch.testing.assert_close(got.double(), want[:7], rtol=0, atol=1e-5)
    torch.testing.assert_close(reward.score(x, "a dog", batch_size=2).double(), want[7:], rtol=0, atol=1e-5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            reward.score(x, "a dog", batch_size=bad)


def test_text_cache_is_lru_bounded(model):
    reward = fastlclip.LatentCLIPReward(model, text_cache_size=3)
    x = torch.randn(1, 4, 16, 16)
    for p in ("a", "b", "c"):
        reward.score(x, p)
    reward.score(x, "a")  # used again: "b" is now the least recent
    reward.score(x, "d")
    assert list(reward._text_cache) == ["c", "a", "d"]
    prompts = [f"prompt {i}" for i in range(10)]  # more new prompts than the cache holds, in one call
    got = reward.score(torch.randn(10, 4, 16, 16, generator=torch.Generator().manual_seed(1)), prompts)
    assert len(reward._text_cache) == 3 and torch.isfinite(got).all()
    assert fastlclip.LatentCLIPReward(model).text_cache_size == 4096
    for bad in (0, -3, 1.5, None):
        with pytest.raises(ValueError, match="text_cache_size"):
            fastlclip.LatentCLIPReward(model, text_cache_size=bad)


def test_scale(model):
    reward = fastlclip.LatentCLIPReward(model)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    cos = reward.score(x, "a dog")
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    torch.testing.assert_close(reward.score(x, "a dog", scale="logit"), 100.0 * cos, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(reward.score(x, "a dog", scale=2.5), 2.5 * cos)
    # The loss is 100 - the logit, averaged.
    assert reward(x, "a dog").item() == pytest.approx(100.0 - reward.score(x, "a dog", scale="logit").mean().item(), abs=1e-4)
    for bad in ("logits", math.nan, math.inf, True):
        with pytest.raises(ValueError, match="scale"):
            reward.score(x, "a dog", scale=bad)


def test_per_latent_noise_levels_follow_their_latents_across_chunks():
    model = tiny_noise_aware(0)
    reward = fastlclip.LatentCLIPReward(model)
    x = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8])
    want = torch.stack([reward.score(x[i:i + 1], "a dog", noise_level=float(s[i]))[0] for i in range(5)])
    torch.testing.assert_close(reward.score(x, "a dog", batch_size=2, noise_level=s), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(reward.score(x, "a dog", batch_size=2, noise_level=0.4),
                               reward.score(x, "a dog", noise_level=0.4), rtol=0, atol=1e-5)


def test_reads_latents_marker(model):
    assert fastlclip.LatentCLIPReward(model).reads_latents is True
    assert fastlclip.PixelCLIPReward(tiny_vae(), tiny_open_clip()).reads_latents is False
    assert LatentCLIPLoss(1.0, torch.float32, "cpu", model=model).reads_latents is True
