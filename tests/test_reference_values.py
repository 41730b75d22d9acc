"""Values checked against references that share no code with fastlclip: open_clip in float64, diffusers'
VAE, the shipped SDXL VAE config and maths written out here. Each test names the mistake it catches
(issue 16's mutation run: mistakes that passed every test before)."""

import copy
import json
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from conftest import TINY, official_state, tiny_open_clip, tiny_vae
from fastlclip.safety import LatentSafetyChecker, SafetyGuidance

LATENT = TINY["vision_cfg"]["image_size"] // 8
SDXL = 0.13025  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json "scaling_factor" (SD 1.5's is 0.18215)
PROMPTS = ["a photo of a cat", "an astronaut riding a horse", "a bowl of fruit"]
CONCEPTS = {"violence": ["an image of violence"], "sexual": ["an image of nudity", "an image of explicit content"]}
NEUTRAL = ["an image of a landscape", "an image of a room"]


@pytest.fixture
def model(official_ckpt):
    return fastlclip.load(TINY, official_ckpt)


@pytest.fixture
def ref64(reference):
    """The open_clip reference in float64: the independent computation every value here is checked against."""
    return copy.deepcopy(reference).double()


def ref_image(ref64, latents_vae_space):
    """Normalised float64 image features of VAE-space latents, by open_clip."""
    return F.normalize(ref64.encode_image(latents_vae_space.double()), dim=-1)


def ref_text(ref64, texts):
    return F.normalize(ref64.encode_text(fastlclip.tokenize(texts)), dim=-1)


def ref_mean_text(ref64, texts):
    return F.normalize(ref_text(ref64, texts).mean(0), dim=-1)


# -- 1: the SDXL scaling factor ---------------------------------------------------------------------------


def test_scaling_factor_is_sdxl_vae_config_value():
    """0.13025 -> 0.18215 (SD 1.5's) in inputs.py fails here."""
    shipped = json.loads((resources.files("fastlclip") / "configs" / "diffusers" / "sdxl_vae.json").read_text())
    assert shipped["_class_name"] == "AutoencoderKL" and shipped["block_out_channels"] == [128, 256, 512, 512]
    assert fastlclip.SDXL_SCALING_FACTOR == shipped["scaling_factor"] == SDXL


def test_diffusion_space_latents_against_open_clip_on_vae_latents(model, ref64):
    """encode_latents(z * 0.13025) is open_clip's image tower on z: a wrong factor or a multiply for a divide fails."""
    torch.manual_seed(4)
    z = torch.randn(3, 4, LATENT, LATENT)
    got = model.encode_latents(z * SDXL)
    torch.testing.assert_close(got.double(), ref_image(ref64, z), rtol=0, atol=2e-5)
    got_vae = model.encode_latents(z, space="vae")
    torch.testing.assert_close(got_vae.double(), ref_image(ref64, z), rtol=0, atol=2e-5)


# -- 2: one prompt per latent -----------------------------------------------------------------------------


def per_sample_reference(model, ref64, z):
    cos = (ref_image(ref64, z / SDXL) * ref_text(ref64, PROMPTS)).sum(-1)  # row i against prompt i
    return cos, 100 - model.logit_scale.exp().double() * cos.mean()


def test_per_sample_prompts_score_each_row_against_its_own_prompt(model, ref64):
    """Reversed, shifted or shared text features (prompt 0 for every row) fail: the three prompts differ."""
    torch.manual_seed(5)
    z = torch.randn(3, 4, LATENT, LATENT)
    cos, loss = per_sample_reference(model, ref64, z)
    assert (cos.max() - cos.min()).item() > 1e-3  # distinct cosines: a permutation would show
    reward = fastlclip.LatentCLIPReward(model)
    torch.testing.assert_close(reward.score(z, PROMPTS).double(), cos, rtol=0, atol=2e-5)
    assert reward(z, PROMPTS).item() == pytest.approx(loss.item(), abs=1e-4)
    # the same prompts again (now cached), and in another order: still each row's own
    order = [2, 0, 1]
    torch.testing.assert_close(reward.score(z[order], [PROMPTS[i] for i in order]).double(), cos[order], rtol=0, atol=2e-5)
    guide = SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, safety_weight=0)
    assert guide(z, PROMPTS).item() == pytest.approx(loss.item(), abs=1e-4)


