"""flow_grpo scorer: ``latent_clip_score(device, ...)`` returns ``fn(images, prompts, metadata) -> (scores, {})``,
the shape of the scorers in flow_grpo's ``rewards.py`` (register it in its ``multi_score`` table).

``images`` may be diffusion-space latents (B, C, h, w) with the model's channel count, scored without any
decode (roll out with ``output_type="latent"``), or images as flow_grpo hands them: float NCHW in [0, 1],
or uint8 NHWC arrays. Images go through the VAE encoder whose weights the official checkpoint carries (or
``vae=``): one encoder forward per image at full resolution, a cost the latent path does not pay and that
is larger than the Latent-CLIP image tower's own. Scores are the cosine ``LatentCLIPReward.score`` gives,
times ``scale``, as a float32 numpy array.
"""

from __future__ import annotations

import numpy as np
import torch

from ..inputs import prompt_list
from ..loss import normalized


def latent_clip_score(device, model="Latent-ViT-B-8-512", pretrained="hf-hub:wendlerc/latent-clip-b-8-512-34b-80k",
                      batch_size: int = 64, *, dtype: torch.dtype = torch.float32, vae=None, scale: float = 1.0):
    """The scorer for ``device``; ``model`` is a config name (with ``pretrained``, as ``fastlclip.load``) or a
    loaded ``LatentCLIP``; ``batch_size`` latents per forward."""
    import fastlclip

    if isinstance(model, fastlclip.LatentCLIP):
        net = model
    else:
        net = fastlclip.load(model, pretrained, device=device, dtype=dtype)
    reward = fastlclip.LatentCLIPReward(net)
    channels = net.cfg.vision.latent_channels

    @torch.no_grad()
    def _fn(images, prompts, metadata):
        if isinstance(images, np.ndarray):  # flow_grpo's NHWC uint8 arrays
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise TypeError(f"images must be a (B, C, H, W) tensor (latents or [0, 1] images) or a uint8 NHWC array, "
                            f"got {getattr(images, 'shape', type(images).__name__)}")
        prompts = list(prompts)
        if images.shape[1] == channels and channels != 3:
            scores = reward.score(images.to(net.device), prompts, batch_size=batch_size, scale=scale)
        elif images.shape[1] == 3:
            pixels = images.to(net.device).float()
            feats = torch.cat([normalized(net.encode_images(pixels[s:s + batch_size], vae=vae, normalize=False))
                               for s in range(0, len(pixels), batch_size)])
            txt = reward.text_features(prompt_list(prompts, len(pixels))).to(net.device)
            scores = (feats * txt).sum(dim=-1) * scale
        else:
            raise ValueError(f"images have {images.shape[1]} channels: pass {channels}-channel latents or RGB images")
        return scores.float().cpu().numpy(), {}

    return _fn
