"""Reading Latent-CLIP checkpoints offline and safely.

Accepted: an official training checkpoint (``epoch_34.pt``: a pickle-zip dict with ``state_dict``,
``module.`` prefixes, numpy scalars, optimizer state), a ``.safetensors`` file, a folder holding one of
those, or ``hf-hub:<repo>[/<file>]`` resolved through huggingface_hub's cache. Pickles are read with
``torch.load(weights_only=True)`` plus exactly the numpy globals official files need; anything else in
a pickle is refused before it can run.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_CONFIG_KEY = "fastlclip_config"

# Published checkpoints: repo -> (config name, file inside the repo or None where it isn't known).
PUBLISHED = {
    "wendlerc/latent-clip-b-8-512-34b-80k": ("Latent-ViT-B-8-512", "checkpoints/epoch_34.pt"),
    "wendlerc/latent-clip-b-8-512-34b-40k": ("Latent-ViT-B-8-512", None),
    "wendlerc/latent-clip-b-4-512-13b-80k": ("Latent-ViT-B-4-512", None),
    "wendlerc/latent-clip-b-4-512-plus-13b-80k": ("Latent-ViT-B-4-512-plus", None),
}
# Tried in order when neither the spec nor PUBLISHED names the file.
_DEFAULT_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "checkpoints/epoch_34.pt")


class CheckpointError(ValueError):
    """A checkpoint that can't be read, or doesn't fit the model config."""


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes (the dtype classes are needed to rebuild them), under the numpy 1.x and 2.x names."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},
    ]


def _load_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)|global: ([\w.]+)|but got <class '([\w.]+)'>", str(e))
        found = ["".join(f) for f in found]
        what = found[0] if found else "an object outside the allowed set"
        raise CheckpointError(
            f"refused to load {path}: it carries a pickled object fastlclip does not allow ({what}); nothing in it "
            "was run. Official Latent-CLIP checkpoints hold only tensors, numbers, strings and numpy scalars. If you "
            "trust the file, convert it to .safetensors yourself in an isolated environment."
        ) from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e}); is the file complete?") from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None


def _pick_file(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors"))
    if not files:
        raise CheckpointError(f"no checkpoint (.safetensors or {', '.join(PICKLE_SUFFIXES)}) found in folder {folder}")
    safe = [p for p in files if p.suffix == ".safetensors"]
    if safe:
        files = safe
    epochs = [p for p in files if re.fullmatch(r"epoch_\d+", p.stem)]
    if epochs:
        return max(epochs, key=lambda p: int(p.stem.split("_")[1]))
    if len(files) > 1:
        raise CheckpointError(f"folder {folder} holds several checkpoints {[str(p) for p in files]}; pass one file")
    return files[0]


def _hub_download(spec: str) -> Path:
    repo_and_file = spec[len("hf-hub:"):].strip("/")
    parts = repo_and_file.split("/")
    if len(parts) < 2:
        raise CheckpointError(f"{spec!r}: expected hf-hub:<owner>/<repo>[/<file>]")
    repo = "/".join(parts[:2])
    if len(parts) > 2:
        files = ["/".join(parts[2:])]
    elif PUBLISHED.get(repo, (None, None))[1]:
        files = [PUBLISHED[repo][1]]
    else:
        files = list(_DEFAULT_HUB_FILES)
    from huggingface_hub import hf_hub_download

    errors = []
    for name in files:
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as e:  # offline, not cached, missing file, no network: report all tried
            errors.append(f"{name}: {type(e).__name__}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    raise CheckpointError(
        f"could not resolve {spec!r} (tried {'; '.join(errors)}). "
        + ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache. " if offline else "")
        + f"Fetch it where a network is reachable, e.g. `huggingface-cli download {repo} {files[0]}`, "
        "or pass the local file path as pretrained="
    )


def read_checkpoint(pretrained: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint into (state_dict with canonical key names, metadata)."""
    spec = str(pretrained)
    path = _hub_download(spec) if spec.startswith("hf-hub:") else Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = _pick_file(path)
    if path.suffix == ".safetensors":
        sd, meta = _load_safetensors(path)
    else:
        obj = _load_pickle(path)
        meta = {}
        if isinstance(obj, Mapping) and "state_dict" in obj:
            meta = {k: str(v) for k, v in obj.items() if isinstance(v, (str, int, float, np.generic)) and k != "state_dict"}
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} holds no state dict of tensors (keys: {list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__})")
        sd = dict(obj)
    return canonical_keys(sd), meta


_VAE_ATTN_RENAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def canonical_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP ``module.`` prefixes; map plain open_clip ``visual.*`` keys and old diffusers VAE attention names."""
    out = {}
    plain_visual = not any(k.startswith(("module.visual.latent_vit.", "visual.latent_vit.")) for k in sd)
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if plain_visual and k.startswith("visual.") and not k.startswith(("visual.vae_encoder.", "visual.vae_quant_conv.")):
            k = "visual.latent_vit." + k[len("visual."):]
        if k.startswith("visual.vae_encoder.mid_block.attentions."):
            for old, new in _VAE_ATTN_RENAMES.items():
                k = k.replace(old, new)
        out[k] = v
    return out


def has_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("visual.vae_encoder.") for k in sd)
