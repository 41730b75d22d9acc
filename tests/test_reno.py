"""fastlclip.reno on tiny configs: the one-step generator, the ReNO loop, rewards and checkpointing."""

import importlib.util
import math
import types
import warnings

import pytest
import torch

from bench import tiny
from fastlclip import reno

PROMPT = "a red dog and a green cat"


@pytest.fixture(scope="module")
def generator():
    return reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE)


class Target:
    """A simple differentiable stand-in reward: mean squared distance of the latents to a constant."""

    name = "target"

    def __init__(self, value=1.0, weighting=1.0, scale=1.0):
        self.value, self.weighting, self.scale = value, weighting, scale

    def __call__(self, latents, prompt):
        return self.scale * (latents - self.value).pow(2).mean()


class Scripted:
    """Loss = a scripted offset per call (plus a tiny differentiable term); records the latents it saw."""

    name = "scripted"
    weighting = 1.0

    def __init__(self, offsets):
        self.offsets, self.seen = list(offsets), []

    def __call__(self, latents, prompt):
        self.seen.append(latents.detach().clone())
        return 1e-6 * latents.pow(2).mean() + self.offsets[len(self.seen) - 1]


def latent_clip_reward():
    import fastlclip

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        return fastlclip.LatentCLIPReward(fastlclip.load(tiny.LATENT_CLIP))


def pixel_clip_reward(vae):
    import fastlclip

    torch.manual_seed(0)
    return fastlclip.PixelCLIPReward(vae, tiny.open_clip_model())


def test_generator_is_one_euler_ancestral_trailing_step_at_999(generator):
    from diffusers import EulerAncestralDiscreteScheduler

    cond = generator.encode_prompt(PROMPT)
    noise = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(1))
    sched = EulerAncestralDiscreteScheduler.from_config(reno.SDXL_TURBO_SCHEDULER)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    assert float(t) == 999.0 and generator.timestep == 999.0
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        eps = generator.unet(sched.scale_model_input(x, t), t, encoder_hidden_states=cond.prompt_embeds,
                             added_cond_kwargs={"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}).sample
        expected = sched.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        got = generator(noise, cond)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_random_prompt_embeddings_are_plain_and_deterministic(generator):
    a, b, c = generator.encode_prompt(PROMPT), generator.encode_prompt(PROMPT), generator.encode_prompt("a boat")
    assert a.random and generator.random_prompt and generator.random_weights
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and not torch.equal(a.prompt_embeds, c.prompt_embeds)
    assert a.prompt_embeds.shape == (1, 77, tiny.UNET["cross_attention_dim"])
    assert a.pooled_prompt_embeds.shape == (1, 16)
    assert a.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]


def test_loop_decreases_a_simple_reward(generator):
    result = reno.optimize(generator, Target(), PROMPT, iterations=15, seed=0, progress=False)
    assert len(result.losses) == 15
    assert result.best_loss < 0.5 * result.losses[0]
    assert result.best_loss == min(result.losses)


def test_best_iterate_is_kept(generator):
    offsets = [5.0, 3.0, -2.0, 4.0, 1.0]
    reward = Scripted(offsets)
    result = reno.optimize(generator, reward, PROMPT, iterations=len(offsets), progress=False)
    assert result.best_iteration == 2
    assert result.best_loss == pytest.approx(min(result.losses)) and result.best_loss < -1.9
    torch.testing.assert_close(result.best_latents, reward.seen[2])
    with torch.no_grad():  # the kept noise regenerates the kept latents
        torch.testing.assert_close(generator(result.best_noise, generator.encode_prompt(PROMPT)), reward.seen[2])


def test_weighted_sum(generator):
    a, b = Target(1.0, weighting=0.3), Target(-1.0, weighting=2.0)
    latents = torch.randn(generator.latent_shape)
    combined = reno.WeightedReward([a, b])
    assert combined.weights == [0.3, 2.0] and combined.weighting == 1.0
    torch.testing.assert_close(combined(latents, PROMPT), 0.3 * a(latents, PROMPT) + 2.0 * b(latents, PROMPT))
    torch.testing.assert_close(reno.WeightedReward([a, b], [1.0, -1.0])(latents, PROMPT), a(latents, PROMPT) - b(latents, PROMPT))

    result = reno.optimize(generator, [a, b], PROMPT, iterations=3, progress=False)
    comps = list(result.component_losses.values())
    for i in range(3):
        assert result.losses[i] == pytest.approx(0.3 * comps[0][i] + 2.0 * comps[1][i], rel=1e-6)


@pytest.mark.parametrize("grad_clip, scale", [(0.1, 1e3), (None, 1e-3)])
def test_first_step_is_clipped_nesterov_sgd_on_reward_plus_regulariser(generator, grad_clip, scale):
    lr, momentum, reg = 5.0, 0.9, 0.01
    noise0 = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(3))
    reward = Target(scale=scale)

    n = noise0.clone().requires_grad_(True)
    loss = reward(generator(n, generator.encode_prompt(PROMPT)), PROMPT) + reno.norm_regularizer(n, reg)
    (g,) = torch.autograd.grad(loss, n)
    if grad_clip is not None:
        assert g.norm() > 10 * grad_clip  # the clip matters
        g = g * (grad_clip / g.norm())
    expected = noise0 - lr * (1 + momentum) * g  # Nesterov's first step: g + momentum * (buffer = g)

    scripted = Scripted([0.0, -100.0])  # make iteration 1 the best so its noise is returned
    result = reno.optimize(generator, [reward, scripted], PROMPT, iterations=2, noise=noise0, lr=lr, momentum=momentum,
                           grad_clip=grad_clip, reg_weight=reg, progress=False)
    assert result.best_iteration == 1
    torch.testing.assert_close(result.best_noise, expected, rtol=1e-4, atol=1e-4)
    if grad_clip is not None:
        assert (result.best_noise - noise0).norm().item() == pytest.approx(lr * (1 + momentum) * grad_clip, rel=1e-4)