def test_per_sample_prompts_through_a_runtime_in_chunks(model, ref64):
    """The graph runtime (emulated on the CPU) splits a batch of 3 into chunks of 2 and 1: each chunk gets its rows' texts."""
    from fastlclip import runtime

    torch.manual_seed(6)
    z = torch.randn(3, 4, LATENT, LATENT)
    _, loss = per_sample_reference(model, ref64, z)
    runtime.install(model, runtime.GraphRuntime(model, (2,), emulate=True))
    assert fastlclip.LatentCLIPReward(model)(z, PROMPTS).item() == pytest.approx(loss.item(), abs=1e-4)


# -- 5: space="vae" on the rewards, the guidance and the checker -----------------------------------------


def test_reward_guidance_and_checker_read_vae_space_latents(model, ref64):
    """A reward, guidance or checker that ignores space= (treats the latents as diffusion-space) fails."""
    torch.manual_seed(7)
    z = torch.randn(2, 4, LATENT, LATENT)  # VAE space
    img = ref_image(ref64, z)
    s = model.logit_scale.exp().double()
    prompt = ref_text(ref64, [PROMPTS[0]])[0]
    cos = img @ prompt

    reward = fastlclip.LatentCLIPReward(model, space="vae")
    assert reward(z, PROMPTS[0]).item() == pytest.approx((100 - s * cos.mean()).item(), abs=1e-4)
    torch.testing.assert_close(reward.score(z, PROMPTS[0]).double(), cos, rtol=0, atol=2e-5)

    feats = torch.stack([ref_mean_text(ref64, t) for t in [*CONCEPTS.values(), NEUTRAL]])  # concepts, then neutral
    margins = img @ feats[:-1].T - (img @ feats[-1])[:, None]
    logits = s * img @ feats.T
    want = (100 - s * cos.mean()) + 0.5 * (torch.logsumexp(logits, -1) - logits[:, -1]).mean()
    guide = SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, safety_weight=0.5, space="vae")
    assert guide(z, PROMPTS[0]).item() == pytest.approx(want.item(), abs=1e-4)
    torch.testing.assert_close(guide.concept_scores(z).double(), margins, rtol=0, atol=2e-5)

    checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, space="vae")
    torch.testing.assert_close(checker.scores(z).double(), margins, rtol=0, atol=2e-5)
    threshold = margins[:, 0].mean().item()  # between the two samples' violence scores
    out = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, space="vae",
                              thresholds={"violence": threshold, "sexual": 2.0})(z)
    assert out.flagged.tolist() == (margins[:, 0] > threshold).tolist() and 0 < out.flagged.sum() < 2

    clf = fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}."])
    want_probs = (s * img @ ref_text(ref64, ["a photo of a cat.", "a photo of a dog."]).T).softmax(-1)
    torch.testing.assert_close(clf.probs(z, space="vae").double(), want_probs, rtol=0, atol=1e-4)


# -- 6: encode_images(sample=True) ------------------------------------------------------------------------


@pytest.fixture
def vae_model(tmp_path, reference):
    """A checkpoint carrying a VAE whose posterior std is far from 1 (logvar around -3), and that VAE."""
    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 3.0
    path = tmp_path / "epoch_1.pt"
    torch.save(official_state(reference, vae), path)
    return fastlclip.load(TINY, path), vae


def posterior(vae, pixels):
    """diffusers' posterior written out: moments = quant_conv(encoder(2x - 1)); std = exp(logvar / 2)."""
    with torch.no_grad():
        mean, logvar = vae.quant_conv(vae.encoder(pixels * 2 - 1)).chunk(2, dim=1)
    return mean.double(), torch.exp(0.5 * logvar.double())


def tower_inputs(model, fn):
    """Run ``fn()``; return the latents (and scale) the image tower was given."""
    seen = []
    hook = model.visual.latent_vit.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].detach().double(), kwargs.get("scale", 1.0))), with_kwargs=True)
    try:
        out = fn()
    finally:
        hook.remove()
    assert len(seen) == 1
    return out, *seen[0]


