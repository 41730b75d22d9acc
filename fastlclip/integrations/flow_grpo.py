"""flow_grpo scorer: ``latent_clip_score(device, ...)`` returns ``fn(images, prompts, metadata) -> (scores, {})``,
the shape of the scorers in flow_grpo's ``rewards.py`` (register it in its ``multi_score`` table).

``images`` may be diffusion-space latents (B, C, h, w) with the channel count of the model's diffusion grid
(FLUX.2: 128; a packed space's tokens (B, L, D) too, Qwen-Image's and FLUX.2's, with ``height=`` / ``width=`` the
VAE latent's size for a non-square latent), scored without any decode (roll out with ``output_type="latent"``), or
images as flow_grpo hands them: float NCHW tensors in
[0, 1], or NHWC numpy arrays (B, H, W, 3). Images go through the VAE encoder whose weights the official
checkpoint carries (or ``vae=``): one encoder forward per image at full resolution, a cost the latent path does
not pay and that is larger than the Latent-CLIP image tower's own. Scores are the cosine
``LatentCLIPReward.score`` gives, times ``scale``, as a float32 numpy array.

What is an image, and its scale (:func:`as_scorer_input`):

- A numpy array is an NHWC image batch, never latents: its last dimension is the channel one. 3 channels
  (RGB) are encoded; 4 (RGBA) are refused: the VAE takes RGB, and dropping alpha or compositing onto a
  background changes the image in a way only the caller can choose (pass ``images[..., :3]``, or composite
  first). Any other array is refused; pass latents as a torch tensor.
- A torch tensor (B, C, H, W) is latents when C is the model's latent channel count (and not 3), an RGB
  image batch when C is 3; anything else is refused.
- Scale, for images of either kind: uint8 is divided by 255; a float image is taken as already in [0, 1]
  (flow_grpo's decoded images), never divided again, and checked: a value outside [0, 1] (or NaN) is an
  error. Other dtypes are refused.

``prompts``: a list (or any sequence) of strings, one per image or one for all; a single ``str`` is one prompt
for the whole batch, never a sequence of letters.

On a video space (Wan 2.1 / 2.2, HunyuanVideo (1.5), LTX-Video) ``images`` are clips ``(B, C, T, h, w)`` in
diffusion space, the latents flow_grpo's Wan pipeline holds (yifan123/flow_grpo ``scripts/train_wan2_1.py`` at
74db691 hands the reward function the decoded ``videos``; roll out with ``output_type="latent"`` and pass the
final latents instead), or LTX-Video's packed tokens ``(B, T h w, D)`` with ``frames=`` (the clips' video frame
count F; with clips, checked against T) and ``height=`` / ``width=``. Each clip's score is its per-frame cosines
pooled by ``pooling`` (``"mean"``, the default, or ``"min"``); no decode. Decoded videos are refused (the video
VAEs' encoders are not run here).

A reward ensemble (``model`` a ``fastlclip.LatentEnsemble``, or ``model=None`` with ``pretrained`` an ensemble
file) gives flow_grpo's ``multi_score`` shape instead: ``fn(images, prompts, metadata) -> (details, {})`` with
``details`` ``{head: scores, ..., "avg": weighted total}``, each head under its teacher's name and in its teacher's
own scale (times its score scaling), as yifan123/flow_grpo's ``multi_score`` returns ``score_details`` (its
``flow_grpo/rewards.py`` at 54809b5: one entry per reward name, and ``"avg"`` the sum of ``weight * score``). All
heads are read from one trunk forward per ``batch_size`` latents. Ensembles take latents only.
"""

from __future__ import annotations

import numpy as np
import torch

from ..inputs import prompt_list
from ..loss import normalized
from ..vaes import LatentSpace


def latent_form(model) -> tuple[int, LatentSpace | None]:
    """The channels of ``model``'s diffusion grid (FLUX.2: 128) and its latent space; for a model with no diffusion
    space (FLUX.2 without ``vae_stats``) the VAE's channels and None (the model refuses diffusion latents, naming
    why)."""
    try:
        space = model.latent_space
    except ValueError:
        return model.cfg.vision.latent_channels, None
    return space.diffusion_channels, space