def hand_written_reno(generator, noise0, offsets, *, steps, lr=5.0, momentum=0.9, nesterov=True, grad_clip=0.1,
                      reg_weight=0.01, scale=1e-2):
    """ReNO's loop written out (Eyring et al.; torch.optim.SGD's documented update), never calling reno.optimize:
    per iteration the loss is Target(scale) + Scripted(offsets) on generator(z), plus reg_weight * (0.5 ||z||^2 -
    (d - 1) log ||z||) whose gradient z - (d - 1) z / ||z||^2 is written by hand; the gradient is clipped to norm
    grad_clip; buf = momentum * buf + g (buf = g on the first step); the step is g + momentum * buf (Nesterov) or
    buf; z -= lr * step. Returns each iteration's reward loss and the noise after ``steps`` steps."""
    cond = generator.encode_prompt(PROMPT)
    z, buf, losses = noise0.clone(), None, []
    for i in range(steps + 1):
        n = z.clone().requires_grad_(True)
        latents = generator(n, cond)
        loss = scale * (latents - 1.0).pow(2).mean() + 1e-6 * latents.pow(2).mean() + offsets[i]
        losses.append(loss.item())
        if i == steps:
            break
        (g,) = torch.autograd.grad(loss, n)
        zd = z.double()
        d = zd[0].numel()
        g = g.double() + reg_weight * (zd - (d - 1) * zd / zd.pow(2).sum())
        if grad_clip is not None:
            g = g * min(1.0, grad_clip / (g.norm().item() + 1e-6))
        buf = g if buf is None else momentum * buf + g
        z = (zd - lr * (g + momentum * buf if nesterov else buf)).float()
    return losses, z


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": False}, {"reg_weight": 0.05, "momentum": 0.5, "lr": 2.0}],
                         ids=["defaults", "no-nesterov", "other-settings"])
def test_several_iterations_follow_the_hand_written_update(generator, kwargs):
    """Three SGD steps from noise of half the typical norm (so the regulariser's gradient, about 0.24, is as large
    as the reward's, and both exceed the clip 0.1): a changed default (lr 5, momentum 0.9, Nesterov, clip 0.1,
    regulariser 0.01), an ignored nesterov=/momentum=/reg_weight=, or a momentum buffer reset per step fails."""
    noise0 = 0.5 * torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(3))
    offsets = [0.0, 0.0, 0.0, -100.0]  # the last iteration is the best: its noise comes back
    want_losses, want_noise = hand_written_reno(generator, noise0, offsets, steps=3, **kwargs)

    result = reno.optimize(generator, [Target(scale=1e-2), Scripted(offsets)], PROMPT, iterations=4, noise=noise0,
                           progress=False, **kwargs)
    assert result.best_iteration == 3
    assert result.losses == pytest.approx(want_losses, abs=1e-5)
    torch.testing.assert_close(result.best_noise, want_noise, rtol=0, atol=1e-5)
    assert (want_noise - noise0).norm() > 0.5  # the steps moved it


def test_regulariser_matches_float64_hand_computation():
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.7
    d = 4 * 8 * 8
    norm = math.sqrt(sum(float(v) ** 2 for v in z.double().flatten()))
    expected = 0.01 * (0.5 * norm**2 - (d - 1) * math.log(norm))
    got = reno.norm_regularizer(z, 0.01)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-6)


def _grad_and_forward_counts(generator, rewards, checkpointing):
    """Gradient of the summed rewards w.r.t. the noise, and how often each watched module ran forward."""
    latent, pixel = rewards
    # inside a checkpointed unit (a resnet: recomputation reruns its forward, and so calls its convolutions)
    watched = {"unet": generator.unet.down_blocks[0].resnets[0].conv1,
               "vae": generator.vae.decoder.up_blocks[0].resnets[0].conv1,
               "latent tower": latent.model.visual.latent_vit.transformer,
               "clip block": pixel.model.visual.transformer.resblocks[0]}
    counts = dict.fromkeys(watched, 0)
    # Pre-hooks: a checkpoint's recomputation may stop before a module returns, never before it starts.
    handles = [m.register_forward_pre_hook(lambda *a, k=k: counts.__setitem__(k, counts[k] + 1)) for k, m in watched.items()]
    try:
        generator.set_gradient_checkpointing(checkpointing)
        combined = reno.WeightedReward(rewards)
        wrap = reno.set_reward_checkpointing(combined.rewards, checkpointing)
        noise = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        combined.losses(generator(noise, generator.encode_prompt(PROMPT)), PROMPT, wrap).sum().backward()
    finally:
        for h in handles:
            h.remove()
        generator.set_gradient_checkpointing(False)
        reno.set_reward_checkpointing(rewards, False)
    return noise.grad, counts, wrap


