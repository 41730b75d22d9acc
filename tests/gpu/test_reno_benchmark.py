"""pytest-benchmark suite: ReNO iterations with a Latent-CLIP reward against decode-then-CLIP, on a CUDA GPU.

SDXL-Turbo UNet and VAE with random weights from the shipped configs (timing does not depend on the
weights), bf16, 512x512. A round is one ``fastlclip.reno.optimize`` call of ``ITERATIONS`` iterations
(all but the last with backward and step, as ReNO runs them); ``extra_info["ms_per_iteration"]`` is the
round's median divided by ``ITERATIONS``. Run the GPU suite in its own process: ``pytest tests/gpu -m gpu``.
"""

import warnings

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

import fastlclip  # noqa: E402
from fastlclip import reno  # noqa: E402

pytestmark = pytest.mark.gpu  # skipped without CUDA: see tests/gpu/conftest.py

ITERATIONS = 10
PROMPT = "A red dog and a green cat"
DTYPE = torch.bfloat16
LOSSES: dict = {}  # kind -> {checkpointing: losses}, compared once both ran


@pytest.fixture(scope="module")
def generator():
    gen = reno.OneStepGenerator.from_config(device="cuda", dtype=DTYPE)
    yield gen
    del gen
    torch.cuda.empty_cache()


def make_reward(kind, vae):
    if kind == "latent-b8":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights are random")  # intended
            model = fastlclip.load("Latent-ViT-B-8-512", device="cuda", dtype=DTYPE)
        return fastlclip.LatentCLIPReward(model)
    import open_clip

    with torch.device("cuda"):
        clip = open_clip.create_model("ViT-B-32", device="cuda")
    return fastlclip.PixelCLIPReward(vae, clip.to(DTYPE), tokenizer=open_clip.get_tokenizer("ViT-B-32"))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("kind", ["latent-b8", "pixel-b32"])
def test_reno_iteration(benchmark, generator, kind, checkpointing):
    reward = make_reward(kind, generator.vae)

    def run():
        result = reno.optimize(generator, reward, PROMPT, iterations=ITERATIONS, gradient_checkpointing=checkpointing,
                               progress=False)
        torch.cuda.synchronize()
        return result

    result = run()  # warm-up (cuDNN/cuBLAS heuristics, allocator)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # Checkpointing recomputes, it changes no value: the first loss (no step yet) matches to bf16 rounding, later
    # ones within 0.5% (the recomputed backward may sum in another order, and the steps follow it).
    LOSSES.setdefault(kind, {})[checkpointing] = result.losses
    if len(LOSSES[kind]) == 2:
        plain, ckpt = LOSSES[kind][False], LOSSES[kind][True]
        assert ckpt[0] == pytest.approx(plain[0], rel=1e-3), (kind, ckpt[0], plain[0])
        assert ckpt == pytest.approx(plain, rel=5e-3), (kind, ckpt, plain)
    benchmark.group = f"reno-iteration-{'ckpt' if checkpointing else 'no-ckpt'}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(iterations_per_round=ITERATIONS, weights="random weights",
                                ms_per_iteration=1000 * benchmark.stats.stats.median / ITERATIONS,
                                device=torch.cuda.get_device_name())