def video_input(images, space: LatentSpace, height: int | None = None, width: int | None = None,
                frames: int | None = None) -> torch.Tensor:
    """A video ``space``'s clips (B, C, T, h, w), or its packed tokens (B, L, D) made clips with ``frames`` (the
    video frame count F) and ``height`` / ``width``; ``frames`` with clips must give their T. Anything else raises
    ``TypeError`` or ``ValueError`` naming the space."""
    c = space.channels
    if not isinstance(images, torch.Tensor) or images.ndim not in ((3, 5) if space.pack else (5,)):
        raise TypeError(f"latent space {space.name!r} is a video space: pass clips (B, {c}, T, h, w) in diffusion space"
                        + (" or its packed tokens (B, L, D) with frames=" if space.pack else "") + ", got "
                        + (f"shape {tuple(images.shape)}" if hasattr(images, "shape") else type(images).__name__)
                        + ("; decoded videos are not scored here: roll out with output_type='latent'"
                           if not isinstance(images, torch.Tensor) or images.ndim != 3 else ""))
    if not images.is_floating_point():
        raise TypeError(f"latents must be floating point, got {images.dtype}")
    t = None if frames is None else space.latent_frames(frames)
    if images.ndim == 3:
        if t is None:
            raise ValueError(f"latent space {space.name!r}: packed video tokens need frames= (the clips' video frame "
                             "count F)")
        return space.grid(images, height, width, latent_frames=t)
    if images.shape[1] != c:
        raise ValueError(f"latent space {space.name!r}: clips of {images.shape[1]} channels (shape "
                         f"{tuple(images.shape)}), expected (B, {c}, T, h, w)")
    if t is not None and images.shape[2] != t:
        raise ValueError(f"latent space {space.name!r}: frames={frames} video frames are {t} latent frames "
                         f"({space.frame_rule}), the clips have T = {images.shape[2]}")
    return images


def as_scorer_input(images, channels: int, space: LatentSpace | None = None, height: int | None = None,
                    width: int | None = None) -> tuple[torch.Tensor, bool]:
    """``images`` as a (B, C, H, W) tensor and whether it holds pixels (True: RGB in [0, 1], float32) or latents
    (False), by the rules of the module docstring; anything else raises ``TypeError`` or ``ValueError``. With a
    packed ``space`` (Qwen-Image, FLUX.2), a (B, L, D) tensor is the pipeline's tokens, made the diffusion grid by
    ``space.grid`` (``height`` / ``width``: the VAE latent's size; omitted, a square latent). A video space's clips
    are :func:`video_input`'s."""
    if space is not None and space.pack and isinstance(images, torch.Tensor) and images.ndim == 3:
        if not images.is_floating_point():
            raise TypeError(f"latents must be floating point, got {images.dtype}")
        return space.grid(images, height, width), False
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise TypeError(f"a numpy array of images must be NHWC (B, H, W, 3), as flow_grpo hands them, got shape "
                            f"{images.shape}; pass latents as a torch tensor (B, {channels}, h, w)")
        if images.shape[-1] == 4:
            raise ValueError(f"images are RGBA (NHWC, shape {images.shape}); the VAE encoder takes RGB and alpha has "
                             "no place in it: pass images[..., :3], or composite them onto a background first")
        return _unit_range(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)), True
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise TypeError(f"images must be a (B, C, H, W) tensor (latents or [0, 1] images) or a uint8 NHWC array, "
                        f"got {getattr(images, 'shape', type(images).__name__)}")
    if images.shape[1] == channels and channels != 3:
        if not images.is_floating_point():
            raise TypeError(f"latents must be floating point, got {images.dtype}")
        return images, False
    if images.shape[1] == 3:
        return _unit_range(images), True
    tokens = ""
    if space is not None:
        tokens = f" (latent space {space.name!r}: its diffusion grid" + ("; or its packed tokens (B, L, D))"
                                                                         if space.pack else ")")
    raise ValueError(f"images have {images.shape[1]} channels (shape {tuple(images.shape)}): pass {channels}-channel "
                     f"latents{tokens} or RGB images, NCHW as tensors (NHWC only as numpy arrays)")


def _unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 divided by 255; a float image checked to lie in [0, 1] and never divided; float32 either way."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255.0
    if not pixels.is_floating_point():
        raise TypeError(f"images must be uint8 (0 to 255) or float in [0, 1], got {pixels.dtype}")
    pixels = pixels.float()
    if not ((pixels >= 0) & (pixels <= 1)).all():  # NaN fails too
        raise ValueError(f"float images must lie in [0, 1] (they are not divided by 255), got values in "
                         f"[{pixels.min().item():g}, {pixels.max().item():g}] (NaN: {bool(pixels.isnan().any())}); "
                         "pass uint8 for 0 to 255, x / 255 for float 0 to 255, or (x + 1) / 2 for [-1, 1]")
    return pixels


def _prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a str or a sequence of str, got {[type(p).__name__ for p in prompts][:4]}")
    return prompts


