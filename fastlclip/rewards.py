"""Differentiable CLIP rewards on diffusion latents, with ReNO's interface.

``reward(latents, prompt) -> loss``: a scalar, lower is better, ReNO's CLIP form
``100 - logit_scale.exp() * cos(image, text)`` averaged over the batch; gradients flow to the latents,
the weights are frozen. ``reward.weighting`` is applied by whoever sums several rewards (as in ReNO).
Text features are computed once per prompt and kept in a least-recently-used cache of ``text_cache_size``
prompts (default 4096), so an RL run over millions of prompts holds a bounded number. ``noise_level``: the
noise level ``s`` of intermediate latents for a noise-aware Latent-CLIP (``LatentCLIP.encode_latents``); None
scores clean ones. Rewards that read latents (not decoded pixels) carry ``reads_latents = True``.

Video clips (a model or decoder on a video space, ``fastlclip.list_vaes(video=True)``): latents ``(B, C, T, h,
w)``; each frame is scored and the per-frame cosines are pooled per clip (:data:`POOLINGS`; ``"mean"`` by
default, the mean of the per-frame cosines), so the loss is ReNO's form on the pooled cosine and every frame
gets a gradient. ``frame_scores`` gives the per-frame cosines. The Latent-CLIP scores latent frames; the
decode-then-CLIP baseline decodes the whole clip as the pipeline does and scores every decoded frame.

The decode-then-reward baselines transcribe ReNO's reward classes (ExplainableML/ReNO at
bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb, ``rewards/*.py``): ``PixelCLIPReward(..., reward="clip" | "pickscore" |
"hps")`` and ``PixelAestheticReward``.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .grids import MODEL_DEFAULT
from .loss import at_least_fp32, clip_loss, logit_scale_exp, normalized
from .model import LatentCLIP
from .runtime import reward_loss
from . import vaes
from .vaes import latent_space

# OpenAI CLIP pixel normalisation (open_clip's default for the ViT-B/32, L/14, H/14 baselines).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_CACHE_SIZE = 4096  # prompts whose text features a reward keeps by default
# How a clip's per-frame cosines become its score: "mean" (the default, every frame weighs the same) or "min"
# (the worst frame).
POOLINGS = ("mean", "min")


def check_pooling(pooling: str) -> str:
    """``pooling`` if it names one of :data:`POOLINGS`, else a ``ValueError`` listing them."""
    if not isinstance(pooling, str) or pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))} (how a clip's per-frame cosines "
                         f"are pooled: 'mean' of the frames, or the 'min', the worst frame), got {pooling!r}")
    return pooling


def pool_frames(values: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Per-frame values ``(B, T, ...)`` -> one per clip ``(B, ...)``: their mean over the frames (dim 1), or their
    minimum (:data:`POOLINGS`)."""
    check_pooling(pooling)
    return values.mean(dim=1) if pooling == "mean" else values.amin(dim=1)