def test_checkpointing_recomputes_and_gives_the_same_gradients(generator):
    rewards = [latent_clip_reward(), pixel_clip_reward(generator.vae)]
    g0, c0, wrap0 = _grad_and_forward_counts(generator, rewards, False)
    g1, c1, wrap1 = _grad_and_forward_counts(generator, rewards, True)
    assert set(c0.values()) == {1}
    assert c1 == dict.fromkeys(c1, 2), c1  # each checkpointed forward ran again in backward
    assert wrap0 == [False, False] and wrap1 == [True, False]  # open_clip checkpoints per block itself
    assert g0.abs().max() > 0
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_real_rewards_in_the_loop(generator):
    rewards = [latent_clip_reward(), pixel_clip_reward(generator.vae)]
    cond = generator.encode_prompt(PROMPT)
    noise0 = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(0))  # optimize's seed=0 noise
    with torch.no_grad():
        first = [r(generator(noise0, cond), PROMPT).item() for r in rewards]
    results = []
    for checkpointing in (False, True):
        result = reno.optimize(generator, rewards, PROMPT, iterations=3, gradient_checkpointing=checkpointing,
                               decode=True, progress=False)
        results.append(result)
        assert list(result.component_losses) == ["latent_clip", "pixel_clip"]
        assert [v[0] for v in result.component_losses.values()] == pytest.approx(first, abs=1e-4)
        assert result.losses == pytest.approx([a + b for a, b in zip(*result.component_losses.values())], abs=1e-4)
        with torch.no_grad():
            image = (generator.vae.decode(result.best_latents / 0.13025).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(result.image, image)
        assert result.image.shape == (1, 3, 64, 64) and 0 <= result.image.min() and result.image.max() <= 1
        assert result.random_prompt
        assert reno.is_checkpointing(generator.unet) is checkpointing
        assert reno.is_checkpointing(rewards[1].vae) is checkpointing
    # checkpointing recomputes, it changes no value: the same losses, step for step
    assert results[1].losses == pytest.approx(results[0].losses, abs=1e-4)
    torch.testing.assert_close(results[1].best_noise, results[0].best_noise, rtol=0, atol=1e-5)


def test_phase_timer_sees_every_phase(generator):
    from bench.timing import PhaseLog

    log = PhaseLog()
    reno.optimize(generator, Target(), PROMPT, iterations=2, progress=False, timer=log)
    assert log.iterations[0] == ["unet_fwd", "reward_fwd", "optimizer", "reward_bwd", "unet_bwd", "optimizer"]
    assert log.iterations[1] == ["unet_fwd", "reward_fwd", "optimizer"]  # the last evaluation takes no step
    assert set(log.iterations[0]) == set(reno.PHASES)


def test_bad_input_gets_clear_errors(generator, tmp_path):
    with pytest.raises(ValueError, match="non-empty string"):
        reno.optimize(generator, Target(), "  ", progress=False)
    with pytest.raises(ValueError, match="iterations"):
        reno.optimize(generator, Target(), PROMPT, iterations=0, progress=False)
    with pytest.raises(ValueError, match="noise must have shape"):
        reno.optimize(generator, Target(), PROMPT, noise=torch.randn(1, 4, 16, 16), progress=False)
    with pytest.raises(ValueError, match="momentum"):
        reno.optimize(generator, Target(), PROMPT, momentum=0.0, progress=False)
    with pytest.raises(ValueError, match="grad_clip"):
        reno.optimize(generator, Target(), PROMPT, grad_clip=0.0, progress=False)
    with pytest.raises(TypeError, match=r"\.name"):
        reno.optimize(generator, lambda latents, prompt: latents.sum(), PROMPT, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        reno.optimize(generator, Target(scale=torch.ones(2)), PROMPT, iterations=1, progress=False)
    with pytest.raises(ValueError, match="at least one reward"):
        reno.WeightedReward([])
    with pytest.raises(ValueError, match="multiple of 8"):
        reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=60, width=64)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        reno.OneStepGenerator.from_pretrained(tmp_path)
    no_vae = reno.OneStepGenerator(generator.unet, random_weights=True, height=64, width=64)
    with pytest.raises(ValueError, match="VAE"):
        reno.optimize(no_vae, Target(), PROMPT, iterations=1, decode=True, progress=False)


def _tiny_sdxl_folder(path):
    """A tiny SDXL pipeline saved as a diffusers folder (two CLIP text encoders of width 16, a 52-token BPE vocab)."""
    import json
    import string

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(vocab),
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**tiny.VAE), unet=UNet2DConditionModel(**tiny.UNET),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16)),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1))
    pipe.save_pretrained(path / "sdxl")
    return pipe, path / "sdxl"


def test_from_pretrained_matches_the_diffusers_sdxl_pipeline(tmp_path):
    pytest.importorskip("transformers", reason="real SDXL weights need the SDXL text encoders (transformers)")
    from diffusers import EulerAncestralDiscreteScheduler

    pipe, folder = _tiny_sdxl_folder(tmp_path)
    gen = reno.OneStepGenerator.from_pretrained(folder, height=64, width=64)
    assert not gen.random_weights and not gen.random_prompt
    cond = gen.encode_prompt(PROMPT)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_prompt_embeds, pooled) and not cond.random

    # ReNO's SDXL-Turbo setting: EulerAncestral, trailing spacing, one step, no guidance
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    noise = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(0))
    expected = pipe(PROMPT, height=64, width=64, num_inference_steps=1, guidance_scale=0.0, latents=noise,
                    output_type="latent").images
    with torch.no_grad():
        torch.testing.assert_close(gen(noise, cond), expected, rtol=1e-6, atol=1e-6)


def test_from_pretrained_without_transformers_says_what_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install transformers"):
        reno.OneStepGenerator.from_pretrained(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loop_on_cuda_in_bf16_starts_from_the_cpu_seeded_noise():
    import fastlclip

    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=64, width=64, device="cuda", dtype=torch.bfloat16)
    pixel = fastlclip.PixelCLIPReward(gen.vae, tiny.open_clip_model().to("cuda", torch.bfloat16))
    result = reno.optimize(gen, [Target(), pixel], PROMPT, iterations=4, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    first = reno.optimize(gen, Target(), PROMPT, iterations=1, seed=0, progress=False)
    torch.testing.assert_close(first.best_noise.cpu(), torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(0)))


