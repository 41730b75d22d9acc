"""Reading one input shard: WebDataset tar shards and Parquet files, one ``Sample`` per latent.

WebDataset conventions (as the ``webdataset`` package reads them): a sample is the run of consecutive tar
members sharing a key, the key being the member path up to the first dot of its basename
(``dir/000123.latent.pt`` -> key ``dir/000123``, extension ``latent.pt``). Latent members:

- ``*.pt`` / ``*.pth``: ``torch.save``'d tensors, read with ``torch.load(weights_only=True)``: a member that
  pickles anything but tensors is refused without running it (never a plain unpickle);
- ``*.npy``: numpy arrays, read with ``allow_pickle=False``;
- images (``jpg``, ``jpeg``, ``png``, ``webp``; when asked for by ``member``): decoded by Pillow to a uint8
  (3, H, W) RGB tensor (``fastlclip.distill`` VAE-encodes image shards);
- video frames as image members ``<key>.<n>.png`` (or another image extension asked for; ``n`` = frame index
  ``0..F-1``), read when the sample has no plain image member: one uint8 ``(F, 3, H, W)`` tensor ordered by
  ``n``; a gap in the numbers, two members for one frame or frames of different sizes make a bad sample.

Parquet shards hold one latent per row in a tensor column (default ``latent``): Arrow's fixed-shape tensor
type, (nested) lists of numbers, flat lists (reshaped to the model's latent shape) or ``.npy`` bytes. The
key comes from a ``key`` / ``__key__`` column (text, UTF-8 bytes or integers), else ``<shard stem>/<row>``.

Keys are checked where they are read (``key_problem``): a key is non-empty UTF-8 text on one line (no control,
line-separator or undecodable characters) whose last path part is not empty, so a keep-list written one key
per line reads back as the same keys. A sample with a bad key, an undecodable member or a null row comes back
with ``error`` set (its ``key`` then shown with ``ascii``) and the rest of the shard goes on. A shard that
cannot be read as a whole (truncated tar, bad Parquet, a latent column of strings or booleans) raises
``ShardError``.
"""

from __future__ import annotations

import io
import os
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_MEMBERS = ("latent.pt", "latent.npy")  # tried in order when no member name is given
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
KEY_COLUMNS = ("key", "__key__")


class ShardError(Exception):
    """The shard as a whole cannot be read (corrupt, truncated, missing column)."""


@dataclass
class Sample:
    key: str
    latent: torch.Tensor | None  # as stored (any shape / dtype); None when ``error`` says why
    error: str | None = None
    missing: bool = False  # a tar sample without the wanted member (a shard where every sample is missing fails)


def key_problem(key) -> str | None:
    """Why ``key`` cannot name a sample, or None when it can (see the module docstring)."""
    if not isinstance(key, str):
        return f"key is {'null' if key is None else type(key).__name__}, not text"
    if not key or key.endswith("/"):
        return "empty key (a tar member's key is its file name up to the first dot)"
    for c in key:
        cat = unicodedata.category(c)
        if cat == "Cs":
            return "key is not valid UTF-8"
        if cat in ("Cc", "Zl", "Zp"):
            return f"key holds the control or line-break character {c!r}"
    return None


def _bad_key(key, problem: str, where: str) -> Sample:
    return Sample(ascii(key), None, f"{where}: {problem}")


