"""Where shards run. Every engine calls the same ``process_shard``, so outputs, manifest and resuming are the
same for all of them.

- ``local``: in this process (``workers=1``) or in ``workers`` spawned processes on this machine, each with
  its own model (on CUDA, worker ``i`` uses GPU ``i % device_count``).
- ``ray``: Ray Data. The shard list goes through ``map_batches`` with an actor class (``ShardScorer``) on an
  ``ActorPoolStrategy`` of ``workers`` actors; each actor builds the model once and writes its shards'
  outputs itself. One GPU per actor when the cluster has GPUs, else a fraction of a CPU (whole CPUs per
  actor deadlock small machines, where Ray Data's own tasks need CPUs too). Needs ``pip install
  'fastlclip[ray]'``; Ray Data's checkpointing is not used (resuming is ``process_shard``'s).
- ``RANK`` / ``WORLD_SIZE`` (torchrun, or a Slurm array with ``RANK=$SLURM_ARRAY_TASK_ID
  WORLD_SIZE=$SLURM_ARRAY_TASK_COUNT``): with the local engine, the sorted shard list is split so that
  shard ``i`` goes to rank ``i % WORLD_SIZE``; every rank writes into the same output folder.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable

import torch

from .runner import ShardOptions, process_shard
from .scoring import Scorer, ScoreSpec

ENGINES = ("local", "ray")
Report = Callable[[dict], None]


def rank_split(shards: list[str], env=os.environ) -> list[str]:
    """This rank's share of ``shards`` (sorted; shard i to rank i % WORLD_SIZE); all of them without RANK/WORLD_SIZE."""
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return shards
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"RANK={env.get('RANK')!r} and WORLD_SIZE={env.get('WORLD_SIZE')!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return sorted(shards)[rank::world]


def run_local(shards: list[str], spec: ScoreSpec, opts: ShardOptions, workers: int, report: Report,
              scorer: Scorer | None = None) -> list[dict]:
    """Score ``shards`` here (one worker; ``scorer``: one already built) or in ``workers`` spawned processes."""
    if workers == 1 or len(shards) <= 1:
        scorer = scorer or spec.build()
        records = []
        for shard in shards:
            records.append(process_shard(shard, scorer, opts))
            report(records[-1])
        return records
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    records = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(spec, opts, workers, counter)) as pool:
        futures = [pool.submit(_work, shard) for shard in shards]
        for f in as_completed(futures):
            records.append(f.result())
            report(records[-1])
    return records


_WORKER: tuple[Scorer, ShardOptions] | None = None


def _init_worker(spec: ScoreSpec, opts: ShardOptions, workers: int, counter) -> None:
    global _WORKER
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    device = spec.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{index % torch.cuda.device_count()}"
    elif device in (None, "cpu"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    _WORKER = (spec.build(device), opts)


def _work(shard: str) -> dict:
    scorer, opts = _WORKER
    return process_shard(shard, scorer, opts)


# -- Ray ---------------------------------------------------------------------------------------------
def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(f"engine='ray' needs Ray Data: pip install 'fastlclip[ray]' (import failed: {e})") from None
    return ray


class ShardScorer:
    """Ray Data actor: builds the scorer once, then scores whole shards, one per batch row."""

    def __init__(self, spec: ScoreSpec, opts: ShardOptions):
        self.scorer = spec.build()
        self.opts = opts

    def __call__(self, batch: dict) -> dict:
        records = [process_shard(str(s), self.scorer, self.opts) for s in batch["shard"]]
        return {"record": [json.dumps(r, default=str) for r in records]}


def run_ray(shards: list[str], spec: ScoreSpec, opts: ShardOptions, workers: int, report: Report) -> list[dict]:
    ray = _import_ray()
    if not ray.is_initialized():  # workers' output stays in Ray's log files: stderr has one line per shard
        ray.init(log_to_driver=False, logging_level=logging.ERROR)
    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.device is not None and torch.device(spec.device).type == "cuda" and not gpus:
        raise ValueError(f"device={spec.device!r}, but the Ray cluster has no GPUs; pass device='cpu' or leave it out")
    if gpus:
        resources = {"num_gpus": 1, "num_cpus": 1}
    else:  # fractional: Ray Data's read and output tasks need CPUs of their own
        cpus = ray.cluster_resources().get("CPU", 1)
        resources = {"num_cpus": max(0.1, min(0.5, (cpus - 1) / workers))}
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # one line per shard comes from ``report`` instead
    # A failure is raised to the caller, whose one line says why; Ray Data's own copy (a stack trace) stays quiet.
    quiet = [(log, log.level) for log in map(logging.getLogger, ("ray", "ray.data"))]
    for log, _ in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(ShardScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                            fn_constructor_kwargs={"spec": spec, "opts": opts}, **resources)
        records = []
        for row in ds.iter_rows():
            records.append(json.loads(row["record"]))
            report(records[-1])
        return records
    finally:
        ctx.enable_progress_bars = saved
        for log, level in quiet:
            log.setLevel(level)
