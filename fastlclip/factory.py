"""``fastlclip.load``: config + checkpoint -> a ready model on the requested device, dtype and backend."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from . import checkpoint as ckpt
from . import grids
from .model import LatentCLIP
from .model_configs import ModelConfig, get_model_config, list_models
from .runtime import BACKENDS, apply
from .vaes import read_json

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shapes(cfg: ModelConfig, with_vae: bool) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in LatentCLIP(cfg, with_vae=with_vae).state_dict().items()}


def _tower_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in sd.items() if not k.startswith(("visual.vae_encoder.", "visual.vae_quant_conv."))}


def config_fits(cfg: ModelConfig, sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether the towers of ``cfg`` have exactly the parameter names and shapes of ``sd`` (the VAE aside)."""
    return _shapes(cfg, False) == _tower_shapes(sd)


def configs_fitting(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered config names whose parameter names and shapes all match ``sd``."""
    want = _tower_shapes(sd)
    return [n for n in list_models() if _shapes(get_model_config(n), False) == want]


def _fit_hint(sd: Mapping[str, torch.Tensor]) -> str:
    fits = configs_fitting(sd)
    if len(fits) == 1:
        return f"the config that fits this checkpoint: {fits[0]!r}"
    return f"configs that fit: {fits}" if fits else "no registered config fits it; register one with fastlclip.add_model_config"


def load_state_dict_strict(model: LatentCLIP, sd: Mapping[str, torch.Tensor]) -> None:
    """Load with exact key and shape matching; errors list missing/unexpected keys or name the fitting config."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
        raise ckpt.CheckpointError(
            f"checkpoint does not match config {model.cfg.name!r}: "
            + (f"missing keys: {show(missing)}. " if missing else "")
            + (f"unexpected keys: {show(unexpected)}. " if unexpected else "") + _fit_hint(sd)
        )
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ckpt.CheckpointError(
            f"checkpoint does not fit config {model.cfg.name!r}: {k} has shape {got}, the config expects {want}"
            + (f" ({len(bad)} mismatched tensors)" if len(bad) > 1 else "") + f"; {_fit_hint(sd)}"
        )
    not_float = [(k, sd[k].dtype) for k, v in own.items() if v.is_floating_point() and not sd[k].is_floating_point()]
    if not_float:
        k, dtype = not_float[0]
        raise ckpt.CheckpointError(
            f"checkpoint tensor {k} is {dtype}, but the model's parameter is floating point"
            + (f" ({len(not_float)} such tensors)" if len(not_float) > 1 else "")
            + ": this is not a float checkpoint of this model (quantised or corrupted?); copying would round every "
            "value. Load a float32/float16/bfloat16 checkpoint"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k])