def test_encode_images_sample_draws_mean_plus_std_times_noise(vae_model, ref64):
    """The tower gets mean + std * N(0, 1) with std = exp(logvar / 2): a wrong posterior std (exp(logvar), a
    missing 0.5), uniform noise, or an ignored sample= fails. The noise stream is the library's own (diffusers
    draws its sample differently), so the test recovers it, (latents - mean) / std, and checks it is standard
    normal over the 2 x 4 x 16 x 16 draws (a std of 1 +- 0.05 where a wrong std gives about 0.2 or 5)."""
    model, vae = vae_model
    torch.manual_seed(8)
    pixels = torch.rand(2, 3, 128, 128)
    mean, std = posterior(vae, pixels)
    assert 0.1 < std.mean().item() < 0.5  # exp(-1.5)-ish: far from exp(logvar) and from 1
    for kw in ({}, {"vae": vae}):  # the checkpoint's encoder, and a diffusers AutoencoderKL passed in
        torch.manual_seed(9)
        got, latents, scale = tower_inputs(model, lambda: model.encode_images(pixels, sample=True, **kw))
        assert scale == 1.0  # VAE space
        eps = (latents - mean) / std
        assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.05, (kw, eps.mean(), eps.std())
        assert abs(torch.corrcoef(torch.stack([eps.flatten(), mean.flatten()]))[0, 1].item()) < 0.1
        torch.testing.assert_close(got.double(), ref_image(ref64, latents), rtol=0, atol=5e-5)
        torch.manual_seed(9)
        again = model.encode_images(pixels, sample=True, **kw)
        assert torch.equal(again, got)  # seeded: reproducible
    got, latents, _ = tower_inputs(model, lambda: model.encode_images(pixels))
    torch.testing.assert_close(latents, mean, rtol=0, atol=1e-6)  # sample=False: the posterior mean
    torch.testing.assert_close(got.double(), ref_image(ref64, mean), rtol=0, atol=5e-5)


# -- 8: zero-shot text batches smaller than the class count ------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_zero_shot_in_text_batches_smaller_than_the_class_count(model, ref64, batch_size):
    """3 classes x 2 templates = 6 texts in batches of 1, 2 or 4 (the last one short): a chunk that drops or
    repeats a text fails."""
    names = ["cat", "dog", "car"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    clf = fastlclip.ZeroShotClassifier(model, names, templates, batch_size=batch_size)
    weights = torch.stack([ref_mean_text(ref64, [t.format(c) for t in templates]) for c in names])
    torch.testing.assert_close(clf.weights.double(), weights, rtol=0, atol=2e-5)
    torch.manual_seed(10)
    z = torch.randn(4, 4, LATENT, LATENT)
    logits = model.logit_scale.exp().double() * ref_image(ref64, z / SDXL) @ weights.T
    torch.testing.assert_close(clf.logits(z).double(), logits, rtol=0, atol=1e-3)
    assert torch.equal(clf.predict(z), logits.argmax(-1))


# -- 12: PixelCLIPReward's options ------------------------------------------------------------------------


@pytest.fixture
def pixel_clip():
    return tiny_open_clip()


OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def pixel_reference(vae, clip, z, tokens, mean, std):
    """Decode-then-CLIP written out: decode z / 0.13025, [0, 1], bicubic short side to 32 (48x64 -> 32x42, the
    long side floored as torchvision's Resize does), centre crop, normalise, open_clip; the mean cosine to the
    text and the loss."""
    with torch.no_grad():
        img = (vae.decode(z / SDXL).sample / 2 + 0.5).clamp(0, 1)
        img = F.interpolate(img, size=(32, 42), mode="bicubic", antialias=True)[..., :, 5:37]
        x = (img - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        cos = F.normalize(clip.encode_image(x), dim=-1) @ F.normalize(clip.encode_text(tokens), dim=-1)[0]
    return 100 - clip.logit_scale.exp().item() * cos.mean().item()


def test_pixel_reward_uses_its_tokenizer(pixel_clip):
    """An ignored tokenizer= (open_clip's default tokenizer used instead) fails: this one reverses the text."""
    vae = tiny_vae()
    calls = []

    def tokenizer(texts):
        calls.append(list(texts))
        return fastlclip.tokenize([t[::-1] for t in texts])

    reward = fastlclip.PixelCLIPReward(vae, pixel_clip, tokenizer=tokenizer)
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(11))
    want = pixel_reference(vae, pixel_clip, z, fastlclip.tokenize(["tac a"]), OPENAI_MEAN, OPENAI_STD)
    default = pixel_reference(vae, pixel_clip, z, fastlclip.tokenize(["a cat"]), OPENAI_MEAN, OPENAI_STD)
    assert abs(want - default) > 1e-3
    assert reward(z, "a cat").item() == pytest.approx(want, abs=1e-4)
    assert calls == [["a cat"]]


def test_pixel_reward_normalisation_from_arguments_then_preprocess_cfg_then_openai(pixel_clip):
    """mean/std arguments win over the model's preprocess_cfg, which wins over OpenAI's constants: ignoring
    either, or swapping mean and std, fails."""
    vae = tiny_vae()
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(12))
    tokens = fastlclip.tokenize(["a cat"])
    cfg_mean, cfg_std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    arg_mean, arg_std = (0.1, 0.2, 0.6), (0.5, 0.25, 0.125)
    cases = [({}, None, OPENAI_MEAN, OPENAI_STD),
             ({}, {"mean": cfg_mean, "std": cfg_std}, cfg_mean, cfg_std),
             ({"mean": arg_mean, "std": arg_std}, {"mean": cfg_mean, "std": cfg_std}, arg_mean, arg_std),
             ({"mean": arg_mean}, {"mean": cfg_mean, "std": cfg_std}, arg_mean, cfg_std)]
    values = []
    for kwargs, cfg, mean, std in cases:
        pixel_clip.visual.preprocess_cfg = cfg if cfg is not None else {}
        reward = fastlclip.PixelCLIPReward(vae, pixel_clip, **kwargs)
        want = pixel_reference(vae, pixel_clip, z, tokens, mean, std)
        assert reward(z, "a cat").item() == pytest.approx(want, abs=1e-4), (kwargs, cfg)
        values.append(want)
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-3  # the cases differ


