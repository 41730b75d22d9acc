"""Distillation cost: ``python -m bench.distill``.

Measures, on this machine, the samples/s of ``fastlclip.distill.make_targets`` (read, VAE decode, the teacher's
preprocessing and image tower, write) and of ``fastlclip.distill.train`` per backend (``eager``, ``triton``; one
sample = one forward and backward of the student), and the GPU-hours these imply per 100M samples. Beside them
it prints published anchors (not measured here).

On CUDA: a random-weight ``--vae`` (default ``flux1``) decoding ``--resolution`` px, the open_clip ``--teacher``
(default ``ViT-B-16``, random weights: the timing does not depend on them), and a ViT-B/16-sized student
(``Latent-ViT-B-4-512``'s image tower: width 768, 12 layers, 257 tokens, with the VAE's channels) in bf16
autocast. ``train``'s rate is taken between two runs of different lengths, so setup and the first steps'
compilation cancel. Without CUDA it is a smoke run of the tiny test world: it says so and its figures are not
throughput results.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.cli import Parser, positive_int, writable_file
from bench.provenance import run_record
from bench.report import NOT_MEASURED, fmt, save_results, table

SAMPLES = 100_000_000
ANCHORS = {
    "latent_clip_from_pixel_clip": {
        "stage1_gpu_hours": 384, "stage2_gpu_hours_at_most": 3072,
        "note": "the Latent-CLIP authors' unpublished start-from-pixel-CLIP recipe: stage 1 the patch embedding "
                "alone (100M samples x 5 epochs, 32 GPUs), stage 2 everything (500M x 6, 64 GPUs)"},
    "latent_clip_from_scratch_pairs": 2.7e9,
    "e_latentlpips_imagenet_top1": {"sd15": 69.9, "sdxl": 68.9, "sd3": 71.1, "flux": 66.2, "pixels": 73.4},
}


def parse_args(argv):
    p = Parser(prog="python -m bench.distill", description=__doc__.splitlines()[0])
    p.add_argument("--vae", default="flux1", help="registered VAE (CUDA; CPU uses the tiny test VAE)")
    p.add_argument("--teacher", default="ViT-B-16", help="open_clip model name (CUDA)")
    p.add_argument("--resolution", type=positive_int, default=512, help="decoded image size in px (CUDA)")
    p.add_argument("--samples", type=positive_int, default=None, help="latents for make_targets (1024 CUDA, 64 CPU)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: 64 CUDA, 16 CPU")
    p.add_argument("--steps", type=positive_int, default=None, help="train steps of the longer run (60 CUDA, 20 CPU)")
    p.add_argument("--backends", nargs="+", choices=("eager", "triton"), default=["eager", "triton"])
    p.add_argument("--json", type=Path, help="results file (default on CUDA: profiles/results/<gpu>/distill.json)")
    a = p.parse_args(argv)
    if a.json is not None and (why := writable_file(a.json)):
        p.error(why)
    if a.resolution % 8:
        p.error(f"--resolution must be a multiple of 8, got {a.resolution}")
    if a.steps is not None and a.steps < 2:
        p.error("--steps must be at least 2 (the rate is taken between runs of steps // 2 and steps)")
    return a


def _world(cuda: bool, a) -> dict:
    """VAE, teacher, student config and latent shape: the real sizes on CUDA, the tiny test world on CPU."""
    if not cuda:
        from tests import distill_world as w

        vae = w.make_vae()
        return {"vae": vae, "teacher": w.make_teacher(vae), "student": w.STUDENT,
                "shape": (16, w.IMAGE // 4, w.IMAGE // 4), "vae_name": "tiny 16-channel test VAE",
                "teacher_name": "tiny open_clip test teacher"}
    import open_clip

    import fastlclip
    from fastlclip.vaes import build_vae, latent_space

    vae = build_vae(a.vae, dtype=torch.bfloat16, device="cuda")
    teacher = open_clip.create_model(a.teacher).to("cuda", torch.bfloat16)
    channels = latent_space(a.vae).channels
    student = copy.deepcopy(fastlclip.model_configs._REGISTRY["Latent-ViT-B-4-512"])
    student["vision_cfg"]["latent_n_channels"] = channels
    student["embed_dim"] = int(teacher.text_projection.shape[1])
    side = a.resolution // 8
    student["vision_cfg"]["image_size"] = a.resolution  # 64x64 latents at 512 px: patch 4 -> 256 tokens
    return {"vae": vae, "teacher": teacher, "student": student, "shape": (channels, side, side), "vae_name": a.vae,
            "teacher_name": a.teacher}


def _write_shards(folder: Path, n: int, shape, shards: int = 4) -> list[Path]:
    import io
    import tarfile

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths, per = [], -(-n // shards)
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal(shape).astype(np.float16))
                info = tarfile.TarInfo(f"{i:08d}.latent.npy")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)
        paths.append(path)
    return paths


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def measure_targets(world, shards, out: Path, batch: int, cuda: bool) -> dict:
    from fastlclip import distill

    kw = dict(vae=world["vae"], teacher=world["teacher"], batch_size=batch, progress=False,
              dtype="bfloat16" if cuda else "float32")
    distill.make_targets(shards[:1], out.with_name("warmup"), **kw)  # kernels chosen, caches warm
    _sync(cuda)
    t = time.perf_counter()
    report = distill.make_targets(shards, out, **kw)
    _sync(cuda)
    wall = time.perf_counter() - t
    if report.failed:
        raise RuntimeError(f"make_targets failed: {report.failed[0]['error']}")
    return {"rows": report.rows, "wall_s": wall, "samples_per_s": report.rows / wall}


def measure_train(world, targets: Path, tmp: Path, backend: str, batch: int, steps: int) -> dict:
    from fastlclip import distill

    times = {}
    for n in (steps // 2, steps):
        t = time.perf_counter()
        distill.train(targets, tmp / f"run-{backend}-{n}", student=world["student"], teacher=world["teacher"],
                      steps=n, batch_size=batch, lr=1e-4, warmup_steps=1, save_every=n, log_every=n, holdout=0.0,
                      backend=backend, progress=False)
        times[n] = time.perf_counter() - t
    delta = times[steps] - times[steps // 2]
    rate = (steps - steps // 2) * batch / delta if delta > 0 else None
    return {"backend": backend, "batch_size": batch, "steps": [steps // 2, steps], "wall_s": [times[steps // 2],
            times[steps]], "samples_per_s": rate}


def gpu_hours(rate) -> float | str:
    return SAMPLES / rate / 3600 if isinstance(rate, (int, float)) and rate > 0 else NOT_MEASURED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    n = a.samples or (1024 if cuda else 64)
    batch = a.batch_size or (64 if cuda else 16)
    steps = a.steps or (60 if cuda else 20)
    if not cuda:
        print("CPU SMOKE RUN: no CUDA device. The tiny test world (16-channel VAE, one-layer teacher, two-layer student) "
              "on CPU: the figures below show that the pipeline runs; they are NOT throughput results.")
    warnings.filterwarnings("ignore", message=".*random")
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    try:
        world = _world(cuda, a)
        shards = _write_shards(tmp / "shards", n, world["shape"])
        targets = measure_targets(world, shards, tmp / "targets", batch, cuda)
        print(f"make_targets: {targets['rows']} latents {world['shape']} in {targets['wall_s']:.2f} s", flush=True)
        rows = []
        for backend in a.backends:
            try:
                rows.append(measure_train(world, tmp / "targets", tmp, backend, batch, steps))
            except Exception as e:  # e.g. a kernel without weight gradients: recorded, never a number
                rows.append({"backend": backend, "batch_size": batch, "samples_per_s": None,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)

    student = "tiny test student" if not cuda else "Latent-ViT-B-4-512 image tower (ViT-B/16-sized)"
    print(f"\n{device}; VAE {world['vae_name']}, teacher {world['teacher_name']}, student {student}; batch {batch}\n")
    lines = [["make_targets (read + decode + teacher + write)", "-", fmt(targets["samples_per_s"], ".1f"),
              fmt(gpu_hours(targets["samples_per_s"]), ".1f")]]
    for r in rows:
        rate = r["samples_per_s"] if r["samples_per_s"] is not None else r.get("error", NOT_MEASURED)
        lines.append(["train (forward + backward + AdamW)", r["backend"], fmt(rate, ".1f"),
                      fmt(gpu_hours(r["samples_per_s"]), ".1f")])
    print(table(["stage", "backend", "samples/s", "GPU-h per 100M samples"], lines))
    if not cuda:
        print("(CPU: 'GPU-h' above are CPU-hours of the tiny world, not an estimate for any GPU)")
    an = ANCHORS["latent_clip_from_pixel_clip"]
    top1 = ANCHORS["e_latentlpips_imagenet_top1"]
    print(f"\nAnchors (published, not measured here): Latent-CLIP from a pixel CLIP, about {an['stage1_gpu_hours']} "
          f"GPU-h for stage 1 and at most about {an['stage2_gpu_hours_at_most']} for stage 2; the from-scratch "
          f"Latent-CLIP saw {ANCHORS['latent_clip_from_scratch_pairs'] / 1e9:.1f}B pairs. E-LatentLPIPS ImageNet "
          f"top-1: SD1.5 {top1['sd15']}, SDXL {top1['sdxl']}, SD3 {top1['sd3']}, FLUX {top1['flux']} vs "
          f"{top1['pixels']} in pixels.")
    report = {**run_record("bench.distill", argv), "device": device, "smoke_test": not cuda,
              "vae": world["vae_name"], "teacher": world["teacher_name"], "student": student,
              "latent_shape": list(world["shape"]), "batch_size": batch,
              "make_targets": {**targets, "gpu_hours_per_100m": gpu_hours(targets["samples_per_s"])},
              "train": [{**r, "gpu_hours_per_100m": gpu_hours(r["samples_per_s"])} for r in rows],
              "anchors": ANCHORS}
    save_results(report, a.json, device, "distill.json", measured=cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