def test_compiled_unet_gives_the_same_losses():
    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE)
    eager = reno.optimize(gen, Target(), PROMPT, iterations=3, progress=False)
    gen.compile(backend="eager")  # TorchDynamo capture without Inductor: cheap on a CPU
    try:
        compiled = reno.optimize(gen, Target(), PROMPT, iterations=3, progress=False)
    finally:
        torch._dynamo.reset()
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


def test_a_captured_reward_is_not_checkpointed(generator):
    """graph backend + gradient_checkpointing: the captured reward step replays once forward and once
    backward per iteration (torch.utils.checkpoint around it raised CheckpointError on a GPU and replayed
    four graphs)."""
    from fastlclip import runtime

    reward = latent_clip_reward()
    rt = runtime.install(reward.model, runtime.GraphRuntime(reward.model, (1,), emulate=True)).runtime
    assert reno.set_reward_checkpointing([reward], True) == [False]
    iterations = 3
    reno.optimize(generator, reward, PROMPT, iterations=iterations, gradient_checkpointing=True, progress=False)
    # forwards every iteration, backwards all but the last; nothing recomputed
    assert rt.stats.replays == 2 * iterations - 1 and rt.stats.recomputes == 0


# -- one-step presets at 1024 px ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset, scheduler_kwargs, timesteps, t0", [
    # ByteDance/SDXL-Lightning model card, 1-step UNet: Euler, trailing, "sample" (x0) prediction
    ("sdxl-lightning-1step", {"timestep_spacing": "trailing", "prediction_type": "sample"}, None, 999.0),
    # ByteDance/Hyper-SD ComfyUI 1-step scheduler: timesteps [800] -> sigmas [sigma(800), 0], epsilon
    ("hyper-sdxl-1step", {"timestep_spacing": "trailing"}, [800], 800.0),
])
def test_presets_are_one_diffusers_euler_step(generator, preset, scheduler_kwargs, timesteps, t0):
    from diffusers import EulerDiscreteScheduler

    gen = reno.OneStepGenerator(generator.unet, vae=generator.vae, random_weights=True, preset=preset,
                                height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE)
    cond = gen.encode_prompt(PROMPT)
    noise = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(2))
    sched = EulerDiscreteScheduler.from_config(reno.SDXL_TURBO_SCHEDULER, **scheduler_kwargs)
    sched.set_timesteps(1) if timesteps is None else sched.set_timesteps(timesteps=timesteps)
    t = sched.timesteps[0]
    assert float(t) == t0 == gen.timestep and len(sched.timesteps) == 1
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        out = gen.unet(sched.scale_model_input(x, t), t, encoder_hidden_states=cond.prompt_embeds,
                       added_cond_kwargs={"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}).sample
        expected = sched.step(out, t, x).prev_sample
        got = gen(noise, cond)
    # diffusers computes x + (x - x0) / sigma * (0 - sigma) for x0 prediction: rounding of |x| ~ 15 * |noise|
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_presets_default_to_their_resolution_and_are_validated():
    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, preset="hyper-sdxl-1step", with_vae=False)
    assert (gen.height, gen.width) == (1024, 1024) and gen.latent_shape == (1, 4, 128, 128)
    assert gen.encode_prompt(PROMPT).time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
    assert reno.OneStepGenerator(gen.unet, random_weights=True).height == 512  # sdxl-turbo
    with pytest.raises(ValueError, match="unknown one-step preset"):
        reno.OneStepGenerator(gen.unet, random_weights=True, preset="sdxl-lightning-4step")


def test_from_pretrained_one_step_unet_matches_the_lightning_pipeline(tmp_path):
    pytest.importorskip("transformers", reason="real SDXL weights need the SDXL text encoders (transformers)")
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import save_file

    pipe, folder = _tiny_sdxl_folder(tmp_path)
    torch.manual_seed(3)
    weights = {k: v + 0.01 * torch.randn_like(v) for k, v in pipe.unet.state_dict().items()}  # "the 1-step UNet"
    save_file(weights, tmp_path / "one_step_unet.safetensors")
    gen = reno.OneStepGenerator.from_pretrained(folder, height=64, width=64, preset="sdxl-lightning-1step",
                                                unet_weights=tmp_path / "one_step_unet.safetensors")
    pipe.unet.load_state_dict(weights)
    # The model card's recipe: Euler, trailing, sample prediction, 1 step, guidance 0
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                        prediction_type="sample")
    noise = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(0))
    expected = pipe(PROMPT, height=64, width=64, num_inference_steps=1, guidance_scale=0.0, latents=noise,
                    output_type="latent").images
    with torch.no_grad():
        torch.testing.assert_close(gen(noise, gen.encode_prompt(PROMPT)), expected, rtol=1e-5, atol=1e-5)  # diffusers rounds on its x0 path


@pytest.mark.parametrize("policy", ["interpolate", "pool"])
def test_reno_at_twice_the_trained_size(policy):
    """ReNO's 1024 px shape on tiny configs: a Hyper-style generator at twice the Latent-CLIP's trained
    size (16x16 latents for an 8x8-trained tower), the reward under each grid policy."""
    import fastlclip

    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, preset="hyper-sdxl-1step",
                                            height=2 * tiny.IMAGE_SIZE, width=2 * tiny.IMAGE_SIZE, with_vae=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        model = fastlclip.load(tiny.LATENT_CLIP, resize=policy)
    result = reno.optimize(gen, fastlclip.LatentCLIPReward(model), PROMPT, iterations=3, progress=False)
    assert result.best_latents.shape == (1, 4, 16, 16) and all(math.isfinite(v) for v in result.losses)
    assert len(set(result.losses)) > 1  # the noise moved


