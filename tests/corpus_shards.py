"""Small shards in the formats fastlclip.corpus reads, written by the tests themselves."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import torch

SHAPE = (4, 16, 16)  # conftest.TINY's latents


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples) -> None:
    """``samples``: (key, {extension: bytes}) in order, as webdataset's TarWriter lays them out."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def pt_shard(path, prefix: str, x: torch.Tensor, caption: bool = True) -> list[str]:
    keys = [f"{prefix}{i:04d}" for i in range(len(x))]
    write_tar(path, [(k, {"latent.pt": pt_bytes(x[i].clone()), **({"txt": b"a caption"} if caption else {})})
                     for i, k in enumerate(keys)])
    return keys


def npy_shard(path, prefix: str, x: np.ndarray) -> list[str]:
    keys = [f"{prefix}{i:04d}" for i in range(len(x))]
    write_tar(path, [(k, {"latent.npy": npy_bytes(x[i])}) for i, k in enumerate(keys)])
    return keys


def parquet_shard(path, prefix: str, x: torch.Tensor, *, flat: bool = False) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"{prefix}{i:04d}" for i in range(len(x))]
    values = x.reshape(len(x), -1).tolist() if flat else x.tolist()
    pq.write_table(pa.table({"key": keys, "latent": pa.array(values)}), path)
    return keys