def shard_kind(path: str | os.PathLike) -> str | None:
    """``"tar"``, ``"parquet"`` or None (not a shard type this module reads)."""
    name = Path(path).name.lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def shard_stem(path: str | os.PathLike) -> str:
    """The shard's name without its shard suffix: ``data/00042.tar`` -> ``00042``."""
    name = Path(path).name
    for suffix in (*TAR_SUFFIXES, *PARQUET_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_shard(path: str | os.PathLike, *, member: str | Sequence[str] | None = None,
               column: str = "latent") -> Iterator[Sample]:
    """Yield the samples of one shard in stored order; raise ``ShardError`` when the shard itself is unreadable.

    ``member``: the tar member to read, or several tried in order (default ``DEFAULT_MEMBERS``)."""
    kind = shard_kind(path)
    if kind == "tar":
        return _read_tar(Path(path), member)
    if kind == "parquet":
        return _read_parquet(Path(path), column)
    raise ShardError(f"{path}: not a shard type fastlclip.corpus reads ({', '.join(TAR_SUFFIXES + PARQUET_SUFFIXES)})")


# -- WebDataset tar ----------------------------------------------------------------------------------
def split_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member path into (key, extension) at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext if dot else ""


def decode_member(data: bytes, ext: str) -> torch.Tensor:
    """A latent member's bytes -> tensor, without unpickling anything but tensors."""
    if ext.endswith((".pt", ".pth")) or ext in ("pt", "pth"):
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for hostile or non-tensor pickles, RuntimeError for corrupt zips
            raise ValueError(f"refused or unreadable {ext} (read with weights_only=True): {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{ext} holds a {type(obj).__name__}, not a tensor")
        return obj
    if ext.rpartition(".")[2].lower() in IMAGE_MEMBERS:
        return _decode_image(data, ext)
    if ext.endswith(".npy") or ext == "npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise ValueError(f"unreadable {ext}: {type(e).__name__}: {e}") from None
        return _from_numpy(arr)
    raise ValueError(f"member extension {ext!r} is neither .pt/.pth nor .npy")


def _decode_image(data: bytes, ext: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"unreadable {ext} image: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def frame_index(ext: str, wanted: Sequence[str]) -> int | None:
    """The frame number of a video frame member's extension (``"3.png"`` -> 3) when its image extension is one of
    ``wanted``; None for any other member."""
    n, dot, e = ext.partition(".")
    if not dot or not n.isascii() or not n.isdigit() or e.lower() not in IMAGE_MEMBERS or e not in wanted:
        return None
    return int(n)


def decode_frames(key: str, frames: dict, wanted: Sequence[str]) -> "Sample":
    """One sample of video frame members (extension -> bytes, or the error of a duplicate): a uint8
    ``(F, 3, H, W)`` tensor ordered by frame number, or a bad sample naming the problem."""
    by_n: dict[int, tuple[str, bytes]] = {}
    for ext, data in frames.items():
        if isinstance(data, Exception):
            return Sample(key, None, f"duplicate member: {data}")
        n = frame_index(ext, wanted)
        if n in by_n:
            return Sample(key, None, f"two members for video frame {n} ({by_n[n][0]} and {ext})")
        by_n[n] = (ext, data)
    gaps = [i for i in range(max(by_n) + 1) if i not in by_n]
    if gaps:
        return Sample(key, None, f"video frame members have a gap: frame(s) {', '.join(map(str, gaps[:8]))} missing "
                                 f"of 0..{max(by_n)} (frames are <key>.<n>.<ext>, n = 0..F-1 without gaps)")
    images = []
    for i in range(len(by_n)):
        ext, data = by_n[i]
        try:
            x = _decode_image(data, ext)
        except ValueError as e:
            return Sample(key, None, f"video frame {i}: {e}")
        if images and x.shape != images[0].shape:
            return Sample(key, None, f"video frames of different sizes: frame {i} is {tuple(x.shape[1:])}, frame 0 "
                                     f"{tuple(images[0].shape[1:])} (a clip's frames share one size)")
        images.append(x)
    return Sample(key, torch.stack(images))


def _from_numpy(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"latent has dtype {arr.dtype}, not a number type")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_tar(path: Path, member: str | Sequence[str] | None) -> Iterator[Sample]:
    wanted = (member,) if isinstance(member, str) else tuple(member) if member else DEFAULT_MEMBERS
    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path.name}: not a readable tar: {e}") from None
    key, members, first = None, {}, None

    def finish() -> Sample | None:
        if key is None:
            return None
        problem = key_problem(key)
        if problem is not None:
            return _bad_key(key, problem, f"member {ascii(first)}")
        ext = next((w for w in wanted if w in members), None)
        frames = {e: d for e, d in members.items() if frame_index(e, wanted) is not None}
        if ext is None and frames:
            return decode_frames(key, frames, wanted)
        if ext is None:
            return Sample(key, None, f"no {' or '.join(wanted)} member (has: {', '.join(sorted(members)) or 'none'})",
                          missing=True)
        data = members[ext]
        if isinstance(data, Exception):
            return Sample(key, None, f"duplicate member: {data}")
        try:
            return Sample(key, decode_member(data, ext))
        except ValueError as e:
            return Sample(key, None, str(e))

    with tf:
        try:
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key:
                    done = finish()
                    if done is not None:
                        yield done
                    key, members, first = k, {}, info.name
                if ext in members:  # webdataset refuses a sample with two members of one name
                    members[ext] = ValueError(f"member {info.name} appears twice in a row")
                elif ext in wanted or frame_index(ext, wanted) is not None:
                    f = tf.extractfile(info)
                    members[ext] = f.read()
                    if len(members[ext]) != info.size:
                        raise ShardError(f"{path.name}: truncated in member {info.name}")
                else:
                    members.setdefault(ext, b"")  # recorded for the error message only
            end = tf.offset
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise ShardError(f"{path.name}: corrupt or truncated tar ({type(e).__name__}: {e})") from None
    done = finish()
    if done is not None:
        yield done
    _check_tar_end(path, end)


def _check_tar_end(path: Path, offset: int) -> None:
    """tarfile stops silently at a header cut short; a complete tar has two zero blocks where its members end."""
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b",):  # gzip: the decompressor reports truncation itself
            return
        f.seek(offset)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.count(0) != 1024:
        raise ShardError(f"{path.name}: truncated tar (no end-of-archive marker after {offset} bytes)")


# -- Parquet -----------------------------------------------------------------------------------------
def _read_parquet(path: Path, column: str) -> Iterator[Sample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as e:
        raise ShardError(f"{path.name}: unreadable Parquet ({type(e).__name__}: {e})") from None
    if column not in schema.names:
        raise ShardError(f"{path.name}: no column {column!r} (columns: {', '.join(schema.names)}); pass column=")
    _check_latent_type(path, column, schema.field(column).type, pa)
    key_col = next((k for k in KEY_COLUMNS if k in schema.names), None)
    if key_col is not None:
        t = schema.field(key_col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or pa.types.is_integer(t)):
            raise ShardError(f"{path.name}: key column {key_col!r} has type {t}; keys must be text, UTF-8 bytes or integers")
    stem, row = shard_stem(path), 0
    try:
        for batch in pf.iter_batches(columns=[column] + ([key_col] if key_col else []), batch_size=1024):
            keys = batch.column(1).to_pylist() if key_col else [f"{stem}/{row + i}" for i in range(len(batch))]
            tensors = _arrow_tensors(batch.column(0), pa)
            for i, (k, t) in enumerate(zip(keys, tensors)):
                if isinstance(k, bytes):
                    try:
                        k = k.decode("utf-8")
                    except UnicodeDecodeError:
                        pass  # key_problem: not text
                elif isinstance(k, int):
                    k = str(k)
                problem = key_problem(k)
                if problem is not None:
                    yield _bad_key(k, "not valid UTF-8" if isinstance(k, bytes) else problem, f"row {row + i}")
                else:
                    yield Sample(k, None, t) if isinstance(t, str) else Sample(k, t)
            row += len(batch)
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"{path.name}: unreadable Parquet ({type(e).__name__}: {e})") from None


def _check_latent_type(path: Path, column: str, t, pa) -> None:
    """A latent column holds floating-point numbers (in lists or a tensor type) or ``.npy`` bytes; else the shard fails."""
    leaf = t.value_type if isinstance(t, pa.FixedShapeTensorType) else t
    while pa.types.is_list(leaf) or pa.types.is_large_list(leaf) or pa.types.is_fixed_size_list(leaf):
        leaf = leaf.value_type
    if not (pa.types.is_floating(leaf) or pa.types.is_binary(leaf) or pa.types.is_large_binary(leaf)):
        raise ShardError(f"{path.name}: column {column!r} holds {leaf} values ({t}); latents are floating-point "
                         "numbers or .npy bytes: pass column= to name the latent column")


def _arrow_tensors(values, pa) -> list:
    """One tensor (or an error string) per element of an Arrow tensor column."""
    import pyarrow.compute as pc

    if isinstance(values.type, pa.FixedShapeTensorType):
        valid = pc.invert(values.is_null()).to_pylist()
        dense = iter(values.filter(pc.invert(values.is_null())).to_numpy_ndarray() if any(valid) else ())
        return [_from_numpy(next(dense).copy()) if ok else "null latent" for ok in valid]
    binary = pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
    if not binary:
        dense = _dense_lists(values, pa)
        if dense is not None:
            return list(torch.from_numpy(dense))
    out = []
    for v in values.to_pylist():
        if v is None:
            out.append("null latent")
            continue
        try:
            out.append(decode_member(v, "npy") if binary else _from_numpy(np.asarray(v, dtype=np.float64)))
        except (ValueError, TypeError) as e:  # ragged nested lists, nulls inside a list
            out.append(f"not a numeric array: {e}")
    return out
def _dense_lists(values, pa) -> np.ndarray | None:
    """(Nested) list columns without nulls and with equal lengths per level as one numpy array, else None."""
    import pyarrow.compute as pc

    shape, level = [len(values)], values
    while pa.types.is_list(level.type) or pa.types.is_large_list(level.type) or pa.types.is_fixed_size_list(level.type):
        if level.null_count:
            return None
        lengths = pc.list_value_length(level)
        lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        if lo != hi or lo is None:
            return None
        shape.append(lo)
        level = level.flatten()
    if level.null_count or not (pa.types.is_floating(level.type) or pa.types.is_integer(level.type)):
        return None
    arr = level.to_numpy(zero_copy_only=False)
    return (arr if arr.flags.writeable else arr.copy()).reshape(shape)
