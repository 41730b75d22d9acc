"""Issue 33 parts 1-2: per-channel, patchified and packed latent spaces (Qwen-Image, FLUX.2, SANA's DC-AE).

The pipelines' own functions are transcribed below from diffusers at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951 (github.com/huggingface/diffusers):

- src/diffusers/pipelines/qwenimage/pipeline_qwenimage.py: ``QwenImagePipeline._pack_latents`` /
  ``_unpack_latents`` and the decode path of ``__call__`` (``latents / (1 / latents_std) + latents_mean``).
- src/diffusers/pipelines/flux2/pipeline_flux2.py: ``Flux2Pipeline._patchify_latents`` /
  ``_unpatchify_latents`` / ``_pack_latents`` / ``_unpack_latents_with_ids`` / ``_prepare_latent_ids``,
  ``_encode_vae_image`` (patchify, then ``(x - running_mean) / sqrt(running_var + batch_norm_eps)``) and the
  decode path of ``__call__`` (unpack, ``x * std + mean``, unpatchify, ``vae.decode``).
- src/diffusers/pipelines/sana/pipeline_sana.py: ``vae.decode(latents / vae.config.scaling_factor)``.
"""

from __future__ import annotations

import inspect
import json
import warnings

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlclip import vaes
from fastlclip.vaes import LatentSpace, latent_space

NEW = ["qwen-image", "flux2", "sana", "dcae-f32c32-in", "dcae-f32c32-mix"]


# --- transcriptions (see the module docstring for file and commit) -------------------------------------------

def qwen_pack_latents(latents, batch_size, num_channels_latents, height, width):
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)


def qwen_unpack_latents(latents, height, width, vae_scale_factor):
    batch_size, num_patches, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // (2 * 2), 1, height, width)


def qwen_decode_input(latents, config):  # __call__, output_type != "latent", before vae.decode
    latents_mean = torch.tensor(config["latents_mean"]).view(1, config["z_dim"], 1, 1, 1).to(latents.dtype)
    latents_std = 1.0 / torch.tensor(config["latents_std"]).view(1, config["z_dim"], 1, 1, 1).to(latents.dtype)
    return latents / latents_std + latents_mean


def flux2_patchify_latents(latents):
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(batch_size, num_channels_latents * 4, height // 2, width // 2)


def flux2_unpatchify_latents(latents):
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), 2, 2, height, width)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch_size, num_channels_latents // (2 * 2), height * 2, width * 2)


def flux2_pack_latents(latents):
    batch_size, num_channels, height, width = latents.shape
    return latents.reshape(batch_size, num_channels, height * width).permute(0, 2, 1)


def flux2_prepare_latent_ids(latents):
    batch_size, _, height, width = latents.shape
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    return ids.unsqueeze(0).expand(batch_size, -1, -1)


def flux2_unpack_latents_with_ids(x, x_ids):
    x_list = []
    for data, pos in zip(x, x_ids):
        _, ch = data.shape
        h_ids, w_ids = pos[:, 1].to(torch.int64), pos[:, 2].to(torch.int64)
        h, w = torch.max(h_ids) + 1, torch.max(w_ids) + 1
        flat_ids = h_ids * w + w_ids
        out = torch.zeros((h * w, ch), device=data.device, dtype=data.dtype)
        out.scatter_(0, flat_ids.unsqueeze(1).expand(-1, ch), data)
        x_list.append(out.view(h, w, ch).permute(2, 0, 1))
    return torch.stack(x_list, dim=0)


def flux2_decode_input(tokens, latent_ids, vae):  # __call__, output_type != "latent", before vae.decode
    latents = flux2_unpack_latents_with_ids(tokens, latent_ids)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.dtype)
    return flux2_unpatchify_latents(latents * std + mean)


def flux2_encode_vae_image(raw, vae):  # _encode_vae_image after retrieve_latents, then prepare_image_latents' pack
    latents = flux2_patchify_latents(raw)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.dtype)
    return flux2_pack_latents((latents - mean) / std)


