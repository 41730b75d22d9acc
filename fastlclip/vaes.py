"""The VAE registry: each latent space's diffusers config, its constants, and a decoder built from it.

A diffusion pipeline's latents live in *diffusion space*; its VAE decodes *VAE space*. diffusers'
pipelines convert with the VAE config's own constants before decoding::

    raw = z / scaling_factor + shift_factor          # LatentSpace.to_vae
    z = (raw - shift_factor) * scaling_factor        # LatentSpace.to_diffusion

The shipped configs (``fastlclip/configs/diffusers/``) copy each published ``vae/config.json``:

========  =================  ========  =======  =====  ==============================================
name      class              channels  scaling  shift  source (Hugging Face repo)
========  =================  ========  =======  =====  ==============================================
sdxl      AutoencoderKL      4         0.13025  0      stabilityai/stable-diffusion-xl-base-1.0 (vae/)
sd15      AutoencoderKL      4         0.18215  0      stable-diffusion-v1-5/stable-diffusion-v1-5 (vae/)
sd3       AutoencoderKL      16        1.5305   0.0609 stabilityai/stable-diffusion-3-medium-diffusers (vae/);
                                                       SD3.5 shares it
flux1     AutoencoderKL      16        0.3611   0.1159 black-forest-labs/FLUX.1-dev (vae/); FLUX.1-schnell
                                                       shares it
taesdxl   AutoencoderTiny    4         1.0      0      madebyollin/taesdxl
taesd3    AutoencoderTiny    16        1.0      0      madebyollin/taesd3
taef1     AutoencoderTiny    16        1.0      0      madebyollin/taef1
========  =================  ========  =======  =====  ==============================================

The 2025-26 spaces (issue 33; docs/vaes.md has their sources): ``qwen-image``
(AutoencoderKLQwenImage, 16 channels, per-channel ``latents_mean`` / ``latents_std`` in the config, packed 2x2 into
64-wide tokens), ``flux2`` (AutoencoderKLFlux2, 32 channels patchified 2x2 to 128, then normalised by the batch
norm's running statistics, which live in the weights: the name alone is an error), ``sana``,
``dcae-f32c32-in`` and ``dcae-f32c32-mix`` (AutoencoderDC f32c32, scaling 0.41407 / 0.3189 / 0.4552).

The video spaces (issue 34; ``list_vaes(video=True)``, docs/vaes.md and docs/video.md have their sources):
``wan2.1`` (AutoencoderKLWan, 16 channels, per-channel ``latents_mean`` / ``latents_std``, 8x spatial; Wan 2.2
A14B shares it), ``wan2.2-ti2v`` (AutoencoderKLWan with ``patch_size`` 2 inside the VAE, 48 channels, 16x),
``hunyuanvideo`` (16 channels, scaling 0.476986, 8x), ``hunyuanvideo-1.5`` (AutoencoderKLHunyuanVideo15, 32
channels, scaling 1.03682, 16x), all 4x temporal, and ``ltx-video`` (128 channels, 32x spatial, 8x temporal,
per-channel statistics as buffers in the weights, packed into ``(B, T h w, 128)`` tokens). Their latents are
``(B, C, T, h, w)``; a clip of ``F = 1 + (T - 1) * temporal`` frames (``LatentSpace.frame_span``).

sd15's published config (diffusers 0.6) carries no ``scaling_factor``: 0.18215 is ``AutoencoderKL``'s
default, which its pipelines use. The tiny autoencoders decode the diffusion latents of their family
(sdxl, sd3, flux1) as the pipeline hands them (scaling 1, shift 0, diffusers' ``AutoencoderTiny``
defaults); their ``latent_space`` is therefore the identity, and :data:`TINY_FAMILY` names their family.

Every config read here is checked: ``scaling_factor`` must lie in :data:`SCALING_RANGE` (the published values
span 0.13025 to 1.5305, so [1e-4, 1e4] leaves three orders of magnitude either side, while an infinite or
astronomically large one maps every latent to 0 and makes every latent score the same), ``|shift_factor|`` at
most :data:`MAX_SHIFT` (published: 0 to 0.1159), ``latent_channels`` at most :data:`MAX_CHANNELS`; integers of
any size are compared before conversion, so none overflows. JSON configs go through :func:`read_json`, which
refuses nesting deeper than :data:`MAX_CONFIG_DEPTH` (a diffusers config nests 2 levels) with a ``ValueError``
instead of Python's ``RecursionError``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

_DIR = resources.files("fastlclip") / "configs" / "diffusers"
_FILES = {
    "sdxl": "sdxl_vae.json", "sd15": "sd15_vae.json", "sd3": "sd3_vae.json", "flux1": "flux1_vae.json",
    "taesdxl": "taesdxl.json", "taesd3": "taesd3.json", "taef1": "taef1.json",
}
# Latent spaces of 2025-26 models (issue 33): per-channel statistics and / or a patchified, packed layout.
_EXTENDED_FILES = {
    "qwen-image": "qwen_image_vae.json", "flux2": "flux2_vae.json", "sana": "dcae_f32c32_sana.json",
    "dcae-f32c32-in": "dcae_f32c32_in.json", "dcae-f32c32-mix": "dcae_f32c32_mix.json",
}
# Video latent spaces (issue 34): latents (B, C, T, H, W), T latent frames for 1 + (T - 1) * temporal video frames.
_VIDEO_FILES = {
    "wan2.1": "wan2.1_vae.json", "wan2.2-ti2v": "wan2.2_ti2v_vae.json", "hunyuanvideo": "hunyuanvideo_vae.json",
    "hunyuanvideo-1.5": "hunyuanvideo_1.5_vae.json", "ltx-video": "ltx_video_vae.json",
}
# class -> the weight names of the latent statistics kept in the weights, not the config
STATS_IN_WEIGHTS = {"AutoencoderKLFlux2": ("bn.running_mean", "bn.running_var"),
                    "AutoencoderKLLTXVideo": ("latents_mean", "latents_std")}
VIDEO_CLASSES = ("AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15", "AutoencoderKLLTXVideo")
# class -> its class default scaling_factor (diffusers 0.42.1 signatures), used when a config carries none
_DEFAULT_SCALING = {"AutoencoderTiny": 1.0, "AutoencoderDC": 1.0, "AutoencoderKLHunyuanVideo": 0.476986,
                    "AutoencoderKLHunyuanVideo15": 1.03682, "AutoencoderKLLTXVideo": 1.0}
TINY_FAMILY = {"taesdxl": "sdxl", "taesd3": "sd3", "taef1": "flux1"}
# Autoencoders whose latents a Latent-CLIP tower reads (a model config's VAE); the decode baselines also take the
# tiny autoencoders (AutoencoderTiny), which decode their family's diffusion latents.
LATENT_CLASSES = ("AutoencoderKL", "AutoencoderKLQwenImage", "AutoencoderKLFlux2", "AutoencoderDC", *VIDEO_CLASSES)
DECODER_CLASSES = (*LATENT_CLASSES, "AutoencoderTiny")
SCALING_RANGE = (1e-4, 1e4)  # published: 0.13025 (SDXL) .. 1.5305 (SD3), 1.0 for the tiny autoencoders
MAX_SHIFT = 1e4  # published: 0 .. 0.1159 (FLUX.1)
MAX_CHANNELS = 1024  # published: 4 and 16
MAX_CONFIG_DEPTH = 32  # a diffusers or model config nests 2 to 4 levels


def check_depth(value: Any, where: str, limit: int = MAX_CONFIG_DEPTH) -> Any:
    """``value`` when its dicts and lists nest at most ``limit`` levels (checked without recursion), else a
    ``ValueError`` naming ``where``."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        if depth > limit:
            raise ValueError(f"{where}: the config nests more than {limit} levels of objects / lists; a config "
                             "nests a few levels: fix or regenerate it")
        stack.extend((c, depth + 1) for c in children)
    return value


