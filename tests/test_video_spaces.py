"""Issue 34 part 1: the video latent spaces (registry, LatentSpace on (B, C, T, h, w), frame_span).

References: the published constants typed from their sources (docs/vaes.md), diffusers' pipeline code transcribed
below (huggingface/diffusers at 58eb52c0803ea9af3abec60841c2a093bdf1f951, the same in the installed 0.42.1:
``pipelines/wan/pipeline_wan.py`` decode input, ``pipelines/hunyuan_video/pipeline_hunyuan_video.py`` and
``pipelines/hunyuan_video1_5/pipeline_hunyuan_video1_5.py`` ``latents / scaling_factor``,
``pipelines/ltx/pipeline_ltx.py`` ``_pack_latents`` / ``_unpack_latents`` / ``_denormalize_latents``), and the tiny
VAEs' own ``encode`` / ``decode`` (tests/tiny_video.py). ``LatentSpace`` is never used to build a reference.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import diffusers
import pytest
import torch

import fastlclip
import tiny_video as tv
from fastlclip import vaes

VIDEO = ["wan2.1", "wan2.2-ti2v", "hunyuanvideo", "hunyuanvideo-1.5", "ltx-video"]


# -- diffusers' pipeline code, transcribed ------------------------------------------------------------------------
def wan_decode_input(latents, cfg):
    """pipeline_wan.py, before ``self.vae.decode``."""
    z = cfg["z_dim"]
    latents_mean = torch.tensor(cfg["latents_mean"]).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(cfg["latents_std"]).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    return latents / latents_std + latents_mean


def ltx_pack_latents(latents, patch_size=1, patch_size_t=1):
    """LTXPipeline._pack_latents."""
    batch_size, num_channels, num_frames, height, width = latents.shape
    post_patch_num_frames = num_frames // patch_size_t
    post_patch_height = height // patch_size
    post_patch_width = width // patch_size
    latents = latents.reshape(batch_size, -1, post_patch_num_frames, patch_size_t, post_patch_height, patch_size,
                              post_patch_width, patch_size)
    return latents.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def ltx_unpack_latents(latents, num_frames, height, width, patch_size=1, patch_size_t=1):
    """LTXPipeline._unpack_latents."""
    batch_size = latents.size(0)
    latents = latents.reshape(batch_size, num_frames, height, width, -1, patch_size_t, patch_size, patch_size)
    return latents.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def ltx_denormalize_latents(latents, latents_mean, latents_std, scaling_factor=1.0):
    """LTXPipeline._denormalize_latents."""
    latents_mean = latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    latents_std = latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
    return latents * latents_std / scaling_factor + latents_mean


def named_space(vae, name):
    """The tiny VAE's space under its registered name (as a model reports it)."""
    return dataclasses.replace(vaes.latent_space(vae), name=name)


def decode_input(name, vae, z):
    """What the pipeline of ``name`` hands ``vae.decode`` for diffusion latents ``z`` (B, C, T, h, w)."""
    if name.startswith("wan"):
        return wan_decode_input(z, dict(vae.config))
    if name == "ltx-video":
        return ltx_denormalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    return z / vae.config.scaling_factor  # pipeline_hunyuan_video.py, pipeline_hunyuan_video1_5.py


# -- the registry --------------------------------------------------------------------------------------------------
# name: (class, channels, spatial, temporal, scaling or None (per channel), typed from docs/vaes.md's sources)
PUBLISHED = {
    "wan2.1": ("AutoencoderKLWan", 16, 8, 4, None),
    "wan2.2-ti2v": ("AutoencoderKLWan", 48, 16, 4, None),
    "hunyuanvideo": ("AutoencoderKLHunyuanVideo", 16, 8, 4, 0.476986),
    "hunyuanvideo-1.5": ("AutoencoderKLHunyuanVideo15", 32, 16, 4, 1.03682),
    "ltx-video": ("AutoencoderKLLTXVideo", 128, 32, 8, 1.0),
}