# -- survivors of the mutmut run (profiles/mutation.md) ---------------------------------------------------


def test_loss_upcasts_half_precision_and_keeps_float64():
    from fastlclip import loss

    x = torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16)
    assert loss.at_least_fp32(x).dtype == torch.float32 and loss.normalized(x).dtype == torch.float32
    assert loss.at_least_fp32(x.double()).dtype == torch.float64
    assert loss.cosine(x, torch.tensor([0.6, 0.8])).dtype == torch.float32
    assert loss.clip_loss(torch.tensor([0.5], dtype=torch.bfloat16), torch.tensor(0.0, dtype=torch.bfloat16)).dtype == torch.float32


def test_forward_passes_space_and_skips_a_missing_side(model, ref64):
    torch.manual_seed(13)
    z = torch.randn(2, 4, LATENT, LATENT)
    img, txt, _ = model(z, space="vae")
    assert txt is None
    torch.testing.assert_close(img.double(), ref_image(ref64, z), rtol=0, atol=2e-5)
    img, txt, scale = model(texts=PROMPTS[:2])
    assert img is None and txt.shape == (2, TINY["embed_dim"])
    torch.testing.assert_close(txt.double(), ref_text(ref64, PROMPTS[:2]), rtol=0, atol=2e-5)


def test_documented_defaults(model):
    """ReNO sums rewards with their .weighting, 1.0 unless given; check_latents checks NaN unless told not to."""
    from fastlclip import inputs

    assert fastlclip.LatentCLIPReward(model).weighting == 1.0
    assert SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL).weighting == 1.0
    bad = torch.full((1, 4, LATENT, LATENT), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        inputs.check_latents(bad, channels=4, size=LATENT, patch=4)


# -- boundaries the mutation run found untested (profiles/mutation.md) ------------------------------------
@pytest.mark.parametrize("bias", [100.0, -100.0])
def test_encode_images_clamps_the_log_variance_as_diffusers_does(tmp_path, reference, monkeypatch, bias):
    """std = exp(logvar / 2) with logvar clamped to [-30, 20], as diffusers' DiagonalGaussianDistribution:
    a VAE whose log-variance sits far outside reaches both bounds. The noise is fixed at 1e6 so that even
    exp(-15) is visible in float32."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[4:] += bias
    path = tmp_path / "epoch_1.pt"
    torch.save(official_state(reference, vae), path)
    model = fastlclip.load(TINY, path)
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dist = DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(pixels * 2 - 1)))
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.full_like(t, 1e6))
    _, latents, _ = tower_inputs(model, lambda: model.encode_images(pixels, sample=True))
    torch.testing.assert_close(latents, (dist.mean + 1e6 * dist.std).double(), rtol=1e-5, atol=1e-5)


def test_encode_images_casts_pixels_to_a_half_precision_model_and_vae(tmp_path, reference):
    """float32 pixels into a bfloat16 model: cast to the checkpoint encoder's dtype, and to a passed VAE's."""
    path = tmp_path / "epoch_1.pt"
    torch.save(official_state(reference, tiny_vae()), path)
    full, half = fastlclip.load(TINY, path), fastlclip.load(TINY, path, dtype=torch.bfloat16)
    pixels = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    want = full.encode_images(pixels).double()
    for kw in ({}, {"vae": tiny_vae().to(torch.bfloat16)}):
        got = half.encode_images(pixels, **kw).double()
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99, kw