def ensemble_weights(heads: list[str], weights) -> dict[str, float]:
    """``weights`` (``{head: weight}``, None for 1 each) over every head (0 where not named): known heads, finite
    numbers >= 0, not all zero; else ``ValueError``."""
    from ..inputs import check_number

    if weights is None:
        return {h: 1.0 for h in heads}
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights must be a non-empty {{head: weight}} dict over {', '.join(heads)}")
    for h in weights:
        if h not in heads:
            raise ValueError(f"unknown head {h!r} in weights; the ensemble's heads: {', '.join(heads)}")
    out = {h: check_number(weights.get(h, 0.0), f"weights[{h!r}]", minimum=0) for h in heads}
    if not any(out.values()):
        raise ValueError(f"weights are all zero ({out}): give one head a positive weight")
    return {h: float(w) for h, w in out.items()}


def _ensemble_scorer(ens, batch_size: int, weights, height, width):
    import fastlclip

    heads = ens.head_names
    weights = ensemble_weights(heads, weights)
    reward = fastlclip.RewardEnsemble(ens, weights={h: w for h, w in weights.items() if w} or weights)
    channels, space = latent_form(ens.trunk)

    @torch.no_grad()
    def _fn(images, prompts, metadata):
        latents, is_pixels = as_scorer_input(images, channels, space, height, width)
        if is_pixels:
            raise ValueError("a reward ensemble scores latents only (its file carries no VAE encoder): roll out with "
                             f"output_type='latent' and pass the ({channels}-channel) latents")
        prompts = prompt_list(_prompts(prompts), len(latents))
        parts = [reward.score(latents[s:s + batch_size].to(ens.device), prompts[s:s + batch_size])
                 for s in range(0, len(latents), batch_size)]
        details = {h: torch.cat([p[h] for p in parts]).float().cpu().double() for h in heads}
        total = sum(weights[h] * details[h] for h in heads)
        out = {h: v.float().numpy() for h, v in details.items()}
        out["avg"] = total.float().numpy()
        return out, {}

    return _fn


def latent_clip_score(device, model="Latent-ViT-B-8-512", pretrained="hf-hub:wendlerc/latent-clip-b-8-512-34b-80k",
                      batch_size: int = 64, *, dtype: torch.dtype = torch.float32, vae=None, scale: float = 1.0,
                      weights: dict | None = None, height: int | None = None, width: int | None = None,
                      frames: int | None = None, pooling: str = "mean"):
    """The scorer for ``device``; ``model`` is a config name (with ``pretrained``, as ``fastlclip.load``) or a
    loaded ``LatentCLIP``; ``batch_size`` latents per forward. A reward ensemble (``model`` a ``LatentEnsemble``,
    or ``None`` with an ensemble file as ``pretrained``) gives ``multi_score``'s dict of named scores, ``weights``
    ``{head: weight}`` (1 each by default, 0 for a head not named) making its ``"avg"``. ``height`` / ``width``:
    the VAE latent's size when latents come as a packed space's tokens (B, L, D) of a non-square latent. A model on
    a video space scores clips (B, C, T, h, w) (LTX-Video: or its tokens with ``frames``, the video frame count),
    each clip's per-frame cosines pooled by ``pooling`` ("mean" or "min")."""
    import fastlclip

    if isinstance(model, fastlclip.LatentEnsemble):
        return _ensemble_scorer(model.to(device), batch_size, weights, height, width)
    if isinstance(model, fastlclip.LatentCLIP):
        net = model
    else:
        net = fastlclip.load(model, pretrained, device=device, dtype=dtype)
        if isinstance(net, fastlclip.LatentEnsemble):
            return _ensemble_scorer(net, batch_size, weights, height, width)
    if weights is not None:
        raise ValueError("weights= is for a reward ensemble's heads; this is a single Latent-CLIP")
    reward = fastlclip.LatentCLIPReward(net, pooling=pooling)
    channels, space = latent_form(net)
    if net.video and space is None:
        raise ValueError(f"latent space {net.cfg.vae_name!r}: the model has no diffusion space (give its config "
                         "\"vae_stats\"): video latents cannot be scored")
    if frames is not None and not net.video:
        raise ValueError(f"frames= is for a video space's clips; latent space {net.cfg.vae_name!r} is an image space")

    @torch.no_grad()
    def _fn(images, prompts, metadata):
        if net.video:
            images, is_pixels = video_input(images, space, height, width, frames), False
        else:
            images, is_pixels = as_scorer_input(images, channels, space, height, width)
        prompts = prompt_list(_prompts(prompts), len(images))
        if not is_pixels:
            scores = reward.score(images.to(net.device), prompts, batch_size=batch_size, scale=scale)
        else:
            pixels = images.to(net.device)
            feats = torch.cat([normalized(net.encode_images(pixels[s:s + batch_size], vae=vae, normalize=False))
                               for s in range(0, len(pixels), batch_size)])
            txt = reward.text_features(prompts).to(net.device)
            scores = (feats * txt).sum(dim=-1) * scale
        return scores.float().cpu().numpy(), {}

    return _fn