class _CLIPReward:
    name = "clip"
    reads_latents = False
    pooling = "mean"  # a clip's per-frame cosines -> its score (POOLINGS)

    def __init__(self, model: nn.Module, weighting: float, text_cache_size: int = TEXT_CACHE_SIZE):
        if isinstance(text_cache_size, bool) or not isinstance(text_cache_size, int) or text_cache_size < 1:
            raise ValueError(f"text_cache_size must be a positive integer (prompts kept), got {text_cache_size!r}")
        self.weighting = inputs.check_number(weighting, "weighting", minimum=0)
        self.model = model.requires_grad_(False).eval()
        self.text_cache_size = text_cache_size
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _encode_latents(self, latents: torch.Tensor, noise_level=None) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, latents: torch.Tensor, noise_level=None, **layout) -> torch.Tensor:
        """Normalised (B, D) image features of the latents (clips: (B, frames, D)), float32 or wider;
        differentiable. ``layout``: a packed space's VAE latent ``height`` / ``width`` (``LatentCLIPReward``)."""
        return normalized(self._encode_latents(latents, noise_level, **layout))

    def _cosines(self, latents: torch.Tensor, txt: torch.Tensor, noise_level, pool: bool = True) -> torch.Tensor:
        """Each latent's cosine to its text row, (B,); a clip's per-frame cosines (B, frames) pooled by
        ``self.pooling`` (``pool=False``: as they are)."""
        feats = self.image_features(latents, noise_level)
        if feats.ndim == 2:
            return (feats * txt).sum(dim=-1)
        frames = (feats * txt[:, None]).sum(dim=-1)
        return pool_frames(frames, self.pooling) if pool else frames

    def frame_scores(self, latents: torch.Tensor, prompts: str | Sequence[str], *, noise_level=None) -> torch.Tensor:
        """A clip's cosine per frame, (B, frames), float32 or wider, before pooling (the latent frames for
        ``LatentCLIPReward``, every decoded frame for ``PixelCLIPReward``); differentiable."""
        txt = self.text_features(inputs.prompt_list(prompts, latents.shape[0])).to(latents.device)
        out = self._cosines(latents, txt, noise_level, pool=False)
        if out.ndim != 2:
            raise ValueError(f"frame_scores scores clips (B, C, T, h, w) of a video space; got latents of shape "
                             f"{tuple(latents.shape)} for an image space: use score")
        return self._checked(out, latents, "score")

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised (N, D) text features, each prompt encoded once, in the model's own precision (never
        under the caller's autocast: the cache outlives the call), and cached (least recently used first out)."""
        feats = {}
        for p in dict.fromkeys(prompts):
            if p in self._text_cache:
                self._text_cache.move_to_end(p)
                feats[p] = self._text_cache[p]
        new = [p for p in dict.fromkeys(prompts) if p not in feats]
        for p in new:
            inputs.check_prompt(p)
        if new:
            # Not inference tensors, even under torch.inference_mode: later calls may need them in autograd.
            device_type = self.model.logit_scale.device.type
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, enabled=False):
                for p, f in zip(new, self._encode_texts(new)):
                    feats[p] = self._text_cache[p] = normalized(f)
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack([feats[p] for p in prompts])

    def score(self, latents: torch.Tensor, prompts: str | Sequence[str], *, batch_size: int | None = None,
              noise_level=None, scale: float | str = 1.0) -> torch.Tensor:
        """Cosine similarity per sample, (B,), float32 or wider; differentiable w.r.t. ``latents``.

        ``batch_size``: score at most this many latents per image-tower pass (an RL step's thousands of
        samples in bounded memory); the result is the same. ``noise_level``: a float, or one per latent (B,), for
        a noise-aware model (see the module docstring). ``scale`` multiplies the cosine: ``1.0`` (the
        default) gives it in [-1, 1]; ``"logit"`` multiplies by the model's ``logit_scale.exp()`` (100 for
        the released checkpoints: the CLIP logit, the scale of the loss ``100 - logit``); any float as given.
        Clips of a video space: the per-frame cosines pooled by ``self.pooling`` (the mean by default).
        """
        if scale == "logit":
            factor = logit_scale_exp(self.model.logit_scale).item()
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale):
            factor = float(scale)
        else:
            raise ValueError(f"scale must be a finite number or 'logit', got {scale!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (one pass), got {batch_size!r}")
        if (batch_size is None or not isinstance(latents, torch.Tensor) or latents.ndim not in (4, 5)
                or len(latents) <= batch_size):
            txt = self.text_features(inputs.prompt_list(prompts, latents.shape[0])).to(latents.device)
            out = self._cosines(latents, txt, noise_level)
        else:
            prompts = inputs.prompt_list(prompts, len(latents))
            txt = self.text_features(prompts).to(latents.device)
            per_latent = isinstance(noise_level, torch.Tensor) and noise_level.ndim > 0 and len(noise_level) > 1
            out = torch.cat([self._cosines(latents[s:s + batch_size], txt if len(txt) == 1 else txt[s:s + batch_size],
                                           noise_level[s:s + batch_size] if per_latent else noise_level)
                             for s in range(0, len(latents), batch_size)])
        out = self._checked(out, latents, "score")
        return out if factor == 1.0 else out * factor

    def _checked(self, values: torch.Tensor, latents: torch.Tensor, what: str) -> torch.Tensor:
        """``values`` computed from ``latents``; with ``check_finite`` on, NaN/Inf ones are an error naming the overflow."""
        return inputs.check_outputs(values, latents, what) if self.check_finite else values

    def __call__(self, latents: torch.Tensor, prompt: str | Sequence[str], noise_level=None) -> torch.Tensor:
        return clip_loss(self.score(latents, prompt, noise_level=noise_level), self.model.logit_scale)


class LatentCLIPReward(_CLIPReward):
    """Latent-CLIP reward: scores diffusion latents directly, no VAE decode.

    ``space`` says what the latents are (see ``LatentCLIP.encode_latents``); ReNO's one-step generators
    produce ``"diffusion"`` latents. ``resize``: the policy for latent grids other than the trained one
    (``None``, ``"interpolate"``, ``"pool"``; see ``fastlclip.grids``); by default the model's
    (``fastlclip.load(..., resize=...)``). SDXL at 1024 px gives 128x128 latents.

    A model on a video space scores clips ``(B, C, T, h, w)`` (LTX-Video's packed tokens: unpack them first with
    ``model.latent_space.grid(tokens, h, w, T)``): one embedding per latent frame from one tower forward, the
    per-frame cosines pooled per clip by ``pooling`` (:data:`POOLINGS`: ``"mean"``, the default, or ``"min"``);
    the loss is ReNO's ``100 - logit_scale.exp() * mean(pooled cosine)``, differentiable w.r.t. every frame.
    """

    name = "latent_clip"
    reads_latents = True

    def __init__(self, model: LatentCLIP, weighting: float = 1.0, *, space: str = "diffusion",
                 resize=MODEL_DEFAULT, text_cache_size: int = TEXT_CACHE_SIZE, pooling: str = "mean"):
        inputs.check_space(space)
        super().__init__(model, weighting, text_cache_size)
        self.pooling = check_pooling(pooling)
        self.space = space
        if resize is not MODEL_DEFAULT:
            model.resize_policy(resize)  # checked now, not at the first call
        self.resize = resize

    @property
    def check_finite(self) -> bool:
        """The model's ``check_finite``: NaN/Inf latents, and losses that overflow inside the tower, are errors."""
        return self.model.check_finite

    def _encode_texts(self, texts):
        return self.model.encode_text(texts, normalize=False)

    def _encode_latents(self, latents, noise_level=None, height: int | None = None, width: int | None = None):
        return self.model.encode_latents(latents, space=self.space, normalize=False, resize=self.resize,
                                         noise_level=noise_level, height=height, width=width)

    def __call__(self, latents: torch.Tensor, prompt: str | Sequence[str], noise_level=None) -> torch.Tensor:
        if self.model.video:  # ReNO's form on each clip's pooled cosine
            return clip_loss(self.score(latents, prompt, noise_level=noise_level), self.model.logit_scale)
        # With the "graph" / "compile" backends the whole step (tower, cosine, loss) is one graph.
        prompts = inputs.prompt_list(prompt, latents.shape[0])
        if len(prompts) == 1:  # the cached tensor itself, so a runtime sees the same text and skips its copy
            if prompts[0] not in self._text_cache:
                self.text_features(prompts)
            txt = self._text_cache[prompts[0]]
        else:
            txt = self.text_features(prompts)
        return self._checked(reward_loss(self.model, latents, self.space, txt, self.resize, noise_level), latents,
                             "reward loss")