# -- gaps found by mutation testing ------------------------------------------------------------------------
class PromptLength:
    """A reward that reads the prompt: the mean of the latents times the prompt's length."""

    name, weighting = "prompt_length", 1.0

    def __call__(self, latents, prompt):
        return latents.mean() * len(prompt)


def test_weighted_reward_passes_the_prompt_on():
    latents = torch.full((1, 4, 8, 8), 0.5)
    assert float(reno.WeightedReward([PromptLength()], [2.0])(latents, "abc")) == pytest.approx(2.0 * 0.5 * 3)


def _explain(health, *, losses=None, totals=None, last=None, **kw):
    """``_Health.explain`` on hand-set flags: one reward ("target"), lr 5, regulariser weight 0.01."""
    n = health.noise_ok.numel()
    losses = torch.zeros(n, 1) if losses is None else losses
    totals = torch.zeros(n) if totals is None else totals
    return health.explain(n - 1 if last is None else last, losses, totals, reno.WeightedReward([Target()]), 5.0, 0.01,
                          **kw)


def _health(iterations=3, d=64):
    health = reno._Health(iterations, torch.device("cpu"))
    health.d = d  # typical norm of standard-normal noise: sqrt(64) = 8
    return health


def test_explain_names_the_step_before_the_noise_went_non_finite():
    health = _health()
    health.noise_ok[2] = False
    assert _explain(health) == ("the noise became NaN/Inf in the SGD step after iteration 1, whose gradient was finite: "
                                "lr=5 is too large: lower it (and keep grad_clip, e.g. 0.1)")


@pytest.mark.parametrize("norm, blames_lr", [(80.0, False), (84.0, True), (79.0, False)])
def test_explain_blames_lr_only_for_noise_grown_past_ten_times_its_typical_norm(norm, blames_lr):
    """d = 64: the typical norm is 8; latents turning NaN from noise of norm > 80 blame lr, else the UNet."""
    health = _health()
    health.latents[1] = False
    health.noise_norm[1] = norm
    msg = _explain(health)
    assert msg.startswith(f"the generator turned the noise into NaN/Inf latents at iteration 1: noise norm {norm:.3g}, "
                          "where standard-normal noise of this shape has about 8. ")
    if blames_lr:
        assert msg.endswith("lr=5 is too large: lower it (and keep grad_clip, e.g. 0.1)")
    else:
        assert msg.endswith("The UNet overflows on this noise; run it in float32 or bfloat16")


def test_explain_looks_no_further_than_the_last_iteration_and_blames_its_reward_unless_partial():
    health = _health()
    health.noise_ok[2] = False  # after the last iteration looked at: not its concern
    assert _explain(health, last=1) is None
    losses = torch.zeros(3, 1)
    losses[1, 0] = float("nan")
    want = ("reward 'target' returned nan at iteration 1 from finite latents; the reward itself is at fault (its inputs "
            "were fine): check it, or its weights and dtype")
    assert _explain(_health(), losses=losses, last=1) == want  # partial defaults to False
    assert _explain(_health(), losses=losses, last=1, partial=True) is None  # its losses were not recorded yet


def test_from_config_default_seed_is_zero():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    want = UNet2DConditionModel.from_config(dict(tiny.UNET))
    got = reno.OneStepGenerator.from_config(tiny.UNET, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE, with_vae=False)
    assert got.vae is None and got.random_weights is True
    for (name, a), b in zip(want.state_dict().items(), got.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_pretrained_reads_the_full_precision_weights_offline_in_the_dtype_and_device_asked(tmp_path, monkeypatch):
    """A snapshot holding both ``diffusion_pytorch_model.safetensors`` and its ``.fp16`` variant (as
    stabilityai/sdxl-turbo does) loads the full-precision file; a snapshot of only ``.fp16`` files loads those;
    the load is local only; ``dtype`` and ``device`` reach the pipeline."""
    pytest.importorskip("transformers", reason="real SDXL weights need the SDXL text encoders (transformers)")
    from diffusers import StableDiffusionXLPipeline

    pipe, folder = _tiny_sdxl_folder(tmp_path)
    full = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.5)
    other = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.unet.save_pretrained(folder / "unet", variant="fp16")  # a second, different, "fp16" file beside the full one
    pipe.save_pretrained(tmp_path / "fp16_only", variant="fp16")

    seen = []
    original = StableDiffusionXLPipeline.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", staticmethod(spy))
    for path, want in ((folder, full), (tmp_path / "fp16_only", other)):
        gen = reno.OneStepGenerator.from_pretrained(path, height=64, width=64)
        for k, v in gen.unet.state_dict().items():
            assert torch.equal(v, want[k]), (path.name, k)
    assert [kw.get("local_files_only") for kw in seen] == [True, True]  # never reaches the Hub

    gen = reno.OneStepGenerator.from_pretrained(folder, height=64, width=64, dtype=torch.bfloat16)
    assert gen.dtype == torch.bfloat16 and gen.vae.dtype == torch.bfloat16
    assert reno.OneStepGenerator.from_pretrained(folder, height=64, width=64, device="meta").device.type == "meta"


