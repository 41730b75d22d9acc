"""Command-line pieces the ``python -m fastlclip.*`` commands share: every argument is checked before any work.

A command-line error is one line on stderr (``prog: error: message``) and exit status 2, no usage block and no
traceback: ``Parser`` is ``argparse.ArgumentParser`` with that ``error``. ``int_at_least`` and ``positive_float``
are ``type=`` parsers that reject bad values while parsing; a parser's ``what`` says what it takes (the command-line
reference, docs/cli.md, shows it).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

USAGE_ERROR = 2


def fail(line: str, code: int = USAGE_ERROR) -> int:
    """Print ``line`` on stderr as one line (its lines joined by `` | ``); returns ``code``, the exit status."""
    print(" | ".join(part for part in line.splitlines() if part.strip()), file=sys.stderr, flush=True)
    return code


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        sys.exit(fail(f"{self.prog}: error: {message}"))


def int_at_least(low: int) -> Callable[[str], int]:
    """A ``type=`` parser for an integer >= ``low``."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    parse.what = what
    return parse


def positive_float(text: str) -> float:
    """A ``type=`` parser for a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


positive_float.what = "a finite number > 0"


def head_weight(text: str) -> tuple[str, float]:
    """A ``type=`` parser for ``--head-weight NAME=WEIGHT``: a head's name and a finite weight >= 0."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT (e.g. hps=5), got {text!r}")
    try:
        w = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a number, got {value!r}") from None
    if not 0 <= w < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a finite number >= 0")
    return name.strip(), w


head_weight.what = "NAME=WEIGHT, a head of the ensemble and a finite number >= 0"
