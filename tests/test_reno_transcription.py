"""The ``reno`` pipeline optimises as ReNO does: checked on tiny configs against a direct transcription of ReNO's
update, written out here by hand from ExplainableML/ReNO (training/trainer.py ``LatentNoiseTrainer.train``,
training/optim.py ``get_optimizer``, main.py's fp16 ``nn.Parameter`` noise), independent of ``fastlclip.reno``:

- the one-step generator: EulerAncestral from sigma_max to 0 is ``x - sigma * eps`` with ``x = z * init_noise_sigma``
  and the UNet fed ``x / sqrt(sigma^2 + 1)``;
- loss = weighting * reward + reg_weight * (0.5 ||z||^2 - (d - 1) log ||z||), the norm of the fp16 noise cast to fp32;
- ``clip_grad_norm_(0.1)``: the gradient scaled by 0.1 / (||g|| + 1e-6) when that is below 1;
- SGD, momentum 0.9, dampening 0, Nesterov: buf = g (first step) or 0.9 buf + g; z -= lr (g + 0.9 buf);
- no step after the last iteration; the best iterate has the lowest reward loss, strictly below the best so far.
"""

import math

import pytest
import torch

from bench import reno_pipelines, rewards as bench_rewards

PROMPT = "A red dog and a green cat"
LR, MOMENTUM, CLIP, REG = 5.0, 0.9, 0.1, 0.01


@pytest.fixture(scope="module")
def generator():
    class Args:
        weights = None
    return reno_pipelines.build_generator(Args, device="cpu", dtype=torch.float32, smoke=True)


def reward_for(key, generator, weighting):
    torch.manual_seed(0)
    reward = bench_rewards.build(bench_rewards.REWARDS[key], vae=generator.vae, device="cpu", dtype=torch.float32,
                                 smoke=True)
    reward.weighting = weighting
    return reward


def transcribed_reno(generator, reward, z0, iterations, lr=LR):
    """ReNO's loop, by hand. Returns the noise before each iteration, the reward losses and the best index."""
    cond = generator.encode_prompt(PROMPT)
    unet = generator.unet
    init_sigma = math.sqrt(generator.sigma**2 + 1)
    d = math.prod(z0.shape[1:])
    z, buf = z0.clone(), None
    zs, losses, best, best_loss = [], [], None, math.inf
    for i in range(iterations):
        zs.append(z.clone())
        z_var = z.clone().requires_grad_(True)
        x = z_var * init_sigma
        model_in = (x / init_sigma).float()
        eps = unet(model_in, generator.timestep, encoder_hidden_states=cond.prompt_embeds,
                   added_cond_kwargs={"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}).sample
        latents = x.float() - generator.sigma * eps
        loss = reward.weighting * reward(latents, PROMPT)
        losses.append(loss.item())
        if losses[-1] < best_loss:
            best, best_loss = i, losses[-1]
        if i == iterations - 1:
            break
        norm = torch.linalg.vector_norm(z_var).float()
        total = loss + (REG * (0.5 * norm**2 - (d - 1) * torch.log(norm))).to(loss.dtype)
        (g,) = torch.autograd.grad(total, z_var)  # fp16, like the parameter: the update runs in fp16
        coef = torch.clamp(CLIP / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)
        g = g * coef
        buf = g.clone() if buf is None else MOMENTUM * buf + g
        z = z - lr * (g + MOMENTUM * buf)
    return zs, losses, best


@pytest.mark.parametrize("key, weighting", [("latent-b8", 1.0), ("pixel-b32", 0.5)])
def test_one_step_agrees_with_renos_update(generator, key, weighting):
    reward = reward_for(key, generator, weighting)
    z0 = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(3)).half()
    run = reno_pipelines.reno_optimize(generator, reward, PROMPT, iterations=2, noise=z0)
    zs, losses, _ = transcribed_reno(generator, reward, z0, iterations=2)
    assert run.last_noise.dtype == torch.float16 and run.best_noise.dtype == torch.float16  # fp16 parameter, as ReNO
    assert run.best_noise.device.type == "cpu"
    assert run.losses == pytest.approx(losses, rel=1e-4, abs=1e-3)
    step_ours, step_theirs = (run.last_noise - z0).float(), (zs[1] - z0).float()
    assert step_theirs.abs().max() > 1e-2  # the step moved the noise
    cos = torch.nn.functional.cosine_similarity(step_ours.flatten(), step_theirs.flatten(), dim=0).item()
    assert cos > 0.999
    torch.testing.assert_close(run.last_noise.float(), zs[1].float(), rtol=0, atol=2e-2)  # fp16 rounding


def test_best_image_rule_over_several_steps(generator):
    reward = reward_for("latent-b8", generator, 1.0)
    z0 = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(5)).half()
    run = reno_pipelines.reno_optimize(generator, reward, PROMPT, iterations=5, noise=z0, lr=500.0)  # big steps: the losses rise again after iteration 2
    zs, losses, best = transcribed_reno(generator, reward, z0, iterations=5, lr=500.0)
    assert run.losses == pytest.approx(losses, rel=1e-3, abs=1e-2)
    assert run.best_iteration == best == min(range(5), key=lambda i: (losses[i], i))
    assert 0 < best < 4  # neither the first nor the last: the rule, not the trend, picks it
    assert run.best_loss == pytest.approx(losses[best], rel=1e-4)
    torch.testing.assert_close(run.best_noise.float(), zs[best].float(), rtol=0, atol=5e-2)


def test_reno_pipeline_reencodes_the_prompt_every_iteration(generator, monkeypatch):
    reward = reward_for("latent-b8", generator, 1.0)
    calls = {"sdxl": 0, "clip": 0}
    encode, text_features = generator.encode_prompt, reward.text_features

    def count_sdxl(prompt):
        calls["sdxl"] += 1
        return encode(prompt)

    def count_clip(prompts):
        calls["clip"] += len([p for p in prompts if p not in reward._text_cache])
        return text_features(prompts)

    monkeypatch.setattr(generator, "encode_prompt", count_sdxl)
    monkeypatch.setattr(reward, "text_features", count_clip)
    reno_pipelines.reno_optimize(generator, reward, PROMPT, iterations=3)
    assert calls == {"sdxl": 3, "clip": 3}
