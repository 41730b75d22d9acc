"""Outputs: one Parquet file per input shard, written atomically, and the manifest of what happened.

Layout of an output folder::

    <out>/<shard stem>.parquet   one per finished shard: written to <stem>.parquet.tmp, then os.replace'd
    <out>/manifest.jsonl         one JSON line per shard per run: shard, status (ok / error / skipped), rows,
                                 seconds (read_s, model_s, write_s), error, bad (keys of skipped samples)
    <out>/run.json               the settings every file in the folder was made with

A shard is done exactly when its final ``.parquet`` exists: a process killed mid-write leaves only the
``.tmp`` file, which never counts and is overwritten when the shard runs again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .readers import shard_stem

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
TMP_SUFFIX = ".tmp"


def output_path(out: str | os.PathLike, shard: str | os.PathLike) -> Path:
    return Path(out) / f"{shard_stem(shard)}.parquet"


def is_done(out: str | os.PathLike, shard: str | os.PathLike) -> bool:
    return output_path(out, shard).is_file()


def build_table(keys: Sequence[str], columns: dict[str, list[np.ndarray]], names: Sequence[str], embed_dim: int,
                metadata: dict):
    """An Arrow table: ``key`` then ``names`` in order, from per-batch numpy chunks."""
    import pyarrow as pa

    arrays, fields = [pa.array(list(keys), type=pa.string())], [pa.field("key", pa.string())]
    for name in names:
        chunks = columns.get(name, [])
        if name == "embedding":
            flat = np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, np.float16)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float16), type=pa.float16()), embed_dim)
        elif name == "label":
            arr = pa.array(np.concatenate(chunks).tolist() if chunks else [], type=pa.string())
        elif name == "safety_flag":
            arr = pa.array(np.concatenate(chunks) if chunks else np.zeros(0, bool), type=pa.bool_())
        elif chunks and chunks[0].ndim == 2:  # one fixed-size vector per row, in its own dtype (e.g. a flat latent)
            flat = np.concatenate(chunks)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        else:
            arr = pa.array(np.concatenate(chunks) if chunks else np.zeros(0, np.float32), type=pa.float32())
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    meta = {f"fastlclip.{k}": json.dumps(v) for k, v in metadata.items()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def write_atomic(table, final: Path) -> None:
    """Write ``table`` to ``final`` through a temporary file in the same folder and ``os.replace``."""
    import pyarrow.parquet as pq

    tmp = final.with_name(final.name + TMP_SUFFIX)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_manifest(out: str | os.PathLike, record: dict) -> None:
    """One line per call, in one ``write`` on an ``O_APPEND`` descriptor, so concurrent workers don't interleave."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(Path(out) / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_manifest(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run_file(out: Path, identity: dict) -> None:
    """Record the run's settings in ``run.json``; refuse a folder whose outputs were made with other settings."""
    path = out / RUN_FILE
    if path.exists() and any(out.glob("*.parquet")):
        old = json.loads(path.read_text())
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise ValueError(f"{out} holds outputs made with other settings ({', '.join(diff)} differ); resuming "
                             "would mix them: pass another --out, or delete the folder to start over")
        return
    tmp = path.with_name(f"{RUN_FILE}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(identity, indent=2) + "\n")
    os.replace(tmp, path)
