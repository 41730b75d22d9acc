"""pytest-benchmark suite: one reward step (loss + gradient to the latents) at batch 1, per backend.

Latent-ViT-B/8, bf16, random weights, NaN check off; the reference (open_clip's ViT with a 4-channel
conv1, same weights, eager) is timed in the same group. Each case first checks its gradient against the
eager backend (cosine >= 0.999). A round is 20 back-to-back steps and one synchronize
(``calls_per_round``). Run alone: ``pytest tests/gpu/test_reward_benchmark.py -m gpu`` (compile takes about a minute on first use).
"""

import warnings

import pytest
import torch

from conftest import gpu_benchmark

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

import fastlclip  # noqa: E402

pytestmark = pytest.mark.gpu  # skipped without CUDA: see tests/gpu/conftest.py

MODEL = "Latent-ViT-B-8-512"
PROMPT = "a photo of a red dog and a green cat"
GROUP = f"reward step {MODEL} b1 bf16"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        m = fastlclip.load(MODEL, device="cuda", dtype=torch.bfloat16)
    m.check_finite = False
    return m


@pytest.fixture(scope="module")
def latents(model):
    g = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(1, 4, model.latent_size, model.latent_size, device="cuda", generator=g).bfloat16()


def step_fn(reward, latents):
    x = latents.clone().requires_grad_(True)

    def step():
        return torch.autograd.grad(reward(x, PROMPT), x)[0]

    return step




@pytest.mark.parametrize("backend", ["eager", "triton", "graph", "compile"])
def test_reward_step(benchmark, model, latents, backend):
    from bench.rewards import agreement

    model.set_backend("eager")
    x = latents.clone().requires_grad_(True)
    want_loss = fastlclip.LatentCLIPReward(model)(x, PROMPT)
    (want,) = torch.autograd.grad(want_loss, x)
    model.set_backend(backend)
    x = latents.clone().requires_grad_(True)
    loss = fastlclip.LatentCLIPReward(model)(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    ok, figures = agreement(loss.item(), want_loss.item(), grad, want, model.logit_scale.exp().item(), model.dtype)
    assert ok, f"{backend} against eager: {figures}"
    step = step_fn(fastlclip.LatentCLIPReward(model), latents)
    benchmark.group = GROUP
    benchmark.extra_info["backend"] = backend
    gpu_benchmark(benchmark, step)
    model.set_backend("eager")


def test_reward_step_reference(benchmark, model, latents):
    from bench.reward import reference_system, reference_tower

    txt = fastlclip.LatentCLIPReward(model).text_features([PROMPT])[0]
    system = reference_system("", "reference eager", reference_tower(model), txt,
                              model.logit_scale.detach().exp().item(), None)
    benchmark.group = GROUP
    benchmark.extra_info["backend"] = "reference open_clip eager"
    gpu_benchmark(benchmark, step_fn(lambda x, prompt: system.reward(x), latents))