# --- tiny VAEs ------------------------------------------------------------------------------------------------

def tiny_flux2(latent_channels=8, stats=True, seed=0):
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                                       layers_per_block=1, norm_num_groups=4)
    if stats:  # non-trivial running statistics, varying within each 2x2 patch group
        g = torch.Generator().manual_seed(seed)
        n = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(torch.randn(n, generator=g) * 2)
        vae.bn.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.25)
    return vae.eval()


def tiny_qwen():
    return diffusers.AutoencoderKLQwenImage(base_dim=8, dim_mult=[1, 2], num_res_blocks=1,
                                            temperal_downsample=[False]).eval()


def tiny_dc(**kw):
    return diffusers.AutoencoderDC(latent_channels=8, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                                   encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                                   encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                                   encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()), **kw).eval()


def flux2_space(vae):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained-looking statistics: no warning
        return latent_space(vae)


# --- the registry ---------------------------------------------------------------------------------------------

def test_registry_entries_and_shipped_configs():
    assert vaes.list_vaes() == ["sdxl", "sd15", "sd3", "flux1", "taesdxl", "taesd3", "taef1", *NEW]
    classes = {n: vaes.get_vae_config(n)["_class_name"] for n in NEW}
    assert classes == {"qwen-image": "AutoencoderKLQwenImage", "flux2": "AutoencoderKLFlux2",
                       "sana": "AutoencoderDC", "dcae-f32c32-in": "AutoencoderDC", "dcae-f32c32-mix": "AutoencoderDC"}
    for n in NEW:  # every entry's class exists in the installed diffusers and takes the config's keys
        cfg = vaes.get_vae_config(n)
        cls = getattr(diffusers, cfg.pop("_class_name"))
        # force_upcast: in AutoencoderKLFlux2's signature at diffusers HEAD (58eb52c), not in the installed 0.42.1
        assert set(cfg) - {"_diffusers_version", "force_upcast"} <= set(inspect.signature(cls.__init__).parameters), n
    q = vaes.get_vae_config("qwen-image")
    assert (q["z_dim"], len(q["latents_mean"]), len(q["latents_std"])) == (16, 16, 16)
    assert q["latents_mean"][:2] == [-0.7571, -0.7089] and q["latents_std"][-1] == 1.916
    f = vaes.get_vae_config("flux2")
    assert (f["latent_channels"], f["patch_size"], f["batch_norm_eps"]) == (32, [2, 2], 0.0001)
    assert "scaling_factor" not in f and "shift_factor" not in f
    for name, scale in (("sana", 0.41407), ("dcae-f32c32-in", 0.3189), ("dcae-f32c32-mix", 0.4552)):
        space = latent_space(name)
        assert (space.channels, space.scaling_factor, space.shift_factor, space.pack) == (32, scale, 0.0, 0)
        assert not space.per_channel


def test_qwen_image_defaults_equal_the_class_signature():
    q = vaes.get_vae_config("qwen-image")
    module = tiny_qwen()
    assert module.config.latents_mean == q["latents_mean"] and module.config.latents_std == q["latents_std"]
    assert latent_space(module) == LatentSpace("AutoencoderKLQwenImage", 16, 1.0, 0.0, tuple(q["latents_mean"]),
                                               tuple(q["latents_std"]), 1, 2, "config")


# --- Qwen-Image -----------------------------------------------------------------------------------------------