def read_json(text: str | bytes, where: str) -> Any:
    """Parsed JSON config text: invalid JSON, or nesting too deep for Python's parser (its ``RecursionError``)
    or deeper than :data:`MAX_CONFIG_DEPTH`, is a ``ValueError`` naming ``where`` (e.g. the file)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: the JSON nests too deeply for Python's parser; a config nests a few levels "
                         f"(at most {MAX_CONFIG_DEPTH}): fix or regenerate it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    return check_depth(value, where)


def read_json_file(path: str | os.PathLike, what: str = "config file") -> Any:
    """:func:`read_json` of a file's text; an unreadable file is a ``ValueError`` naming it."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} is not a readable JSON file ({e})") from None
    return read_json(text, f"{what} {str(path)!r}")


def list_vaes(video: bool = False) -> list[str]:
    """Names of the registered image VAEs: the scalar spaces and their tiny autoencoders, then the per-channel /
    packed spaces of 2025-26 models (``qwen-image``, ``flux2``, ``sana``, ``dcae-f32c32-in``, ``dcae-f32c32-mix``).
    ``video=True``: the video spaces instead (``wan2.1``, ``wan2.2-ti2v``, ``hunyuanvideo``, ``hunyuanvideo-1.5``,
    ``ltx-video``)."""
    return list(_VIDEO_FILES) if video else list(_FILES) + list(_EXTENDED_FILES)


def _registered(name: Any) -> str | None:
    """The config file of a registered name (image or video), else None."""
    if not isinstance(name, (str, os.PathLike)):
        return None
    name = str(name)
    return _FILES.get(name) or _EXTENDED_FILES.get(name) or _VIDEO_FILES.get(name)


def _class_config(vae: Mapping[str, Any] | nn.Module) -> tuple[str, Mapping[str, Any]]:
    """``(class name, config)`` of a diffusers VAE config dict (no ``_class_name``: AutoencoderKL) or module."""
    if isinstance(vae, nn.Module):
        return type(vae).__name__, vae.config
    return vae.get("_class_name") or "AutoencoderKL", vae


def _channels_key(cls: str | None) -> str:
    return "z_dim" if cls in ("AutoencoderKLQwenImage", "AutoencoderKLWan") else "latent_channels"


def vae_channels(vae: Mapping[str, Any] | nn.Module) -> int:
    """The channels of a diffusers VAE's latents, from its config or module (``z_dim`` for
    AutoencoderKLQwenImage and AutoencoderKLWan, else ``latent_channels``; when absent, the class default: 16 for
    Wan, HunyuanVideo and Qwen-Image, 32 for HunyuanVideo 1.5, 128 for LTX-Video, 4 for ``AutoencoderKL``)."""
    cls, cfg = _class_config(vae)
    default = {"AutoencoderKLQwenImage": 16, "AutoencoderKLWan": 16, "AutoencoderKLHunyuanVideo": 16,
               "AutoencoderKLHunyuanVideo15": 32, "AutoencoderKLLTXVideo": 128}.get(cls, 4)
    return cfg.get(_channels_key(cls), default)


def vae_factor(vae: Mapping[str, Any] | nn.Module) -> int:
    """Image pixels per latent pixel (spatial downsampling) of a diffusers VAE, from its config or module: 8 for
    the published KL, Qwen-Image and tiny autoencoders, 32 for DC-AE f32c32."""
    cls, cfg = _class_config(vae)
    if cls in VIDEO_CLASSES:
        return _video_factors(cls, cfg, f"VAE config {cls!r}")[0]
    key = {"AutoencoderKLQwenImage": "dim_mult", "AutoencoderDC": "encoder_block_out_channels",
           "AutoencoderTiny": "encoder_block_out_channels"}.get(cls, "block_out_channels")
    blocks = cfg.get(key, (64,) if cls == "AutoencoderKL" else (64,) * 4)
    if not isinstance(blocks, (list, tuple)) or not 0 < len(blocks) <= 16:
        raise ValueError(f"VAE config: {key} must be a list of at most 16 blocks, got {blocks!r}")
    return 2 ** (len(blocks) - 1)


def vae_temporal(vae: Mapping[str, Any] | nn.Module) -> int:
    """Video frames per latent frame of a diffusers video VAE (4 for Wan and HunyuanVideo, 8 for LTX-Video;
    the first latent frame covers one), from its config or module; 0 for an image VAE."""
    cls, cfg = _class_config(vae)
    return _video_factors(cls, cfg, f"VAE config {cls!r}")[1] if cls in VIDEO_CLASSES else 0


