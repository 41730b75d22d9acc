"""Command-line checks shared by the bench CLIs: every argument is checked before any work starts.

A command-line error is one line on stderr (``prog: error: message``) and exit status 2, no usage block
and no traceback: ``Parser`` is ``argparse.ArgumentParser`` with that ``error``. The ``type=`` helpers
reject bad values while parsing; ``writable_dir`` / ``writable_file`` check an output location up front,
so a run that would fail to save its results fails at once instead of after the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


@contextlib.contextmanager
def argument_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Read the inputs that arguments name (prompt files, checkpoints, latent files) inside this block,
    before any work: the errors bad inputs raise (ValueError, TypeError, OSError, KeyError and their
    subclasses, ``CheckpointError`` among them) end the run as bad arguments do, one line and exit 2."""
    try:
        yield
    except (ValueError, TypeError, OSError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        parser.error(" ".join(str(message).split()) or type(e).__name__)


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A random seed ``torch.Generator.manual_seed`` takes: an integer in [0, 2**64)."""
    value = _int_at_least(text, 0, "an integer >= 0")
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2**64, got {text}")
    return value


def text(value: str) -> str:
    """A non-empty string (a prompt, a name): an empty or blank one is a mistake."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must be non-empty text, got {value!r}")
    return value


def diffusers_folder(text: str) -> Path:
    """A local diffusers pipeline folder (one with ``model_index.json``)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text} (pass a local diffusers pipeline folder)")
    if not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a diffusers pipeline folder (no model_index.json)")
    return path


def safetensors_file(text: str) -> Path:
    """An existing, readable ``.safetensors`` file (its header is parsed; the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    path = existing_file(text)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise argparse.ArgumentTypeError(f"{text} is not a readable .safetensors file ({' '.join(str(e).split())})") from None
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}" if not path.exists() else f"{text} is not a regular file")
    return path


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(directory: Path) -> str | None:
    """Why files cannot be created in the existing ``directory`` (None if they can): a real write, so it holds
    for root, read-only mounts and full disks alike."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def writable_dir(path: Path) -> str | None:
    """Why results cannot be written under the folder ``path`` (made on demand), or None if they can."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"{path} cannot be made: {base} is a file, not a folder"
    reason = _probe(base)
    return f"{path} is not writable ({base}: {reason})" if reason else None


def writable_file(path: Path) -> str | None:
    """Why the file ``path`` cannot be written (its folder made on demand), or None if it can."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; give a file path"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return writable_dir(path.parent)
