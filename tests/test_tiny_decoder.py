"""Issue 17: decode-then-CLIP with a tiny autoencoder (diffusers.AutoencoderTiny, TAESD-XL's config)."""

import pytest
import torch

import fastlclip
from bench import fidelity, flops, rewards as bench_rewards, tiny
from fastlclip.model_configs import taesdxl_config


@pytest.fixture(scope="module")
def taesd():
    torch.manual_seed(0)
    return bench_rewards.tiny_autoencoder(device="cpu", dtype=torch.float32, smoke=True)


def test_shipped_taesdxl_config_builds_offline_with_the_right_scaling():
    from diffusers import AutoencoderTiny

    cfg = taesdxl_config()
    assert cfg["_class_name"] == "AutoencoderTiny" and cfg["scaling_factor"] == 1.0 and cfg["latent_channels"] == 4
    with torch.device("meta"):
        model = AutoencoderTiny.from_config(cfg)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert 1.0e6 < decoder < 1.5e6  # ~1.2M decoder weights (the SDXL VAE decoder has ~50M)
    assert model.config.scaling_factor == 1.0


def test_tiny_decode_reward_runs_and_its_gradient_reaches_the_latents(taesd):
    clip = tiny.open_clip_model()
    reward = fastlclip.PixelCLIPReward(taesd, clip)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = reward(latents, "a red dog")
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert reward.score(latents.detach(), ["a", "b"]).shape == (2,)


def test_tiny_decoder_gets_the_diffusion_latents_as_they_are(taesd, monkeypatch):
    """scaling_factor 1.0: latents / scaling_factor leaves SDXL's diffusion latents unchanged, as diffusers' SDXL
    pipeline hands them to AutoencoderTiny; its [-1, 1] output is mapped to [0, 1]."""
    seen = []
    original = taesd.decode

    def spy(z, *args, **kwargs):
        seen.append(z)
        return original(z, *args, **kwargs)

    monkeypatch.setattr(taesd, "decode", spy)
    reward = fastlclip.PixelCLIPReward(taesd, tiny.open_clip_model())
    latents = torch.randn(1, 4, 8, 8)
    pixels = reward.decode(latents)
    torch.testing.assert_close(seen[0], latents)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.shape == (1, 3, 64, 64)


def test_anything_but_a_diffusers_decoder_is_refused():
    with pytest.raises(TypeError, match="diffusers decoder"):
        fastlclip.PixelCLIPReward(torch.nn.Linear(2, 2), tiny.open_clip_model())


def test_floors_count_the_tiny_decoder_at_full_resolution():
    small, big, vae = flops.decode_work("taesd", side=64), flops.decode_work("taesd", side=128), flops.decode_work("vae")
    assert small.weight_bytes == big.weight_bytes < vae.weight_bytes / 30  # few weights...
    assert big.total_flops == pytest.approx(4 * small.total_flops, rel=0.01)  # ...but work scales with pixels
    assert big.activation_bytes == pytest.approx(4 * small.activation_bytes, rel=0.01)
    assert small.total_flops < vae.total_flops / 10
    work = flops.iteration_work("pixel", "ViT-B-32", False, decoder="taesd")
    assert [w.name for w in work] == ["UNet", "TAESD-XL decode", "ViT-B-32"]


def test_fidelity_check_shows_the_approximation():
    result = fidelity.tiny_fidelity(steps=300, samples=4)
    assert result["distill_mse_last"] < result["distill_mse_first"]
    assert -1 <= result["cosine_untrained_median"] <= 1 and -1 <= result["cosine_distilled_median"] <= 1
    assert result["cosine_distilled_median"] > result["cosine_untrained_median"]
    assert "repeat" in result["caveat"]