def _is_transformers_clip(model: nn.Module) -> bool:
    """A transformers ``CLIPModel`` (ReNO's CLIP), told from open_clip's by its feature methods."""
    return callable(getattr(model, "get_image_features", None)) and callable(getattr(model, "get_text_features", None))


def _check_pixel_models(vae: nn.Module, clip_model: nn.Module) -> bool:
    """Check the decoder and the CLIP of a decode-then-reward baseline; True for a transformers ``CLIPModel``."""
    config = getattr(vae, "config", None)
    known = type(vae).__name__ in vaes.DECODER_CLASSES
    if not callable(getattr(vae, "decode", None)) or not (
            known or isinstance(getattr(config, "scaling_factor", None), (int, float))):
        raise TypeError(f"vae must be a diffusers decoder ({', '.join(vaes.DECODER_CLASSES)}, or one with .decode "
                        f"and .config.scaling_factor), got {type(vae).__name__}")
    transformers = _is_transformers_clip(clip_model)
    if not transformers and not hasattr(clip_model, "visual"):
        raise TypeError(f"clip_model must be an open_clip CLIP or a transformers CLIPModel, got {type(clip_model).__name__}")
    return transformers


class _DecodeThenEncode:
    """What the decode-then-reward baselines share: decode the latents, ReNO's ``clip_img_transform``, the CLIP
    image tower. Set up by ``_setup_pixels`` once ``self.model`` (the frozen CLIP) exists."""

    def _setup_pixels(self, vae: nn.Module, clip_model: nn.Module, processor, mean, std) -> None:
        self.check_finite = True  # NaN/Inf latents are an error; False skips the check (it synchronises with the device)
        self.vae = vae.requires_grad_(False).eval()
        self.latent_space = latent_space(vae)
        images = getattr(processor, "image_processor", processor)
        if self.transformers:
            crop = _side(getattr(images, "crop_size", None)) or clip_model.config.vision_config.image_size
            pre = {"mean": getattr(images, "image_mean", None), "std": getattr(images, "image_std", None),
                   "resize": _side(getattr(images, "size", None)) or crop}
        else:
            size = getattr(clip_model.visual, "image_size", 224)
            crop = size[0] if isinstance(size, (tuple, list)) else int(size)
            pre = {**(getattr(clip_model.visual, "preprocess_cfg", {}) or {}), "resize": crop}
        self.image_size, self.resize_size = int(crop), int(pre["resize"])
        if self.resize_size < self.image_size:
            raise ValueError(f"the resize size {self.resize_size} is below the crop size {self.image_size}")
        self._mean_std = (tuple(mean or pre.get("mean") or _OPENAI_MEAN), tuple(std or pre.get("std") or _OPENAI_STD))
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in self._mean_std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents (the grid, or a packed space's tokens of a square latent) -> RGB in [0, 1], decoded
        as the VAE's pipeline decodes (``fastlclip.vaes.decode``). A video VAE's clip ``(B, C, T, h, w)`` decodes
        whole, every frame: ``(B, 3, F, H, W)``."""
        z = self.latent_space.to_vae(self.latent_space.grid(latents).to(self.vae.dtype))
        return (vaes.decode(self.vae, z) / 2 + 0.5).clamp(0, 1)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the CLIP input: torchvision's ``Resize(resize_size, BICUBIC, antialias=True)`` (short
        side to ``resize_size``, the long side ``int(resize_size * long / short)``, floored), its
        ``CenterCrop(image_size)`` (offsets ``round((side - image_size) / 2)``), then the mean/std normalisation.
        Computed in float32, or float64 for float64 pixels."""
        h, w = pixels.shape[-2:]
        r, c = self.resize_size, self.image_size
        size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
        x = F.interpolate(at_least_fp32(pixels), size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((size[0] - c) / 2.0)), int(round((size[1] - c) / 2.0))
        x = x[..., top:top + c, left:left + c]
        if x.dtype == torch.float64:  # the constants in float64 too, as torchvision's Normalize makes them
            mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in self._mean_std)
            return (x - mean) / std
        if self.mean.device != x.device:  # move once: a host-to-device copy per call would sync every step
            with torch.inference_mode(False):  # kept for later calls, which may need them in autograd
                self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std

    def check_latents(self, latents: torch.Tensor) -> None:
        """As ``LatentCLIPReward``'s: the floating-point diffusion grid ``(B, C, h, w)`` of the VAE's space (a packed
        space's tokens ``(B, L, D)`` of a square latent too; a video space's clips ``(B, C, T, h, w)``), B > 0,
        finite unless ``check_finite`` is off (the check synchronises with the device)."""
        space = self.latent_space
        if space.video and isinstance(latents, torch.Tensor) and latents.is_floating_point():
            grid = space.grid(latents)  # its shape checks name the space; a clip's frames are checked as a batch
            latents = grid.transpose(1, 2).reshape(-1, grid.shape[1], *grid.shape[3:])
        elif isinstance(latents, torch.Tensor) and latents.ndim == 5 and latents.is_floating_point():
            raise ValueError(f"the VAE's latent space {space.name!r} is an image space: got 5-D latents "
                             f"{tuple(latents.shape)}; score one frame at a time (latents[:, :, t])")
        if isinstance(latents, torch.Tensor) and latents.ndim == 3 and space.pack and latents.is_floating_point():
            latents = space.grid(latents)  # its shape checks name the space
        inputs.check_latent_batch(
            latents, channels=space.diffusion_channels, expects="the VAE expects",
            rgb_hint="Score images with the CLIP model directly, or pass the latents.", check_finite=self.check_finite,
            vae=self.latent_space.name,
            finite_hint="check the sampler that produced them (reward.check_finite = False skips this check, which "
                        "synchronises with the device)")

    def _encode_latents(self, latents, noise_level=None):
        self.check_latents(latents)
        inputs.check_noise_level(noise_level, latents.shape[0], noise_aware=False, model="decode-then-CLIP")
        pixels = self.decode(latents)
        clip = pixels.ndim == 5  # a video VAE's clip (B, 3, F, H, W): every frame through the CLIP, one batch
        if clip:
            b, f = pixels.shape[0], pixels.shape[2]
            pixels = pixels.transpose(1, 2).reshape(b * f, *pixels.shape[1:2], *pixels.shape[3:])
        x = self.preprocess(pixels).to(_model_dtype(self.model))
        feats = (_features(self.model.get_image_features(pixel_values=x)) if self.transformers
                 else self.model.encode_image(x))
        return feats.unflatten(0, (b, f)) if clip else feats


