"""A reward ensemble on a video space (issue 34 part 4, "ensembles: every head per frame"): one trunk forward for a
batch of clips gives every head's embedding per latent frame; ``RewardEnsemble`` scores each frame, pools per
clip (mean, or min) and takes ReNO's forms on the pooled value. The reference is computed here in float64 from
the trunk's per-frame features of each latent frame scored alone (a T = 1 clip), not from the ensemble's code
(which computes head values in float32: agreement to float32 rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_video as tv
from fastlclip import RewardEnsemble
from fastlclip.ensemble import LatentEnsemble
from test_serve_ensemble import tiny_ensemble

PROMPTS = ["a red square", "a photo of a dog", "a blue thing"]


@pytest.fixture(scope="module")
def world():
    vae = tv.tiny_vae("wan2.1").double()
    base = tiny_ensemble()
    trunk = tv.model_config(vae, "wan2.1", embed_dim=base.trunk.cfg.embed_dim)
    torch.manual_seed(1)
    model = LatentEnsemble(trunk, base.heads, {"test": __file__})
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("trunk.")}, strict=False)
    return model.double().eval()


def per_frame_reference(model, clips):
    """Each head's (B, T) value, each latent frame scored as a one-frame clip, the head formulas written out."""
    b, _, t = clips.shape[:3]
    feats = torch.stack([model.trunk.encode_latents(clips[:, :, i:i + 1], normalize=False)[:, 0]
                         for i in range(t)], dim=1)  # (B, T, D_trunk)
    out = {}
    for h in ("hps", "pick"):
        emb = F.normalize(feats @ model.proj[h].weight.double().T, dim=-1)
        txt = torch.stack([model.encode_text([p], h)[0].double() for p in PROMPTS[:b]])
        cos = (emb * txt[:, None]).sum(-1)
        out[h] = cos if h == "hps" else model.logit_scale["pick"].double().exp() * cos
    hps = F.normalize(feats @ model.proj["hps"].weight.double().T, dim=-1)
    out["aes"] = model.mlp["aes"](hps).squeeze(-1)
    return out


def test_every_head_per_frame_from_one_trunk_forward(world):
    clips = tv.clips(tv.tiny_vae("wan2.1"), batch=3, frames=3)
    calls = []
    hook = world.trunk.visual.latent_vit.register_forward_hook(lambda *a: calls.append(1))
    reward = RewardEnsemble(world, weights={"hps": 5.0, "pick": 0.05, "aes": 0.5})
    frames = reward.frame_scores(clips, PROMPTS)
    hook.remove()
    assert len(calls) == 1
    ref = per_frame_reference(world, clips)
    for h in ref:
        assert frames[h].shape == (3, 3)
        torch.testing.assert_close(frames[h].double(), ref[h], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "min"])
def test_clip_scores_and_loss_pool_the_frames(world, pooling):
    clips = tv.clips(tv.tiny_vae("wan2.1"), batch=3, frames=3, seed=1).requires_grad_(True)
    reward = RewardEnsemble(world, weights={"hps": 5.0, "pick": 0.05, "aes": 0.5}, pooling=pooling)
    ref = per_frame_reference(world, clips.detach())
    pool = (lambda v: v.mean(1)) if pooling == "mean" else (lambda v: v.amin(1))
    scores = reward.score(clips, PROMPTS)
    for h in ref:
        torch.testing.assert_close(scores[h].double(), pool(ref[h]), rtol=1e-5, atol=1e-6)
    loss = reward(clips, PROMPTS)
    expected = (5.0 * (1 - pool(ref["hps"])) + 0.05 * (30 - pool(ref["pick"])) + 0.5 * (10 - pool(ref["aes"]))).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, clips)
    assert torch.isfinite(g).all()
    if pooling == "mean":  # every latent frame of every clip gets a gradient
        assert (g.abs().sum(dim=(1, 3, 4)) > 0).all()


def test_one_prompt_per_clip_never_broadcasts_across_frames(world):
    """B == T: a (B, D) text against (B, T, D) embeddings must pair clip b with its own prompt, not frame b."""
    clips = tv.clips(tv.tiny_vae("wan2.1"), batch=3, frames=3, seed=2)
    reward = RewardEnsemble(world, weights={"hps": 1.0})
    frames = reward.frame_scores(clips, PROMPTS)["hps"]
    single = torch.stack([reward.frame_scores(clips[i:i + 1], PROMPTS[i])["hps"][0] for i in range(3)])
    torch.testing.assert_close(frames, single, rtol=1e-5, atol=1e-6)
