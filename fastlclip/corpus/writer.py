"""Outputs: one Parquet file per input shard, written atomically, and the manifest of what happened.

Layout of an output folder::

    <out>/<shard stem>.parquet   one per finished shard: written to <stem>.parquet.tmp, then os.replace'd
    <out>/manifest.jsonl         one JSON line per shard per run: shard, status (ok / error / skipped), rows,
                                 seconds (read_s, model_s, write_s), error, bad (keys of skipped samples)
    <out>/run.json               the settings every file in the folder was made with (with the weights' digests)
    <out>/inputs.jsonl           one JSON line per ``score`` call: every shard it was given (what ``select`` expects)

A shard is done exactly when its final ``.parquet`` is a regular file (not a link) whose Parquet footer reads
and names the shard: a process killed mid-write leaves only the ``.tmp`` file, which never counts, and an
empty or damaged output is scored again. Nothing is written through a symbolic link: a planted ``.tmp`` link
is removed, a ``manifest.jsonl`` / ``run.json`` / ``inputs.jsonl`` that is not a regular file is refused.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .readers import shard_stem

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
INPUTS = "inputs.jsonl"
TMP_SUFFIX = ".tmp"


def output_path(out: str | os.PathLike, shard: str | os.PathLike) -> Path:
    return Path(out) / f"{shard_stem(shard)}.parquet"


def is_done(out: str | os.PathLike, shard: str | os.PathLike) -> bool:
    return readable_output(output_path(out, shard))


def readable_output(path: Path, scored: bool = True) -> bool:
    """``path`` is a regular file (not a link) whose Parquet footer reads (and, if ``scored``, names a shard)."""
    import pyarrow.parquet as pq

    if not path.is_file() or path.is_symlink() or path.stat().st_size == 0:
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        return False
    return not scored or b"fastlclip.shard" in meta


def check_folder(out: Path) -> None:
    """Refuse an output folder whose bookkeeping files are links or not regular files (never written through)."""
    for name in (MANIFEST, RUN_FILE, INPUTS):
        p = out / name
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ValueError(f"{p} is a link or not a regular file; fastlclip.corpus never writes through one: "
                             "remove it, or pass another --out")


def build_table(keys: Sequence[str], columns: dict[str, list[np.ndarray]], names: Sequence[str], embed_dim: int,
                metadata: dict, frames: int | None = None):
    """An Arrow table: ``key`` then ``names`` in order, from per-batch numpy chunks. ``frames``: a video run's T
    latent frames per clip: ``frame_*`` columns are lists of T float32 values and ``embedding`` is T lists of
    ``embed_dim`` (typed so even when the shard has no rows)."""
    import pyarrow as pa

    arrays, fields = [pa.array(list(keys), type=pa.string())], [pa.field("key", pa.string())]
    for name in names:
        chunks = columns.get(name, [])
        if name == "embedding":
            flat = np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, np.float16)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float16), type=pa.float16()), embed_dim)
            if frames:
                arr = pa.FixedSizeListArray.from_arrays(arr, frames)
        elif frames and name.startswith("frame_"):
            flat = np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, np.float32)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32), type=pa.float32()), frames)
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
        with _new_file(tmp) as f:
            pq.write_table(table, f)
        os.replace(tmp, final)  # replaces a link at ``final`` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file(path: Path):
    """``path`` opened for writing as a new file: a stale file or planted link there is removed first, and the
    open refuses to follow a link (``O_EXCL | O_NOFOLLOW``)."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def append_manifest(out: str | os.PathLike, record: dict) -> None:
    """One line per call, in one ``write`` on an ``O_APPEND`` descriptor, so concurrent workers don't interleave."""
    _append(Path(out) / MANIFEST, record)


