"""Corpus scoring throughput: ``python -m bench.corpus``.

Writes synthetic WebDataset shards (``latent.npy`` fp16 or ``latent.pt``, as corpora keep them) to a temporary
folder, scores them with ``fastlclip.corpus.score`` on the local engine at 1, 2, 4, ... up to ``--workers``
worker processes, and, when Ray is installed, on the Ray engine with ``--workers`` actors on the same shards.
Per run it reports wall time and latents/s, and, summed over shards from the manifest, the time spent reading
and decoding versus in the model (per latent, in worker time): where a worker's time goes. Ray's overhead is
its wall time minus the local engine's at the same worker count.

On a machine without CUDA the model is a tiny random-weight config (``bench.tiny``) and the run is a smoke
test of the pipeline: it says so, and its figures are not throughput results.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench import tiny
from bench.cli import Parser, positive_int, writable_file
from bench.provenance import run_record
from bench.report import save_results


def parse_args(argv):
    p = Parser(prog="python -m bench.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1), help="largest worker count")
    p.add_argument("--shards", type=positive_int, default=8)
    p.add_argument("--per-shard", type=positive_int, default=None, help="latents per shard (default: 64 CPU, 2048 CUDA)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: 32 CPU, 256 CUDA")
    p.add_argument("--format", choices=("npy", "pt"), default="npy", help="latent member type")
    p.add_argument("--model", default="Latent-ViT-B-8-512", help="config on CUDA (CPU: bench.tiny's)")
    p.add_argument("--pretrained", help="checkpoint on CUDA (default: random weights; the CPU run's tiny model has none)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    p.add_argument("--json", type=Path, help="results file (default on CUDA: profiles/results/<gpu>/corpus.json)")
    a = p.parse_args(argv)
    if a.json is not None:
        why = "--json must be a file path, got ''" if not str(a.json).strip() or str(a.json) == "." else writable_file(a.json)
        if why:
            p.error(f"--json: {why}")
    if a.pretrained is not None:
        if not a.pretrained.startswith("hf-hub:") and not (os.path.isfile(a.pretrained) or os.path.isdir(a.pretrained)):
            p.error(f"--pretrained: checkpoint not found (or not a file or folder): {a.pretrained!r}")
        if not torch.cuda.is_available():
            p.error("--pretrained needs CUDA: the CPU smoke run scores with bench.tiny's random-weight config")
    if torch.cuda.is_available():
        from fastlclip import get_model_config

        try:
            get_model_config(a.model)
        except (KeyError, ValueError, OSError) as e:
            p.error(f"--model: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    return a


def write_shards(folder: Path, shards: int, per_shard: int, size: int, fmt: str) -> list[str]:
    from tests.corpus_shards import npy_bytes, pt_bytes, write_tar

    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        x = rng.standard_normal((per_shard, 4, size, size), dtype=np.float32).astype(np.float16)
        members = [(f"{s:05d}{i:06d}", {f"latent.{fmt}": npy_bytes(x[i]) if fmt == "npy" else pt_bytes(torch.from_numpy(x[i])),
                                        "txt": b"a caption"}) for i in range(per_shard)]
        paths.append(str(folder / f"{s:05d}.tar"))
        write_tar(paths[-1], members)
    return paths


def worker_counts(most: int) -> list[int]:
    counts, w = [], 1
    while w < most:
        counts.append(w)
        w *= 2
    return counts + [most]


def run(shards, out: Path, engine: str, workers: int, kw: dict) -> dict:
    from fastlclip import corpus

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = corpus.score(shards, out, engine=engine, workers=workers, progress=False, **kw)
    wall = time.perf_counter() - t0
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} shards failed: {report.failed[0]['error']}")
    rows = report.rows
    read_s = sum(r["read_s"] for r in report.ok)
    model_s = sum(r["model_s"] for r in report.ok)
    write_s = sum(r["write_s"] for r in report.ok)
    return {"engine": engine, "workers": workers, "rows": rows, "wall_s": wall, "latents_per_s": rows / wall,
            "latents_per_s_per_worker": rows / wall / workers, "read_decode_s": read_s, "model_s": model_s,
            "write_s": write_s, "read_decode_ms_per_latent": 1e3 * read_s / rows, "model_ms_per_latent": 1e3 * model_s / rows,
            # wall time not spent in shards: process / actor start, model build, scheduling
            "overhead_s": wall - (read_s + model_s + write_s) / workers}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    per_shard = a.per_shard or (2048 if cuda else 64)
    batch = a.batch_size or (256 if cuda else 32)
    model = a.model if cuda else tiny.LATENT_CLIP
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    size = tiny.IMAGE_SIZE // 8 if not cuda else __import__("fastlclip").get_model_config(model).vision.latent_size
    if not cuda:
        print("CPU SMOKE RUN: no CUDA device. Tiny random-weight Latent-CLIP (bench.tiny, "
              f"{size}x{size} latents) on CPU: the figures below show that the pipeline runs and where time goes; "
              "they are NOT throughput results.")
    elif a.pretrained is None:
        print(f"{model} with random weights (timing does not depend on the weights).")
    warnings.filterwarnings("ignore", message=".*weights are random")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:fastlclip.corpus.scoring")  # worker processes too
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # tiny ops: more threads only add contention (workers get cpu_count // workers)
    try:
        return _main(a, argv, cuda, device_name, model, dtype, size, per_shard, batch)
    except (RuntimeError, ValueError, OSError, ImportError) as e:  # a failed run: one line, not a traceback
        print(f"python -m bench.corpus: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


def _main(a, argv, cuda, device_name, model, dtype, size, per_shard, batch) -> int:
    kw = dict(model=model, pretrained=a.pretrained, prompts=["a photo of a cat"], safety=True, embeddings=True,
              batch_size=batch, dtype=dtype)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        tmp = Path(tmp)
        shards = write_shards(tmp, a.shards, per_shard, size, a.format)
        print(f"{a.shards} shards x {per_shard} latents ({a.format}, fp16), batch {batch}, {dtype}, on {device_name}; "
              "columns: one prompt's cosine, safety margins + flag, fp16 embeddings", flush=True)
        for w in worker_counts(a.workers):
            rows.append(run(shards, tmp / f"local{w}", "local", w, kw))
            print(f"  local x{w}: {rows[-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
        ray_note = None
        if a.no_ray:
            ray_note = "skipped (--no-ray)"
        else:
            try:
                import ray
            except ImportError:
                ray_note = "not installed (pip install 'fastlclip[ray]')"
            else:
                started = not ray.is_initialized()
                if started:  # fractional CPUs per actor: whole ones deadlock small machines
                    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
                try:
                    rows.append(run(shards, tmp / "ray", "ray", a.workers, kw))
                finally:
                    if started:
                        ray.shutdown()

    head = f"{'engine':<8}{'workers':>8}{'wall s':>9}{'latents/s':>11}{'per worker':>12}{'read+decode':>13}{'model':>11}{'other s':>9}"
    print("\n" + head + "\n" + " " * 52 + "(ms/latent, worker time)")
    for r in rows:
        print(f"{r['engine']:<8}{r['workers']:>8}{r['wall_s']:>9.2f}{r['latents_per_s']:>11.0f}"
              f"{r['latents_per_s_per_worker']:>12.0f}{r['read_decode_ms_per_latent']:>13.3f}"
              f"{r['model_ms_per_latent']:>11.3f}{r['overhead_s']:>9.2f}")
    ray_row = next((r for r in rows if r["engine"] == "ray"), None)
    local_same = next((r for r in rows if r["engine"] == "local" and r["workers"] == a.workers), None)
    overhead = None
    if ray_row and local_same:
        overhead = {"workers": a.workers, "ray_wall_s": ray_row["wall_s"], "local_wall_s": local_same["wall_s"],
                    "overhead_s": ray_row["wall_s"] - local_same["wall_s"],
                    "overhead_fraction": ray_row["wall_s"] / local_same["wall_s"] - 1}
        print(f"\nRay vs local at {a.workers} workers: {overhead['overhead_s']:+.2f} s "
              f"({100 * overhead['overhead_fraction']:+.0f}%) on the same shards")
    else:
        print(f"\nRay: {ray_note}")
    report = {**run_record("bench.corpus", argv), "device": device_name, "smoke_test": not cuda,
              "model": model if isinstance(model, str) else "bench.tiny.LATENT_CLIP", "pretrained": a.pretrained,
              "dtype": dtype, "shards": a.shards, "per_shard": per_shard, "batch_size": batch, "format": a.format,
              "rows": rows, "ray_vs_local": overhead, "ray_note": ray_note}
    save_results(report, a.json, device_name, "corpus.json", measured=cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