def _video_factors(cls: str, cfg: Mapping[str, Any], where: str) -> tuple[int, int]:
    """``(spatial, temporal)`` compression of a video VAE from its architecture, as its decoder computes them:
    Wan ``2 ** (len(dim_mult) - 1) * (patch_size or 1)`` and ``2 ** sum(temperal_downsample)`` (the pipeline
    reads ``scale_factor_spatial`` / ``_temporal``, which the published configs set to these); HunyuanVideo (1.5)
    ``spatial_compression_ratio`` / ``temporal_compression_ratio``; LTX-Video ``patch_size * 2 ** sum(
    spatio_temporal_scaling)`` and ``patch_size_t * 2 ** sum(...)`` unless the config names the ratios."""
    def ints(key, default):
        value = cfg.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 64:
            raise ValueError(f"{where}: {key} must be a small positive integer, got {value!r}")
        return value

    def flags(key, default):
        value = cfg.get(key, default)
        if not isinstance(value, (list, tuple)) or len(value) > 16 or not all(isinstance(v, bool) for v in value):
            raise ValueError(f"{where}: {key} must be a list of at most 16 booleans, got {value!r}")
        return sum(value)

    if cls == "AutoencoderKLWan":
        dims = cfg.get("dim_mult", [1, 2, 4, 4])
        if not isinstance(dims, (list, tuple)) or not 0 < len(dims) <= 16:
            raise ValueError(f"{where}: dim_mult must be a list of at most 16 levels, got {dims!r}")
        return 2 ** (len(dims) - 1) * ints("patch_size", 1), 2 ** flags("temperal_downsample", [False, True, True])
    if cls == "AutoencoderKLLTXVideo":
        scaled = flags("spatio_temporal_scaling", [True, True, True, False])
        return (ints("spatial_compression_ratio", ints("patch_size", 4) * 2 ** scaled),
                ints("temporal_compression_ratio", ints("patch_size_t", 1) * 2 ** scaled))
    default = 16 if cls == "AutoencoderKLHunyuanVideo15" else 8
    return ints("spatial_compression_ratio", default), ints("temporal_compression_ratio", 4)


def get_vae_config(name: str) -> dict[str, Any]:
    """The diffusers config dict of a registered VAE, image or video (a fresh copy)."""
    file = _registered(name)
    if file is None:
        raise ValueError(f"unknown VAE {name!r}; registered VAEs: {list_vaes()}, video: {list_vaes(video=True)} (or "
                         "embed a diffusers config as \"vae_cfg\" in the model config)")
    return read_json((_DIR / file).read_text(), f"registered VAE config {name!r}")


