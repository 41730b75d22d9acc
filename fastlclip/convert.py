"""``python -m fastlclip.convert IN.pt OUT.safetensors [--model NAME_OR_JSON] [--force]``.

Keeps the model weights only (optimizer state and the rest dropped), with canonical key names, and
stores the config as metadata (a registered name, or the JSON config itself) so ``fastlclip.load(None, OUT)`` finds it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from . import checkpoint as ckpt
from .cli import Parser
from .factory import config_fits, configs_fitting, infer_config_name
from .model_configs import get_model_config, list_models, read_config_file


def _check_destination(dst: str | os.PathLike, src: str, force: bool) -> None:
    path = Path(dst)
    if path.suffix != ".safetensors":
        raise ValueError(f"the output {str(path)!r} must end in .safetensors")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass a file path ending in .safetensors")
    if path.exists() or path.is_symlink():
        if Path(src).exists() and path.exists() and path.resolve() == Path(src).resolve():
            raise ValueError(f"the output {path} is the input checkpoint; write to another file")
        if not force:
            raise ValueError(f"{path} already exists; pass --force (force=True) to overwrite it")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"the output folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not parent.is_dir():
        raise ValueError(f"{parent} is not a folder, so {path.name} can't be written inside it; choose another output path")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"the output folder {parent} is not writable; choose another output path")


def convert(src: str, dst: str, model: str | Mapping[str, Any] | None = None, *, force: bool = False) -> str:
    """Convert ``src`` to ``dst``; returns the config stored (a registered name, or ``"embedded JSON config"``).
    An existing ``dst`` is refused unless ``force``. The metadata holds the config only (no local paths)."""
    from safetensors.torch import save_file

    _check_destination(dst, str(src), force)
    sd, meta = ckpt.read_checkpoint(src)
    spec = model if model is not None else infer_config_name(sd, meta, src)
    if isinstance(spec, str) and spec not in list_models() and Path(spec).suffix == ".json":
        spec = read_config_file(spec)
    cfg = get_model_config(spec)  # unknown names and invalid configs fail here
    if not config_fits(cfg, sd):
        raise ckpt.CheckpointError(f"{src} does not fit config {cfg.name!r} (registered configs that fit: "
                                   f"{configs_fitting(sd) or 'none'})")
    stored = spec if isinstance(spec, str) else json.dumps(spec)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(dst),
                  metadata={ckpt.SAFETENSORS_CONFIG_KEY: stored})
    except OSError as e:
        raise ValueError(f"could not write {dst}: {e.strerror or e}") from None
    return spec if isinstance(spec, str) else "embedded JSON config"


def parser() -> Parser:
    p = Parser(prog="python -m fastlclip.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("src", help="official checkpoint (.pt), .safetensors, folder or hf-hub:<repo>[/<file>]")
    p.add_argument("dst", help="output .safetensors path (its folder must exist)")
    p.add_argument("--model", help="registered config name or a JSON config file (default: from the checkpoint's shapes)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        name = convert(a.src, a.dst, a.model, force=a.force)
    except (ckpt.CheckpointError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Exception as e:  # a command line ends in one line, never a traceback
        print(f"error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"wrote {a.dst} (config {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
