"""Backend selection: :func:`apply` sets a concrete backend or ``"auto"``, the fastest one on this GPU,
timed once per (GPU, model, dtype, versions) and remembered in ``~/.cache/fastlclip/backends.json``."""

from __future__ import annotations

import datetime
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from ..model import LatentCLIP
from . import timing
from .backends import BACKENDS, activate
from .common import warn

try:
    from triton import __version__ as _TRITON_VERSION
except ImportError:
    _TRITON_VERSION = "none"

logger = logging.getLogger(__name__)


def apply(model: LatentCLIP, backend: str, **options) -> LatentCLIP:
    """Set ``model``'s backend (``model.set_backend`` and ``fastlclip.load`` call this).

    ``options`` go to the runtime's constructor (``buckets``; ``mode`` for ``"compile"``; ``cache_path``,
    ``refresh`` for ``"auto"``, see :func:`choose_backend`).
    """
    choices = (*BACKENDS, "auto")
    if backend not in choices:
        raise ValueError(f"unknown backend {backend!r}; choose one of {choices}")
    if backend == "auto":
        auto = {k: options.pop(k) for k in ("cache_path", "refresh") if k in options}
        if options:
            raise TypeError(f"backend 'auto' takes only cache_path and refresh, got {sorted(options)}")
        if model.device.type != "cuda":
            warn(f"backend='auto' on {model.device}: using 'eager' (the 'graph' and 'compile' backends need a CUDA "
                 "device)")
            backend = "eager"
        else:
            backend = choose_backend(model, **auto)
    return activate(model, backend, **options)


def set_backend(self: LatentCLIP, backend: str, **options) -> LatentCLIP:
    """Switch backend: one of ``fastlclip.runtime.BACKENDS`` or ``"auto"`` (see ``fastlclip.runtime.apply``)."""
    return apply(self, backend, **options)


# The model file stays plain PyTorch; the method that switches its backend is attached from here.
LatentCLIP.set_backend = set_backend


def default_cache_path() -> Path:
    """``$FASTLCLIP_CACHE_DIR/backends.json``, else ``~/.cache/fastlclip/backends.json``."""
    root = os.environ.get("FASTLCLIP_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlclip"
    return Path(root) / "backends.json"


def cache_key(device_name: str, model_name: str, dtype: torch.dtype) -> str:
    """What a timing depends on: GPU, model, dtype, and the torch and Triton versions."""
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{device_name} | {model_name} | {dtype_name} | torch {torch.__version__} | triton {_TRITON_VERSION}"


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"ignoring the unreadable backend cache {path}: {e}", stacklevel=2)
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``key: entry`` to the JSON cache at ``path`` (atomically replaced)."""
    path = Path(path)
    data = read_cache(path)
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def choose_backend(model: LatentCLIP, *, cache_path: Path | None = None, refresh: bool = False) -> str:
    """The fastest backend for ``model``'s reward step at batch 1 on its GPU: cached, else timed once
    (every backend, ``"compile"`` included, so the first call can take minutes) and cached."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = cache_key(torch.cuda.get_device_name(model.device), f"{model.cfg.name} {model.cfg.vision}", model.dtype)
    hit = read_cache(path).get(key)
    if not refresh and isinstance(hit, dict) and hit.get("backend") in BACKENDS:
        return hit["backend"]
    logger.warning("fastlclip: timing the backends for %s once (cached in %s)", key, path)
    times, failures = timing.time_backends(model)
    if not times:
        raise RuntimeError(f"no backend ran for {key}: {failures}")
    best = min(times, key=times.get)
    write_cache(path, key, {"backend": best, "reward_step_ms": times, "failed": failures,
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return best