def load(
    name: str | Mapping[str, Any] | os.PathLike | None,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "eager",
    resize: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LatentCLIP:
    """Build a Latent-CLIP model and load its weights.

    Args:
        name: a registered config name (``fastlclip.list_models()``), a config dict, a JSON path, or
            ``None`` to take the config from the checkpoint (its metadata, or the one config its shapes fit).
            ``None`` with a reward ensemble's ``.safetensors`` file (``fastlclip.ensemble``) gives that
            ensemble, a ``LatentEnsemble``.
        pretrained: an official ``.pt`` checkpoint, a ``.safetensors`` file, a folder, or
            ``hf-hub:<repo>[/<file>]``; ``None`` gives random weights (with a warning).
        device, dtype: where and in which precision (float32, float16, bfloat16) the model runs.
        backend: ``"eager"`` (plain PyTorch), ``"triton"`` (fused kernels, see ``fastlclip.kernels``),
            ``"graph"`` (CUDA graphs of the image tower and reward step), ``"compile"`` (``torch.compile``)
            or ``"auto"`` (the fastest here, measured once); see ``fastlclip.runtime``. ``"graph"`` and
            ``"compile"`` freeze the image tower's weights and fall back to eager, with a warning, off CUDA.
        resize: the model's default policy for latent grids other than the trained one (``model.resize``;
            ``encode_latents(..., resize=...)`` overrides it per call): ``None`` refuses them,
            ``"interpolate"`` resamples the positional embeddings to the latents' grid, ``"pool"``
            centre-crops and area-pools the latents to the trained grid (see ``fastlclip.grids``).
        cache_dir: where ``hf-hub:`` checkpoints are downloaded (huggingface_hub's cache by default).
    """
    grids.check_resize(resize)
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype}")
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown backend {backend!r}; choose one of {(*BACKENDS, 'auto')}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} asked for, but CUDA is not available here; use device='cpu'")

    if pretrained is None:
        if name is None:
            raise ValueError("pass a model name or a pretrained checkpoint (or both)")
        cfg = get_model_config(name)
        warnings.warn(f"fastlclip.load({cfg.name!r}) without pretrained=: the weights are random", stacklevel=2)
        model = LatentCLIP(cfg)
    elif name is None and _ensemble_file(pretrained):  # a reward ensemble (fastlclip.ensemble)
        from .ensemble import load_ensemble

        if backend not in ("eager", "auto") or resize is not None:
            raise ValueError("an ensemble file loads with backend='eager' and resize=None (pass resize= per call)")
        return load_ensemble(pretrained, device=device, dtype=dtype)
    else:
        sd, meta = ckpt.read_checkpoint(pretrained, cache_dir=cache_dir)
        cfg = get_model_config(name if name is not None else infer_config_name(sd, meta, pretrained))
        model = LatentCLIP(cfg, with_vae=ckpt.has_vae(sd))
        load_state_dict_strict(model, sd)

    model = model.to(device=device, dtype=dtype).eval()
    model.resize = resize
    return apply(model, backend)


def _ensemble_file(pretrained) -> bool:
    """Whether ``pretrained`` is a local safetensors file whose metadata says it is a latent reward ensemble."""
    from .ensemble import ensemble_metadata

    if not isinstance(pretrained, (str, os.PathLike)) or str(pretrained).startswith("hf-hub:"):
        return False
    return ensemble_metadata(pretrained) is not None


def config_from_metadata(value: str, source: str | os.PathLike) -> str | dict[str, Any]:
    """The config a ``.safetensors`` file names in its metadata: a registered name, or an embedded JSON config dict.

    Never a path: a file's metadata must not make ``load`` read other local files.
    """
    where = Path(str(source)).name
    text = value.strip()
    if text.startswith(("{", "[")):
        try:
            cfg = read_json(text, "the JSON")  # bad JSON or nesting too deep: ValueError
            ModelConfig.from_dict(cfg, name=where)  # validated here, before anything is built
        except ValueError as e:  # json.JSONDecodeError is one
            raise ckpt.CheckpointError(f"{where}: the config in its metadata is invalid: {e}. Pass the config as "
                                       "fastlclip.load(name, ...)") from None
        return cfg
    if text in list_models():
        return text
    raise ckpt.CheckpointError(
        f"{where} names the config {value[:200]!r} in its metadata, which is not a registered config name "
        f"({list_models()}); paths in metadata are never read. Register it with fastlclip.add_model_config(name, config) "
        "or pass the config: fastlclip.load(name_or_dict_or_json_path, ...)"
    )


def infer_config_name(sd, meta, pretrained) -> str | dict[str, Any]:
    """A registered name or a config dict for ``sd``: from the metadata, the published repo, or the one config that fits."""
    if ckpt.SAFETENSORS_CONFIG_KEY in meta:
        return config_from_metadata(meta[ckpt.SAFETENSORS_CONFIG_KEY], pretrained)
    spec = str(pretrained)
    for repo, (cfg_name, _) in ckpt.PUBLISHED.items():
        if spec == "hf-hub:" + repo or spec.startswith(f"hf-hub:{repo}/"):
            return cfg_name
    fits = configs_fitting(sd)
    if len(fits) != 1:
        raise ckpt.CheckpointError(f"can't tell the config of {Path(spec).name}: {_fit_hint(sd)}; pass the model name")
    return fits[0]
