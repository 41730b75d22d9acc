"""Differentiable CLIP rewards on diffusion latents, with ReNO's interface.

``reward(latents, prompt) -> loss``: a scalar, lower is better, ReNO's CLIP form
``100 - logit_scale.exp() * cos(image, text)`` averaged over the batch; gradients flow to the latents,
the weights are frozen. ``reward.weighting`` is applied by whoever sums several rewards (as in ReNO).
Text features are computed once per prompt and kept in a least-recently-used cache of ``text_cache_size``
prompts (default 4096), so an RL run over millions of prompts holds a bounded number. ``noise_level``: the
noise level ``s`` of intermediate latents for a noise-aware Latent-CLIP (``LatentCLIP.encode_latents``); None
scores clean ones. Rewards that read latents (not decoded pixels) carry ``reads_latents = True``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .grids import MODEL_DEFAULT
from .loss import clip_loss, logit_scale_exp, normalized
from .model import LatentCLIP
from .runtime import reward_loss
from .vaes import latent_space

# OpenAI CLIP pixel normalisation (open_clip's default for the ViT-B/32, L/14, H/14 baselines).
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_CACHE_SIZE = 4096  # prompts whose text features a reward keeps by default


class _CLIPReward:
    name = "clip"
    reads_latents = False

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

    def image_features(self, latents: torch.Tensor, noise_level=None) -> torch.Tensor:
        """Normalised (B, D) image features of the latents, float32 or wider; differentiable."""
        return normalized(self._encode_latents(latents, noise_level))

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
        """
        if scale == "logit":
            factor = logit_scale_exp(self.model.logit_scale).item()
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale):
            factor = float(scale)
        else:
            raise ValueError(f"scale must be a finite number or 'logit', got {scale!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (one pass), got {batch_size!r}")
        if batch_size is None or not isinstance(latents, torch.Tensor) or latents.ndim != 4 or len(latents) <= batch_size:
            txt = self.text_features(inputs.prompt_list(prompts, latents.shape[0])).to(latents.device)
            out = (self.image_features(latents, noise_level) * txt).sum(dim=-1)
        else:
            prompts = inputs.prompt_list(prompts, len(latents))
            txt = self.text_features(prompts).to(latents.device)
            per_latent = isinstance(noise_level, torch.Tensor) and noise_level.ndim > 0 and len(noise_level) > 1
            out = torch.cat([(self.image_features(latents[s:s + batch_size],
                                                  noise_level[s:s + batch_size] if per_latent else noise_level)
                              * (txt if len(txt) == 1 else txt[s:s + batch_size])).sum(dim=-1)
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
    """

    name = "latent_clip"
    reads_latents = True

    def __init__(self, model: LatentCLIP, weighting: float = 1.0, *, space: str = "diffusion",
                 resize=MODEL_DEFAULT, text_cache_size: int = TEXT_CACHE_SIZE):
        inputs.check_space(space)
        super().__init__(model, weighting, text_cache_size)
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

    def _encode_latents(self, latents, noise_level=None):
        return self.model.encode_latents(latents, space=self.space, normalize=False, resize=self.resize,
                                         noise_level=noise_level)

    def __call__(self, latents: torch.Tensor, prompt: str | Sequence[str], noise_level=None) -> torch.Tensor:
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


class PixelCLIPReward(_CLIPReward):
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
    """

    name = "pixel_clip"

    def __init__(self, vae: nn.Module, clip_model: nn.Module, *, tokenizer=None, processor=None, weighting: float = 1.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 text_cache_size: int = TEXT_CACHE_SIZE):
        config = getattr(vae, "config", None)
        if not callable(getattr(vae, "decode", None)) or not isinstance(getattr(config, "scaling_factor", None), (int, float)):
            raise TypeError(f"vae must be a diffusers decoder (AutoencoderKL, AutoencoderTiny, ...) with .decode and "
                            f".config.scaling_factor, got {type(vae).__name__}")
        self.transformers = _is_transformers_clip(clip_model)
        if not self.transformers and not hasattr(clip_model, "visual"):
            raise TypeError(f"clip_model must be an open_clip CLIP or a transformers CLIPModel, got {type(clip_model).__name__}")
        super().__init__(clip_model, weighting, text_cache_size)
        self.check_finite = True  # NaN/Inf latents are an error; False skips the check (it synchronises with the device)
        self.vae = vae.requires_grad_(False).eval()
        self.latent_space = latent_space(vae)
        images = getattr(processor, "image_processor", processor)
        if self.transformers:
            self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError("a transformers CLIPModel needs its tokenizer: pass processor=CLIPProcessor.from_pretrained"
                                 "(...) (ReNO's) or tokenizer=")
            crop = _side(getattr(images, "crop_size", None)) or clip_model.config.vision_config.image_size
            pre = {"mean": getattr(images, "image_mean", None), "std": getattr(images, "image_std", None),
                   "resize": _side(getattr(images, "size", None)) or crop}
        else:
            self.tokenizer = tokenizer
            size = getattr(clip_model.visual, "image_size", 224)
            crop = size[0] if isinstance(size, (tuple, list)) else int(size)
            pre = {**(getattr(clip_model.visual, "preprocess_cfg", {}) or {}), "resize": crop}
        self.image_size, self.resize_size = int(crop), int(pre["resize"])
        if self.resize_size < self.image_size:
            raise ValueError(f"the resize size {self.resize_size} is below the crop size {self.image_size}")
        self.mean = torch.tensor(mean or pre.get("mean") or _OPENAI_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std or pre.get("std") or _OPENAI_STD, dtype=torch.float32).view(1, 3, 1, 1)

    def _encode_texts(self, texts):
        device = self.model.logit_scale.device
        if self.transformers:  # as ReNO's CLIPLoss.get_text_features
            tokens = self.tokenizer(texts, return_tensors="pt", padding=True, max_length=77, truncation=True)
            return _features(self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
        ctx = getattr(self.model, "context_length", 77)
        tokens = self.tokenizer(texts) if self.tokenizer is not None else inputs.tokenize(texts, ctx)
        return self.model.encode_text(tokens.to(device))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> RGB in [0, 1]."""
        z = self.latent_space.to_vae(latents.to(self.vae.dtype))
        return (self.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the CLIP input: torchvision's ``Resize(resize_size, BICUBIC, antialias=True)`` (short
        side to ``resize_size``, the long side ``int(resize_size * long / short)``, floored), its
        ``CenterCrop(image_size)`` (offsets ``round((side - image_size) / 2)``), then the mean/std normalisation."""
        h, w = pixels.shape[-2:]
        r, c = self.resize_size, self.image_size
        size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
        x = F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((size[0] - c) / 2.0)), int(round((size[1] - c) / 2.0))
        x = x[..., top:top + c, left:left + c]
        if self.mean.device != x.device:  # move once: a host-to-device copy per call would sync every step
            with torch.inference_mode(False):  # kept for later calls, which may need them in autograd
                self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std

    def check_latents(self, latents: torch.Tensor) -> None:
        """As ``LatentCLIPReward``'s: (B, C, H, W) floating-point VAE-space latents, B > 0, finite unless
        ``check_finite`` is off (the check synchronises with the device)."""
        inputs.check_latent_batch(
            latents, channels=self.vae.config.latent_channels, expects="the VAE expects",
            rgb_hint="Score images with the CLIP model directly, or pass the latents.", check_finite=self.check_finite,
            vae=self.latent_space.name,
            finite_hint="check the sampler that produced them (reward.check_finite = False skips this check, which "
                        "synchronises with the device)")

    def _encode_latents(self, latents, noise_level=None):
        self.check_latents(latents)
        inputs.check_noise_level(noise_level, latents.shape[0], noise_aware=False, model="decode-then-CLIP")
        x = self.preprocess(self.decode(latents)).to(self.model.logit_scale.dtype)
        return _features(self.model.get_image_features(pixel_values=x)) if self.transformers else self.model.encode_image(x)


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