def test_from_config_builds_the_vae_asked_in_the_dtype_asked():
    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE,
                                            dtype=torch.bfloat16)
    assert list(gen.vae.config.block_out_channels) == list(tiny.VAE["block_out_channels"])
    assert {p.dtype for p in gen.unet.parameters()} == {p.dtype for p in gen.vae.parameters()} == {torch.bfloat16}
    cond = gen.encode_prompt(PROMPT)
    assert {cond.prompt_embeds.dtype, cond.pooled_prompt_embeds.dtype, cond.time_ids.dtype} == {torch.bfloat16}
    with torch.no_grad():  # the UNet is fed in its own dtype; the latents come back in float32
        assert gen(torch.randn(gen.latent_shape), cond).dtype == torch.float32


class _MinimalPipe:
    """What ``from_pipeline`` reads of a diffusers SDXL pipeline; ``encode_prompt`` records its arguments."""

    def __init__(self, unet, vae, scheduler_config, text_encoders=True):
        self.unet, self.vae, self.scheduler = unet, vae, types.SimpleNamespace(config=scheduler_config)
        if text_encoders:  # as a training script might leave them
            self.text_encoder, self.text_encoder_2 = torch.nn.Linear(2, 2).train(), torch.nn.Linear(2, 2).train()
        self.seen = []

    def encode_prompt(self, **kwargs):
        self.seen.append(kwargs)
        g = torch.Generator().manual_seed(7)
        return (torch.randn(1, 77, tiny.UNET["cross_attention_dim"], generator=g), None, torch.randn(1, 16, generator=g),
                None)


def test_from_pipeline_shares_the_pipelines_parts_and_encodes_without_guidance(generator):
    """The pipeline's scheduler config is used (beta_end 0.02 here: sigma_max by hand in float64), its VAE and
    UNet shared, its text encoders frozen in eval mode, its encode_prompt asked for one image without CFG."""
    config = dict(reno.SDXL_TURBO_SCHEDULER, beta_end=0.02)
    pipe = _MinimalPipe(generator.unet, generator.vae, config)
    gen = reno.OneStepGenerator.from_pipeline(pipe, height=64, width=64)
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.02) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    alpha_bar = math.prod(1 - b for b in betas)
    assert gen.sigma == pytest.approx(math.sqrt((1 - alpha_bar) / alpha_bar), rel=1e-5)
    assert gen.vae is pipe.vae and gen.unet is pipe.unet and gen.random_weights is False and not gen.random_prompt
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    cond = gen.encode_prompt(PROMPT)
    assert pipe.seen == [{"prompt": PROMPT, "device": generator.unet.device, "num_images_per_prompt": 1,
                          "do_classifier_free_guidance": False}]
    g = torch.Generator().manual_seed(7)
    assert torch.equal(cond.prompt_embeds, torch.randn(1, 77, tiny.UNET["cross_attention_dim"], generator=g))
    assert torch.equal(cond.pooled_prompt_embeds, torch.randn(1, 16, generator=g)) and not cond.random
    # a pipeline without text encoders (its encode_prompt brings its own) is taken too
    assert reno.OneStepGenerator.from_pipeline(_MinimalPipe(generator.unet, generator.vae, config, False),
                                               height=64, width=64).sigma == gen.sigma


