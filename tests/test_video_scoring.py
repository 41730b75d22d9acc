"""Issue 34 parts 2 and 4: scoring clips of the video spaces with a Latent-CLIP (one embedding per latent frame,
pooled per clip) and with the decode-then-CLIP baseline (the whole clip decoded, every frame scored).

References, all float64: each latent frame converted by diffusers' pipeline code (tests/test_video_spaces.py's
transcriptions) and read by the image tower alone (``model.visual.latent_vit``), the text tower's features, and
the tiny VAEs' own ``decode`` called as the pipelines call it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlclip
import tiny_spaces as ts
import tiny_video as tv
from conftest import tiny_open_clip
from fastlclip import vaes
from test_video_spaces import decode_input, ltx_pack_latents

PROMPTS = ["a dog running on a beach", "a red car at night"]


@pytest.fixture(scope="module", params=tv.SPACES)
def world(request):
    name = request.param
    vae = tv.tiny_vae(name).double()
    model = tv.model(vae, name).double()
    return name, vae, model


def frame_features(name, vae, model, z):
    """(B, T, D): each latent frame through the pipeline's conversion and the tower alone, one frame at a time."""
    raw = decode_input(name, vae, z)
    return torch.stack([F.normalize(model.visual.latent_vit(raw[:, :, t]), dim=-1) for t in range(z.shape[2])], 1)


def test_clips_embed_frame_by_frame_in_one_forward(world):
    name, vae, model = world
    z = tv.clips(vae, batch=2, frames=3)
    feats = model.encode_latents(z)
    assert feats.shape == (2, 3, model.cfg.embed_dim)
    torch.testing.assert_close(feats, frame_features(name, vae, model, z), rtol=1e-5, atol=1e-7)
    # the same as scoring each latent frame as a one-frame clip
    for t in range(3):
        torch.testing.assert_close(feats[:, t], model.encode_latents(z[:, :, t:t + 1])[:, 0], rtol=1e-10, atol=1e-12)
    # frames= checks T; LTX-Video's packed tokens read as its grid
    space = model.latent_space
    assert model.encode_latents(z, frames=space.video_frames(3)).shape == feats.shape
    if name == "ltx-video":
        tokens = ltx_pack_latents(z)
        torch.testing.assert_close(model.encode_latents(tokens, frames=space.video_frames(3), height=4, width=4),
                                   feats, rtol=0, atol=0)


