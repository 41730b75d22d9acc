"""Reading Latent-CLIP checkpoints offline and safely.

Accepted: an official training checkpoint (``epoch_34.pt``: a pickle-zip dict with ``state_dict``,
``module.`` prefixes, numpy scalars, optimizer state), a ``.safetensors`` file, a folder holding one of
those, or ``hf-hub:<repo>[/<file>]`` resolved through huggingface_hub's cache. Pickles are read with
``torch.load(weights_only=True)`` plus exactly the numpy globals official files need; anything else in
a pickle is refused before it can run.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FOLDER_RULE = (
    "a folder stands for the epoch_N checkpoint with the highest N found up to 4 levels down; without epoch_N files, "
    "for its only checkpoint, or its only .safetensors beside pickles; hidden (.name), backup (name~, *.bak, *.old, "
    "*.orig, *.tmp, *backup*) files and folders are skipped"
)
SAFETENSORS_CONFIG_KEY = "fastlclip_config"

# Published checkpoints: repo -> (config name, file inside the repo or None where it isn't known).
PUBLISHED = {
    "wendlerc/latent-clip-b-8-512-34b-80k": ("Latent-ViT-B-8-512", "checkpoints/epoch_34.pt"),
    "wendlerc/latent-clip-b-8-512-34b-40k": ("Latent-ViT-B-8-512", None),
    "wendlerc/latent-clip-b-4-512-13b-80k": ("Latent-ViT-B-4-512", None),
    "wendlerc/latent-clip-b-4-512-plus-13b-80k": ("Latent-ViT-B-4-512-plus", None),
}
# Tried in order when neither the spec nor PUBLISHED names the file.
log = logging.getLogger(__name__)
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


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _not_a_checkpoint(path: Path, head: bytes) -> str:
    """Why a file whose first bytes match no checkpoint format is not one, and what to do."""
    if head.startswith(_LFS_POINTER):
        return (f"{path} is a git-LFS pointer file, not the weights: fetch them with `git lfs pull` in its repository "
                "(or download the file itself, e.g. with huggingface-cli download)")
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")):
        return (f"{path} is an HTML page, not a checkpoint (a login or error page saved in place of the file?); "
                "download the file itself, e.g. with huggingface-cli download or the repository's 'resolve' URL")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of head is still text
        text = head[:e.start].decode("utf-8") if e.start > len(head) - 4 else None
    if text is not None and text and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"{path} is a text file, not a checkpoint (it starts with {first!r})"
    if path.suffix == ".safetensors":
        return (f"{path} is not a readable .safetensors file: it starts with bytes {head[:12].hex(' ')}, where a "
                ".safetensors file starts with its header length and '{'; is the file complete?")
    return (f"{path} is not a readable PyTorch checkpoint: it starts with bytes {head[:12].hex(' ')}, where one starts "
            "with a zip or pickle header; is the file complete?")


def _check_format(path: Path) -> None:
    """Refuse, by their first bytes, files that are no checkpoint: text, HTML, git-LFS pointers, random bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"could not read checkpoint {path}: {e.strerror or type(e).__name__}") from None
    if path.suffix == ".safetensors":
        ok = len(head) >= 9 and head[8:9] == b"{"
    else:  # torch.save's zip format, or a pickle (legacy torch.save, protocols 2-5)
        ok = head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
    if not ok:
        raise CheckpointError(_not_a_checkpoint(path, head))


def _load_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The most specific name first: torch's "Unsupported global: GLOBAL x.y" has both spellings, and the
        # first match in the text ("global: GLOBAL") would name the opcode instead of the object.
        found = [m.group(1) for p in (r"GLOBAL ([\w.]+)", r"global: ([\w.]+)", r"but got <class '([\w.]+)'>")
                 if (m := re.search(p, str(e)))]
        if not found:  # no forbidden object named: a pickle torch's safe reader cannot read, or a broken one
            with open(path, "rb") as f:
                head = f.read(2)
            if head[:1] == b"\x80" and head[1:2] in (b"\x04", b"\x05"):
                raise CheckpointError(
                    f"{path} is a bare pickle of protocol {head[1]} (a legacy, pre-zip torch.save file?), which torch's "
                    "safe (weights-only) reader cannot read; nothing in it was run. If you trust the file, re-save it "
                    "with torch.save's default zip format or convert it to .safetensors") from None
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (its pickle is corrupt); is the file "
                                  "complete?") from None
        what = found[0]
        raise CheckpointError(
            f"refused to load {path}: it carries a pickled object fastlclip does not allow ({what}); nothing in it "
            "was run. Official Latent-CLIP checkpoints hold only tensors, numbers, strings and numpy scalars. If you "
            "trust the file, convert it to .safetensors yourself in an isolated environment."
        ) from None
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError, OverflowError, OSError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {detail}); is the file "
                              "complete?") from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None


# Folder search: names that are never candidates, however deep (hidden, editor and backup copies).
_BACKUP_SUFFIXES = (".bak", ".old", ".orig", ".tmp", ".swp", ".backup")
_MAX_DEPTH = 4  # folders below the one given


def _skipped(name: str) -> bool:
    low = name.lower()
    return name.startswith(".") or name.endswith("~") or low.endswith(_BACKUP_SUFFIXES) or "backup" in low