def test_generator_freezes_its_modules_and_checks_sides_against_the_vaes_scale():
    """A VAE of three blocks downsamples by 4: sides must be positive integer multiples of 4, not of 8."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(tiny.UNET)).train()
    vae = AutoencoderKL.from_config(dict(tiny.VAE, block_out_channels=[8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 3,
                                         up_block_types=["UpDecoderBlock2D"] * 3)).train()
    gen = reno.OneStepGenerator(unet, vae=vae, height=20, width=12, random_weights=True)
    assert gen.vae_scale_factor == 4 and gen.latent_shape == (1, 4, 5, 3) and gen.random_weights is True
    for module in (unet, vae):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    for kw, match in [({"height": 18}, r"^height must be a positive multiple of 4 \(the VAE's downsampling\), got 18$"),
                      ({"width": 0}, r"^width must be a positive multiple of 4 \(the VAE's downsampling\), got 0$"),
                      ({"height": 16.0}, r"^height must be .* got 16\.0$")]:
        with pytest.raises(ValueError, match=match):
            reno.OneStepGenerator(unet, vae=vae, random_weights=True, **{"height": 20, "width": 12, **kw})
    assert reno.OneStepGenerator(unet, height=16, width=16, random_weights=False).vae_scale_factor == 8  # no VAE: SDXL's


class _LinearUNet(torch.nn.Module):
    """An SDXL-configured stand-in for the UNet that predicts ``w * x``: a generator whose step costs nothing."""

    def __init__(self, pooled=16):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.config = FrozenDict(addition_embed_type="text_time", addition_time_embed_dim=8, in_channels=4,
                                 projection_class_embeddings_input_dim=6 * 8 + pooled, cross_attention_dim=32)

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs, return_dict):
        return (self.w * x,)


def test_optimize_runs_renos_50_iterations_by_default():
    generator = reno.OneStepGenerator(_LinearUNet(), height=16, width=16, random_weights=True)
    reward = Scripted([0.0] * 51)
    result = reno.optimize(generator, reward, PROMPT, progress=False)
    assert len(reward.seen) == len(result.losses) == 50


def test_health_keeps_the_norm_of_noise_beyond_float32_finite():
    """The noise norm is taken in float64 (off MPS): noise of 1e38 everywhere (finite in float32) has norm 1.6e39,
    which float32 would report as inf in the error message."""
    health = reno._Health(2, torch.device("cpu"))
    health.noise(1, torch.full((1, 4, 8, 8), 1e38))
    assert health.d == 256 and health.noise_norm.dtype == torch.float64
    assert health.noise_norm.tolist() == pytest.approx([0.0, 1e38 * 16], rel=1e-6)


@pytest.fixture()
def linear_generator():
    return reno.OneStepGenerator(_LinearUNet(), height=16, width=16, random_weights=True)


@pytest.mark.parametrize("kw, match", [
    ({"iterations": 0}, r"^iterations must be an integer >= 1, got 0$"),
    ({"momentum": math.nan}, r"^momentum must be a finite number, got nan$"),
    ({"momentum": 1.0}, r"^momentum must lie in \[0, 1\) and be > 0 with nesterov=True, got 1\.0$"),
    ({"momentum": 1.5, "nesterov": False}, r"^momentum must lie in \[0, 1\)"),
    ({"momentum": -0.1, "nesterov": False}, r"^momentum must lie in \[0, 1\)"),
    ({"momentum": 0.0}, r"^momentum must lie in \[0, 1\) and be > 0 with nesterov=True, got 0\.0$"),  # ours, not SGD's
    ({"grad_clip": 0.0}, r"^grad_clip \(None: no clipping\) must be a finite positive number, got 0\.0$"),
])
def test_optimize_momentum_and_iterations_bounds(linear_generator, kw, match):
    with pytest.raises(ValueError, match=match):
        reno.optimize(linear_generator, Target(), PROMPT, progress=False, **kw)


def test_optimize_takes_plain_sgd_a_weighted_reward_as_given_and_shows_progress_by_default(linear_generator, capsys):
    """momentum 0 without Nesterov is plain SGD (z -= lr * clipped g); a WeightedReward keeps its explicit weights
    (a difference here, not the rewards' own weightings); the progress bar is on unless asked off, and cleared."""
    a, b = Target(1.0, weighting=0.3), Target(-1.0, weighting=2.0)
    noise0 = torch.randn(linear_generator.latent_shape, generator=torch.Generator().manual_seed(0))
    result = reno.optimize(linear_generator, reno.WeightedReward([a, b], [1.0, -1.0]), PROMPT, iterations=2,
                           noise=noise0.double(), momentum=0.0, nesterov=False, reg_weight=0.0, lr=0.5)
    err = capsys.readouterr().err
    assert err.startswith("\rReNO:   0%|") and "0/2 [00:00<?, ?it/s]" in err  # tqdm's bar, its unit "it"
    assert err.endswith("\r") and "\n" not in err  # leave=False: cleared at the end
    assert result.best_noise.dtype == torch.float32  # the parameter is float32 whatever noise is given
    comps = list(result.component_losses.values())
    assert result.losses == pytest.approx([comps[0][i] - comps[1][i] for i in range(2)], rel=1e-6)
    # by hand: latents = x - sigma * w * x / sqrt(sigma^2 + 1) with x = z * init_noise_sigma, w = 0.5
    gen = linear_generator
    scale = gen.init_noise_sigma * (1 - gen.sigma * 0.5 / math.sqrt(gen.sigma**2 + 1))
    z = noise0.double()
    lat = z * scale
    n = lat.numel()
    g = scale * (2 * (lat - 1) / n - 2 * (lat + 1) / n)  # d/dz of mean((l-1)^2) - mean((l+1)^2)
    g = g * min(1.0, 0.1 / (g.norm().item() + 1e-6))
    want = z - 0.5 * g
    assert result.losses[1] == pytest.approx(((want * scale - 1) ** 2).mean().item() - ((want * scale + 1) ** 2).mean().item(),
                                             rel=1e-5)


def test_a_first_iteration_that_stays_best_is_reported_as_iteration_0(linear_generator):
    noise0 = torch.randn(linear_generator.latent_shape, generator=torch.Generator().manual_seed(1))
    result = reno.optimize(linear_generator, Scripted([-5.0, 0.0, 0.0]), PROMPT, iterations=3, noise=noise0,
                           progress=False)
    assert result.best_iteration == 0 and result.best_loss == pytest.approx(-5.0, abs=1e-4)
    assert torch.equal(result.best_noise, noise0)


class RefusesNonFinite(Target):
    """Target that raises on NaN/Inf latents, as a Latent-CLIP reward does."""

    def __call__(self, latents, prompt):
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or Inf")
        return super().__call__(latents, prompt)


def test_a_reward_refusing_the_nan_latents_an_infinite_regulariser_made_names_the_regulariser(linear_generator):
    """reg_weight 1e38: the regulariser is -inf at iteration 0, the step makes the noise NaN, the reward refuses the
    latents at iteration 1; the error names the regulariser, not the gradient or the reward."""
    with pytest.raises(FloatingPointError, match=r"^the norm regulariser is -inf at iteration 0 .*reg_weight=1e\+38 is too "
                                                 r"large; ReNO uses 0\.01$") as e:
        reno.optimize(linear_generator, RefusesNonFinite(), PROMPT, iterations=3, reg_weight=1e38, progress=False)
    assert isinstance(e.value.__cause__, ValueError)


def test_gradient_checkpointing_recomputes_a_latent_clip_reward_in_the_loop(generator):
    """With checkpointing on, a Latent-CLIP reward (no per-block checkpointing of its own) runs its forward again in
    each backward: 2 iterations are 3 forwards of its tower (2 without)."""
    reward = latent_clip_reward()
    runs = []
    handle = reward.model.visual.latent_vit.transformer.register_forward_pre_hook(lambda *a: runs.append(1))
    try:
        for checkpointing, want in ((False, 2), (True, 3)):
            runs.clear()
            reno.optimize(generator, reward, PROMPT, iterations=2, gradient_checkpointing=checkpointing, progress=False)
            assert len(runs) == want, checkpointing
    finally:
        handle.remove()
        generator.set_gradient_checkpointing(False)


def test_equal_losses_keep_the_first_iterate(linear_generator):
    """ReNO keeps an iterate only when its loss is strictly lower: a constant reward keeps iteration 0."""

    class Constant:
        name, weighting = "constant", 1.0

        def __call__(self, latents, prompt):
            return 0 * latents.sum() + 1.0

    noise0 = torch.randn(linear_generator.latent_shape, generator=torch.Generator().manual_seed(2))
    result = reno.optimize(linear_generator, Constant(), PROMPT, iterations=3, noise=noise0, progress=False)
    assert result.losses == [1.0, 1.0, 1.0] and result.best_iteration == 0 and torch.equal(result.best_noise, noise0)


def _tiny_resnet():
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4)


