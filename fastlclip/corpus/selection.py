"""Keep-lists from scored outputs: the keys whose column passes a threshold, or the top fraction.

``select`` reads the folder's records first (``inputs.jsonl`` and ``manifest.jsonl``, see ``writer``): a shard
that was given to ``score`` but has no complete output (it failed, or the run stopped before it) would drop its
keys silently, so it raises ``MissingShards`` naming each one and why, unless ``allow_missing=True``. A key
found in two output files raises too: a keep-list never holds a key twice.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np

from .readers import shard_stem
from .writer import expected_shards, read_manifest, readable_output


class MissingShards(ValueError):
    """Shards of the folder's runs without a complete output; ``missing`` maps shard path -> why."""

    def __init__(self, folder, missing: dict[str, str]):
        self.missing = missing
        names = "; ".join(f"{os.path.basename(s)} ({why})" for s, why in list(missing.items())[:5])
        more = f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
        super().__init__(f"{len(missing)} shards of {folder} have no scores: {names}{more}; rerun the same score "
                         "command to finish them, or pass allow_missing=True (--allow-missing) to select without them")


def _outputs(out: Path, allow_missing: bool) -> list[Path]:
    if not out.is_dir():
        raise FileNotFoundError(f"no output folder {out}")
    files = sorted(out.glob("*.parquet"))
    unreadable = {str(p): "empty, unreadable or a link" for p in files if not readable_output(p, scored=False)}
    files = [p for p in files if str(p) not in unreadable]
    present = {p.stem for p in files}
    last = {}
    for r in read_manifest(out):
        last[shard_stem(r["shard"])] = r
    missing, expected = {}, expected_shards(out)
    for stem, shard in expected.items():
        if stem not in present:
            r = last.get(stem)
            if r is not None and r.get("status") == "error":
                missing[shard] = f"failed: {r.get('error')}"
            elif str(out / f"{stem}.parquet") in unreadable:
                missing[shard] = f"{stem}.parquet is empty, unreadable or a link"
            else:
                missing[shard] = "not scored yet (the run stopped before it?)"
    for path, why in unreadable.items():
        if Path(path).stem not in expected:
            missing[path] = why
    if missing and not allow_missing:
        raise MissingShards(out, missing)
    if not files:
        raise FileNotFoundError(f"{out} holds no scored shards (*.parquet)")
    return files


def _values(path: Path, column: str) -> tuple[list[str], np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    usable = [f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)
              or pa.types.is_integer(f.type)]
    if column not in usable:
        what = "no column" if column not in schema.names else "not a numeric or boolean column:"
        raise ValueError(f"{what} {column!r} in {path.name}; columns to select by: {', '.join(usable)}")
    t = pq.read_table(path, columns=["key", column])
    return t.column("key").to_pylist(), t.column(column).to_numpy(zero_copy_only=False).astype(np.float64)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def select(out, *, by: str, threshold: float | None = None, top_fraction: float | None = None,
           allow_missing: bool = False) -> list[str]:
    """Keys of the rows of ``out`` (a ``score`` output folder) to keep, in file then row order.

    ``by``: a column (``clip_cos_0``, ``prob_cat``, ``safety_flag``, ...); ``-column`` ranks by its negation,
    for columns where lower is better: ``by="-safety_flag", threshold=0`` keeps unflagged rows.
    ``threshold``: keep rows with value >= threshold. ``top_fraction`` F in (0, 1]: keep the int(F * N)
    highest of the N rows (ties broken by file and row order). NaN is never kept. Pass exactly one of the two.
    ``allow_missing``: select from the shards that have scores even when others failed or were never scored.
    """
    if (threshold is None) == (top_fraction is None):
        raise ValueError("pass exactly one of threshold and top_fraction")
    if threshold is not None and not _number(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if top_fraction is not None and not (_number(top_fraction) and 0 < top_fraction <= 1):
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction!r}")
    if not isinstance(by, str) or not by.lstrip("-"):
        raise ValueError(f"by must name a column, got {by!r}")
    sign, column = (-1.0, by[1:]) if by.startswith("-") else (1.0, by)
    rows, owner = [], {}
    for f in _outputs(Path(out), allow_missing):
        keys, values = _values(f, column)
        for k in keys:
            other = owner.setdefault(k, f.name)
            if other != f.name:
                raise ValueError(f"key {k!r} is in both {other} and {f.name}: a keep-list would hold it twice; "
                                 "give every sample a unique key across shards")
        rows.append((keys, sign * values))
    if len(owner) != sum(len(k) for k, _ in rows):
        raise ValueError(f"{out} holds a key twice in one file; it was not written by fastlclip.corpus.score")
    if threshold is not None:
        return [k for keys, v in rows for k, kept in zip(keys, v >= threshold) if kept]  # NaN compares False
    values = np.concatenate([v for _, v in rows])
    finite = values[~np.isnan(values)]
    count = min(int(top_fraction * len(values)), len(finite))
    if count == 0:
        return []
    cutoff = np.partition(finite, len(finite) - count)[len(finite) - count]
    ties = count - int((finite > cutoff).sum())
    keep = []
    for keys, v in rows:
        for key, x in zip(keys, v):
            if x > cutoff:
                keep.append(key)
            elif x == cutoff and ties > 0:
                keep.append(key)
                ties -= 1
    return keep
