"""pytest-benchmark: LatentSafetyChecker throughput and SafetyGuidance cost per ReNO iteration on a CUDA GPU.

Latent-ViT-B-8-512 shapes (64x64 latents, the default I2P concept set), random weights (timing only), bf16,
eager and Triton backends. The guidance is timed as in a ReNO iteration: forward + backward to batch-1
latents, next to the prompt-only ``LatentCLIPReward`` in the same group (the difference is the guidance's
overhead). Each round is 20 back-to-back calls and one synchronize; divide by ``calls_per_round``
(and multiply by ``latents_per_call`` for checker throughput). Run in its own process:
``pytest tests/gpu/test_safety_benchmark.py -m gpu``.
"""

import warnings

import pytest
import torch

from conftest import gpu_benchmark

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

import fastlclip  # noqa: E402
from fastlclip.safety import LatentSafetyChecker, SafetyGuidance  # noqa: E402

pytestmark = pytest.mark.gpu  # skipped without CUDA: see tests/gpu/conftest.py

MODEL = "Latent-ViT-B-8-512"
DTYPE = torch.bfloat16
PROMPT = "a photo of a crowded market street"
BACKENDS = ["eager", "triton"]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: timing only
        m = fastlclip.load(MODEL, device="cuda", dtype=DTYPE, backend=request.param)
    # The per-call NaN check is a host sync; off for timing (as bench/rewards.py), the tests check finiteness once.
    m.check_finite = False
    return m




@pytest.mark.parametrize("batch", [1, 64])
def test_checker_throughput(benchmark, model, batch):
    benchmark.group = f"safety checker b{batch} {model.backend}"
    benchmark.extra_info["latents_per_call"] = batch
    checker = LatentSafetyChecker(model)
    torch.manual_seed(0)
    latents = torch.randn(batch, 4, model.latent_size, model.latent_size, device="cuda", dtype=DTYPE)
    out = checker(latents)
    assert out.flags.shape == (batch, len(checker.categories)) and torch.isfinite(out.scores).all()
    gpu_benchmark(benchmark, lambda: checker(latents))


@pytest.mark.parametrize("reward", ["safety_guidance", "latent_clip"])
def test_guidance_fwd_bwd(benchmark, model, reward):
    benchmark.group = f"guidance fwd+bwd b1 {model.backend}"
    fn = SafetyGuidance(model) if reward == "safety_guidance" else fastlclip.LatentCLIPReward(model)
    torch.manual_seed(0)
    z = torch.randn(1, 4, model.latent_size, model.latent_size, device="cuda", requires_grad=True)
    (grad,) = torch.autograd.grad(fn(z, PROMPT), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    gpu_benchmark(benchmark, lambda: torch.autograd.grad(fn(z, PROMPT), z))