def test_checkpoint_diffusers_turns_diffusers_own_switch_off_and_takes_plain_modules():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(dict(tiny.VAE))
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    reno.checkpoint_diffusers(vae, True)
    assert not vae.is_gradient_checkpointing and reno.is_checkpointing(vae)  # ours instead, never both
    plain = torch.nn.Sequential(torch.nn.Identity(), _tiny_resnet())  # no diffusers switch at all
    reno.checkpoint_diffusers(plain, True)
    assert reno.is_checkpointing(plain)
    reno.checkpoint_diffusers(plain, False)
    assert not reno.is_checkpointing(plain)


def test_set_reward_checkpointing_reaches_a_module_rewards_children_and_takes_slotted_rewards():
    from diffusers import AutoencoderKL

    class ModuleReward(torch.nn.Module):
        name, weighting = "module", 1.0

        def __init__(self):
            super().__init__()
            self.vae = AutoencoderKL.from_config(dict(tiny.VAE))

        def forward(self, latents, prompt):
            return latents.mean()

    class Slotted:
        __slots__ = ()
        name, weighting = "slotted", 1.0

        def __call__(self, latents, prompt):
            return latents.mean()

    module_reward = ModuleReward()
    assert reno.set_reward_checkpointing([module_reward, Slotted()], True) == [True, True]
    assert reno.is_checkpointing(module_reward.vae)
    assert reno.set_reward_checkpointing([module_reward, Slotted()], False) == [False, False]
    assert not reno.is_checkpointing(module_reward.vae)


def test_check_seed_takes_exactly_the_64_bit_range():
    assert reno.check_seed(200) == 200 and reno.check_seed(2**64 - 1) == 2**64 - 1
    for bad in (2**64, -1, True, 3.0):
        with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*64\)"):
            reno.check_seed(bad)


def test_a_reward_needs_a_string_name_even_with_a_good_weighting():
    bad = Target()
    bad.name = 3
    with pytest.raises(TypeError, match=r"\.name \(str\)"):
        reno.WeightedReward([bad])


def test_generator_needs_room_for_pooled_embeddings_and_a_step_ending_at_sigma_0():
    assert reno.OneStepGenerator(_LinearUNet(pooled=1), height=16, width=16, random_weights=True).pooled_dim == 1
    with pytest.raises(ValueError, match=r"leaves no room for pooled text embeddings after 6 x addition_time_embed_dim 8"):
        reno.OneStepGenerator(_LinearUNet(pooled=0), height=16, width=16, random_weights=True)
    config = dict(reno.SDXL_TURBO_SCHEDULER, final_sigmas_type="sigma_min")  # Euler's last sigma: sigma_min, not 0
    with pytest.raises(ValueError, match=r"expected one step ending at sigma 0, got sigmas \[\d"):
        reno.OneStepGenerator(_LinearUNet(), scheduler_config=config, preset="sdxl-lightning-1step", height=16, width=16,
                              random_weights=True)


def test_a_reward_must_be_callable_even_with_a_name_and_weighting():
    with pytest.raises(TypeError, match=r"^a reward must be callable as reward\(latents, prompt\)"):
        reno.WeightedReward([types.SimpleNamespace(name="x", weighting=1.0)])


def test_weighted_reward_name_and_generator_noise_shape(linear_generator):
    assert reno.WeightedReward([Target(weighting=0.3), PromptLength()], [0.3, 2.0]).name == "0.3*target + 2*prompt_length"
    cond = linear_generator.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match=r"^noise must have shape \(B, 4, 2, 2\) for 16x16 images, got \(1, 4, 4, 4\)$"):
        linear_generator(torch.randn(1, 4, 4, 4), cond)


def test_random_prompt_embeddings_are_seeded_by_the_prompts_sha256(generator):
    import hashlib

    seed = int.from_bytes(hashlib.sha256(PROMPT.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    cond = generator.encode_prompt(PROMPT)
    assert torch.equal(cond.prompt_embeds, torch.randn(1, 77, tiny.UNET["cross_attention_dim"], generator=g))
    assert torch.equal(cond.pooled_prompt_embeds, torch.randn(1, 16, generator=g))


def test_a_text_encoder_of_the_wrong_width_is_refused(generator):
    pipe = _MinimalPipe(generator.unet, generator.vae, reno.SDXL_TURBO_SCHEDULER)
    pipe.encode_prompt = lambda **kw: (torch.zeros(1, 77, 7), None, torch.zeros(1, 16), None)  # pooled right, embeds not
    gen = reno.OneStepGenerator.from_pipeline(pipe, height=64, width=64)
    with pytest.raises(ValueError, match=rf"^text encoders give widths 7/16, the UNet expects {tiny.UNET['cross_attention_dim']}/16$"):
        gen.encode_prompt(PROMPT)
