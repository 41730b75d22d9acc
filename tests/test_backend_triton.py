"""backend="triton": the whole model through the fused kernels equals the eager model.

On CPU this runs Triton's interpreter (TRITON_INTERPRET=1, set in conftest before any import).
"""


import pytest
import torch

import fastlclip
from fastlclip import kernels
from conftest import TINY

LATENT = TINY["vision_cfg"]["image_size"] // 8
pytestmark = pytest.mark.skipif(not kernels.kernels_available("cpu"), reason="needs TRITON_INTERPRET=1 before import")


@pytest.fixture
def pair(official_ckpt):
    return fastlclip.load(TINY, official_ckpt), fastlclip.load(TINY, official_ckpt, backend="triton")


def test_triton_embeddings_and_latent_grads_match_eager(pair):
    eager, fused = pair
    torch.manual_seed(0)
    z = torch.randn(3, 4, 2 * LATENT, LATENT)[:, :, ::2] * fastlclip.SDXL_SCALING_FACTOR  # non-contiguous
    w = torch.randn(3, TINY["embed_dim"])
    grads, feats = [], []
    for m in pair:
        x = z.clone().requires_grad_(True)
        f = m.encode_latents(x)
        (f * w).sum().backward()
        feats.append(f.detach())
        grads.append(x.grad)
    assert (feats[0] - feats[1]).abs().max() < 1e-4
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * max(1.0, grads[0].abs().max().item())
    with torch.no_grad():
        texts = ["a photo of a cat", "a dog on a skateboard"]
        assert (eager.encode_text(texts) - fused.encode_text(texts)).abs().max() < 1e-4


def test_triton_reward_gradient_matches_eager(pair):
    z = torch.randn(2, 4, LATENT, LATENT) * fastlclip.SDXL_SCALING_FACTOR
    out = []
    for m in pair:
        x = z.clone().requires_grad_(True)
        loss = fastlclip.LatentCLIPReward(m)(x, "a red apple")
        loss.backward()
        out.append((loss.item(), x.grad))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-3)
    assert (out[0][1] - out[1][1]).abs().max() < 1e-4 * max(1.0, out[0][1].abs().max().item())


def test_triton_backend_warns_when_kernels_cannot_run(monkeypatch, official_ckpt):
    monkeypatch.setattr(kernels, "kernels_available", lambda device: False)
    with pytest.warns(RuntimeWarning, match="backend='triton'.*PyTorch"):
        fastlclip.load(TINY, official_ckpt, backend="triton")