def _append(path: Path, record: dict) -> None:
    line = (json.dumps(record, default=str) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file; fastlclip.corpus writes only regular files")
        written = os.write(fd, line)
        if written != len(line):  # a full disk or quota: stop here, before another line is appended onto this one
            raise OSError(f"{path}: only {written} of the {len(line)} bytes of a record were written (is the disk "
                          "full?); free space and run the same command again: it cuts the torn line and resumes")
    finally:
        os.close(fd)


def read_manifest(out: str | os.PathLike) -> list[dict]:
    """The manifest's records, in order. A torn last line (a run killed while writing it) is left out with a
    warning; any other line that is not a JSON object naming its shard is a ValueError naming the file and line."""
    path = Path(out) / MANIFEST
    records = _read_lines(path)
    for i, r in records:
        if not isinstance(r.get("shard"), str):
            raise ValueError(f"{path}, line {i}: a manifest record names no shard ({_shown(json.dumps(r))}); "
                             f"{_LINE_FIX}")
    return [r for _, r in records]


_LINE_FIX = ("fix or delete that line (the scores are the .parquet files; the manifest only says what each run did, "
             "and a shard without its line is reported as not scored yet)")


def _shown(text: str) -> str:
    return ascii(text[:80] + ("..." if len(text) > 80 else ""))


def _read_lines(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each JSON line of ``path`` (blank lines skipped); see ``read_manifest``."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            if i == len(lines):  # no newline after it: the write that a killed run began and never finished
                warnings.warn(f"{path}, line {i}: torn last line ({len(raw)} bytes without a newline: a run stopped "
                              "while writing it) left out; the next score run into this folder drops it", stacklevel=3)
                continue
            why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{path}, line {i}: not a JSON record ({why}): {_shown(raw.decode('utf-8', 'replace'))}; "
                             f"{_LINE_FIX}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {i}: not a JSON object: {_shown(raw.decode('utf-8', 'replace'))}; {_LINE_FIX}")
        records.append((i, record))
    return records


def drop_torn_tail(path: Path) -> None:
    """Cut a torn last line off ``path`` (a run killed mid-write leaves one without its newline), so the next
    append starts a line of its own; every complete line is kept, and a warning says what was dropped. Under an
    exclusive ``flock`` and checked again there, so ranks starting together cut it once."""
    if not path.is_file() or path.is_symlink():
        return
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network file systems): one process repairs
            pass
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start = size
        while start > 0:  # back to the newline that ends the last complete line
            chunk = os.pread(fd, min(start, 1 << 16), max(0, start - (1 << 16)))
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = start - len(chunk) + cut + 1
                break
            start -= len(chunk)
        line = os.pread(fd, start, 0).count(b"\n") + 1
        tail = os.pread(fd, min(size - start, 1 << 20), start)
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:  # a complete record that only lacks its newline (written by hand): keep it, end its line
            os.pwrite(fd, b"\n", size)
            return
        torn = tail[:80]
        os.ftruncate(fd, start)
        warnings.warn(f"{path}, line {line}: dropped a torn last line ({size - start} bytes without a newline, "
                      f"starting {ascii(torn.decode('utf-8', 'replace'))}: a run stopped while writing it); every "
                      "complete line is kept, and a shard whose line it was is scored again unless its output is done",
                      stacklevel=3)
    finally:
        os.close(fd)


def record_inputs(out: str | os.PathLike, run: str, shards: Sequence[str]) -> None:
    """Note every shard a ``score`` call was given (all ranks' shards), so ``select`` can name the missing ones."""
    _append(Path(out) / INPUTS, {"run": run, "shards": [str(s) for s in shards]})


def expected_shards(out: str | os.PathLike) -> dict[str, str]:
    """Output stem -> shard path for every shard any ``score`` call into ``out`` was given or recorded."""
    stems = {}
    for _, line in _read_lines(Path(out) / INPUTS):
        for s in line.get("shards", []):
            stems.setdefault(shard_stem(s), s)
    for r in read_manifest(out):
        stems.setdefault(shard_stem(r["shard"]), r["shard"])
    return stems


def check_run_file(out: Path, identity: dict) -> None:
    """Record the run's settings in ``run.json``; refuse a folder whose outputs were made with other settings."""
    check_folder(out)
    path = out / RUN_FILE
    if path.exists() and any(readable_output(p) for p in out.glob("*.parquet")):
        old = json.loads(path.read_text())
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise ValueError(f"{out} holds outputs made with other settings ({', '.join(diff)} differ); resuming "
                             "would mix them: pass another --out, or delete the folder to start over")
        return
    tmp = path.with_name(f"{RUN_FILE}.{os.getpid()}{TMP_SUFFIX}")
    with _new_file(tmp) as f:
        f.write((json.dumps(identity, indent=2) + "\n").encode())
    os.replace(tmp, path)
