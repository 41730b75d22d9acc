"""Latent-CLIP model configs: the authors' JSON files, shipped as package data.

A config follows open_clip's schema plus the Latent-CLIP vision keys ``latent_factor``,
``latent_n_channels`` (by default the VAE's channel count) and ``noise_aware`` (a learned noise-level
embedding, see ``LatentViT``). The model's VAE, whose latent space the tower reads: ``"vae": NAME``
(``fastlclip.list_vaes()``) or an embedded diffusers VAE config ``"vae_cfg"`` (``vaes.LATENT_CLASSES``); neither means
``sdxl``. It sets the constants of ``encode_latents(space="diffusion")`` and the encoder of ``encode_images``.
A FLUX.2 model carries its VAE's batch-norm statistics as ``"vae_stats"`` (``fastlclip.vaes.weight_stats``).
The tower reads the VAE-space latents ``(B, C, H, W)`` (``latent_factor``: image pixels per latent pixel, 32 for
DC-AE); diffusion-space input, a grid or the pipeline's packed tokens, is converted first. A video VAE
(``fastlclip.list_vaes(video=True)``: ``"vae": "wan2.1"`` etc.) gives a tower reading one latent frame of its
clips; LTX-Video's model carries its ``latents_mean`` / ``latents_std`` as ``"vae_stats"``.
"""

from __future__ import annotations

