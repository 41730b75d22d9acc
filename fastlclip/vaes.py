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
TINY_FAMILY = {"taesdxl": "sdxl", "taesd3": "sd3", "taef1": "flux1"}
_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
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


def list_vaes() -> list[str]:
    """Names of the registered VAEs."""
    return list(_FILES)


def get_vae_config(name: str) -> dict[str, Any]:
    """The diffusers config dict of a registered VAE (a fresh copy)."""
    if name not in _FILES:
        raise ValueError(f"unknown VAE {name!r}; registered VAEs: {list_vaes()} (or embed a diffusers config as "
                         "\"vae_cfg\" in the model config)")
    return read_json((_DIR / _FILES[name]).read_text(), f"registered VAE config {name!r}")


@dataclass(frozen=True)
class LatentSpace:
    """A VAE's latent space: its channel count and the constants that map diffusion <-> VAE space."""

    name: str
    channels: int
    scaling_factor: float
    shift_factor: float = 0.0

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents -> what the VAE decodes: ``z / scaling_factor + shift_factor``."""
        raw = z / self.scaling_factor
        return raw + self.shift_factor if self.shift_factor else raw

    def to_diffusion(self, raw: torch.Tensor) -> torch.Tensor:
        """VAE latents (``vae.encode(x).latent_dist`` samples) -> diffusion space: ``(raw - shift) * scaling``."""
        return ((raw - self.shift_factor) if self.shift_factor else raw) * self.scaling_factor


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


def latent_space(vae: str | Mapping[str, Any] | nn.Module) -> LatentSpace:
    """The :class:`LatentSpace` of a registered name, a diffusers config dict or a diffusers VAE module."""
    if isinstance(vae, str):
        name, cfg = vae, get_vae_config(vae)
    elif isinstance(vae, Mapping):
        name, cfg = str(vae.get("_name_or_path") or "custom"), vae
    elif isinstance(getattr(vae, "config", None), Mapping):
        name, cfg = type(vae).__name__, vae.config
    else:
        raise TypeError(f"expected a VAE name ({list_vaes()}), a diffusers config dict or a diffusers VAE, "
                        f"got {type(vae).__name__}")
    where = f"VAE config {name!r}"
    channels = cfg.get("latent_channels")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 0 < channels <= MAX_CHANNELS:
        shown = _short(channels) if isinstance(channels, int) else repr(channels)
        raise ValueError(f"{where}: latent_channels must be a positive integer at most {MAX_CHANNELS}, got {shown}")
    scaling = _number(cfg, "scaling_factor", 0.18215 if cfg.get("_class_name") != "AutoencoderTiny" else 1.0, where,
                      *SCALING_RANGE)
    return LatentSpace(name, channels, scaling, _number(cfg, "shift_factor", 0.0, where, -MAX_SHIFT, MAX_SHIFT))


def build_vae(vae: str | os.PathLike | nn.Module, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> nn.Module:
    """A diffusers ``AutoencoderKL`` / ``AutoencoderTiny``: from a registered name (random weights, with a
    warning), from a local diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``),
    or ``vae`` itself when it is a module. Moved to ``dtype`` / ``device`` when given; eval mode."""
    if isinstance(vae, nn.Module):
        module = vae
    else:
        import diffusers

        if isinstance(vae, str) and vae in _FILES:
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
            if cls_name not in _CLASSES:
                raise ValueError(f"{folder / 'config.json'}: _class_name {cls_name!r} is not one of {_CLASSES}")
            # its constants, before loading (latent_channels: 4, diffusers' default, when the config has none)
            latent_space({"latent_channels": 4, **cfg, "_name_or_path": str(folder / "config.json")})
            module = getattr(diffusers, cls_name).from_pretrained(folder)
    if dtype is not None or device is not None:
        module = module.to(device=device, dtype=dtype)
    return module.eval()


def model_vae(cfg: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """A model config's VAE: ``(name, diffusers config)`` from its ``"vae"`` name and / or embedded
    ``"vae_cfg"`` (which wins; its name is then ``"vae"`` or ``"custom"``); neither means ``sdxl``."""
    name, embedded = cfg.get("vae"), cfg.get("vae_cfg")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{where}: vae must be a registered VAE name ({list_vaes()}), got {name!r}")
    if embedded is not None:
        if not isinstance(embedded, Mapping):
            raise ValueError(f"{where}: vae_cfg must be a diffusers AutoencoderKL config dict, got "
                             f"{type(embedded).__name__}")
        vae_cfg = copy.deepcopy(dict(check_depth(embedded, f"{where}: vae_cfg")))
        name = name or "custom"
    else:
        name = name or "sdxl"
        vae_cfg = get_vae_config(name) if name in _FILES else None
        if vae_cfg is None:
            raise ValueError(f"{where}: unknown VAE {name!r}; registered VAEs: {list_vaes()}, or embed a diffusers "
                             "config as \"vae_cfg\"")
    if vae_cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        family = TINY_FAMILY.get(name)
        hint = f"; name its family's VAE instead: \"vae\": {family!r}" if family else ""
        raise ValueError(f"{where}: the VAE {name!r} is a {vae_cfg.get('_class_name')} (a decoder for the decode "
                         f"baseline), not the AutoencoderKL whose latents a Latent-CLIP reads{hint}")
    latent_space(vae_cfg)  # validates channels and constants
    return name, vae_cfg
