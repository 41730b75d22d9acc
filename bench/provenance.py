"""What every results file records about the run that made it: the command, the date, the software."""

from __future__ import annotations

import datetime
import platform
import shlex
from typing import Sequence

import torch


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that shape the timings (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for name in ("triton", "diffusers", "open_clip", "xformers", "fastlclip"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # missing, or a wheel that fails to import (e.g. xformers built for another torch)
            out[name] = None
    return out


def run_record(module: str, argv: Sequence[str]) -> dict:
    """``command`` (as typed, from the repository root), UTC ``date`` and ``versions`` of this run."""
    return {
        "command": f"python -m {module} {shlex.join(argv)}".rstrip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
