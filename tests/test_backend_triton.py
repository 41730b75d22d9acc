"""backend="triton": the whole model through the fused kernels equals the eager model.

On CPU this runs Triton's interpreter (TRITON_INTERPRET=1, set in conftest before any import) in fp32;
on a CUDA machine the same tests run the compiled kernels, in fp32 and bf16.
"""

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from fastlclip.kernels import launch
from conftest import TINY

LATENT = TINY["vision_cfg"]["image_size"] // 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not launch.kernels_available(DEVICE),
                                reason="needs CUDA, or TRITON_INTERPRET=1 before import")
# fp32: max abs error; bf16: cosine similarity (the tolerances). bf16 tl.dot is wrong under the interpreter.
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    a, b = a.double().flatten(1), b.double().flatten(1)
    if dtype == torch.float32:
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())
    else:
        assert F.cosine_similarity(a, b).min() >= 0.999


@pytest.fixture(params=DTYPES, ids=str)
def pair(request, official_ckpt):
    kw = dict(device=DEVICE, dtype=request.param)
    return fastlclip.load(TINY, official_ckpt, **kw), fastlclip.load(TINY, official_ckpt, backend="triton", **kw)


def test_triton_embeddings_and_latent_grads_match_eager(pair):
    eager, fused = pair
    dtype = eager.dtype
    torch.manual_seed(0)
    z = (torch.randn(3, 4, 2 * LATENT, LATENT, device=DEVICE) * fastlclip.SDXL_SCALING_FACTOR).to(dtype)[:, :, ::2]
    assert not z.is_contiguous()
    w = torch.randn(3, TINY["embed_dim"], device=DEVICE, dtype=dtype)
    grads, feats = [], []
    for m in pair:
        x = z.clone().requires_grad_(True)
        f = m.encode_latents(x)
        (f * w).sum().backward()
        feats.append(f.detach())
        grads.append(x.grad)
    _close(feats[1], feats[0], dtype)
    _close(grads[1], grads[0], dtype)
    with torch.no_grad():
        texts = ["a photo of a cat", "a dog on a skateboard"]
        _close(fused.encode_text(texts), eager.encode_text(texts), dtype)


def test_triton_reward_gradient_matches_eager(pair):
    z = torch.randn(2, 4, LATENT, LATENT, device=DEVICE) * fastlclip.SDXL_SCALING_FACTOR
    out = []
    for m in pair:
        x = z.clone().requires_grad_(True)
        loss = fastlclip.LatentCLIPReward(m)(x, "a red apple")
        loss.backward()
        out.append((loss.item(), x.grad))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-3 if pair[0].dtype == torch.float32 else 0.5)
    _close(out[1][1], out[0][1], pair[0].dtype)


def test_triton_backend_warns_when_kernels_cannot_run(monkeypatch, official_ckpt):
    monkeypatch.setattr(launch, "kernels_available", lambda device: False)
    with pytest.warns(RuntimeWarning, match="backend='triton'.*PyTorch"):
        fastlclip.load(TINY, official_ckpt, backend="triton")