import copy
import json
import numbers
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .vaes import check_depth, list_vaes, model_vae, read_json, vae_channels

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
        config = read_config_file(config)
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
    noise_aware: bool = False

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
    vae_name: str = "sdxl"
    vae_stats: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], name: str = "custom") -> "ModelConfig":
        """Validate ``cfg`` (see ``LIMITS``) and build the config; bad values raise ``ValueError`` naming the key."""
        where = f"model config {name!r}"
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{where} must be a mapping (a dict as in fastlclip/configs/models/*.json), got {type(cfg).__name__}")
        check_depth(cfg, where)  # before anything copies it recursively
        try:
            v, t = cfg["vision_cfg"], cfg["text_cfg"]
            for key, sub in (("vision_cfg", v), ("text_cfg", t)):
                if not isinstance(sub, Mapping):
                    raise ValueError(f"{where}: {key} must be a mapping of settings, got {type(sub).__name__}")
            vae_name, vae = model_vae(cfg, where)
            width = _int(v["width"], "vision_cfg.width", where)
            if "heads" in v:
                heads = _int(v["heads"], "vision_cfg.heads", where)
            else:
                heads = max(width // _int(v.get("head_width", 64), "vision_cfg.head_width", where), 1)
            vision = VisionConfig(
                image_size=_int(v["image_size"], "vision_cfg.image_size", where),
                patch_size=_int(v["patch_size"], "vision_cfg.patch_size", where),
                width=width,
                layers=_int(v["layers"], "vision_cfg.layers", where),
                heads=heads,
                mlp_ratio=_ratio(v.get("mlp_ratio", 4.0), "vision_cfg.mlp_ratio", where),
                latent_factor=_int(v.get("latent_factor", 8), "vision_cfg.latent_factor", where),
                latent_channels=_int(v.get("latent_n_channels", vae_channels(vae)), "vision_cfg.latent_n_channels",
                                     where),
                noise_aware=_bool(v.get("noise_aware", False), "vision_cfg.noise_aware", where),
            )
            text = TextConfig(
                context_length=_int(t.get("context_length", 77), "text_cfg.context_length", where),
                vocab_size=_int(t.get("vocab_size", 49408), "text_cfg.vocab_size", where),
                width=_int(t["width"], "text_cfg.width", where),
                heads=_int(t["heads"], "text_cfg.heads", where),
                layers=_int(t["layers"], "text_cfg.layers", where),
                mlp_ratio=_ratio(t.get("mlp_ratio", 4.0), "text_cfg.mlp_ratio", where),
            )
            embed_dim = _int(cfg["embed_dim"], "embed_dim", where)
        except KeyError as e:
            raise ValueError(f"{where} lacks the key {e}; see fastlclip/configs/models/*.json") from None
        if vision.image_size % vision.latent_factor:
            raise ValueError(f"{where}: vision_cfg.image_size {vision.image_size} must be a multiple of latent_factor "
                             f"{vision.latent_factor}")
        if vision.latent_size % vision.patch_size:
            raise ValueError(
                f"{where}: the latent size {vision.latent_size} (image_size {vision.image_size} / latent_factor "
                f"{vision.latent_factor}) must be a multiple of patch_size {vision.patch_size}"
            )
        for tower, c in (("vision", vision), ("text", text)):
            if c.width % c.heads:
                raise ValueError(f"{where}: {tower} width {c.width} is not divisible by heads {c.heads}")
        params = _estimated_params(vision, text, embed_dim)
        if params > MAX_PARAMS:
            raise ValueError(f"{where} describes a model of about {params / 1e9:.0f} billion parameters; fastlclip builds "
                             f"models of at most {MAX_PARAMS / 1e9:.0f} billion (Latent-CLIP B models have 0.15 billion). "
                             "Check layers and width.")
        if vision.latent_channels != vae_channels(vae):
            raise ValueError(f"{where}: vision_cfg.latent_n_channels is {vision.latent_channels} but its VAE {vae_name!r} "
                             f"has {vae_channels(vae)}-channel latents; name the VAE the tower reads (\"vae\": "
                             f"one of {list_vaes()}) or drop latent_n_channels")
        stats = cfg.get("vae_stats")
        return cls(name, embed_dim, vision, text, vae, vae_name, copy.deepcopy(dict(stats)) if stats else None)


# Upper bounds for config values: a hostile or mistyped config (layers: 1e9) must fail, not hang or exhaust memory.
LIMITS = {
    "width": 16384, "heads": 1024, "head_width": 16384, "layers": 256, "embed_dim": 16384, "image_size": 8192,
    "patch_size": 1024, "latent_factor": 64, "latent_n_channels": 1024, "context_length": 4096, "vocab_size": 1_000_000,
}
MAX_PARAMS = 5e9


def _int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    limit = LIMITS[key.split(".")[-1]]
    if value > limit:
        raise ValueError(f"{where}: {key} must be at most {limit}, got {value!r}")
    return int(value)


def _bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _ratio(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 16:
        raise ValueError(f"{where}: {key} must be a number in (0, 16], got {value!r}")
    return float(value)


def _estimated_params(vision: VisionConfig, text: TextConfig, embed_dim: int) -> float:
    """Parameter count to within a few percent: attention and MLP weights, embeddings, projections."""
    def tower(width, layers, mlp_ratio):
        return layers * (4 + 2 * mlp_ratio) * width * width

    v = tower(vision.width, vision.layers, vision.mlp_ratio) + vision.num_tokens * vision.width + vision.width * embed_dim
    v += vision.latent_channels * vision.patch_size**2 * vision.width
    t = tower(text.width, text.layers, text.mlp_ratio) + (text.vocab_size + text.context_length) * text.width
    return float(v + t + text.width * embed_dim)


def read_config_file(path: str | Path) -> Any:
    """The JSON in ``path``; a missing file or bad JSON is a ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model config file {str(path)!r} does not exist; pass a JSON file or a registered name "
                         f"({list_models()})")
    return read_json(path.read_bytes(), f"model config file {str(path)!r}")  # bad JSON or nesting: ValueError


def get_model_config(model: str | Mapping[str, Any] | Path) -> ModelConfig:
    """Resolve a registered name, a config dict, or a path to a JSON config."""
    if isinstance(model, Mapping):
        return ModelConfig.from_dict(model)
    if isinstance(model, str) and model in _REGISTRY:
        return ModelConfig.from_dict(_REGISTRY[model], name=model)
    path = Path(model)
    if path.suffix == ".json":
        return ModelConfig.from_dict(read_config_file(path), name=path.stem)
    if model not in _REGISTRY:
        close = [n for n in _REGISTRY if str(model).lower() in n.lower()]
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {model!r}.{hint} Known models: {list_models()}")
    return ModelConfig.from_dict(_REGISTRY[str(model)], name=str(model))


_load_builtin()
