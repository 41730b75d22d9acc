"""The eager model against an independent open_clip reference, and its input checks."""

import copy
import pytest
import torch

import fastlclip
from conftest import TINY, tiny_vae

LATENT = TINY["vision_cfg"]["image_size"] // 8


def test_fidelity_with_open_clip(official_ckpt, reference):
    model = fastlclip.load(TINY, official_ckpt)
    torch.manual_seed(1)
    z = torch.randn(3, 4, LATENT, LATENT)
    got = model.encode_latents(z, space="vae", normalize=False)
    want = reference.encode_image(z)
    assert (got - want).abs().max() < 1e-5
    texts = ["a photo of a cat", "an astronaut riding a horse", "x"]
    got_t = model.encode_text(texts, normalize=False)
    want_t = reference.encode_text(fastlclip.tokenize(texts))
    assert (got_t - want_t).abs().max() < 1e-5
    assert torch.allclose(model.logit_scale, reference.logit_scale)


def test_gradients_wrt_latents_match_open_clip(official_ckpt, reference):
    model = fastlclip.load(TINY, official_ckpt)
    torch.manual_seed(2)
    z = torch.randn(3, 4, LATENT, LATENT, requires_grad=True)
    w = torch.randn(3, TINY["embed_dim"])
    (model.encode_latents(z, space="vae") * w).sum().backward()
    g = z.grad.clone()
    z.grad = None
    (torch.nn.functional.normalize(reference.encode_image(z), dim=-1) * w).sum().backward()
    assert (g - z.grad).abs().max() < 1e-5 * max(1.0, z.grad.abs().max().item())
    assert g.abs().sum() > 0


def test_float64_reference_matches_fp32(official_ckpt):
    m32 = fastlclip.load(TINY, official_ckpt)
    m64 = fastlclip.load(TINY, official_ckpt).double()
    z = torch.randn(2, 4, LATENT, LATENT)
    assert (m32.encode_latents(z) - m64.encode_latents(z.double()).float()).abs().max() < 1e-5


def test_diffusion_space_divides_by_scaling_factor(tiny_model):
    z = torch.randn(2, 4, LATENT, LATENT)
    a = tiny_model.encode_latents(z * fastlclip.SDXL_SCALING_FACTOR, space="diffusion")
    b = tiny_model.encode_latents(z, space="vae")
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="space must be"):
        tiny_model.encode_latents(z, space="pixel")


def test_forward_is_open_clip_shaped(tiny_model):
    img, txt, scale = tiny_model(torch.randn(2, 4, LATENT, LATENT), ["a", "b", "c"])
    assert img.shape == (2, 32) and txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(official_ckpt, dtype):
    m32 = fastlclip.load(TINY, official_ckpt)
    mh = fastlclip.load(TINY, official_ckpt, dtype=dtype)
    z = torch.randn(3, 4, LATENT, LATENT)
    cos = torch.nn.functional.cosine_similarity(m32.encode_latents(z), mh.encode_latents(z).float())
    assert cos.min() > 0.999
    assert mh.encode_latents(z).dtype == dtype


def test_non_contiguous_and_fp16_latents_accepted(tiny_model):
    z = torch.randn(2, 4, LATENT, 2 * LATENT)[..., ::2]
    assert not z.is_contiguous()
    ref = tiny_model.encode_latents(z.contiguous())
    assert torch.allclose(tiny_model.encode_latents(z), ref, atol=1e-6)
    assert torch.allclose(tiny_model.encode_latents(z.to(memory_format=torch.channels_last)), ref, atol=1e-6)
    assert torch.allclose(tiny_model.encode_latents(z.half()), ref, atol=2e-2)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 3, 16, 16), "RGB pixel images"),
    (torch.randn(2, 16, 16, 16), "16 channels"),
    (torch.randn(4, 16, 16), "Add a batch dimension"),
    (torch.randint(0, 5, (2, 4, 16, 16)), "floating point"),
    (torch.randn(0, 4, 16, 16), "empty batch"),
    (torch.randn(1, 4, 32, 32), "trained on 16x16"),
    (torch.full((1, 4, 16, 16), float("nan")), "NaN or Inf"),
    (torch.full((1, 4, 16, 16), float("inf")), "NaN or Inf"),
])
def test_bad_latents_get_clear_errors(tiny_model, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_model.encode_latents(bad)


def test_bad_texts_get_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="empty list"):
        tiny_model.encode_text([])
    with pytest.raises(TypeError, match="must be strings"):
        tiny_model.encode_text(["ok", 3])
    with pytest.raises(ValueError, match="shape"):
        tiny_model.encode_text(torch.zeros(2, 10, dtype=torch.long))


