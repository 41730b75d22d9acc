"""Latent-CLIP model configs: the authors' JSON files, shipped as package data.

A config follows open_clip's schema plus the Latent-CLIP vision keys ``latent_factor`` and
``latent_n_channels``. Optionally ``vae_cfg`` (a diffusers ``AutoencoderKL`` config dict) sets the VAE
encoder used by ``encode_images``; by default it is SDXL's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

_CONFIG_DIR = resources.files("fastlclip") / "configs"
_REGISTRY: dict[str, dict[str, Any]] = {}


def _load_builtin() -> None:
    for entry in sorted((_CONFIG_DIR / "models").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            _REGISTRY[entry.name[: -len(".json")]] = json.loads(entry.read_text())


def sdxl_vae_config() -> dict[str, Any]:
    """The SDXL VAE's diffusers config (shipped copy)."""
    return json.loads((_CONFIG_DIR / "diffusers" / "sdxl_vae.json").read_text())


def taesdxl_config() -> dict[str, Any]:
    """The tiny SDXL autoencoder's diffusers ``AutoencoderTiny`` config (shipped copy of madebyollin/taesdxl's,
    which equals diffusers' ``AutoencoderTiny`` defaults): it decodes SDXL *diffusion* latents as the pipeline
    hands them (``scaling_factor`` 1.0, so ``latents / scaling_factor`` leaves them as they are) to [-1, 1]."""
    return json.loads((_CONFIG_DIR / "diffusers" / "taesdxl.json").read_text())


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL UNet's diffusers config (shipped copy)."""
    return json.loads((_CONFIG_DIR / "diffusers" / "sdxl_unet.json").read_text())


def list_models() -> list[str]:
    """Names of the registered Latent-CLIP configs."""
    return sorted(_REGISTRY)


def add_model_config(name: str, config: Mapping[str, Any] | str | Path) -> None:
    """Register a config (a dict or a JSON file) under ``name``."""
    if not isinstance(config, Mapping):
        config = json.loads(Path(config).read_text())
    ModelConfig.from_dict(config, name=name)  # validate before registering
    _REGISTRY[name] = copy.deepcopy(dict(config))


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    latent_factor: int
    latent_channels: int

    @property
    def latent_size(self) -> int:
        """Side of the latent grid the tower was trained on (image_size / latent_factor)."""
        return self.image_size // self.latent_factor

    @property
    def grid(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + 1


@dataclass(frozen=True)
class TextConfig:
    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    mlp_ratio: float


@dataclass(frozen=True)
class ModelConfig:
    name: str
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    vae: dict[str, Any]

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], name: str = "custom") -> "ModelConfig":
        try:
            v, t = cfg["vision_cfg"], cfg["text_cfg"]
            width = int(v["width"])
            head_width = int(v.get("head_width", 64))
            vision = VisionConfig(
                image_size=int(v["image_size"]),
                patch_size=int(v["patch_size"]),
                width=width,
                layers=int(v["layers"]),
                heads=int(v.get("heads", max(width // head_width, 1))),
                mlp_ratio=float(v.get("mlp_ratio", 4.0)),
                latent_factor=int(v.get("latent_factor", 8)),
                latent_channels=int(v.get("latent_n_channels", 4)),
            )
            text = TextConfig(
                context_length=int(t.get("context_length", 77)),
                vocab_size=int(t.get("vocab_size", 49408)),
                width=int(t["width"]),
                heads=int(t["heads"]),
                layers=int(t["layers"]),
                mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            )
            embed_dim = int(cfg["embed_dim"])
        except KeyError as e:
            raise ValueError(f"model config {name!r} lacks the key {e}; see fastlclip/configs/models/*.json") from None
        if vision.image_size % vision.latent_factor or vision.latent_size % vision.patch_size:
            raise ValueError(
                f"model config {name!r}: image_size {vision.image_size} / latent_factor {vision.latent_factor} "
                f"must be a multiple of patch_size {vision.patch_size}"
            )
        for tower, c in (("vision", vision), ("text", text)):
            if c.width % c.heads:
                raise ValueError(f"model config {name!r}: {tower} width {c.width} is not divisible by heads {c.heads}")
        return cls(name, embed_dim, vision, text, dict(cfg.get("vae_cfg") or sdxl_vae_config()))


def get_model_config(model: str | Mapping[str, Any] | Path) -> ModelConfig:
    """Resolve a registered name, a config dict, or a path to a JSON config."""
    if isinstance(model, Mapping):
        return ModelConfig.from_dict(model)
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_dict(json.loads(path.read_text()), name=path.stem)
    if model not in _REGISTRY:
        close = [n for n in _REGISTRY if str(model).lower() in n.lower()]
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {model!r}.{hint} Known models: {list_models()}")
    return ModelConfig.from_dict(_REGISTRY[str(model)], name=str(model))


_load_builtin()