def test_vae_space_clips_are_what_the_vae_encodes(world):
    name, vae, model = world
    f = vaes.vae_factor(vae)
    video = torch.rand(1, 3, model.latent_space.video_frames(2), 4 * f, 4 * f, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        raw = vaes.encode(vae, video)
    assert raw.shape[2] == 2
    torch.testing.assert_close(model.encode_latents(raw, space="vae"),
                               model.encode_latents(model.latent_space.to_diffusion(raw)), rtol=1e-6, atol=1e-8)


def test_one_forward_for_the_whole_clip(world):
    name, vae, model = world
    calls = []
    hook = model.visual.latent_vit.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    try:
        model.encode_latents(tv.clips(vae, batch=2, frames=3))
    finally:
        hook.remove()
    assert calls == [torch.Size((6, vaes.vae_channels(vae), 4, 4))]


def test_the_reward_pools_per_frame_cosines_and_reaches_every_frame(world):
    name, vae, model = world
    reward = fastlclip.LatentCLIPReward(model)
    z = tv.clips(vae, batch=2, frames=3).requires_grad_(True)
    txt = F.normalize(model.encode_text(PROMPTS), dim=-1)
    per_frame = (frame_features(name, vae, model, z.detach()) * txt[:, None]).sum(-1)  # (B, T)
    torch.testing.assert_close(reward.frame_scores(z, PROMPTS), per_frame, rtol=1e-5, atol=1e-7)
    score = reward.score(z, PROMPTS)
    torch.testing.assert_close(score, per_frame.mean(1), rtol=1e-5, atol=1e-7)
    loss = reward(z, PROMPTS)
    torch.testing.assert_close(loss, 100 - model.logit_scale.exp() * per_frame.mean(), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, z)
    per_latent_frame = grad.abs().flatten(3).amax(-1)  # (B, C, T) -> every clip and frame moves
    assert torch.isfinite(grad).all() and (per_latent_frame.amax(1) > 0).all()
    worst = fastlclip.LatentCLIPReward(model, pooling="min")
    torch.testing.assert_close(worst.score(z, PROMPTS), per_frame.amin(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reward.score(z, PROMPTS, batch_size=1), score, rtol=1e-10, atol=1e-12)


def test_noise_level_per_clip_is_shared_by_its_frames():
    vae = tv.tiny_vae("wan2.1").double()
    model = tv.model(vae, "wan2.1", noise_aware=True).double()
    torch.nn.init.normal_(model.visual.latent_vit.noise_embed.mlp[2].weight, std=0.5)  # so the level matters
    z = tv.clips(vae, batch=2, frames=3)
    s = torch.tensor([0.2, 0.7], dtype=torch.float64)
    feats = model.encode_latents(z, noise_level=s)
    raw = decode_input("wan2.1", vae, z)
    for t in range(3):
        ref = F.normalize(model.visual.latent_vit(raw[:, :, t], noise_level=s), dim=-1)
        torch.testing.assert_close(feats[:, t], ref, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(feats, model.encode_latents(z, noise_level=0.5))


def test_bad_shapes_are_refused_naming_the_space():
    vae = tv.tiny_vae("wan2.1")
    model = tv.model(vae, "wan2.1")
    z = tv.clips(vae, batch=2, frames=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'wan2.1' latent space is a video space.*\(B, 16, T, h, w\).*got shape \(2, 16, 4, 4\)"
                                         r"; one frame is latents\[:, :, None\]"):
        model.encode_latents(z[:, :, 0])
    with pytest.raises(ValueError, match=r"'wan2.1': video latents of 4 channels, expected 16"):
        model.encode_latents(z[:, :4])
    with pytest.raises(ValueError, match=r"'wan2.1': 13 frames are 4 latent frames \(1 \+ \(F - 1\) / 4\), got T = 3"):
        model.encode_latents(z, frames=13)
    with pytest.raises(ValueError, match=r"'wan2.1': 12 frames do not fit its causal 4x temporal layout"):
        model.encode_latents(z, frames=12)
    with pytest.raises(ValueError, match="not noise-aware"):
        model.encode_latents(z, noise_level=0.5)
    with pytest.raises(ValueError, match="noise_level has 3 values for a batch of 2"):
        model.encode_latents(z, noise_level=torch.tensor([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"'wan2.1' video space: encode a video .* fastlclip.vaes.encode"):
        model.encode_images(torch.rand(2, 3, 16, 16), vae=vae)
    reward = fastlclip.LatentCLIPReward(model)
    with pytest.raises(ValueError, match="'wan2.1' latent space is a video space"):
        reward(z[:, :, 0], "a cat")
    with pytest.raises(ValueError, match="pooling must be one of 'mean', 'min'"):
        fastlclip.LatentCLIPReward(model, pooling="max")
    image = ts.model(ts.tiny_vae("sana"), "sana")
    with pytest.raises(ValueError, match=r"'sana' latent space is an image space: got 5-D latents.*video space"):
        image.encode_latents(torch.randn(2, 8, 3, 16, 16))
    with pytest.raises(ValueError, match="frame_scores scores clips"):
        fastlclip.LatentCLIPReward(image).frame_scores(torch.randn(2, 8, 16, 16), "a cat")


# -- the decode-then-CLIP baseline ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", tv.SPACES)
def test_the_decode_baseline_decodes_the_whole_clip_and_scores_every_frame(name):
    vae = tv.tiny_vae(name).double()
    clip = tiny_open_clip().double()
    reward = fastlclip.PixelCLIPReward(vae, clip)
    z = tv.clips(vae, batch=2, frames=3, side=2).requires_grad_(True)
    with torch.no_grad():  # as the pipeline decodes, (B, 3, F, H, W); HunyuanVideo 1.5 one clip at a time (its
        # batched decode fails in diffusers 0.42.1, see fastlclip.vaes.decode)
        raw = decode_input(name, vae, z.detach())
        video = torch.cat([vae.decode(c).sample for c in raw.split(1 if name == "hunyuanvideo-1.5" else 2)])
    frames = video.shape[2]
    assert frames == vaes.latent_space(vae).video_frames(3)
    txt = F.normalize(clip.encode_text(fastlclip.tokenize(PROMPTS)), dim=-1)
    per_frame = torch.stack([
        (F.normalize(clip.encode_image(reward.preprocess((video[:, :, f] / 2 + 0.5).clamp(0, 1))), dim=-1) * txt).sum(-1)
        for f in range(frames)], 1)
    torch.testing.assert_close(reward.frame_scores(z, PROMPTS), per_frame, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(reward.score(z, PROMPTS), per_frame.mean(1), rtol=1e-6, atol=1e-8)
    loss = reward(z, PROMPTS)
    torch.testing.assert_close(loss, 100 - clip.logit_scale.exp() * per_frame.mean(), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all() and (grad.abs().flatten(3).amax(-1).amax(1) > 0).all()
    with pytest.raises(ValueError, match="is a video space"):
        reward.score(z.detach()[:, :, 0], PROMPTS)


def test_pool_frames_pools_over_the_frame_axis():
    from fastlclip.rewards import pool_frames

    values = torch.tensor([[[1.0, 5.0], [3.0, -1.0], [2.0, 2.0]]])  # (B=1, T=3, K=2)
    assert torch.equal(pool_frames(values), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(pool_frames(values, "min"), torch.tensor([[1.0, -1.0]]))
    assert torch.equal(pool_frames(values[..., 0]), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_frames(values, "median")
