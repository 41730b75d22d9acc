"""Keep-lists from scored outputs: the keys whose column passes a threshold, or the top fraction."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def _outputs(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"no output folder {out}")
    files = sorted(out.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out} holds no scored shards (*.parquet)")
    return files


def _values(path: Path, column: str) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if column not in names:
        usable = [n for n in names if n not in ("key", "label", "embedding")]
        raise ValueError(f"no column {column!r} in {path.name}; columns to select by: {', '.join(usable)}")
    t = pq.read_table(path, columns=["key", column])
    values = t.column(column).to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "fbiu":
        raise ValueError(f"column {column!r} is not numeric or boolean; select by a score, probability or flag")
    return t.column("key").to_pylist(), values.astype(np.float64)


def select(out, *, by: str, threshold: float | None = None, top_fraction: float | None = None) -> list[str]:
    """Keys of the rows of ``out`` (a ``score`` output folder) to keep, in file then row order.

    ``by``: a column (``clip_cos_0``, ``prob_cat``, ``safety_flag``, ...); ``-column`` ranks by its negation,
    for columns where lower is better: ``by="-safety_flag", threshold=0`` keeps unflagged rows.
    ``threshold``: keep rows with value >= threshold. ``top_fraction`` F in (0, 1]: keep the int(F * N)
    highest of the N rows (ties broken by file and row order). NaN is never kept. Pass exactly one of the two.
    """
    if (threshold is None) == (top_fraction is None):
        raise ValueError("pass exactly one of threshold and top_fraction")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if top_fraction is not None and not (isinstance(top_fraction, (int, float)) and 0 < top_fraction <= 1):
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction!r}")
    if not isinstance(by, str) or not by.lstrip("-"):
        raise ValueError(f"by must name a column, got {by!r}")
    sign, column = (-1.0, by[1:]) if by.startswith("-") else (1.0, by)
    files = _outputs(out)
    if threshold is not None:
        keys = []
        for f in files:
            k, v = _values(f, column)
            keep = sign * v >= threshold  # NaN compares False
            keys += [key for key, kept in zip(k, keep) if kept]
        return keys
    values = np.concatenate([sign * _values(f, column)[1] for f in files])
    count = int(top_fraction * len(values))
    finite = values[~np.isnan(values)]
    count = min(count, len(finite))
    if count == 0:
        return []
    cutoff = np.partition(finite, len(finite) - count)[len(finite) - count]
    ties = count - int((finite > cutoff).sum())
    keys = []
    for f in files:
        k, v = _values(f, column)
        for key, x in zip(k, sign * v):
            if x > cutoff:
                keys.append(key)
            elif x == cutoff and ties > 0:
                keys.append(key)
                ties -= 1
    return keys