def test_the_video_registry_is_listed_apart_and_carries_the_published_constants():
    assert vaes.list_vaes(video=True) == VIDEO
    assert not set(VIDEO) & set(fastlclip.list_vaes())  # the image list is unchanged
    for name, (cls, channels, spatial, temporal, scaling) in PUBLISHED.items():
        cfg = fastlclip.get_vae_config(name)
        assert cfg["_class_name"] == cls
        assert (vaes.vae_channels(cfg), vaes.vae_factor(cfg), vaes.vae_temporal(cfg)) == (channels, spatial, temporal)
        assert hasattr(diffusers, cls)
        if name == "ltx-video":
            continue
        space = vaes.latent_space(name)
        assert (space.channels, space.temporal, space.causal, space.pack) == (channels, temporal, True, 0)
        if scaling is None:
            assert space.scaling_factor == 1.0 and len(space.mean) == len(space.std) == channels
        else:
            assert space.scaling_factor == scaling and space.mean is None
    # Wan 2.1's statistics are AutoencoderKLWan's defaults (the convert script builds AutoencoderKLWan())
    defaults = inspect.signature(diffusers.AutoencoderKLWan).parameters
    assert vaes.latent_space("wan2.1").mean == tuple(defaults["latents_mean"].default)
    assert vaes.latent_space("wan2.1").std == tuple(defaults["latents_std"].default)
    # TI2V's, typed from scripts/convert_wan_to_diffusers.py vae22_diffusers_config (first and last entries)
    ti2v = vaes.latent_space("wan2.2-ti2v")
    assert (ti2v.mean[0], ti2v.mean[-1], ti2v.std[0], ti2v.std[-1]) == (-0.2289, -0.0667, 0.4765, 0.7744)
    assert fastlclip.get_vae_config("wan2.2-ti2v")["patch_size"] == 2  # patchified inside the VAE, not in latents