@dataclass(frozen=True)
class LatentSpace:
    """A VAE's latent space: its channel count and the constants that map diffusion <-> VAE space.

    The published SD / SDXL / SD3 / FLUX.1 / SANA spaces need ``scaling_factor`` and ``shift_factor`` only. The
    optional fields describe the 2025-26 spaces (issue 33):

    - ``mean`` / ``std``: per-channel statistics of the diffusion grid's channels (``diffusion_channels`` of
      them): ``z = ((raw - mean) / std) * scaling_factor`` (Qwen-Image: ``latents_mean`` / ``latents_std`` of
      the config; FLUX.2: the batch norm's ``running_mean`` and ``sqrt(running_var + eps)``, read from weights).
    - ``patch``: the VAE latents are patchified ``patch x patch`` into ``channels * patch**2`` channels
      *before* the statistics apply (FLUX.2: 2, channel order ``(c, ph, pw)``); 1 otherwise.
    - ``pack``: the pipeline packs the diffusion grid ``(B, C, h, w)`` into tokens ``(B, (h/pack)(w/pack),
      C * pack**2)`` with feature order ``(c, ph, pw)`` (Qwen-Image: 2; FLUX.2: 1, a plain transpose); 0
      when the pipeline hands the grid itself (SD, SDXL, SD3, FLUX.1 at this level, SANA).
    - ``stats_from``: where the statistics came from (``"config"``, or the weights' file / module).

    - ``temporal``: 0 for an image space; for a video space (issue 34) its temporal compression (Wan,
      HunyuanVideo: 4; LTX-Video: 8): latents are ``(B, C, T, h, w)`` and every conversion applies to each frame.
      ``causal``: the first latent frame covers one video frame and each later one ``temporal`` frames
      (``F = 1 + (T - 1) * temporal``: every registered video VAE); False: each covers ``temporal``.

    ``to_vae`` takes the diffusion grid ``(B, diffusion_channels, h, w)`` (video: ``(B, C, T, h, w)``) as the
    pipeline holds it before packing and returns what the VAE decodes, ``(B, channels, h * patch, w * patch)``
    (Qwen-Image's VAE takes a frame axis: ``raw.unsqueeze(2)``); ``to_diffusion`` is its inverse. ``grid`` /
    ``pack_grid`` convert between the packed tokens and the grid.
    """

    name: str
    channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    patch: int = 1
    pack: int = 0
    stats_from: str | None = None
    temporal: int = 0
    causal: bool = True

    def __post_init__(self):
        if not isinstance(self.patch, int) or self.patch < 1 or not isinstance(self.pack, int) or self.pack < 0:
            raise ValueError(f"latent space {self.name!r}: patch must be an integer >= 1 and pack >= 0, got "
                             f"{self.patch!r} / {self.pack!r}")
        if isinstance(self.temporal, bool) or not isinstance(self.temporal, int) or not 0 <= self.temporal <= 64:
            raise ValueError(f"latent space {self.name!r}: temporal must be 0 (images) or a video VAE's temporal "
                             f"compression (1 to 64), got {self.temporal!r}")
        if self.temporal and self.patch != 1:
            raise ValueError(f"latent space {self.name!r}: a video space has no latent-side patch (got {self.patch})")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is None:
                continue
            value = tuple(float(v) for v in value)
            object.__setattr__(self, key, value)
            if len(value) != self.diffusion_channels:
                raise ValueError(f"latent space {self.name!r}: {key} has {len(value)} entries, the diffusion grid "
                                 f"has {self.diffusion_channels} channels")
            if not all(math.isfinite(v) for v in value) or (key == "std" and not all(v > 0 for v in value)):
                raise ValueError(f"latent space {self.name!r}: {key} must be finite" +
                                 (" and positive" if key == "std" else "") + f", got {list(value)}")

    @property
    def diffusion_channels(self) -> int:
        """Channels of the diffusion grid: ``channels * patch**2`` (FLUX.2: 128)."""
        return self.channels * self.patch * self.patch

    @property
    def per_channel(self) -> bool:
        return self.mean is not None or self.std is not None or self.patch != 1

    @property
    def video(self) -> bool:
        """Whether latents carry a frame axis, ``(B, C, T, h, w)``."""
        return self.temporal > 0

    def frame_span(self, t: int) -> tuple[int, int]:
        """The half-open range ``[start, stop)`` of the video frames latent frame ``t`` covers: causal spaces
        ``[0, 1)`` for ``t = 0``, ``[1 + (t - 1) k, 1 + t k)`` after (``k = temporal``); others ``[t k, (t + 1) k)``.
        It is the first stretch of frames the latent frame decodes into; a decoder's receptive field may reach
        further (docs/video.md: measured per VAE)."""
        k = self._need_video("frame_span")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"latent space {self.name!r}: frame_span takes a latent frame index >= 0, got {t!r}")
        if not self.causal:
            return t * k, (t + 1) * k
        return (0, 1) if t == 0 else (1 + (t - 1) * k, 1 + t * k)

    @property
    def frame_rule(self) -> str:
        """The rule between a clip's video frames F and latent frames T, as error messages write it."""
        return f"F = 1 + (T - 1) * {self.temporal}" if self.causal else f"F = T * {self.temporal}"

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of ``frames`` video frames: ``1 + (F - 1) / temporal`` (causal) or
        ``F / temporal``; a count that does not fit the rule is a ``ValueError`` naming it."""
        k = self._need_video("latent_frames")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"latent space {self.name!r}: a frame count is a positive integer, got {frames!r}")
        if self.causal:
            if (frames - 1) % k:
                lo = (frames - 1) // k * k + 1
                raise ValueError(f"latent space {self.name!r}: {frames} frames do not fit its causal {k}x temporal "
                                 f"layout (F = 1 + {k} (T - 1)): use {lo} or {lo + k} frames")
            return 1 + (frames - 1) // k
        if frames % k:
            raise ValueError(f"latent space {self.name!r}: {frames} frames are not a multiple of its temporal "
                             f"factor {k}")
        return frames // k

    def video_frames(self, latent_frames: int) -> int:
        """Video frames ``T`` latent frames decode to: ``1 + (T - 1) * temporal`` (causal) or ``T * temporal``."""
        k = self._need_video("video_frames")
        if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
            raise ValueError(f"latent space {self.name!r}: a latent frame count is a positive integer, got "
                             f"{latent_frames!r}")
        return 1 + (latent_frames - 1) * k if self.causal else latent_frames * k

    def _need_video(self, what: str) -> int:
        if not self.temporal:
            raise ValueError(f"latent space {self.name!r} is an image space (no frame axis): {what} is for the video "
                             f"spaces ({', '.join(_VIDEO_FILES)})")
        return self.temporal

    def _check_rank(self, x: torch.Tensor, what: str) -> None:
        """Video spaces take ``(B, C, T, h, w)``; per-channel image spaces ``(B, C, h, w)``."""
        if self.temporal and x.dim() != 5:
            raise ValueError(f"latent space {self.name!r} is a video space: {what} takes (B, {self.channels}, T, h, w) "
                             f"latents, got shape {tuple(x.shape)}" + (
                                 "; one frame is latents[:, :, None]" if x.dim() == 4 else ""))
        if not self.temporal and self.per_channel and x.dim() != 4:
            raise ValueError(f"latent space {self.name!r} is an image space: {what} takes a (B, C, h, w) grid, got "
                             f"shape {tuple(x.shape)}" + ("; one frame of a video latent is latents[:, :, 0]"
                                                          if x.dim() == 5 else ""))

    def _stat(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype if like.is_floating_point() else torch.float32,
                            device=like.device).view(1, -1, *([1] * (like.dim() - 2)))

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents -> what the VAE decodes: ``z / scaling_factor + shift_factor`` (per channel:
        ``unpatchify((z / scaling_factor) * std + mean) + shift_factor``); a video space's on every frame."""
        self._check_rank(z, "to_vae")
        if not self.per_channel:
            raw = z / self.scaling_factor
            return raw + self.shift_factor if self.shift_factor else raw
        x = z / self.scaling_factor if self.scaling_factor != 1 else z
        if self.std is not None:
            x = x * self._stat(self.std, x)
        if self.mean is not None:
            x = x + self._stat(self.mean, x)
        x = unpatchify(x, self.patch) if self.patch != 1 else x
        return x + self.shift_factor if self.shift_factor else x

    def to_diffusion(self, raw: torch.Tensor) -> torch.Tensor:
        """VAE latents (``vae.encode(x).latent_dist`` samples) -> diffusion space: ``(raw - shift) * scaling``
        (per channel: ``((patchify(raw - shift) - mean) / std) * scaling``); a video space's on every frame."""
        self._check_rank(raw, "to_diffusion")
        if not self.per_channel:
            return ((raw - self.shift_factor) if self.shift_factor else raw) * self.scaling_factor
        x = raw - self.shift_factor if self.shift_factor else raw
        x = patchify(x, self.patch) if self.patch != 1 else x
        if self.mean is not None:
            x = x - self._stat(self.mean, x)
        if self.std is not None:
            x = x / self._stat(self.std, x)
        return x * self.scaling_factor if self.scaling_factor != 1 else x

    def pack_grid(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion grid ``(B, C, h, w)`` -> the pipeline's tokens ``(B, (h/p)(w/p), C p^2)`` (``p = pack``;
        the grid itself when ``pack`` is 0). A video grid ``(B, C, T, h, w)`` -> ``(B, T (h/p)(w/p), C p^2)``,
        tokens in ``(t, h, w)`` order (``LTXPipeline._pack_latents`` with ``patch_size_t`` 1)."""
        if not self.pack:
            return z
        if self.temporal:
            self._check_rank(z, "pack_grid")
            return pack_video_tokens(z, self.pack)
        return pack_tokens(z, self.pack)

    def grid(self, x: torch.Tensor, height: int | None = None, width: int | None = None,
             latent_frames: int | None = None) -> torch.Tensor:
        """What a pipeline hands -> the diffusion grid ``(B, diffusion_channels, h, w)``: a 4-D grid as it is,
        packed tokens ``(B, L, D)`` unpacked with the VAE latent ``height`` / ``width`` (image size / VAE
        factor; the grid is ``height / patch`` high; both omitted: a square latent). A video space: the grid
        ``(B, C, T, h, w)`` as it is, or its packed tokens with ``latent_frames`` (T) and the latent height / width."""
        if self.temporal:
            return self._video_grid(x, height, width, latent_frames)
        if x.dim() == 4:
            if x.shape[1] != self.diffusion_channels:
                raise ValueError(f"latent space {self.name!r}: a grid of {x.shape[1]} channels, expected "
                                 f"{self.diffusion_channels}")
            return x
        if x.dim() != 3 or not self.pack:
            raise ValueError(f"latent space {self.name!r}: expected a (B, {self.diffusion_channels}, h, w) grid"
                             + (" or packed (B, L, D) tokens" if self.pack else "") + f", got shape {tuple(x.shape)}"
                             + ("; one frame of a video latent is latents[:, :, 0]" if x.dim() == 5 else ""))
        step = self.patch * self.pack
        if height is None and width is None:  # a square latent
            side = math.isqrt(x.shape[1])
            if side * side != x.shape[1]:
                raise ValueError(f"latent space {self.name!r}: {x.shape[1]} packed tokens are not a square grid; pass "
                                 "the VAE latent height and width (image size / VAE factor)")
            height = width = side * step
        elif height is None or width is None:
            raise ValueError(f"latent space {self.name!r}: packed tokens need both the latent height and width")
        if height % step or width % step:
            raise ValueError(f"latent space {self.name!r}: latent height / width {height} x {width} must be "
                             f"multiples of {step}")
        h, w = height // self.patch, width // self.patch
        want = (h // self.pack) * (w // self.pack), self.diffusion_channels * self.pack ** 2
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"latent space {self.name!r}: packed tokens of shape {tuple(x.shape)} for a "
                             f"{height} x {width} latent, expected (B, {want[0]}, {want[1]})")
        return unpack_tokens(x, h, w, self.pack)

    def _video_grid(self, x: torch.Tensor, height: int | None, width: int | None,
                    latent_frames: int | None) -> torch.Tensor:
        c = self.channels
        if x.dim() == 5:
            if x.shape[1] != c:
                raise ValueError(f"latent space {self.name!r}: video latents of {x.shape[1]} channels, expected {c} "
                                 f"(B, {c}, T, h, w)")
            return x
        if x.dim() != 3 or not self.pack:
            raise ValueError(f"latent space {self.name!r} is a video space: expected (B, {c}, T, h, w) latents"
                             + (f" or packed (B, T h w, {c * self.pack ** 2}) tokens" if self.pack else "")
                             + f", got shape {tuple(x.shape)}"
                             + ("; one frame is latents[:, :, None]" if x.dim() == 4 else ""))
        if latent_frames is None:
            raise ValueError(f"latent space {self.name!r}: packed video tokens need the latent frame count T (and the "
                             "latent height / width: omitted, a square latent)")
        t = latent_frames
        if isinstance(t, bool) or not isinstance(t, int) or t < 1 or x.shape[1] % t:
            raise ValueError(f"latent space {self.name!r}: {x.shape[1]} packed tokens are not {t!r} latent frames of "
                             "whole grids")
        p, per_frame = self.pack, x.shape[1] // t
        if height is None and width is None:
            side = math.isqrt(per_frame)
            if side * side != per_frame:
                raise ValueError(f"latent space {self.name!r}: {per_frame} tokens per frame are not a square grid; "
                                 "pass the latent height and width")
            height = width = side * p
        elif height is None or width is None:
            raise ValueError(f"latent space {self.name!r}: packed tokens need both the latent height and width")
        want = (t * (height // p) * (width // p), c * p * p)
        if height % p or width % p or tuple(x.shape[1:]) != want:
            raise ValueError(f"latent space {self.name!r}: packed tokens of shape {tuple(x.shape)} for {t} latent "
                             f"frames of {height} x {width}, expected (B, {want[0]}, {want[1]})")
        return unpack_video_tokens(x, t, height, width, p)


def pack_video_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, T, h, w) -> (B, T (h/p)(w/p), C p^2)``, tokens ``(t, h, w)``, features ``(c, ph, pw)``
    (``LTXPipeline._pack_latents`` with ``patch_size = p``, ``patch_size_t = 1``)."""
    b, c, t, h, w = x.shape
    return (x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
            .reshape(b, t * (h // p) * (w // p), c * p * p))


def unpack_video_tokens(x: torch.Tensor, t: int, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`pack_video_tokens` for ``t`` frames of an ``h x w`` grid."""
    b, _, d = x.shape
    c = d // (p * p)
    return x.reshape(b, t, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h, w)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C p^2, H/p, W/p)``, channel order ``(c, ph, pw)`` (diffusers'
    ``Flux2Pipeline._patchify_latents`` for ``p = 2``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify` (``Flux2Pipeline._unpatchify_latents`` for ``p = 2``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


def pack_tokens(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, h, w) -> (B, (h/p)(w/p), C p^2)``, features ``(c, ph, pw)`` (``QwenImagePipeline._pack_latents``
    for ``p = 2``; ``Flux2Pipeline._pack_latents`` for ``p = 1``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack_tokens(x: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`pack_tokens` for a grid ``h x w``."""
    b, _, d = x.shape
    c = d // (p * p)
    return x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _number(cfg: Mapping[str, Any], key: str, default: float, where: str, low: float, high: float) -> float:
    """``cfg[key]`` (``default`` when absent or null) as a float in ``[low, high]``; integers of any size are
    compared before conversion, so none overflows."""
    value = cfg.get(key, default)
    if value is None:  # e.g. "shift_factor": null in a published config
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r}")
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{where}: {key} must be a finite number in [{low:g}, {high:g}], got "
                         f"{value if isinstance(value, float) else _short(value)}: fix the VAE config (the published "
                         "VAEs' scaling factors lie in 0.13 .. 1.53, their shifts in 0 .. 0.12)")
    return float(value)


def _short(value: int) -> str:
    return repr(value) if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"


def latent_space(vae: str | os.PathLike | Mapping[str, Any] | nn.Module,
                 stats: Mapping[str, Any] | None = None) -> LatentSpace:
    """The :class:`LatentSpace` of a registered name, a diffusers config dict, a diffusers VAE module or a local
    diffusers VAE folder (``config.json`` + weights, or a pipeline folder with ``vae/``).

    FLUX.2's and LTX-Video's statistics live in their VAE's weights (``bn.running_mean`` / ``bn.running_var``;
    the ``latents_mean`` / ``latents_std`` buffers): a name or config alone is a ``ValueError`` saying so; pass
    the loaded module or its folder, or ``stats`` (a mapping ``{"running_mean": [...], "running_var": [...]}`` /
    ``{"latents_mean": [...], "latents_std": [...]}`` copied from those weights, as a model config's
    ``vae_stats`` carries them: :func:`weight_stats`)."""
    if _registered(vae):
        name, cfg = str(vae), get_vae_config(str(vae))
    elif isinstance(vae, (str, os.PathLike)) and Path(vae).is_dir():
        folder = Path(vae) / "vae" if (Path(vae) / "vae" / "config.json").is_file() else Path(vae)
        cfg = read_json_file(folder / "config.json", "VAE config")
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{folder / 'config.json'}: a diffusers VAE config is a JSON object")
        name = str(folder / "config.json")
        if cfg.get("_class_name") in STATS_IN_WEIGHTS:
            stats = _stats_from_folder(folder, cfg["_class_name"])
    elif isinstance(vae, str):
        get_vae_config(vae)  # the unknown-name error
        raise AssertionError  # unreachable
    elif isinstance(vae, Mapping):
        name, cfg = str(vae.get("_name_or_path") or "custom"), vae
    elif isinstance(getattr(vae, "config", None), Mapping):
        name, cfg = type(vae).__name__, vae.config
        cls = cfg.get("_class_name") or type(vae).__name__
        if cls in STATS_IN_WEIGHTS:
            stats = _stats_from_module(vae, cls)
    else:
        raise TypeError(f"expected a VAE name ({list_vaes()}, video: {list_vaes(video=True)}), a diffusers config "
                        f"dict, a diffusers VAE or a diffusers folder, got {type(vae).__name__}")
    where = f"VAE config {name!r}"
    cls = cfg.get("_class_name") or (type(vae).__name__ if isinstance(vae, nn.Module) else None)
    if stats is not None and not isinstance(stats, tuple):  # a mapping (vae_stats), checked for its class
        stats = _stats_from_mapping(stats, cls if cls in STATS_IN_WEIGHTS else "AutoencoderKLFlux2")
    key = _channels_key(cls)
    channels = cfg.get(key)
    if isinstance(channels, bool) or not isinstance(channels, int) or not 0 < channels <= MAX_CHANNELS:
        shown = _short(channels) if isinstance(channels, int) else repr(channels)
        raise ValueError(f"{where}: {key} must be a positive integer at most {MAX_CHANNELS}, got {shown}")
    temporal = _video_factors(cls, cfg, where)[1] if cls in VIDEO_CLASSES else 0
    if cls in ("AutoencoderKLQwenImage", "AutoencoderKLWan"):
        # diffusers pipelines/qwenimage/pipeline_qwenimage.py and pipelines/wan/pipeline_wan.py: latents /
        # (1 / latents_std) + latents_mean before decode (per channel; on every frame for Wan)
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if not isinstance(mean, (list, tuple)) or not isinstance(std, (list, tuple)):
            raise ValueError(f"{where}: an {cls} config needs latents_mean and latents_std lists "
                             f"({channels} numbers each)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*mean, *std]):
            raise ValueError(f"{where}: latents_mean / latents_std must be numbers")
        return LatentSpace(name, channels, 1.0, 0.0, tuple(mean), tuple(std), patch=1,
                           pack=0 if temporal else 2, stats_from="config", temporal=temporal)
    if cls in STATS_IN_WEIGHTS:
        if stats is None:
            raise ValueError(f"{where}: {cls}'s latent statistics are not in its config: they live in the VAE's "
                             f"weights ({' / '.join(STATS_IN_WEIGHTS[cls])}, diffusion_pytorch_model.safetensors); "
                             "pass the loaded VAE module or its diffusers folder to latent_space")
        if cls == "AutoencoderKLLTXVideo":
            # pipelines/ltx/pipeline_ltx.py _denormalize_latents: latents * latents_std / scaling_factor + latents_mean
            mean, std, _, source = stats
            if len(mean) != channels or len(std) != channels:
                raise ValueError(f"{source}: latents_mean / latents_std of {len(mean)} / {len(std)} channels, "
                                 f"expected {channels} (latent_channels)")
            scaling = _number(cfg, "scaling_factor", _DEFAULT_SCALING[cls], where, *SCALING_RANGE)
            return LatentSpace(name, channels, scaling, 0.0, tuple(mean), tuple(std), pack=1, stats_from=source,
                               temporal=temporal)
        patch = cfg.get("patch_size", (2, 2))
        if (not isinstance(patch, (list, tuple)) or len(patch) != 2 or patch[0] != patch[1]
                or not isinstance(patch[0], int) or isinstance(patch[0], bool) or not 0 < patch[0] <= 16):
            raise ValueError(f"{where}: patch_size must be two equal small positive integers, got {patch!r}")
        mean, var, eps, source = stats
        if eps is None:  # statistics given apart from the module: the config's eps
            eps = _batch_norm_eps(cfg, where)
        if len(mean) != channels * patch[0] ** 2 or len(var) != len(mean):
            raise ValueError(f"{source}: batch-norm statistics of {len(mean)} / {len(var)} channels, expected "
                             f"{channels * patch[0] ** 2} (latent_channels {channels} x patch {patch[0]}^2)")
        std = tuple(math.sqrt(v + eps) for v in var)  # pipeline_flux2.py: sqrt(running_var + batch_norm_eps)
        return LatentSpace(name, channels, 1.0, 0.0, tuple(mean), std, patch=patch[0], pack=1, stats_from=source)
    # the classes' own defaults (HunyuanVideo 0.476986, 1.5: 1.03682; their pipelines decode latents / scaling_factor)
    scaling = _number(cfg, "scaling_factor", _DEFAULT_SCALING.get(cls, 0.18215), where, *SCALING_RANGE)
    return LatentSpace(name, channels, scaling, _number(cfg, "shift_factor", 0.0, where, -MAX_SHIFT, MAX_SHIFT),
                       temporal=temporal)


def _stat_keys(cls: str) -> tuple[str, str]:
    """The keys of a model config's ``vae_stats`` for ``cls``: its weight names' last parts."""
    first, second = (n.rsplit(".", 1)[-1] for n in STATS_IN_WEIGHTS[cls])
    return first, second


def weight_stats(vae: str | os.PathLike | nn.Module) -> dict[str, Any] | None:
    """The latent statistics a VAE keeps in its weights (FLUX.2: ``{"running_mean", "running_var", "source"}``;
    LTX-Video: ``{"latents_mean", "latents_std", "source"}``; float lists) from a module or a diffusers folder,
    for a model config's ``vae_stats``; None for the classes whose constants are all in their config."""
    if isinstance(vae, nn.Module):
        cls = vae.config.get("_class_name") or type(vae).__name__
        found = _stats_from_module(vae, cls) if cls in STATS_IN_WEIGHTS else None
    elif isinstance(vae, (str, os.PathLike)) and Path(vae).is_dir():
        folder = Path(vae) / "vae" if (Path(vae) / "vae" / "config.json").is_file() else Path(vae)
        cls = read_json_file(folder / "config.json", "VAE config").get("_class_name")
        found = _stats_from_folder(folder, cls) if cls in STATS_IN_WEIGHTS else None
    else:
        cls = get_vae_config(str(vae)).get("_class_name")
        if cls in STATS_IN_WEIGHTS:
            latent_space(str(vae))  # the error saying the statistics live in the weights
        found = None
    if found is None:
        return None
    first, second, _, source = found
    k1, k2 = _stat_keys(cls)
    return {k1: first, k2: second, "source": source}


def _stats_from_mapping(stats: Mapping[str, Any], cls: str = "AutoencoderKLFlux2"
                        ) -> tuple[list[float], list[float], None, str]:
    """``{"running_mean": [...], "running_var": [...], "source"?}`` (FLUX.2; LTX-Video: ``latents_mean`` /
    ``latents_std``) checked: two non-empty lists of finite numbers, variances >= 0 / deviations > 0. A batch
    norm's eps comes from the VAE config."""
    where = "vae_stats"
    k1, k2 = _stat_keys(cls)
    if not isinstance(stats, Mapping):
        raise ValueError(f"{where} must be a mapping {{\"{k1}\": [...], \"{k2}\": [...]}}, got {type(stats).__name__}")
    first, second = stats.get(k1), stats.get(k2)
    for key, value in ((k1, first), (k2, second)):
        if (not isinstance(value, (list, tuple)) or not value or len(value) > 4 * MAX_CHANNELS
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
            raise ValueError(f"{where}.{key} must be a non-empty list of finite numbers (the VAE's {key} buffer, "
                             f"fastlclip.vaes.weight_stats(vae)), got {str(value)[:80]}")
    if k2 == "running_var" and any(v < 0 for v in second):
        raise ValueError(f"{where}.running_var must be >= 0")
    if k2 == "latents_std" and any(v <= 0 for v in second):
        raise ValueError(f"{where}.latents_std must be > 0")
    return [float(v) for v in first], [float(v) for v in second], None, str(stats.get("source") or where)


def _batch_norm_eps(cfg: Mapping[str, Any], where: str) -> float:
    return _number(cfg, "batch_norm_eps", 1e-4, where, 0.0, 1.0)  # AutoencoderKLFlux2's default 1e-4


def _stats_from_module(vae: nn.Module, cls: str) -> tuple[list[float], list[float], float | None, str]:
    """The latent statistics a VAE keeps in its weights (float64 lists: FLUX.2's batch-norm running mean / var,
    LTX-Video's latents_mean / latents_std buffers), FLUX.2's eps (None for LTX-Video) and where they came from."""
    names = STATS_IN_WEIGHTS[cls]
    found = []
    for n in names:
        try:
            found.append(vae.get_buffer(n))
        except AttributeError:
            found.append(None)
    where = f"{cls} module's {names[0].rsplit('.', 1)[0] + ' ' if '.' in names[0] else ''}buffers"
    if not all(isinstance(t, torch.Tensor) for t in found):
        raise ValueError(f"{where}: the VAE has no {' / '.join(names)} buffers, where its latent statistics live")
    first, second = (t.detach().double().cpu().tolist() for t in found)
    if all(m == 0 for m in first) and all(v == 1 for v in second):
        warnings.warn(f"{where} hold the class's initial statistics (mean 0, {_stat_keys(cls)[1]} 1): an untrained "
                      "VAE, not published weights; load the weights before reading its latent space", stacklevel=3)
    eps = _batch_norm_eps(vae.config, f"VAE config {cls!r}") if cls == "AutoencoderKLFlux2" else None
    return first, second, eps, f"{where} {' / '.join(names)}"


def _stats_from_folder(folder: Path, cls: str) -> tuple[list[float], list[float], float | None, str]:
    """The latent statistics read from a diffusers folder's weights file (FLUX.2's batch norm, LTX-Video's
    buffers); absent ones are an error naming the file (never a default)."""
    names = STATS_IN_WEIGHTS[cls]
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no diffusion_pytorch_model*.safetensors: {cls}'s latent statistics "
                         f"({' / '.join(names)}) live in the VAE's weights")
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for n in names:
                if n in f.keys():
                    found[n] = f.get_tensor(n)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{', '.join(str(f) for f in files)}: no {' / '.join(missing)} tensor: {cls}'s latent "
                         "statistics live there; no default is used")
    cfg = read_json_file(folder / "config.json", "VAE config")
    eps = (_batch_norm_eps(cfg, f"VAE config {str(folder / 'config.json')!r}") if cls == "AutoencoderKLFlux2"
           else None)
    return found[names[0]].double().tolist(), found[names[1]].double().tolist(), eps, str(files[0])


def build_vae(vae: str | os.PathLike | nn.Module, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> nn.Module:
    """A diffusers autoencoder of one of :data:`DECODER_CLASSES`: from a registered name (random weights, with a
    warning), from a local diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``),
    or ``vae`` itself when it is a module. Moved to ``dtype`` / ``device`` when given; eval mode."""
    if isinstance(vae, nn.Module):
        module = vae
    else:
        import diffusers

        if isinstance(vae, str) and _registered(vae):
            cfg = get_vae_config(vae)
            cls = getattr(diffusers, cfg.pop("_class_name"))
            warnings.warn(f"build_vae({vae!r}): the registered config has no weights, this VAE is random; pass a "
                          "diffusers folder for trained weights", stacklevel=2)
            module = cls.from_config(cfg)
        else:
            folder = Path(vae)
            if (folder / "vae" / "config.json").is_file():
                folder = folder / "vae"
            if not (folder / "config.json").is_file():
                raise ValueError(f"VAE {str(vae)!r} is neither a registered name ({list_vaes()}) nor a diffusers folder "
                                 "with a config.json (or a pipeline folder with vae/config.json)")
            cfg = read_json_file(folder / "config.json", "VAE config")
            if not isinstance(cfg, Mapping):
                raise ValueError(f"{folder / 'config.json'}: a diffusers VAE config is a JSON object")
            cls_name = cfg.get("_class_name")
            if cls_name not in DECODER_CLASSES:
                raise ValueError(f"{folder / 'config.json'}: _class_name {cls_name!r} is not one of {DECODER_CLASSES}")
            # its constants, before loading (latent_channels: 4, diffusers' default, when the config has none)
            if cls_name not in STATS_IN_WEIGHTS:  # those are read from the weights, below
                latent_space({"latent_channels": 4, **cfg, "_name_or_path": str(folder / "config.json")})
            module = getattr(diffusers, cls_name).from_pretrained(folder)
    if dtype is not None or device is not None:
        module = module.to(device=device, dtype=dtype)
    return module.eval()


def encode(vae: nn.Module, images: torch.Tensor, sample: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] ``(B, 3, H, W)`` -> VAE-space latents ``(B, C, H / f, W / f)``, each class as its
    pipelines encode: the posterior mean (or a sample) of the KL autoencoders (AutoencoderKLQwenImage takes and
    returns one frame, ``(B, C, 1, H, W)``: ``pipeline_qwenimage_img2img.py`` ``_encode_vae_image``); DC-AE's
    deterministic ``.latent``. The video VAEs (:data:`VIDEO_CLASSES`) take clips ``(B, 3, F, H, W)`` and return
    ``(B, C, T, H / f, W / f)``. Diffusion space is ``latent_space(vae).to_diffusion`` of the result."""
    cls = type(vae).__name__
    x = images.to(vae.dtype)
    if cls == "AutoencoderKLQwenImage":
        x = x.unsqueeze(2)
    out = vae.encode(x)
    if hasattr(out, "latent_dist"):
        dist = out.latent_dist
        raw = dist.sample(generator) if sample else dist.mean
    elif hasattr(out, "latent"):
        raw = out.latent
    else:
        raw = out.latents  # AutoencoderTiny
    return raw[:, :, 0] if cls == "AutoencoderKLQwenImage" else raw


def decode(vae: nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """VAE-space latents ``(B, C, h, w)`` (``latent_space(vae).to_vae`` of diffusion latents) -> images in
    [-1, 1] (not clamped), as each pipeline decodes: ``vae.decode(z).sample``; AutoencoderKLQwenImage on one
    frame, ``decode(z[:, :, None]).sample[:, :, 0]`` (``pipeline_qwenimage.py``). A video VAE decodes the whole
    clip ``(B, C, T, h, w)`` -> ``(B, 3, F, H, W)``; LTX-Video with a timestep-conditioned decoder gets the
    pipeline's default ``decode_timestep`` 0 (``pipeline_ltx.py``: at 0 its decode noise is scaled by 0 too);
    HunyuanVideo 1.5 decodes clip by clip (its batched attention mask fails for B > 1 in diffusers 0.42.1)."""
    cls = type(vae).__name__
    if cls == "AutoencoderKLQwenImage":
        return vae.decode(raw.to(vae.dtype).unsqueeze(2)).sample[:, :, 0]
    if cls == "AutoencoderKLHunyuanVideo15" and raw.shape[0] > 1:
        # diffusers 0.42.1: its mid-block attention builds a (B, L, L) mask that SDPA broadcasts against the
        # (B, 1, L, d) heads, so a batch of B > 1 clips fails; clip by clip it decodes (each clip is independent)
        return torch.cat([decode(vae, clip) for clip in raw.split(1)])
    if cls == "AutoencoderKLLTXVideo" and vae.config.get("timestep_conditioning"):
        return vae.decode(raw.to(vae.dtype), raw.new_zeros(raw.shape[0], dtype=vae.dtype)).sample
    return vae.decode(raw.to(vae.dtype)).sample


def model_vae(cfg: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """A model config's VAE: ``(name, diffusers config)`` from its ``"vae"`` name and / or embedded
    ``"vae_cfg"`` (which wins; its name is then ``"vae"`` or ``"custom"``); neither means ``sdxl``. A FLUX.2 VAE's
    statistics come as ``"vae_stats"`` (:func:`weight_stats`), checked here; without them the model reads
    VAE-space latents only."""
    name, embedded = cfg.get("vae"), cfg.get("vae_cfg")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{where}: vae must be a registered VAE name ({list_vaes()}), got {name!r}")
    if embedded is not None:
        if not isinstance(embedded, Mapping):
            raise ValueError(f"{where}: vae_cfg must be a diffusers VAE config dict, got "
                             f"{type(embedded).__name__}")
        vae_cfg = copy.deepcopy(dict(check_depth(embedded, f"{where}: vae_cfg")))
        name = name or "custom"
    else:
        name = name or "sdxl"
        vae_cfg = get_vae_config(name) if _registered(name) else None
        if vae_cfg is None:
            raise ValueError(f"{where}: unknown VAE {name!r}; registered VAEs: {list_vaes()}, video: "
                             f"{list_vaes(video=True)}, or embed a diffusers config as \"vae_cfg\"")
    cls = vae_cfg.get("_class_name", "AutoencoderKL")
    if cls not in LATENT_CLASSES:
        family = TINY_FAMILY.get(name)
        hint = f"; name its family's VAE instead: \"vae\": {family!r}" if family else ""
        raise ValueError(f"{where}: the VAE {name!r} is a {cls} (a decoder for the decode baseline), not one of the "
                         f"autoencoders whose latents a Latent-CLIP reads ({', '.join(LATENT_CLASSES)}){hint}")
    stats = cfg.get("vae_stats")
    if cls in STATS_IN_WEIGHTS:
        if stats is not None:
            latent_space(vae_cfg, stats=stats)  # validates the statistics against the config
    elif stats is not None:
        raise ValueError(f"{where}: vae_stats is for a VAE whose latent statistics live in its weights "
                         f"({', '.join(STATS_IN_WEIGHTS)}); the {name!r} VAE ({cls}) keeps them in its config: drop it")
    else:
        latent_space(vae_cfg)  # validates channels and constants
    return name, vae_cfg
