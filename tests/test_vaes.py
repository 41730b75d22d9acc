"""fastlclip.vaes and the model side of latent spaces and noise-aware scoring: the registry's published
constants, diffusion <-> VAE conversion with a shift (eager, fused kernel, runtimes) against float64
maths, model configs naming a VAE, input errors naming it, and the noise-level embedding and its checks."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from fastlclip import runtime, vaes
from fastlclip.runtime import BackendFallbackWarning

import tiny16
from tiny16 import FLUX_SCALING, FLUX_SHIFT

# The table (each VAE's published vae/config.json): name -> (class, channels, scaling, shift).
PUBLISHED = {
    "sdxl": ("AutoencoderKL", 4, 0.13025, 0.0), "sd15": ("AutoencoderKL", 4, 0.18215, 0.0),
    "sd3": ("AutoencoderKL", 16, 1.5305, 0.0609), "flux1": ("AutoencoderKL", 16, 0.3611, 0.1159),
    "taesdxl": ("AutoencoderTiny", 4, 1.0, 0.0), "taesd3": ("AutoencoderTiny", 16, 1.0, 0.0),
    "taef1": ("AutoencoderTiny", 16, 1.0, 0.0),
}


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


# -- registry ------------------------------------------------------------------------------------------
def test_registry_has_the_published_constants():
    assert set(PUBLISHED) <= set(fastlclip.list_vaes())
    for name, (cls, channels, scaling, shift) in PUBLISHED.items():
        cfg = fastlclip.get_vae_config(name)
        assert cfg["_class_name"] == cls and cfg["latent_channels"] == channels
        space = vaes.latent_space(name)
        assert (space.name, space.channels, space.scaling_factor, space.shift_factor) == (name, channels, scaling, shift)
    for name in ("sd3", "flux1"):  # no quant convs in SD3's and FLUX's VAEs
        assert fastlclip.get_vae_config(name)["use_quant_conv"] is False


def test_get_vae_config_returns_a_copy_and_names_unknown_vaes():
    fastlclip.get_vae_config("flux1")["scaling_factor"] = 1.0
    assert fastlclip.get_vae_config("flux1")["scaling_factor"] == 0.3611
    with pytest.raises(ValueError, match="unknown VAE 'sdxl-turbo'.*flux1"):
        fastlclip.get_vae_config("sdxl-turbo")


def test_latent_space_conversion_against_float64_maths():
    z = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    space = vaes.latent_space("flux1")
    raw = space.to_vae(z)
    torch.testing.assert_close(raw, z / 0.3611 + 0.1159, rtol=0, atol=1e-15)
    torch.testing.assert_close(space.to_diffusion(raw), z, rtol=0, atol=1e-14)
    assert vaes.latent_space(tiny16.flux_kl()) == vaes.LatentSpace("AutoencoderKL", 16, FLUX_SCALING, FLUX_SHIFT)
    assert vaes.latent_space({"latent_channels": 4}).scaling_factor == 0.18215  # AutoencoderKL's default
    with pytest.raises(ValueError, match="latent_channels"):
        vaes.latent_space({"scaling_factor": 1.0})
    with pytest.raises(TypeError, match="VAE name"):
        vaes.latent_space(3)


def test_build_vae_from_name_folder_and_module(tmp_path):
    with pytest.warns(UserWarning, match="random"):
        tiny = vaes.build_vae("taef1")
    assert type(tiny).__name__ == "AutoencoderTiny" and tiny.config.latent_channels == 16 and not tiny.training
    kl = tiny16.flux_kl()
    assert vaes.build_vae(kl) is kl
    kl.save_pretrained(tmp_path / "pipe" / "vae")
    for folder in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        loaded = vaes.build_vae(folder, dtype=torch.float64)
        assert loaded.dtype == torch.float64 and vaes.latent_space(loaded).shift_factor == FLUX_SHIFT
        torch.testing.assert_close(loaded.decoder.conv_in.weight.float(), kl.decoder.conv_in.weight)
    with pytest.raises(ValueError, match="neither a registered name"):
        vaes.build_vae(tmp_path / "nothing")


# -- model configs -------------------------------------------------------------------------------------
def test_model_config_names_its_vae():
    cfg = fastlclip.get_model_config(tiny16.config())
    assert cfg.vae_name == "flux1" and cfg.vision.latent_channels == 16 and cfg.vae["shift_factor"] == 0.1159
    for name in fastlclip.list_models():  # the published configs: SDXL's VAE
        assert fastlclip.get_model_config(name).vae_name == "sdxl"
    model = tiny16.model()
    assert model.latent_space == vaes.LatentSpace("flux1", 16, 0.3611, 0.1159) and not model.noise_aware
    embedded = {**tiny16.config(), "vae_cfg": fastlclip.get_vae_config("sd3")}
    del embedded["vae"]
    assert fastlclip.get_model_config(embedded).vae_name == "custom"
    assert fastlclip.get_model_config({**embedded, "vae": "sd3"}).vae_name == "sd3"


@pytest.mark.parametrize("change, message", [
    ({"vae": "taef1"}, "AutoencoderTiny.*\"vae\": 'flux1'"),
    ({"vae": "sd4"}, "unknown VAE 'sd4'"),
    ({"vae": 3}, "vae must be a registered VAE name"),
    ({"vae": "sdxl"}, None),  # 4 channels: the tower's 16 below then disagree
    ({"vae_cfg": [1]}, "vae_cfg must be a diffusers"),
])
def test_bad_vae_in_a_model_config(change, message):
    cfg = {**tiny16.config(), **change}
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "latent_n_channels": 16}
    with pytest.raises(ValueError, match=message or "latent_n_channels is 16 but its VAE 'sdxl' has 4-channel"):
        fastlclip.get_model_config(cfg)


def test_noise_aware_must_be_a_bool():
    cfg = tiny16.config()
    cfg["vision_cfg"]["noise_aware"] = 1
    with pytest.raises(ValueError, match="noise_aware must be true or false"):
        fastlclip.get_model_config(cfg)


# -- encode_latents with a shift -----------------------------------------------------------------------
@pytest.mark.parametrize("vae", ["sd15", "sd3", "flux1"])
def test_diffusion_space_uses_the_vaes_own_constants(vae):
    cfg = tiny16.config()
    cfg["vae"] = vae
    torch.manual_seed(0)
    model = quiet(fastlclip.load, cfg).double()
    _, channels, scaling, shift = PUBLISHED[vae]
    z = torch.randn(2, channels, 8, 8, dtype=torch.float64)
    got = model.encode_latents(z)
    want = model.encode_latents(z / scaling + shift, space="vae")  # the conversion in float64, typed here
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if shift:  # the shift matters: dropping it gives other features
        assert (model.encode_latents(z / scaling, space="vae") - got).abs().max() > 1e-3


def _eager_tower64(tower, latents, scale, shift, noise=None):
    """The tower's eager path in float64 on detached copies: (features, d latents, d conv1, d pos)."""
    t64 = tiny16.model(noise_aware=tower.noise_embed is not None).visual.latent_vit.double()
    t64.load_state_dict({k: v.double() for k, v in tower.state_dict().items()})
    x = latents.detach().double().requires_grad_(True)
    out = t64(x, scale=scale, shift=shift, noise_level=noise)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    return out, grad, x.grad, t64.conv1.weight.grad, t64.positional_embedding.grad