def test_qwen_image_against_the_pipeline():
    space = latent_space("qwen-image")
    cfg = vaes.get_vae_config("qwen-image")
    assert (space.channels, space.diffusion_channels, space.patch, space.pack) == (16, 16, 1, 2)
    b, height, width = 2, 6, 10  # latent height / width (image 48 x 80 px, VAE factor 8)
    grid = torch.randn(b, 1, 16, height, width, dtype=torch.float64)  # prepare_latents' shape
    tokens = qwen_pack_latents(grid, b, 16, height, width)
    assert tokens.shape == (b, 15, 64)
    assert torch.equal(space.pack_grid(grid[:, 0]), tokens)
    assert torch.equal(space.grid(tokens, height, width), grid[:, 0])
    expected = qwen_decode_input(qwen_unpack_latents(tokens, height * 8, width * 8, 8), cfg)
    # the pipeline builds its mean / std with torch.tensor(list): float32 constants, hence 1e-6
    assert torch.allclose(space.to_vae(space.grid(tokens, height, width)).unsqueeze(2), expected, rtol=0, atol=1e-6)
    # z = (raw - mean) / std, per channel
    raw = expected[:, :, 0]
    mean = torch.tensor(cfg["latents_mean"], dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(cfg["latents_std"], dtype=torch.float64).view(1, -1, 1, 1)
    assert torch.allclose(space.to_diffusion(raw), (raw - mean) / std, rtol=0, atol=1e-12)
    # the tiny VAE decodes what to_vae returns (with its frame axis)
    out = tiny_qwen().decode(space.to_vae(space.grid(tokens.float(), height, width)).unsqueeze(2)).sample
    assert out.shape == (b, 3, 1, height * 2, width * 2)  # a 2-level tiny VAE


# --- FLUX.2 ---------------------------------------------------------------------------------------------------

def test_flux2_by_name_or_config_is_an_error_naming_the_weights():
    for what in ("flux2", vaes.get_vae_config("flux2")):
        with pytest.raises(ValueError, match=r"live in the VAE's weights \(bn.running_mean / bn.running_var"):
            latent_space(what)


def test_flux2_module_is_not_sd15s_default():
    vae = tiny_flux2(stats=False)
    with pytest.warns(UserWarning, match="initial statistics"):
        space = latent_space(vae)
    assert space.scaling_factor == 1.0 and space.per_channel
    assert (space.channels, space.diffusion_channels, space.patch, space.pack) == (8, 32, 2, 1)
    assert space.mean == (0.0,) * 32 and space.std == pytest.approx((1.0001 ** 0.5,) * 32)
    trained = flux2_space(tiny_flux2())
    assert trained.mean == tuple(tiny_flux2().bn.running_mean.double().tolist())


def _flux2_case(b=2, height=8, width=12, seed=1):
    vae = tiny_flux2()
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(b, 32, height // 2, width // 2, generator=g, dtype=torch.float64)  # prepare_latents' shape
    ids = flux2_prepare_latent_ids(grid)
    tokens = flux2_pack_latents(grid)
    return vae.double(), grid, ids, tokens


def test_flux2_against_the_pipeline_and_sensitive_to_stats_and_order():
    vae, grid, ids, tokens = _flux2_case()
    space = flux2_space(vae)
    height, width = 8, 12
    assert tokens.shape == (2, 24, 128 // 4)
    assert torch.equal(space.pack_grid(grid), tokens)
    assert torch.equal(space.grid(tokens, height, width), grid)
    expected = flux2_decode_input(tokens, ids, vae)
    assert expected.shape == (2, 8, height, width)

    def matches(to_vae):
        return torch.allclose(to_vae(space.grid(tokens, height, width)), expected, rtol=0, atol=1e-10)

    assert matches(space.to_vae)
    assert not matches(lambda z: vaes.unpatchify(z, 2))  # no statistics
    mean, std = torch.tensor(space.mean).view(8, 4)[:, 0], torch.tensor(space.std).view(8, 4)[:, 0]
    # the wrong order: unpatchify first, then per-VAE-channel statistics
    assert not matches(lambda z: vaes.unpatchify(z, 2) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1))
    # the wrong channel order inside a patch, (ph, pw, c)
    assert not matches(lambda z: vaes.unpatchify(
        z * torch.tensor(space.std).view(8, 4).T.reshape(1, -1, 1, 1)
        + torch.tensor(space.mean).view(8, 4).T.reshape(1, -1, 1, 1), 2))
    # encoding: _encode_vae_image then _pack_latents
    raw = expected
    assert torch.allclose(space.pack_grid(space.to_diffusion(raw)), flux2_encode_vae_image(raw, vae), rtol=0,
                          atol=1e-12)
    assert vae.decode(space.to_vae(grid)).sample.shape == (2, 3, height * 2, width * 2)  # a 2-block tiny VAE


def test_flux2_statistics_from_a_folder(tmp_path):
    vae = tiny_flux2()
    vae.save_pretrained(tmp_path / "vae")
    space = latent_space(tmp_path)  # a pipeline folder with vae/
    assert space.mean == flux2_space(vae).mean and space.std == flux2_space(vae).std
    assert space.stats_from.endswith("diffusion_pytorch_model.safetensors")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("bn.")}
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: no bn.running_mean / bn.running_var"):
        latent_space(tmp_path / "vae")
    weights.unlink()
    with pytest.raises(ValueError, match="no diffusion_pytorch_model"):
        latent_space(tmp_path / "vae")


# --- SANA -----------------------------------------------------------------------------------------------------

def test_sana_against_the_pipeline():
    space = latent_space("sana")
    z = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    assert torch.equal(space.to_vae(z), z / vaes.get_vae_config("sana")["scaling_factor"])
    assert torch.equal(space.grid(z), z)
    with pytest.raises(ValueError, match="grid"):
        space.grid(z.flatten(2).transpose(1, 2), 4, 4)
    # a module's scaling is its config's; AutoencoderDC's default is 1.0, not AutoencoderKL's 0.18215
    assert latent_space(tiny_dc(scaling_factor=0.41407)).scaling_factor == 0.41407
    assert latent_space(tiny_dc()).scaling_factor == 1.0
    dc = tiny_dc(scaling_factor=0.41407)
    assert dc.decode(latent_space(dc).to_vae(torch.randn(1, 8, 2, 2))).sample.shape == (1, 3, 4, 4)


# --- exact round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["qwen-image", "flux2", "sana", "sd3"])
def test_float64_round_trips(which):
    space = flux2_space(tiny_flux2()) if which == "flux2" else latent_space(which)
    g = torch.Generator().manual_seed(3)
    height, width = 8, 12
    grid = torch.randn(3, space.diffusion_channels, height // space.patch, width // space.patch, generator=g,
                       dtype=torch.float64) * 3
    raw = space.to_vae(grid)
    assert raw.shape == (3, space.channels, height, width) and raw.dtype == torch.float64
    assert torch.allclose(space.to_diffusion(raw), grid, rtol=0, atol=1e-12)
    raw2 = torch.randn(raw.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(space.to_vae(space.to_diffusion(raw2)), raw2, rtol=0, atol=1e-12)
    if space.pack:
        assert torch.equal(space.grid(space.pack_grid(grid), height, width), grid)
        tokens = space.pack_grid(grid)
        assert torch.equal(space.pack_grid(space.grid(tokens, height, width)), tokens)
        with pytest.raises(ValueError, match="expected"):
            space.grid(tokens, height + 2 * space.patch * space.pack, width)


def test_patch_helpers_equal_the_pipeline():
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    assert torch.equal(vaes.patchify(x, 2), flux2_patchify_latents(x))
    assert torch.equal(vaes.unpatchify(vaes.patchify(x, 2), 2), x)
    assert torch.equal(vaes.unpatchify(x[:, :4], 2), flux2_unpatchify_latents(x[:, :4]))
    assert torch.equal(vaes.pack_tokens(x, 2), qwen_pack_latents(x, 2, 5, 6, 8))
    assert torch.equal(vaes.pack_tokens(x, 1), flux2_pack_latents(x))


def test_invalid_statistics_are_refused():
    with pytest.raises(ValueError, match="mean has 3 entries"):
        LatentSpace("x", 4, 1.0, mean=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="finite and positive"):
        LatentSpace("x", 1, 1.0, std=(0.0,))
    bad = dict(vaes.get_vae_config("qwen-image"))
    del bad["latents_std"]
    with pytest.raises(ValueError, match="latents_mean and latents_std"):
        latent_space(bad)
    assert json.loads(json.dumps(vaes.get_vae_config("flux2")))["_class_name"] == "AutoencoderKLFlux2"