def test_long_text_truncated_with_warning(tiny_model):
    with pytest.warns(UserWarning, match="truncated"):
        f = tiny_model.encode_text(["word " * 200])
    assert f.shape == (1, 32)


def test_encode_images_uses_checkpoint_vae(official_ckpt):
    model = fastlclip.load(TINY, official_ckpt)
    vae = tiny_vae()
    torch.manual_seed(3)
    pixels = torch.rand(2, 3, 128, 128)
    want = model.encode_latents(vae.encode(pixels * 2 - 1).latent_dist.mean, space="vae")
    assert (model.encode_images(pixels) - want).abs().max() < 1e-5
    assert (model.encode_images(pixels, vae=vae) - want).abs().max() < 1e-5


def test_encode_images_errors(tiny_model):
    with pytest.raises(ValueError, match="no VAE encoder"):
        tiny_model.encode_images(torch.rand(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_model.encode_images(torch.rand(1, 3, 128, 128) * 255)
    with pytest.raises(ValueError, match="RGB"):
        tiny_model.encode_images(torch.rand(1, 4, 128, 128))
    with pytest.raises(ValueError, match="images are 256x256 px, this model expects 128x128"):
        tiny_model.encode_images(torch.rand(1, 3, 256, 256))


def test_all_shipped_configs_build():
    names = fastlclip.list_models()
    for required in ("Latent-ViT-B-8-512", "Latent-ViT-B-4-512", "Latent-ViT-B-4-512-plus", "Latent-ViT-C-8-512"):
        assert required in names
    cfg = fastlclip.get_model_config("Latent-ViT-B-4-512-plus")
    assert (cfg.embed_dim, cfg.text.width, cfg.text.heads, cfg.vision.num_tokens, cfg.vision.heads) == (640, 640, 10, 257, 12)
    assert fastlclip.get_model_config("Latent-ViT-B-8-512").vision.num_tokens == 65
    for n in names:
        with torch.device("meta"):
            fastlclip.LatentCLIP(fastlclip.get_model_config(n))


def test_param_count_b8_matches_paper_table():
    with torch.device("meta"):
        m = fastlclip.LatentCLIP(fastlclip.get_model_config("Latent-ViT-B-8-512"))
    n = sum(p.numel() for p in m.visual.parameters())
    assert abs(n / 1e6 - 85.7) < 0.5  # reference README: 85.7 M params in the B/8 image tower


def test_unknown_model_and_options():
    with pytest.raises(ValueError, match="unknown model 'ViT-B-8'.*Did you mean"):
        fastlclip.load("ViT-B-8")
    with pytest.raises(ValueError, match="unknown backend"):
        fastlclip.load(TINY, backend="tensorrt")
    with pytest.raises(TypeError, match="dtype"):
        fastlclip.load(TINY, dtype=torch.int8)


def test_device_mismatch_is_named(tiny_model):
    """A second device without a GPU: the model moved to ``meta`` (meta latents are refused before: no values)."""
    model = copy.deepcopy(tiny_model).to("meta")
    model.check_finite = False
    with pytest.raises(ValueError, match="on cpu but the model is on meta"):
        model.encode_latents(torch.randn(1, 4, LATENT, LATENT))
    with pytest.raises(ValueError, match="latents are on the meta device"):
        tiny_model.encode_latents(torch.randn(1, 4, LATENT, LATENT, device="meta"))


def test_fp32_references_run_without_tf32():
    """TF32 (cuDNN's default for conv) would put fp32 references ~1e-3 off: tests/conftest.py turns it off."""
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp32_patchify_conv_is_true_fp32():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 64, 64, generator=g), torch.randn(768, 4, 8, 8, generator=g) / 16
    got = torch.nn.functional.conv2d(x.cuda(), w.cuda(), stride=8).cpu().double()
    want = torch.nn.functional.conv2d(x.double(), w.double(), stride=8)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