def test_fused_patch_embed_folds_the_shift_into_the_positions():
    from fastlclip.kernels.fused_patch_embed import patch_embed

    tower = tiny16.model().visual.latent_vit
    tower.patch_embed_fn = patch_embed  # the Triton kernel (TRITON_INTERPRET=1) or its PyTorch fallback
    x = tiny16.latents(2).requires_grad_(True)
    scale, shift = 1 / FLUX_SCALING, FLUX_SHIFT
    want, grad, d_x, d_w, d_pos = _eager_tower64(tower, x, scale, shift)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fall")  # without TRITON_INTERPRET: the PyTorch fallback
        out = tower(x, scale=scale, shift=shift)
    out.backward(grad.float())
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), d_x, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(tower.conv1.weight.grad.double(), d_w, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(tower.positional_embedding.grad.double(), d_pos, rtol=1e-3, atol=1e-5)


def test_triton_backend_matches_float64_with_shift_and_noise():
    model = tiny16.model(noise_aware=True, backend="triton")
    _perturb_noise_embedding(model)
    x = tiny16.latents(2)
    s = torch.tensor([0.2, 0.9])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fall")
        got = model.encode_latents(x, normalize=False, noise_level=s)
    want = _eager_tower64(model.visual.latent_vit, x, 1 / FLUX_SCALING, FLUX_SHIFT, s.double())[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# -- input errors --------------------------------------------------------------------------------------
def test_latent_errors_name_the_vae_and_its_channels():
    model = tiny16.model()
    with pytest.raises(ValueError, match=r"4 channels, the model expects 16-channel latents of the 'flux1' VAE.*sdxl 4"):
        model.encode_latents(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"RGB.*16-channel latents of the 'flux1' VAE.*encode with the 'flux1' VAE"):
        model.encode_latents(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="space must be 'diffusion'.*shift_factor"):
        model.encode_latents(tiny16.latents(1), space="pixels")


# -- noise-aware scoring -------------------------------------------------------------------------------
def _perturb_noise_embedding(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    last = model.visual.latent_vit.noise_embed.mlp[2]
    with torch.no_grad():
        last.weight.copy_(0.05 * torch.randn(last.weight.shape, generator=g))
        last.bias.copy_(0.05 * torch.randn(last.bias.shape, generator=g))


def _noise_embedding64(embed, s):
    """The embedding typed from its definition, float64: sin/cos features of 1000 s -> Linear, SiLU, Linear."""
    half = embed.features // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = 1000.0 * s.double()[:, None] * freqs
    feats = torch.cat([angles.cos(), angles.sin()], dim=-1)
    l1, l2 = embed.mlp[0], embed.mlp[2]
    h = F.silu(feats @ l1.weight.double().T + l1.bias.double())
    return h @ l2.weight.double().T + l2.bias.double()


def test_fresh_noise_aware_tower_equals_the_plain_one():
    plain, aware = tiny16.model(), tiny16.model(noise_aware=True)
    missing, unexpected = aware.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".noise_embed." in k for k in missing)
    assert aware.noise_aware
    x = tiny16.latents(3)
    want = plain.encode_latents(x)
    for s in (None, 0.0, 0.7, torch.tensor([0.0, 0.5, 1.0])):
        torch.testing.assert_close(aware.encode_latents(x, noise_level=s), want, rtol=0, atol=0)


def test_noise_embedding_is_added_after_ln_pre():
    plain, aware = tiny16.model(), tiny16.model(noise_aware=True)
    aware.load_state_dict(plain.state_dict(), strict=False)
    _perturb_noise_embedding(aware)
    plain, aware = plain.double(), aware.double()
    x = tiny16.latents(3, dtype=torch.float64)
    s = torch.tensor([0.0, 0.35, 1.0])
    emb = _noise_embedding64(aware.visual.latent_vit.noise_embed, s)
    hook = plain.visual.latent_vit.ln_pre.register_forward_hook(lambda m, i, out: out + emb[:, None])
    want = plain.encode_latents(x)
    hook.remove()
    torch.testing.assert_close(aware.encode_latents(x, noise_level=s), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(aware.encode_latents(x[1:2], noise_level=0.35), want[1:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(aware.encode_latents(x[:1]), want[:1], rtol=0, atol=1e-12)  # None: clean, s = 0


@pytest.mark.parametrize("level, error, message", [
    (float("nan"), ValueError, "NaN"),
    (1.5, ValueError, r"\[0, 1\]"),
    (torch.tensor([0.1, -0.2]), ValueError, r"\[0, 1\]"),
    (torch.tensor([0.1, 0.2, 0.3]), ValueError, "3 values for a batch of 2"),
    (torch.tensor([[0.1, 0.2]]), ValueError, "shape"),
    (torch.tensor([0, 1]), ValueError, "int64"),
    (True, TypeError, "bool"),
    ("0.5", TypeError, "str"),
])
def test_bad_noise_levels(level, error, message):
    model = tiny16.model(noise_aware=True)
    with pytest.raises(error, match=message):
        model.encode_latents(tiny16.latents(2), noise_level=level)


def test_a_plain_model_refuses_a_noise_level():
    model = tiny16.model()
    x = tiny16.latents(2)
    want = model.encode_latents(x)
    for ok in (None, 0.0, torch.zeros(2)):
        torch.testing.assert_close(model.encode_latents(x, noise_level=ok), want, rtol=0, atol=0)
    for bad in (0.5, torch.tensor([0.0, 0.1])):
        with pytest.raises(ValueError, match="is not noise-aware"):
            model.encode_latents(x, noise_level=bad)
    with pytest.raises(ValueError, match="is not noise-aware"):
        fastlclip.LatentCLIPReward(model)(x, "a cat", noise_level=0.5)


# -- runtimes ------------------------------------------------------------------------------------------
def _reward_and_grad(model, x, s):
    x = x.detach().clone().requires_grad_(True)
    loss = fastlclip.LatentCLIPReward(model)(x, "a photo of a cat", noise_level=s)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("kind", ["graph", "graph-fused", "compile"])
def test_runtimes_run_noise_levels_and_shifts_as_eager_does(kind):
    from fastlclip.kernels.launch import kernels_available

    if kind == "graph-fused" and not kernels_available("cpu"):
        pytest.skip("the Triton kernels do not run here (no GPU, TRITON_INTERPRET unset)")
    model = tiny16.model(noise_aware=True)
    _perturb_noise_embedding(model)
    x, s = tiny16.latents(2), torch.tensor([0.25, 0.75])
    want = [model.encode_latents(x, noise_level=s), model.encode_latents(x), *_reward_and_grad(model, x, s),
            *_reward_and_grad(model, x, None)]
    if kind == "compile":
        rt = runtime.install(model, runtime.CompiledRuntime(model, (1, 2), compiler="eager")).runtime
    else:
        rt = runtime.install(model, runtime.GraphRuntime(model, (1, 2), fused=kind == "graph-fused", emulate=True)).runtime
    with pytest.warns(BackendFallbackWarning, match="noise_level run the image tower uncaptured"):
        noisy = model.encode_latents(x, noise_level=s)
    got = [noisy, model.encode_latents(x), *_reward_and_grad(model, x, s), *_reward_and_grad(model, x, None)]
    tol = dict(rtol=1e-4, atol=1e-5) if kind == "graph-fused" else dict(rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    assert rt.stats.uncaptured == 2  # the noisy calls; the clean ones ran captured / compiled
    assert (rt.stats.captures if kind != "compile" else rt.stats.compiles) >= 2


# -- config checks: constants in range, integers of any size, nesting ----------------------------------
def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("key, value", [
    ("scaling_factor", math.inf), ("scaling_factor", 1e300), ("scaling_factor", -math.inf), ("scaling_factor", 0),
    ("scaling_factor", 1e-300), ("scaling_factor", math.nan), ("scaling_factor", 10**400), ("scaling_factor", -2),
    ("shift_factor", math.inf), ("shift_factor", -1e300), ("shift_factor", 10**400), ("shift_factor", math.nan),
], ids=lambda v: str(v)[:12])
def test_latent_space_refuses_constants_out_of_range(key, value):
    # inf or 1e300 would map every latent to 0 (every latent then scores the same); 10**400 overflowed float()
    cfg = {"latent_channels": 4, "scaling_factor": 0.5, key: value}
    with pytest.raises(ValueError, match=f"{key} must be a finite number in \\[.*fix the VAE config"):
        vaes.latent_space(cfg)
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):  # the model config path too
        fastlclip.get_model_config({**tiny16.config(), "vae_cfg": {**fastlclip.get_vae_config("flux1"), key: value}})


def test_latent_space_range_holds_every_published_constant_and_converts_integers():
    lo, hi = vaes.SCALING_RANGE
    for _, _, scaling, shift in PUBLISHED.values():  # three orders of magnitude of margin either side
        assert lo * 1000 <= scaling <= hi / 1000 and abs(shift) <= vaes.MAX_SHIFT / 1000
    space = vaes.latent_space({"latent_channels": 4, "scaling_factor": 2, "shift_factor": -1})
    assert (space.scaling_factor, space.shift_factor) == (2.0, -1.0) and type(space.scaling_factor) is float
    assert vaes.latent_space({"latent_channels": 4, "scaling_factor": 1e-4}).scaling_factor == 1e-4  # edges
    assert vaes.latent_space({"latent_channels": 4, "scaling_factor": 10_000}).scaling_factor == 1e4
    with pytest.raises(ValueError, match="latent_channels must be a positive integer at most 1024, got an integer of "
                                         "401 digits"):
        vaes.latent_space({"latent_channels": 10**400})


def test_deeply_nested_configs_are_a_value_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text(deep_json(100_000))  # json.loads: RecursionError
    with pytest.raises(ValueError, match="model config file .*deep.json.*nests too deeply"):
        fastlclip.get_model_config(deep)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL", "x": ' + deep_json(100_000) + "}")
    with pytest.raises(ValueError, match="VAE config .*config.json.*nests too deeply"):
        vaes.build_vae(tmp_path)
    nested: dict = {}
    cur = nested
    for _ in range(100_000):  # a dict no JSON parser built: copy.deepcopy recursed
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(ValueError, match="here: vae_cfg: the config nests more than 32 levels"):
        vaes.model_vae({"vae_cfg": {**fastlclip.get_vae_config("flux1"), "x": nested}}, "here")
    with pytest.raises(ValueError, match="model config 'custom': the config nests more than 32 levels"):
        fastlclip.get_model_config({**tiny16.config(), "notes": nested})
    with pytest.raises(fastlclip.CheckpointError, match="m.safetensors: the config in its metadata is invalid: the "
                                                         "JSON: the JSON nests too deeply"):
        from fastlclip.factory import config_from_metadata
        config_from_metadata("{\"a\": " + deep_json(100_000) + "}", "m.safetensors")
    ok = {**tiny16.config(), "notes": json.loads(deep_json(30))}  # shallow enough
    assert fastlclip.get_model_config(ok).vae_name == "flux1"


def test_vae_folder_with_an_infinite_scaling_factor_is_refused_before_loading(tmp_path):
    cfg = {**fastlclip.get_vae_config("flux1"), "scaling_factor": 1e300}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*scaling_factor must be a finite number"):
        vaes.build_vae(tmp_path)


def test_serve_refuses_a_deeply_nested_model_config_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from fastlclip.serve.__main__ import main

    deep = tmp_path / "deep.json"
    deep.write_text(deep_json(100_000))
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny16.model().state_dict().items()}, str(ckpt))
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(deep), "--pretrained", str(ckpt), "--device", "cpu"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "nests too deeply" in lines[0] and "Traceback" not in lines[0]


def test_reno_generator_refuses_a_vae_config_with_an_infinite_scaling_factor():
    from bench import tiny
    from fastlclip import reno

    with pytest.raises(ValueError, match="scaling_factor must be a finite number"):
        reno.OneStepGenerator.from_config(tiny.UNET, {**tiny.VAE, "scaling_factor": math.inf}, height=tiny.IMAGE_SIZE,
                                          width=tiny.IMAGE_SIZE)
    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE)
    assert gen.vae.config.scaling_factor == tiny.VAE["scaling_factor"]  # a sane one is taken as it is
