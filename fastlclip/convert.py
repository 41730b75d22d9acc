"""``python -m fastlclip.convert IN.pt OUT.safetensors [--model NAME]``.

Keeps the model weights only (optimizer state and the rest dropped), with canonical key names, and
stores the config name as metadata so ``fastlclip.load(None, OUT)`` finds it.
"""

from __future__ import annotations

import argparse
import sys

from . import checkpoint as ckpt
from .factory import infer_config_name, configs_fitting
from .model_configs import get_model_config


def convert(src: str, dst: str, model: str | None = None) -> str:
    """Convert ``src`` to ``dst``; returns the config name stored."""
    from safetensors.torch import save_file

    sd, meta = ckpt.read_checkpoint(src)
    name = model or infer_config_name(sd, meta, src)
    get_model_config(name)  # unknown names fail here
    if name not in configs_fitting(sd):
        raise ckpt.CheckpointError(f"{src} does not fit config {name!r} (fits: {configs_fitting(sd) or 'none'})")
    save_file({k: v.contiguous() for k, v in sd.items()}, dst,
              metadata={ckpt.SAFETENSORS_CONFIG_KEY: name, "source": str(src)})
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlclip.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("src", help="official checkpoint (.pt), .safetensors, folder or hf-hub:<repo>[/<file>]")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", help="config name (default: from the checkpoint's shapes)")
    a = p.parse_args(argv)
    if not a.dst.endswith(".safetensors"):
        p.error("the output must end in .safetensors")
    try:
        name = convert(a.src, a.dst, a.model)
    except (ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.dst} (config {name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
