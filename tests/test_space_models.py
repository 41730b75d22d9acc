"""Issue 33 part 3, the model and the decode baseline on the 2025-26 latent spaces (Qwen-Image, FLUX.2, SANA).

The reference for every conversion is the pipelines' own code, transcribed in tests/test_latent_spaces_2026.py
(diffusers 58eb52c0803e: ``QwenImagePipeline._unpack_latents`` and its decode input, ``Flux2Pipeline``'s
``_unpack_latents_with_ids`` / denormalise / ``_unpatchify_latents``, SANA's ``latents / scaling_factor``) and the
VAEs' own ``encode`` / ``decode`` called as the pipelines call them; fastlclip's ``LatentSpace`` is not used to
build a reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlclip
import tiny_spaces as ts
from conftest import tiny_open_clip
from fastlclip import vaes
from test_latent_spaces_2026 import (flux2_decode_input, flux2_pack_latents, flux2_patchify_latents,
                                     flux2_prepare_latent_ids, qwen_decode_input, qwen_pack_latents,
                                     qwen_unpack_latents)


@pytest.fixture(scope="module", params=ts.SPACES)
def world(request):
    name = request.param
    vae = ts.tiny_vae(name).double()
    model = ts.model(vae, name).double()
    return name, vae, model


def pipeline_input(name, vae, model, batch=3, seed=0):
    """``(what the pipeline hands, the raw latents its decode input is)`` for a square latent of the model's
    trained size, by the pipeline's own code."""
    side = model.latent_size  # the VAE latent's side
    g = torch.Generator().manual_seed(seed)
    if name == "qwen-image":
        grid = torch.randn(batch, 16, side, side, generator=g, dtype=torch.float64)
        tokens = qwen_pack_latents(grid, batch, 16, side, side)
        px = side * 2  # the tiny VAE's factor: the pipeline's vae_scale_factor
        raw = qwen_decode_input(qwen_unpack_latents(tokens, px, px, 2), dict(vae.config))[:, :, 0]
        return tokens, raw
    if name == "flux2":
        grid = torch.randn(batch, 32, side // 2, side // 2, generator=g, dtype=torch.float64)
        tokens = flux2_pack_latents(grid)
        return tokens, flux2_decode_input(tokens, flux2_prepare_latent_ids(grid), vae)
    z = torch.randn(batch, 8, side, side, generator=g, dtype=torch.float64)
    return z, z / vae.config.scaling_factor  # pipeline_sana.py


def test_encode_latents_reads_what_the_pipeline_hands_as_the_vae_decodes_it(world):
    name, vae, model = world
    handed, raw = pipeline_input(name, vae, model)
    handed.requires_grad_(True)
    ours = model.encode_latents(handed)
    ref = model.encode_latents(raw, space="vae")
    # Qwen-Image's pipeline makes its constants float32 tensors: agreement to their rounding (a wrong constant,
    # order or layout differs by O(1))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    # gradients to what the pipeline hands, through the pipeline's own conversion
    (g,) = torch.autograd.grad(ours[:, 0].sum(), handed)
    h2 = handed.detach().clone().requires_grad_(True)
    if name == "qwen-image":
        side = model.latent_size
        raw2 = qwen_decode_input(qwen_unpack_latents(h2, side * 2, side * 2, 2), dict(vae.config))[:, :, 0]
    elif name == "flux2":
        grid_shape = (h2.shape[0], 32, model.latent_size // 2, model.latent_size // 2)
        raw2 = flux2_decode_input(h2, flux2_prepare_latent_ids(torch.empty(grid_shape)), vae)
    else:
        raw2 = h2 / vae.config.scaling_factor
    (g_ref,) = torch.autograd.grad(model.encode_latents(raw2, space="vae")[:, 0].sum(), h2)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_the_packed_spaces_take_the_grid_or_the_tokens(world):
    name, vae, model = world
    handed, _ = pipeline_input(name, vae, model)
    if handed.ndim == 4:
        pytest.skip(f"{name} hands its grid")
    side = model.latent_size
    if name == "qwen-image":
        grid = handed.reshape(3, side // 2, side // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(3, 16, side, side)
    else:
        grid = handed.permute(0, 2, 1).reshape(3, 32, side // 2, side // 2)  # Flux2Pipeline._pack_latents: a transpose
    torch.testing.assert_close(model.encode_latents(grid), model.encode_latents(handed), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.encode_latents(handed, height=side, width=side), model.encode_latents(handed))


def test_non_square_packed_latents_need_their_height_and_width():
    vae = ts.tiny_vae("qwen-image").double()
    model = ts.model(vae, "qwen-image").double()
    grid = torch.randn(2, 16, 16, 8, dtype=torch.float64)  # 16 x 8 latent
    tokens = qwen_pack_latents(grid, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="'qwen-image'.*not a square grid.*height and width"):
        model.encode_latents(tokens, resize="interpolate")
    ref = model.encode_latents(qwen_decode_input(qwen_unpack_latents(tokens, 32, 16, 2), dict(vae.config))[:, :, 0],
                               space="vae", resize="interpolate")
    torch.testing.assert_close(model.encode_latents(tokens, height=16, width=8, resize="interpolate"), ref)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.randn(2, 4, 16, 16), r"'qwen-image'.*16 channels|'qwen-image'.*expected 16"),
    (lambda: torch.randn(2, 64, 48), r"'qwen-image'.*packed tokens of shape \(2, 64, 48\)"),
    (lambda: torch.randn(2, 16, 1, 16, 16), r"'qwen-image'.*one frame of a video latent"),
    (lambda: torch.randn(0, 64, 64), r"'qwen-image'.*B > 0"),
    (lambda: torch.zeros(2, 64, 64, dtype=torch.long), r"floating point"),
])
def test_wrong_inputs_are_refused_naming_the_space(bad, match):
    model = ts.model(ts.tiny_vae("qwen-image"), "qwen-image")
    with pytest.raises((ValueError, TypeError), match=match):
        model.encode_latents(bad())


def test_flux2_without_its_statistics_reads_vae_latents_only():
    vae = ts.tiny_vae("flux2")
    cfg = ts.model_config(vae, "flux2")
    stats = cfg.pop("vae_stats")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(cfg)
    raw = torch.randn(2, 8, 16, 16)
    model.encode_latents(raw, space="vae")  # fine
    with pytest.raises(ValueError, match="live in the VAE's weights"):
        model.encode_latents(torch.randn(2, 32, 8, 8))
    bad = dict(cfg, vae_stats={**stats, "running_mean": stats["running_mean"][:-1]})
    with pytest.raises(ValueError, match="batch-norm statistics of 31 / 32 channels"):
        fastlclip.load(bad)
    with pytest.raises(ValueError, match="keeps them in its config"):
        fastlclip.load(dict(ts.model_config(ts.tiny_vae("sana"), "sana"), vae_stats=stats))


def test_the_statistics_travel_with_the_model_and_differ_from_none():
    """A FLUX.2 model's vae_stats are the VAE's running statistics: with them the tower sees the pipeline's decode
    input; applying none (or normalising before patchifying) gives other latents."""
    vae = ts.tiny_vae("flux2").double()
    model = ts.model(vae, "flux2").double()
    grid = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    raw = flux2_decode_input(flux2_pack_latents(grid), flux2_prepare_latent_ids(grid), vae)
    ours = model.encode_latents(grid)
    torch.testing.assert_close(ours, model.encode_latents(raw, space="vae"))
    unpatch = grid.reshape(2, 8, 2, 2, 8, 8).permute(0, 1, 4, 2, 5, 3).reshape(2, 8, 16, 16)
    assert (ours - model.encode_latents(unpatch, space="vae")).abs().max() > 1e-3  # no statistics applied


def test_encode_images_encodes_as_each_pipeline_does(world):
    name, vae, model = world
    side = model.latent_size * model.cfg.vision.latent_factor
    pixels = torch.rand(2, 3, side, side, dtype=torch.float64)
    x = pixels * 2 - 1
    if name == "qwen-image":  # pipeline_qwenimage_img2img.py: encode(image[:, :, None]), then [:, :, 0]
        raw = vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
    elif name == "flux2":
        raw = vae.encode(x).latent_dist.mean
    else:  # AutoencoderDC: a deterministic latent
        raw = vae.encode(x).latent
    torch.testing.assert_close(model.encode_images(pixels, vae=vae), model.encode_latents(raw, space="vae"))


def test_the_decode_baseline_decodes_each_space_as_its_pipeline(world):
    name, vae, model = world
    clip = tiny_open_clip().double()
    reward = fastlclip.PixelCLIPReward(vae, clip)
    handed, raw = pipeline_input(name, vae, model, batch=2)
    if name == "qwen-image":
        image = vae.decode(raw[:, :, None]).sample[:, :, 0]
    else:
        image = vae.decode(raw).sample
    torch.testing.assert_close(reward.decode(handed), (image / 2 + 0.5).clamp(0, 1))
    feats = clip.encode_image(reward.preprocess((image / 2 + 0.5).clamp(0, 1)))
    txt = F.normalize(clip.encode_text(clip_tokens("a photo of a cat")), dim=-1)
    cos = (F.normalize(feats, dim=-1) * txt).sum(-1).mean()
    expected = 100 - clip.logit_scale.exp() * cos  # ReNO's CLIP loss
    torch.testing.assert_close(reward(handed, "a photo of a cat"), expected)
    with pytest.raises(ValueError, match=repr(reward.latent_space.name)[1:-1]):
        reward(torch.randn(2, 5, 8, 8, dtype=torch.float64), "a cat")


def clip_tokens(text):
    import open_clip

    return open_clip.tokenize([text])


def test_registry_lists_every_space_and_model_configs_take_them():
    assert fastlclip.list_vaes()[-5:] == ["qwen-image", "flux2", "sana", "dcae-f32c32-in", "dcae-f32c32-mix"]
    for name in ("qwen-image", "sana", "dcae-f32c32-in"):
        cfg = {"embed_dim": 16, "vae": name,
               "vision_cfg": {"image_size": 512, "patch_size": 2, "width": 32, "layers": 1, "heads": 2,
                              "latent_factor": vaes.vae_factor(vaes.get_vae_config(name))},
               "text_cfg": {"width": 32, "heads": 2, "layers": 1}}
        c = fastlclip.model_configs.ModelConfig.from_dict(cfg)
        assert c.vision.latent_channels == (16 if name == "qwen-image" else 32)
        assert c.vision.latent_size == (64 if name == "qwen-image" else 16)  # 512 px: 8x / 32x
    with pytest.raises(ValueError, match="AutoencoderTiny.*not one of the autoencoders"):
        fastlclip.model_configs.ModelConfig.from_dict(dict(cfg, vae="taef1"))
