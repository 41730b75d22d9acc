"""The unit of work: one input shard in, one output file and one manifest line out."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from .readers import Sample, read_shard
from .scoring import Scorer
from .writer import append_manifest, build_table, is_done, output_path, write_atomic

ON_ERROR = ("skip", "raise")


@dataclass
class ShardOptions:
    out: str
    batch_size: int = 256
    on_error: str = "skip"  # a bad sample: "skip" (recorded in the manifest) or "raise" (the shard fails)
    member: str | tuple[str, ...] | None = None  # tar member(s) with the latent; None: latent.pt, then latent.npy
    column: str = "latent"  # Parquet column with the latent
    run_id: str = ""


class BadSample(ValueError):
    pass


def check_sample(sample: Sample, shape: tuple[int, ...]) -> torch.Tensor:
    """The sample's latent as a (C, H, W) float tensor of the model's shape, or ``BadSample`` saying why not."""
    if sample.error is not None:
        raise BadSample(sample.error)
    x = sample.latent
    if x.ndim == len(shape) + 1 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 1 and x.numel() == torch.Size(shape).numel():
        x = x.reshape(shape)  # flat storage (e.g. a Parquet list column)
    if tuple(x.shape) != shape:
        raise BadSample(f"shape {tuple(x.shape)}, the model takes {shape}")
    if not x.is_floating_point():
        raise BadSample(f"dtype {x.dtype}, latents must be floating point")
    if not torch.isfinite(x).all():
        raise BadSample("NaN or Inf in the latent")
    return x


def process_shard(shard: str, scorer: Scorer, opts: ShardOptions) -> dict:
    """Score one shard unless its output exists; append its manifest line and return it. Never raises for a
    bad shard: the error is recorded (KeyboardInterrupt and SystemExit still stop the run)."""
    record = {"shard": str(shard), "run": opts.run_id, "pid": os.getpid(), "status": "skipped", "rows": 0,
              "bad": [], "error": None, "seconds": 0.0, "read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    if is_done(opts.out, shard):
        record["output"] = str(output_path(opts.out, shard))
        append_manifest(opts.out, record)
        return record
    t0 = time.perf_counter()
    names = scorer.columns()
    keys: list[str] = []
    chunks: dict[str, list] = {}
    seen: set[str] = set()
    batch: list[torch.Tensor] = []
    batch_keys: list[str] = []

    def flush():
        t = time.perf_counter()
        for name, values in scorer(torch.stack(batch)).items():
            chunks.setdefault(name, []).append(values)
        keys.extend(batch_keys)
        batch.clear()
        batch_keys.clear()
        record["model_s"] += time.perf_counter() - t

    try:
        samples = read_shard(shard, member=opts.member, column=opts.column)
        while True:
            t = time.perf_counter()
            sample = next(samples, None)
            if sample is not None:
                try:
                    if sample.key in seen:
                        raise BadSample("duplicate key in this shard")
                    latent = scorer.check(sample) if hasattr(scorer, "check") else check_sample(sample, scorer.shape)
                except BadSample as e:
                    if opts.on_error == "raise":
                        raise BadSample(f"sample {sample.key!r}: {e}") from None
                    record["bad"].append({"key": sample.key, "error": str(e)})
                    latent = None
                seen.add(sample.key)
            record["read_s"] += time.perf_counter() - t
            if sample is None:
                break
            if latent is not None:
                batch.append(latent)
                batch_keys.append(sample.key)
                if len(batch) == opts.batch_size:
                    flush()
        if batch:
            flush()
        t = time.perf_counter()
        meta = {"shard": str(shard), "settings": scorer.spec.identity(), "bad": record["bad"]}
        table = build_table(keys, chunks, names, scorer.embed_dim, meta)
        write_atomic(table, output_path(opts.out, shard))
        record["write_s"] = time.perf_counter() - t
        record.update(status="ok", rows=len(keys), output=str(output_path(opts.out, shard)))
    except Exception as e:
        record.update(status="error", rows=0, error=f"{type(e).__name__}: {e}")
    record["seconds"] = time.perf_counter() - t0
    for k in ("seconds", "read_s", "model_s", "write_s"):
        record[k] = round(record[k], 6)
    append_manifest(opts.out, record)
    return record


def progress_line(record: dict, done: int, total: int) -> str:
    name = os.path.basename(record["shard"])
    head = f"[fastlclip.corpus] {done}/{total} {name}: {record['status']}"
    if record["status"] == "ok":
        rate = record["rows"] / record["seconds"] if record["seconds"] else float("inf")
        bad = f", {len(record['bad'])} bad samples skipped" if record["bad"] else ""
        return f"{head}, {record['rows']} rows{bad} in {record['seconds']:.2f} s ({rate:.0f} latents/s)"
    if record["status"] == "error":
        return f"{head}: {record['error']}"
    return f"{head} (output exists)"


def report(record: dict, done: int, total: int) -> None:
    print(progress_line(record, done, total), file=sys.stderr, flush=True)