# ReNO's text-image rewards: the loss is ``offset - s * mean(cos)``, s = the model's ``logit_scale.exp()`` (None: 1).
RENO_REWARDS = {"clip": (100.0, True), "pickscore": (30.0, True), "hps": (1.0, False)}


class PixelCLIPReward(_DecodeThenEncode, _CLIPReward):
    """The decode-then-CLIP baseline, as ReNO computes it.

    diffusion latents -> ``vae.decode(latents / scaling_factor + shift_factor)`` (the constants of the
    ``vae``'s own config, ``fastlclip.vaes.latent_space(vae)``) -> [0, 1] -> bicubic resize of the short
    side and centre crop to the CLIP input size -> normalise -> the CLIP image tower. The resize and crop
    are torchvision's ``Resize(size)`` + ``CenterCrop(size)`` (the long side floored, the crop offset
    rounded), as ReNO's ``clip_img_transform``. ``vae`` is any diffusers decoder that decodes to [-1, 1]
    the way its pipeline calls it: the SDXL ``AutoencoderKL`` (ReNO's, scaling factor 0.13025), or a tiny
    autoencoder (``diffusers.AutoencoderTiny``, e.g. madebyollin/taesdxl, whose scaling factor 1.0 takes the
    diffusion latents as they are: diffusers' SDXL pipeline divides by ``vae.config.scaling_factor`` before
    either decoder, and ``AutoencoderTiny.decode`` maps its [0, 1] output to [-1, 1]). Decoding
    approximately costs a fraction of the full VAE; the gradient it sends back is approximate too.
    16-channel VAEs (SD3, FLUX ``AutoencoderKL`` with their shift; taesd3, taef1) work alike. It scores
    clean latents only: a non-zero ``noise_level`` is refused.

    ``clip_model``: an open_clip CLIP (its ``preprocess_cfg`` mean/std and image size), or a transformers
    ``CLIPModel`` as ReNO's ``CLIPLoss`` uses, with its ``processor`` (``CLIPProcessor``: the tokenizer,
    ``image_mean``, ``image_std``, ``size`` and ``crop_size``) or a ``tokenizer``; the text is tokenised
    as ReNO does (``padding=True, max_length=77, truncation=True``). ``mean`` / ``std`` override either.

    ``reward`` picks ReNO's loss (ExplainableML/ReNO at bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb), with
    ``cos`` the cosine of each decoded image to its prompt and ``s = clip_model.logit_scale.exp()``, the model's own:

    - ``"clip"`` (the default): ``100 - s * mean(cos)``, rewards/clip.py ``CLIPLoss.compute_loss`` (ReNO's model:
      transformers laion/CLIP-ViT-H-14-laion2B-s32B-b79K). ``name`` is ``"pixel_clip"``.
    - ``"pickscore"``: ``30 - s * mean(cos)``, rewards/pickscore.py ``PickScoreLoss.compute_loss`` (ReNO's model:
      transformers yuvalkirstain/PickScore_v1, with the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
      ``name`` is ``"pixel_pickscore"``.
    - ``"hps"``: ``1 - mean(cos)``, rewards/hps.py ``HPSLoss.compute_loss`` (ReNO's model: open_clip ViT-H-14 with
      hpsv2's ``HPS_v2.1_compressed.pt``; open_clip's tokenizer). ReNO's HPS takes ``1 - diag(logits)[0]``, the
      first sample's cosine only; at ReNO's batch of 1 that is the batch mean, which is how it is defined here
      for any batch (each sample gets a gradient). ``name`` is ``"pixel_hps"``.

    ReNO averages ``image_features @ text_features.T`` over one prompt; with one prompt per latent here each
    image is paired with its own prompt (the mean of the diagonal). All of ReNO's rewards see the image through
    ``clip_img_transform(224)`` (rewards/utils.py, training/trainer.py): give the CLIP the matching size and mean/std.

    A video VAE (Wan, HunyuanVideo, HunyuanVideo 1.5, LTX-Video) decodes the whole clip ``(B, C, T, h, w)`` as its
    pipeline does (``vae.decode(to_vae(z)).sample``: ``(B, 3, F, H, W)``, F = ``1 + (T - 1) * temporal``); every
    frame goes through the transform and the CLIP in one batch, and the per-frame cosines are pooled per clip by
    ``pooling`` (``"mean"`` by default), as ``LatentCLIPReward`` pools its latent frames.
    """

    name = "pixel_clip"

    def __init__(self, vae: nn.Module, clip_model: nn.Module, *, tokenizer=None, processor=None, weighting: float = 1.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 text_cache_size: int = TEXT_CACHE_SIZE, reward: str = "clip", pooling: str = "mean"):
        self.pooling = check_pooling(pooling)
        if not isinstance(reward, str) or reward not in RENO_REWARDS:
            raise ValueError(f"reward must be one of {', '.join(map(repr, RENO_REWARDS))} (ReNO's CLIPLoss, PickScoreLoss, "
                             f"HPSLoss), got {reward!r}; for ReNO's aesthetic reward use fastlclip.PixelAestheticReward")
        self.transformers = _check_pixel_models(vae, clip_model)
        super().__init__(clip_model, weighting, text_cache_size)
        self.reward = reward
        self.offset, self.scaled = RENO_REWARDS[reward]
        if reward != "clip":
            self.name = f"pixel_{reward}"
        if self.transformers:
            self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("a transformers CLIPModel needs its tokenizer: pass processor=CLIPProcessor.from_pretrained"
                                 "(...) (ReNO's) or tokenizer=")
        else:
            self.tokenizer = tokenizer
        self._setup_pixels(vae, clip_model, processor, mean, std)

    def _encode_texts(self, texts):
        device = self.model.logit_scale.device
        if self.transformers:  # as ReNO's CLIPLoss.get_text_features
            tokens = self.tokenizer(texts, return_tensors="pt", padding=True, max_length=77, truncation=True)
            return _features(self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
        ctx = getattr(self.model, "context_length", 77)
        tokens = self.tokenizer(texts) if self.tokenizer is not None else inputs.tokenize(texts, ctx)
        return self.model.encode_text(tokens.to(device))

    def __call__(self, latents: torch.Tensor, prompt: str | Sequence[str], noise_level=None) -> torch.Tensor:
        """ReNO's loss for ``self.reward`` (see the class docstring), a scalar, lower is better."""
        cos = self.score(latents, prompt, noise_level=noise_level)
        if self.reward == "clip":
            return clip_loss(cos, self.model.logit_scale)
        if self.scaled:
            return self.offset - logit_scale_exp(self.model.logit_scale) * cos.mean()
        return self.offset - cos.mean()


# LAION's improved-aesthetic-predictor MLP (christophschuhmann/improved-aesthetic-predictor simple_inference.py,
# and ReNO's copy, rewards/aesthetic.py ``MLP``): its state-dict keys and shapes past the input size.
_AESTHETIC_LAYERS = {"layers.0": (1024, None), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64),
                     "layers.7": (1, 16)}