def test_ltx_video_statistics_live_in_the_weights():
    with pytest.raises(ValueError, match=r"'ltx-video'.*live in the VAE's weights \(latents_mean / latents_std"):
        vaes.latent_space("ltx-video")
    with pytest.raises(ValueError, match="live in the VAE's weights"):
        vaes.weight_stats("ltx-video")
    vae = tv.tiny_vae("ltx-video")
    stats = vaes.weight_stats(vae)
    assert stats["latents_mean"] == vae.latents_mean.double().tolist()
    assert stats["latents_std"] == vae.latents_std.double().tolist()
    from_stats = vaes.latent_space(tv.vae_config(vae), stats=stats)
    assert from_stats.mean == tuple(stats["latents_mean"]) and from_stats.scaling_factor == 0.7
    with pytest.raises(ValueError, match=r"vae_stats.latents_std must be > 0"):
        vaes.latent_space(tv.vae_config(vae), stats={**stats, "latents_std": [0.0] * 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untrained = diffusers.AutoencoderKLLTXVideo(**{k: v for k, v in tv.vae_config(vae).items()
                                                        if not k.startswith("_")})
    with pytest.warns(UserWarning, match="initial statistics"):
        vaes.latent_space(untrained)


def test_ltx_video_statistics_are_read_from_a_folder(tmp_path):
    vae = tv.tiny_vae("ltx-video")
    vae.save_pretrained(tmp_path / "vae")
    space = vaes.latent_space(tmp_path)
    assert space.mean == tuple(vae.latents_mean.double().tolist())
    assert space.std == tuple(vae.latents_std.double().tolist())
    assert vaes.weight_stats(tmp_path)["latents_std"] == list(space.std)


# -- the temporal layout -------------------------------------------------------------------------------------------
def test_frame_span_and_latent_frames():
    wan, ltx = vaes.latent_space("wan2.1"), named_space(tv.tiny_vae("ltx-video"), "ltx-video")
    assert wan.latent_frames(81) == 21 and wan.video_frames(21) == 81
    assert [wan.frame_span(t) for t in range(4)] == [(0, 1), (1, 5), (5, 9), (9, 13)]
    assert ltx.latent_frames(121) == 16 and ltx.video_frames(16) == 121
    assert [ltx.frame_span(t) for t in range(3)] == [(0, 1), (1, 9), (9, 17)]
    for space, frames in ((wan, 81), (ltx, 121), (vaes.latent_space("hunyuanvideo-1.5"), 33)):
        spans = [space.frame_span(t) for t in range(space.latent_frames(frames))]
        covered = [f for a, b in spans for f in range(a, b)]
        assert covered == list(range(frames))  # the spans tile the clip, in order, once
    with pytest.raises(ValueError, match=r"'wan2.1': 80 frames do not fit its causal 4x temporal layout "
                                         r"\(F = 1 \+ 4 \(T - 1\)\): use 77 or 81 frames"):
        wan.latent_frames(80)
    with pytest.raises(ValueError, match=r"'ltx-video'.*F = 1 \+ 8 \(T - 1\)"):
        ltx.latent_frames(120)
    with pytest.raises(ValueError, match=r"'sdxl' is an image space.*frame_span"):
        vaes.latent_space("sdxl").frame_span(0)
    with pytest.raises(ValueError, match="latent frame index >= 0"):
        wan.frame_span(-1)


@pytest.mark.parametrize("name", VIDEO)
def test_to_vae_is_the_pipelines_decode_input_on_every_frame(name):
    vae = tv.tiny_vae(name).double()
    space = named_space(vae, name)
    z = tv.clips(vae, batch=2, frames=3, side=5)  # odd sizes
    ref = decode_input(name, vae, z)
    # Wan's pipeline makes its constants float32 tensors: agreement to their rounding (a wrong constant, or the
    # statistics on the wrong axis, is off by O(1)); the others are exact in float64
    tol = dict(rtol=1e-5, atol=1e-6) if name.startswith("wan") else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(space.to_vae(z), ref, **tol)
    torch.testing.assert_close(space.to_diffusion(space.to_vae(z)), z, rtol=1e-12, atol=1e-12)
    # frame by frame is the same as the clip (the statistics apply per channel on every frame)
    for t in range(3):
        torch.testing.assert_close(space.to_vae(z[:, :, t:t + 1])[:, :, 0], ref[:, :, t], **tol)
    with pytest.raises(ValueError, match=rf"'{name}' is a video space.*one frame is latents\[:, :, None\]"):
        space.to_vae(z[:, :, 0])


def test_ltx_video_tokens_are_the_pipelines_packing():
    space = named_space(tv.tiny_vae("ltx-video"), "ltx-video")
    z = tv.clips(tv.tiny_vae("ltx-video"), batch=2, frames=3, side=5)[..., :4]  # 5 x 4 latent
    tokens = ltx_pack_latents(z)
    assert torch.equal(space.pack_grid(z), tokens)
    assert torch.equal(space.grid(tokens, 5, 4, latent_frames=3), ltx_unpack_latents(tokens, 3, 5, 4))
    assert torch.equal(space.grid(tokens, 5, 4, latent_frames=3), z)
    with pytest.raises(ValueError, match="'ltx-video': packed video tokens need the latent frame count"):
        space.grid(tokens)
    with pytest.raises(ValueError, match=r"'ltx-video': packed tokens of shape \(2, 60, 8\) for 3 latent frames of "
                                         r"4 x 4, expected \(B, 48, 8\)"):
        space.grid(tokens, 4, 4, latent_frames=3)


# -- frame coverage against the tiny VAEs' own encode / decode -----------------------------------------------------
def changed(a, b):
    """Per frame (dim 2): whether anything differs."""
    return [(a[:, :, i] - b[:, :, i]).abs().max().item() > 0 for i in range(a.shape[2])]


@pytest.mark.parametrize("name", VIDEO)
def test_frame_coverage_against_the_vaes_own_decode_and_encode(name):
    """Decode with one latent frame changed: no frame before its span changes, every frame in it does (the
    causal decoders carry a cache forward, so later ones change too). HunyuanVideo's decoder and LTX-Video's are
    not causal: a change reaches frames before its span as well (GroupNorm over the whole clip; LTX's
    ``decoder_causal`` False). Encoders: a video frame first reaches the latent frame whose span holds it (all but
    HunyuanVideo's, which GroupNorm couples over the clip)."""
    vae = tv.tiny_vae(name).double()
    space = vaes.latent_space(vae)
    t_count = 3
    z = torch.randn(1, space.channels, t_count, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = vaes.decode(vae, z)
        assert base.shape[2] == space.video_frames(t_count) == 1 + (t_count - 1) * space.temporal
        for t in range(t_count):
            z2 = z.clone()
            z2[:, :, t] += 1.0
            moved = changed(vaes.decode(vae, z2), base)
            start, stop = space.frame_span(t)
            assert all(moved[start:stop]), (t, moved)
            if name in tv.CAUSAL_DECODERS:
                assert not any(moved[:start]) and all(moved[start:]), (t, moved)
            elif t > 0:
                assert any(moved[:start]), (t, moved)  # documented: not causal
        frames = space.video_frames(t_count)
        f = vaes.vae_factor(vae)
        x = torch.rand(1, 3, frames, 2 * f, 2 * f, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        enc = vaes.encode(vae, x * 2 - 1)
        assert enc.shape[2] == space.latent_frames(frames)
        edges = sorted({f for t in range(t_count) for f in (space.frame_span(t)[0], space.frame_span(t)[1] - 1)})
        for frame in edges:  # each span's first and last frame
            x2 = x.clone()
            x2[:, :, frame] += 0.5
            moved = changed(vaes.encode(vae, x2 * 2 - 1), enc)
            first = next(t for t in range(t_count) if space.frame_span(t)[0] <= frame < space.frame_span(t)[1])
            if name == "hunyuanvideo":
                assert all(moved)  # documented: GroupNorm over the whole clip
            else:
                assert moved == [t >= first for t in range(t_count)], (frame, moved)
