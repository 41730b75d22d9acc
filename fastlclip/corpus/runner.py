"""The unit of work: one input shard in, one output file and one manifest line out."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .readers import DEFAULT_MEMBERS, Sample, read_shard
from .scoring import Scorer, ScoreSpec
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


def run_identity(spec: ScoreSpec, opts: ShardOptions) -> dict:
    """What must match for two runs to share an output folder: the scores' settings and which latents are read."""
    return {**spec.identity(), "member": opts.member, "column": opts.column}


def check_sample(sample: Sample, shape: tuple[int, ...], dtype: torch.dtype | None = None, *,
                 tokens: tuple | None = None, note: str | None = None) -> torch.Tensor:
    """The sample's latent as a tensor of the model's shape (``(C, H, W)``; a video space's clips ``(C, T, h, w)``),
    cast to ``dtype`` (the model's) and finite there, or ``BadSample`` saying why not. ``note``: what a wrong
    shape's message adds (a video space's layout and T).

    ``tokens``: for a packed space's diffusion latents (Qwen-Image, FLUX.2), ``((L, D), unpack)``
    (``scoring.latent_layout``): a latent stored as the pipeline's tokens ``(L, D)`` / ``(1, L, D)`` is unpacked to
    ``shape``; flat storage is then refused (tokens or grid: the order of its values is not known)."""
    if sample.error is not None:
        raise BadSample(sample.error)
    x = sample.latent
    if x.layout != torch.strided or x.device.type != "cpu":
        raise BadSample(f"a {x.layout} tensor on {x.device}; latents are dense tensors with their values stored")
    if x.ndim == len(shape) + 1 and x.shape[0] == 1:
        x = x[0]
    token_shape = tuple(tokens[0]) if tokens else None
    packed = token_shape is not None and tuple(x.shape[-2:]) == token_shape and (x.ndim == 2 or (
        x.ndim == 3 and x.shape[0] == 1))
    if x.ndim == 1 and x.numel() == torch.Size(shape).numel():
        if token_shape is not None:
            raise BadSample(f"a flat latent of {x.numel()} values: the model's diffusion latents are the grid {shape} or "
                            f"the pipeline's packed tokens {token_shape}, and flat storage does not say which; store the "
                            "latent with its shape")
        x = x.reshape(shape)  # flat storage (e.g. a Parquet list column)
    if not packed and tuple(x.shape) != shape:
        raise BadSample(f"shape {tuple(x.shape)}, the model takes {shape}"
                        + (f" or its packed tokens {token_shape}" if token_shape else "")
                        + (f": {note}" if note else ""))
    if not x.is_floating_point():
        raise BadSample(f"dtype {x.dtype}, latents must be floating point")
    if not torch.isfinite(x).all():
        raise BadSample("NaN or Inf in the latent")
    if dtype is not None:
        x = x.to(dtype)
        if not torch.isfinite(x).all():
            raise BadSample(f"overflows {dtype} (max |x| = {sample.latent.abs().max().item():.3g}), the model's dtype")
    if packed:
        x = tokens[1](x.reshape(1, *token_shape))[0]  # a permutation: exact
    return x


def finite_rows(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Per row: every number the model gave for it is finite (a row with a NaN or Inf score has no valid score)."""
    ok = None
    for values in columns.values():
        if values.dtype.kind == "f":
            row = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            ok = row if ok is None else ok & row
    return ok


def _checked(sample: Sample, scorer: Scorer) -> torch.Tensor:
    """``check_sample`` where anything odd about one member (a sparse or meta tensor, ...) is a bad sample."""
    try:
        if hasattr(scorer, "check"):  # a scorer with its own reading rule (fastlclip.distill's image shards)
            return scorer.check(sample)
        return check_sample(sample, scorer.shape, scorer.dtype, tokens=getattr(scorer, "tokens", None),
                            note=getattr(scorer, "note", None))
    except BadSample:
        raise
    except Exception as e:
        raise BadSample(f"unusable latent ({type(e).__name__}: {e})") from None


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
        latents = torch.stack(batch)
        columns = scorer(latents)
        ok = finite_rows(columns)
        if ok is not None and not ok.all():  # overflowed inside the model: never a score or a label
            for i in np.flatnonzero(~ok):
                error = (f"the model's output is NaN or Inf (the latent overflowed inside the model; max |x| = "
                         f"{latents[i].abs().max().item():.3g})")
                if opts.on_error == "raise":
                    raise BadSample(f"sample {batch_keys[i]!r}: {error}")
                record["bad"].append({"key": batch_keys[i], "error": error})
            columns = {name: values[ok] for name, values in columns.items()}
            batch_keys[:] = [k for k, kept in zip(batch_keys, ok) if kept]
        for name, values in columns.items():
            chunks.setdefault(name, []).append(values)
        keys.extend(batch_keys)
        batch.clear()
        batch_keys.clear()
        record["model_s"] += time.perf_counter() - t

    samples_seen = matched = 0
    try:
        samples = read_shard(shard, member=opts.member, column=opts.column)
        while True:
            t = time.perf_counter()
            sample = next(samples, None)
            if sample is not None:
                samples_seen += 1
                matched += not sample.missing
                try:
                    if sample.key in seen:
                        raise BadSample("duplicate key in this shard")
                    latent = _checked(sample, scorer)
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
        if samples_seen and not matched:  # a wrong member name: an error to fix, never a finished empty shard
            raise BadSample(f"no sample has a {opts.member or ' or '.join(DEFAULT_MEMBERS)} member "
                            f"(first: {record['bad'][0]['error']}); pass member= (--member) to name the latent member")
        if batch:
            flush()
        t = time.perf_counter()
        meta = {"shard": str(shard), "settings": run_identity(scorer.spec, opts), "bad": record["bad"]}
        table = build_table(keys, chunks, names, scorer.embed_dim, meta, getattr(scorer, "latent_frames", None))
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