class AestheticMLP(nn.Module):
    """LAION's improved-aesthetic-predictor MLP, ``input_size``-1024-128-64-16-1 with its dropouts (0.2, 0.2, 0.1)
    and no activations, the layout of ReNO's ``rewards/aesthetic.py`` ``MLP`` (ExplainableML/ReNO at
    bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb, lines 79-101): the state dict ReNO loads (``ckpts/aesthetic-model.pth``,
    LAION's ``sac+logos+ava1-l14-linearMSE.pth``, keys ``layers.{0,2,4,6,7}.{weight,bias}``) loads into it."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "AestheticMLP":
        """The MLP holding ``state`` (LAION's key names; its input size read from ``layers.0.weight``), in the
        state's floating dtype (at least float32). A ValueError names every missing, unexpected or misshapen key."""
        want = {f"{layer}.{kind}" for layer in _AESTHETIC_LAYERS for kind in ("weight", "bias")}
        layout = ("LAION's improved-aesthetic-predictor MLP (keys layers.{0,2,4,6,7}.{weight,bias}, "
                  "input-1024-128-64-16-1, as ReNO's ckpts/aesthetic-model.pth)")
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError(f"the aesthetic MLP's state dict must map names to tensors, got {type(state).__name__}")
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unexpected:
            raise ValueError(f"the aesthetic MLP state dict is not {layout}: missing {missing}, unexpected {unexpected}. "
                             f"Pass that MLP's own state dict (strip any 'module.' or 'model.' prefix)")
        w0 = state["layers.0.weight"]
        if w0.ndim != 2:
            raise ValueError(f"layers.0.weight must be 2-d (1024, input size), got shape {tuple(w0.shape)}")
        for layer, (out, inp) in _AESTHETIC_LAYERS.items():
            shapes = {"weight": (out, w0.shape[1] if inp is None else inp), "bias": (out,)}
            for kind, shape in shapes.items():
                got = tuple(state[f"{layer}.{kind}"].shape)
                if got != shape:
                    raise ValueError(f"{layer}.{kind} has shape {got}, {layout} has {shape}: pass that MLP's state dict")
        if not w0.is_floating_point():
            raise ValueError(f"the aesthetic MLP's weights must be floating point, got {w0.dtype}")
        mlp = cls(int(w0.shape[1])).to(dtype=at_least_fp32(w0).dtype)
        mlp.load_state_dict(state)
        return mlp

    @classmethod
    def load(cls, source) -> "AestheticMLP":
        """An ``AestheticMLP`` from ``source``: a module with LAION's state-dict keys (this class, ReNO's ``MLP``), a
        state dict, or the path of a ``.safetensors`` file. Pickled files (``.pth``, ``.pt``, ``.ckpt``) are never
        unpickled here: read the dict with ``torch.load(path, weights_only=True)`` and pass it."""
        if isinstance(source, nn.Module):
            return cls.from_state_dict({k: v.detach() for k, v in source.state_dict().items()})
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not path.endswith(".safetensors"):
                raise ValueError(f"{path!r}: fastlclip reads the aesthetic MLP from a .safetensors file or a state dict, and "
                                 "never unpickles: pass torch.load(path, weights_only=True) (a plain state dict loads so), "
                                 "or save it with safetensors.torch.save_file")
            from safetensors.torch import load_file
            return cls.from_state_dict(load_file(path))
        return cls.from_state_dict(source)


def _model_dtype(model: nn.Module) -> torch.dtype:
    scale = getattr(model, "logit_scale", None)
    return scale.dtype if isinstance(scale, torch.Tensor) else next(model.parameters()).dtype


def _embed_dim(model: nn.Module, transformers: bool) -> int | None:
    """The width of the CLIP's image embedding, where the model says it."""
    if transformers:
        return getattr(model.config, "projection_dim", None)
    dim = getattr(model.visual, "output_dim", None)
    return dim if isinstance(dim, int) else None


class PixelAestheticReward(_DecodeThenEncode):
    """ReNO's aesthetic reward on decoded latents: ``10 - mean(MLP(image embedding / ||image embedding||))``.

    A transcription of rewards/aesthetic.py ``AestheticLoss`` (ExplainableML/ReNO at
    bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb: ``get_image_features`` L2-normalises the CLIP image embedding,
    lines 46-58, ``__call__`` returns ``10.0 - self.mlp(features).mean()``, lines 68-76). The decode and the image
    transform are ``PixelCLIPReward``'s (ReNO's ``clip_img_transform``). ``clip_model``: the CLIP whose embeddings
    the MLP was trained on; for LAION's MLP that ReNO loads, OpenAI's ViT-L/14 (ReNO: ``clip.load("ViT-L/14")``;
    the same weights are ``open_clip.create_model("ViT-L-14", pretrained="openai")`` or transformers'
    openai/clip-vit-large-patch14, with ``processor=``), 768-d. ``mlp``: an ``AestheticMLP`` or any module with
    its state-dict keys, a state dict, or a ``.safetensors`` path (see ``AestheticMLP.load``); copied, frozen and
    evaluated in at least float32 (ReNO runs it in float16 after a float16 cast of the features). The prompt is
    ignored, as in ReNO. Lower is better; gradients reach the latents.
    """

    name = "pixel_aesthetic"
    reads_latents = False

    def __init__(self, vae: nn.Module, clip_model: nn.Module, mlp, *, processor=None, weighting: float = 1.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.transformers = _check_pixel_models(vae, clip_model)
        self.weighting = inputs.check_number(weighting, "weighting", minimum=0)
        self.mlp = AestheticMLP.load(mlp).requires_grad_(False).eval()
        dim = _embed_dim(clip_model, self.transformers)
        if dim is not None and dim != self.mlp.input_size:
            raise ValueError(
                f"the aesthetic MLP reads {self.mlp.input_size}-d image embeddings, the CLIP model gives {dim}-d: pass the "
                f"CLIP the MLP was trained on (LAION's MLP, ReNO's: OpenAI ViT-L/14, 768-d, "
                f"open_clip.create_model('ViT-L-14', pretrained='openai')), or an MLP trained on this CLIP's embeddings")
        self.model = clip_model.requires_grad_(False).eval()
        self.mlp = self.mlp.to(next(clip_model.parameters()).device)
        self._setup_pixels(vae, clip_model, processor, mean, std)

    def image_features(self, latents: torch.Tensor, noise_level=None) -> torch.Tensor:
        """Normalised (B, D) CLIP image embeddings of the decoded latents, float32 or wider; differentiable."""
        if self.latent_space.video:
            raise ValueError(f"PixelAestheticReward rates images; the VAE's space {self.latent_space.name!r} is a "
                             "video space (no pooling of aesthetic ratings over frames is defined here)")
        return normalized(self._encode_latents(latents, noise_level))

    def score(self, latents: torch.Tensor, prompts=None, *, batch_size: int | None = None,
              noise_level=None) -> torch.Tensor:
        """The MLP's aesthetic rating per sample, (B,), float32 or wider (higher is better); differentiable w.r.t.
        ``latents``. ``prompts`` is ignored; ``batch_size`` bounds the latents per pass (the result is the same)."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (one pass), got {batch_size!r}")
        if batch_size is None or not isinstance(latents, torch.Tensor) or latents.ndim != 4 or len(latents) <= batch_size:
            out = self._rate(self.image_features(latents, noise_level))
        else:
            out = torch.cat([self._rate(self.image_features(latents[s:s + batch_size], noise_level))
                             for s in range(0, len(latents), batch_size)])
        return inputs.check_outputs(out, latents, "score") if self.check_finite else out

    def _rate(self, feats: torch.Tensor) -> torch.Tensor:
        """The MLP on (B, D) features, each linear layer in the wider of the features' and the MLP's dtype (dropout is
        off in evaluation)."""
        x = feats.to(torch.promote_types(feats.dtype, self.mlp.layers[0].weight.dtype))
        for layer in self.mlp.layers:
            if isinstance(layer, nn.Linear):
                x = F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
        return x[:, 0]

    def __call__(self, latents: torch.Tensor, prompt=None, noise_level=None) -> torch.Tensor:
        """``10 - mean(score)``: ReNO's ``AestheticLoss``, a scalar, lower is better."""
        return 10.0 - self.score(latents, noise_level=noise_level).mean()


def _side(size) -> int | None:
    """The square side an image processor's ``size`` / ``crop_size`` names (an int, or a dict with
    ``shortest_edge`` or equal ``height`` and ``width``); None when it names none."""
    if isinstance(size, int) or size is None:
        return size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)  # transformers 5: a SizeDict
    if get("shortest_edge") is not None:
        return int(get("shortest_edge"))
    if get("height") is not None and get("height") != get("width"):
        raise ValueError(f"only square CLIP inputs are supported, got a crop of {size}")
    return None if get("height") is None else int(get("height"))


def _features(out) -> torch.Tensor:
    """A transformers feature method's result: the tensor (transformers 4.x), or the projected
    ``pooler_output`` of the output object newer versions return."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class RewardEnsemble:
    """A ReNO reward read from a latent ensemble (``fastlclip.ensemble.LatentEnsemble``): one trunk forward per
    call, each head's loss in ReNO's form, summed with its weighting.

    ``weights``: ``{head: weighting}`` (ReNO's defaults: HPS 5, CLIP 0.01, PickScore 0.05, aesthetic 0); the
    heads named are the ones scored. A head's loss: ``constant - value`` per sample (``1 - cos``,
    ``logit_scale.exp() * cos`` under 30 or 100, ``10 - MLP(normalised base prediction)``), averaged over the
    batch (ReNO's forms; its HPS loss reads the first sample, the same at ReNO's batch of 1).
    ``__call__(latents, prompt) -> loss`` (a scalar), ``losses(...)`` the unweighted per-sample losses by head,
    ``score(latents, prompts)`` every head's value in its teacher's own scale (times its score scaling),
    ``heads()`` one ReNO reward per weighted head (``.name``, ``.weighting``) for loops that take a list of
    rewards: the heads share one trunk forward per latents tensor. Text features are cached per head (least
    recently used first out, ``text_cache_size`` prompts each). ``space`` / ``resize``: as
    ``LatentCLIPReward``'s. On a video space's clips every head scores each latent frame and its per-frame
    values are pooled per clip (``pooling``, :data:`POOLINGS`) before the loss; ``frame_scores`` gives them
    unpooled."""

    name = "ensemble"
    reads_latents = True

    def __init__(self, model, weights: Mapping[str, float], *, space: str = "diffusion", resize=None,
                 text_cache_size: int = TEXT_CACHE_SIZE, pooling: str = "mean"):
        from .ensemble import LatentEnsemble

        if not isinstance(model, LatentEnsemble):
            raise TypeError(f"RewardEnsemble takes a LatentEnsemble (fastlclip.load(None, 'ensemble.safetensors')), "
                            f"got {type(model).__name__}")
        inputs.check_space(space)
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"weights must be a non-empty {{head: weighting}} dict over {', '.join(model.head_names)}")
        for head in weights:
            if head not in model.head_names:
                raise ValueError(f"unknown head {head!r} in weights; the ensemble's heads: {', '.join(model.head_names)}")
        if isinstance(text_cache_size, bool) or not isinstance(text_cache_size, int) or text_cache_size < 1:
            raise ValueError(f"text_cache_size must be a positive integer (prompts kept), got {text_cache_size!r}")
        self.weights = {h: inputs.check_number(w, f"weights[{h!r}]", minimum=0) for h, w in weights.items()}
        self.model = model.requires_grad_(False).eval()
        self.space, self.resize, self.text_cache_size = space, resize, text_cache_size
        self.pooling = check_pooling(pooling)
        self.weighting = 1.0
        self._text_cache: dict[str, OrderedDict] = {h: OrderedDict() for h in model.clip_heads}
        self._last = None  # (latents, version, noise_level, embeddings): the forward the heads() share

    def text_features(self, head: str, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised (N, D) text features of ``head``'s text tower, each prompt encoded once and cached."""
        cache = self._text_cache[head]
        new = [p for p in dict.fromkeys(prompts) if p not in cache]
        for p in new:
            inputs.check_prompt(p)
        if new:
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(self.model.device.type, enabled=False):
                for p, f in zip(new, self.model.encode_text(new, head)):
                    cache[p] = f
        for p in prompts:
            cache.move_to_end(p)
        out = torch.stack([cache[p] for p in prompts])
        while len(cache) > self.text_cache_size:
            cache.popitem(last=False)
        return out

    def embeddings(self, latents: torch.Tensor, noise_level=None) -> dict[str, torch.Tensor]:
        """Every CLIP head's normalised embedding from one trunk forward (reused for the same latents tensor,
        unchanged, and noise level: the heads of ``heads()`` share it)."""
        last = self._last
        if last is not None and last[0] is latents and last[1] == latents._version and last[2] is noise_level:
            return last[3]
        embs = self.model.encode_latents(latents, space=self.space, noise_level=noise_level, resize=self.resize)
        self._last = (latents, latents._version, noise_level, embs)
        return embs

    def _values(self, heads, latents, prompt, noise_level, kind):
        embs = self.embeddings(latents, noise_level)
        self._last = None if kind != "shared" else self._last
        prompts = inputs.prompt_list(prompt, latents.shape[0]) if prompt is not None else None
        out = {}
        for h in heads:
            txt = None
            if h in self._text_cache:
                if prompts is None:
                    raise ValueError(f"head {h!r} scores against a prompt: pass one")
                txt = self.text_features(h, prompts).to(latents.device)
            value = self.model.value(h, embs, txt)  # (B,), or (B, T) for clips
            if value.ndim == 2 and kind != "frames":
                value = pool_frames(value, self.pooling)
            form = self.model.forms[h]
            out[h] = form.constant - value if kind in ("loss", "shared") else form.scale * value
        return out

    def losses(self, latents: torch.Tensor, prompt, noise_level=None) -> dict[str, torch.Tensor]:
        """Each weighted head's ReNO loss per sample (B,), unweighted."""
        return self._values(self.weights, latents, prompt, noise_level, "loss")

    def __call__(self, latents: torch.Tensor, prompt, noise_level=None) -> torch.Tensor:
        losses = self.losses(latents, prompt, noise_level)
        return sum(w * losses[h].mean() for h, w in self.weights.items())

    def score(self, latents: torch.Tensor, prompts=None, noise_level=None) -> dict[str, torch.Tensor]:
        """Every head's (B,) value in its teacher's own scale (cos, logit_scale.exp() * cos, the MLP), times
        its score scaling; differentiable w.r.t. ``latents``. ``prompts``: one, or one per latent."""
        return self._values(self.model.head_names, latents, prompts, noise_level, "score")

    def frame_scores(self, latents: torch.Tensor, prompts=None, noise_level=None) -> dict[str, torch.Tensor]:
        """A video space's clips: every head's per-frame values (B, T) in its teacher's own scale, unpooled."""
        return self._values(self.model.head_names, latents, prompts, noise_level, "frames")

    def heads(self) -> list:
        """One ReNO reward per weighted head (``name`` the head's, ``weighting`` its weight): ReNO's list of
        reward losses, each ``reward(latents, prompt) -> loss``; called in turn on the same latents tensor, they
        run the trunk once."""
        return [_EnsembleHead(self, h, w) for h, w in self.weights.items()]


class _EnsembleHead:
    reads_latents = True

    def __init__(self, ensemble: RewardEnsemble, head: str, weighting: float):
        self.ensemble, self.name, self.weighting = ensemble, head, weighting

    def __call__(self, latents: torch.Tensor, prompt, noise_level=None) -> torch.Tensor:
        return self.ensemble._values([self.name], latents, prompt, noise_level, "shared")[self.name].mean()