def _candidates(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = [] if depth >= _MAX_DEPTH else sorted(d for d in dirs if not _skipped(d))
        for name in files:
            path = Path(root) / name
            if not _skipped(name) and path.suffix in (*PICKLE_SUFFIXES, ".safetensors") and path.is_file():
                found.append(path)
    return sorted(found)


def _pick_file(folder: Path) -> Path:
    """The checkpoint a folder stands for (the rule is FOLDER_RULE); logs which file and why."""
    files = _candidates(folder)
    rel = lambda p: str(p.relative_to(folder))  # noqa: E731
    if not files:
        raise CheckpointError(f"no checkpoint (.safetensors or {', '.join(PICKLE_SUFFIXES)}) found in folder {folder} "
                              f"(hidden and backup files and folders are skipped; {FOLDER_RULE})")
    epochs = {p: int(m.group(1)) for p in files if (m := re.fullmatch(r"epoch_(\d+)", p.stem))}
    if epochs:
        top = max(epochs.values())
        best = [p for p, n in epochs.items() if n == top]
        if len(best) > 1:
            raise CheckpointError(f"folder {folder} holds several checkpoints of epoch {top}: {[rel(p) for p in best]}; "
                                  "pass one file")
        chosen, why = best[0], f"the highest epoch_N of {len(epochs)}"
    elif len(files) == 1:
        chosen, why = files[0], "the only checkpoint"
    else:
        safe = [p for p in files if p.suffix == ".safetensors"]
        if len(safe) != 1:
            raise CheckpointError(f"folder {folder} holds several checkpoints {[rel(p) for p in files]}, none named "
                                  f"epoch_N; pass one file ({FOLDER_RULE})")
        chosen, why = safe[0], "the only .safetensors beside pickles"
    log.info("%s: chose %s (%s; %d candidate(s))", folder, rel(chosen), why, len(files))
    return chosen


def _hub_download(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
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
            return Path(hf_hub_download(repo, name, cache_dir=cache_dir))
        except Exception as e:  # offline, not cached, missing file, no network: report all tried
            errors.append(f"{name}: {type(e).__name__}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    raise CheckpointError(
        f"could not resolve {spec!r} (tried {'; '.join(errors)}). "
        + ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache. " if offline else "")
        + f"Fetch it where a network is reachable, e.g. `huggingface-cli download {repo} {files[0]}`, "
        "or pass the local file path as pretrained="
    )


def read_checkpoint(pretrained: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint into (state_dict with canonical key names, metadata); ``hf-hub:`` files are downloaded to
    ``cache_dir`` (huggingface_hub's cache by default)."""
    spec = str(pretrained)
    if not spec.strip():
        raise CheckpointError("pretrained is an empty string; pass a checkpoint file or folder ('.' for the working "
                              "directory), hf-hub:<repo>, or None for random weights")
    path = _hub_download(spec, cache_dir) if spec.startswith("hf-hub:") else Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = _pick_file(path)
    if not path.is_file():  # a FIFO, socket or device would block or stream forever
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe, socket or device); pass a checkpoint file")
    _check_format(path)
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
    _check_tensors(path, sd)
    return canonical_keys(sd), meta


def _check_tensors(path: Path, sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors that hold no weights a model can load: meta-device (no data), sparse or quantized
    layouts, and floating-point weights with NaN/Inf (a NaN ``logit_scale`` makes every score NaN)."""
    for kind, test, fix in (
        ("meta-device tensors (shapes without data)", lambda v: v.is_meta, "save the state dict of a model whose weights were loaded"),
        ("sparse tensors", lambda v: v.layout != torch.strided, "save dense tensors (.to_dense())"),
        ("quantized tensors", lambda v: v.is_quantized, "save the float weights (.dequantize())"),
        ("NaN/Inf values", lambda v: v.is_floating_point() and not bool(torch.isfinite(v).all()),
         "the weights are corrupt or diverged in training; use another checkpoint"),
    ):
        bad = [k for k, v in sd.items() if test(v)]
        if bad:
            raise CheckpointError(f"{path} holds {kind}: {bad[:5]}{' ...' if len(bad) > 5 else ''}; {fix}")


_VAE_ATTN_RENAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def canonical_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP ``module.`` prefixes; map plain open_clip ``visual.*`` keys and old diffusers VAE attention names."""
    out, origin = {}, {}
    plain_visual = not any(k.startswith(("module.visual.latent_vit.", "visual.latent_vit.")) for k in sd)
    for k, v in sd.items():
        original = k
        k = k[len("module."):] if k.startswith("module.") else k
        if plain_visual and k.startswith("visual.") and not k.startswith(("visual.vae_encoder.", "visual.vae_quant_conv.")):
            k = "visual.latent_vit." + k[len("visual."):]
        if k.startswith("visual.vae_encoder.mid_block.attentions."):
            for old, new in _VAE_ATTN_RENAMES.items():
                k = k.replace(old, new)
        if k in out:
            raise CheckpointError(
                f"checkpoint keys {origin[k]!r} and {original!r} both become {k!r} once names are made canonical (the "
                "DDP 'module.' prefix dropped, open_clip's 'visual.' layout and old VAE attention names mapped): the "
                "file holds two copies of one weight; remove one, or save the state dict you meant"
            )
        out[k], origin[k] = v, original
    return out


def has_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("visual.vae_encoder.") for k in sd)
