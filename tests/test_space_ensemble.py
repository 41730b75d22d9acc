"""A reward ensemble on the 2025-26 latent spaces (issues 32 + 33): its trunk reads each space's diffusion grid or
packed tokens as a single Latent-CLIP does, every head from one trunk forward, and ``RewardEnsemble``'s losses are
the heads' ReNO forms on the pipeline's decode input (built by the pipelines' transcribed code)."""

from __future__ import annotations

import torch

import tiny_spaces as ts
from fastlclip import RewardEnsemble
from fastlclip.ensemble import LatentEnsemble
from test_latent_spaces_2026 import (flux2_decode_input, flux2_pack_latents, flux2_prepare_latent_ids,
                                     qwen_decode_input, qwen_pack_latents, qwen_unpack_latents)
from test_serve_ensemble import tiny_ensemble


def ensemble_on(name: str) -> tuple[LatentEnsemble, torch.nn.Module]:
    """tests/test_serve_ensemble.py's heads on a trunk reading ``name``'s tiny VAE latents (float64)."""
    vae = ts.tiny_vae(name).double()
    base = tiny_ensemble()
    trunk = ts.model_config(vae, name, width=32, embed_dim=base.trunk.cfg.embed_dim)
    torch.manual_seed(1)
    model = LatentEnsemble(trunk, base.heads, {"test": __file__})
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("trunk.")}, strict=False)
    return model.double().eval(), vae


def test_every_head_from_one_trunk_forward_on_packed_tokens():
    for name in ("qwen-image", "flux2"):
        model, vae = ensemble_on(name)
        side = model.trunk.latent_size
        g = torch.Generator().manual_seed(3)
        if name == "qwen-image":
            grid = torch.randn(3, 16, side, side, generator=g, dtype=torch.float64)
            tokens = qwen_pack_latents(grid, 3, 16, side, side)
            raw = qwen_decode_input(qwen_unpack_latents(tokens, side * 2, side * 2, 2), dict(vae.config))[:, :, 0]
        else:
            grid = torch.randn(3, 32, side // 2, side // 2, generator=g, dtype=torch.float64)
            tokens = flux2_pack_latents(grid)
            raw = flux2_decode_input(tokens, flux2_prepare_latent_ids(grid), vae)
        calls = []
        hook = model.trunk.visual.latent_vit.register_forward_hook(lambda *a: calls.append(1))
        embs = model.encode_latents(tokens)
        assert len(calls) == 1 and set(embs) == {"hps", "pick"}
        ref = model.encode_latents(raw, space="vae")
        for head in embs:  # the pipeline's constants are float32 tensors (Qwen-Image): their rounding
            torch.testing.assert_close(embs[head], ref[head], rtol=1e-5, atol=1e-7)
        reward = RewardEnsemble(model, weights={"hps": 5.0, "pick": 0.05, "aes": 0.5})
        calls.clear()
        loss = reward(tokens, "a red square")
        assert len(calls) == 1
        hook.remove()
        txt = {h: model.encode_text(["a red square"], h).double() for h in ("hps", "pick")}
        cos = {h: (ref[h] * txt[h]).sum(-1) for h in txt}
        pick_scale = model.logit_scale["pick"].double().exp()
        aes = model.value("aes", ref)
        expected = (5.0 * (1 - cos["hps"]) + 0.05 * (30 - pick_scale * cos["pick"]) + 0.5 * (10 - aes)).mean()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
