"""Every latent consumer on a 16-channel space (tiny models with FLUX.1's constants), noise levels
included: rewards, zero-shot, the safety checker, guidance and callback, the decode-then-CLIP baseline
with a shifted AutoencoderKL and a 16-channel AutoencoderTiny, ReNO's reward sum, and corpus scoring.
References: float64 copies and diffusers' own decode path, the conversion typed from the published
constants."""

import types
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_open_clip
from corpus_shards import pt_shard

import fastlclip
from fastlclip import corpus, reno

import tiny16
from tiny16 import FLUX_SCALING, FLUX_SHIFT

PROMPT = "a photo of a cat"


def noisy_model(**kw):
    """A noise-aware 16-channel model whose noise embedding is not zero (as after training)."""
    model = tiny16.model(noise_aware=True, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.visual.latent_vit.noise_embed.mlp[2].parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def features64(model, z, s=None):
    """Normalised image features of a float64 copy of ``model``, the conversion typed from FLUX's constants."""
    m64 = tiny16.model(noise_aware=model.noise_aware).double()
    m64.load_state_dict(model.state_dict())
    raw = z.double() / FLUX_SCALING + FLUX_SHIFT
    with torch.no_grad():
        return m64, m64.encode_latents(raw, space="vae", noise_level=None if s is None else torch.as_tensor(s).double())


def test_reward_loss_and_score_with_noise_levels():
    model = noisy_model()
    reward = fastlclip.LatentCLIPReward(model)
    z, s = tiny16.latents(3), torch.tensor([0.1, 0.5, 0.9])
    m64, feats = features64(model, z, s)
    cos = feats @ m64.encode_text([PROMPT])[0]
    torch.testing.assert_close(reward.score(z, PROMPT, noise_level=s).double(), cos, rtol=1e-5, atol=1e-5)
    want = 100 - m64.logit_scale.exp() * cos.mean()
    torch.testing.assert_close(reward(z, PROMPT, noise_level=s).double(), want, rtol=1e-5, atol=1e-4)
    assert (reward.score(z, PROMPT) - reward.score(z, PROMPT, noise_level=s)).abs().max() > 1e-4


def test_zero_shot_with_noise_levels():
    model = noisy_model()
    classes = ["cat", "dog", "car"]
    clf = fastlclip.ZeroShotClassifier(model, classes, ["a photo of a {}."])
    z = tiny16.latents(2)
    m64, feats = features64(model, z, 0.4)
    weights = F.normalize(m64.encode_text([f"a photo of a {c}." for c in classes]), dim=-1)
    want = (m64.logit_scale.exp() * feats @ weights.T).softmax(-1)
    torch.testing.assert_close(clf.probs(z, noise_level=0.4).double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(clf.predict(z, noise_level=0.4), want.argmax(-1))


def test_safety_checker_and_guidance_with_noise_levels():
    model = noisy_model()
    concepts, neutral = {"violence": ["an image of violence"]}, ["an image of a landscape"]
    checker = fastlclip.LatentSafetyChecker(model, concepts=concepts, neutral=neutral)
    guidance = fastlclip.SafetyGuidance(model, concepts=concepts, neutral=neutral, prompt_weight=0.0)
    z, s = tiny16.latents(2), torch.tensor([0.3, 0.6])
    m64, feats = features64(model, z, s)
    txt = F.normalize(m64.encode_text(["an image of violence", "an image of a landscape"]), dim=-1)
    margins = (feats @ txt.T)[:, :1] - (feats @ txt.T)[:, 1:]
    torch.testing.assert_close(checker(z, noise_level=s).scores.double(), margins, rtol=1e-4, atol=1e-5)
    logits = m64.logit_scale.exp() * feats @ txt.T
    want = (torch.logsumexp(logits, -1) - logits[:, -1]).mean()
    torch.testing.assert_close(guidance(z, PROMPT, noise_level=s).double(), want, rtol=1e-4, atol=1e-5)


def test_callback_passes_the_flow_schedulers_sigma():
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    model = noisy_model()
    guidance = fastlclip.SafetyGuidance(model)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    scheduler._step_index = 2  # as after the pipeline's third scheduler.step
    pipe = types.SimpleNamespace(scheduler=scheduler, num_timesteps=4)
    z = tiny16.latents(1)
    got = guidance.callback(PROMPT, steps=1, start=0.0, noise_level="scheduler")(pipe, 2, None, {"latents": z})
    want = guidance.callback(PROMPT, steps=1, start=0.0, noise_level=float(scheduler.sigmas[2]))(pipe, 2, None,
                                                                                                {"latents": z})
    clean = guidance.callback(PROMPT, steps=1, start=0.0)(pipe, 2, None, {"latents": z})
    torch.testing.assert_close(got["latents"], want["latents"], rtol=0, atol=0)
    assert (got["latents"] - clean["latents"]).abs().max() > 0
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(4)
    euler._step_index = 1  # k-diffusion sigmas (> 1): not a flow-matching noise level
    with pytest.raises(ValueError, match="not a flow-matching noise level"):
        guidance.callback(PROMPT, start=0.0, noise_level="scheduler")(types.SimpleNamespace(scheduler=euler), 1, None,
                                                                     {"latents": z})
    with pytest.raises(ValueError, match="needs a noise-aware model"):
        fastlclip.SafetyGuidance(tiny16.model()).callback(PROMPT, noise_level="scheduler")
    with pytest.raises(ValueError, match="is not noise-aware"):
        fastlclip.SafetyGuidance(tiny16.model()).callback(PROMPT, noise_level=0.5)


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_pixel_reward_decodes_16_channel_latents_as_diffusers_pipelines_do(kind):
    vae = tiny16.flux_kl() if kind == "kl" else tiny16.flux_tiny()
    reward = fastlclip.PixelCLIPReward(vae, tiny_open_clip())
    z = tiny16.latents(2)
    # FluxPipeline: vae.decode(latents / scaling_factor + shift_factor); taef1's config has 1.0 and 0.0.
    raw = z.double() / FLUX_SCALING + FLUX_SHIFT if kind == "kl" else z.double()
    with torch.no_grad():
        want = (vae.double().decode(raw).sample / 2 + 0.5).clamp(0, 1)
        vae.float()
        torch.testing.assert_close(reward.decode(z).double(), want, rtol=1e-4, atol=1e-5)
    x = z.clone().requires_grad_(True)
    loss = reward(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and grad.abs().sum() > 0
    assert reward(z, PROMPT, noise_level=0.0) == loss.detach()
    with pytest.raises(ValueError, match="'decode-then-CLIP' is not noise-aware"):
        reward(z, PROMPT, noise_level=0.5)
    with pytest.raises(ValueError, match="expects 16-channel latents"):
        reward(torch.randn(1, 4, 8, 8), PROMPT)


def test_reno_reward_sum_on_16_channel_latents():
    latent = fastlclip.LatentCLIPReward(tiny16.model())
    pixel = fastlclip.PixelCLIPReward(tiny16.flux_kl(), tiny_open_clip(), weighting=0.5)
    combined = reno.WeightedReward([latent, pixel])
    wrap = reno.set_reward_checkpointing(combined.rewards, True)
    try:
        x = tiny16.latents(1).requires_grad_(True)
        losses = combined.losses(x, PROMPT, checkpointed=wrap)
        (grad,) = torch.autograd.grad(losses @ torch.tensor([1.0, 0.5]), x)
    finally:
        reno.set_reward_checkpointing(combined.rewards, False)
    y = x.detach().clone().requires_grad_(True)
    want = latent(y, PROMPT) + 0.5 * pixel(y, PROMPT)
    (want_grad,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(losses @ torch.tensor([1.0, 0.5]), want.detach())
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_corpus_scores_16_channel_diffusion_latents(tmp_path):
    from safetensors.torch import save_file

    model = tiny16.model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    z = tiny16.latents(3)
    pt_shard(tmp_path / "a.tar", "a", z)
    report = corpus.score([tmp_path / "a.tar"], tmp_path / "out", model=tiny16.config(),
                          pretrained=str(tmp_path / "w.safetensors"), prompts=[PROMPT], space="diffusion",
                          progress=False)
    assert [r["status"] for r in report.records] == ["ok"]
    m64, feats = features64(model, z)
    with torch.no_grad():
        want = (feats @ F.normalize(m64.encode_text([PROMPT]), dim=-1).T)[:, 0].numpy()
    got = pq.read_table(tmp_path / "out" / "a.parquet").to_pydict()["clip_cos_0"]
    np.testing.assert_allclose(got, want, atol=1e-5)
