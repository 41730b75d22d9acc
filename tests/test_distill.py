"""fastlclip.distill on a tiny world (tests/distill_world.py): targets, training, exact resume, DDP, evaluation."""

import copy
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distill_world as W
from corpus_shards import npy_bytes, png_bytes, write_tar

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(steps=30, batch_size=16, lr=1e-3, warmup_steps=5, save_every=10, seed=3)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """VAE, teacher (module and open_clip files), shards and targets; torch on one thread (2 busy cores)."""
    from fastlclip import distill
    from fastlclip.distill.teacher import register_teacher_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distill")
    vae = W.make_vae()
    teacher = W.make_teacher(vae)
    cfg_file, weights = W.save_teacher(teacher, root / "teacher")
    register_teacher_config("tiny-teacher", cfg_file)
    shards = W.write_shards(vae, root / "shards", 384, 96)
    report = distill.make_targets(shards, root / "targets", vae=vae, teacher=teacher, progress=False)
    assert len(report.ok) == 4 and report.rows == 384
    student = root / "student.json"
    student.write_text(json.dumps(W.STUDENT))
    w = dict(root=root, vae=vae, teacher=teacher, cfg_file=cfg_file, weights=weights, shards=shards,
             targets=root / "targets", student=student)
    # The torchrun run starts now, in the background: its processes' start-up overlaps the other tests.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastlclip.distill", *_cli_train(w, root / "ddp")]
    w["ddp"] = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: torchrun and its workers
    # So does the run that is SIGKILLed as soon as its first checkpoint exists.
    killed = root / "killed"
    cmd = [sys.executable, "-m", "fastlclip.distill", *_cli_train(w, killed)]
    w["killed"] = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    w["killer"] = threading.Thread(target=_kill_at_first_checkpoint, args=(w["killed"], killed / "checkpoint.pt"))
    w["killer"].start()
    yield w
    if w["ddp"].poll() is None:  # a test that did not wait for it
        os.killpg(w["ddp"].pid, signal.SIGKILL)
        w["ddp"].wait()
    w["killer"].join()
    torch.set_num_threads(threads)


def _kill_at_first_checkpoint(proc, checkpoint: Path) -> None:
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _train(world, out, **kw):
    from fastlclip import distill

    args = dict(student=str(world["student"]), teacher="tiny-teacher", teacher_pretrained=str(world["weights"]),
                progress=False, **RUN)
    args.update(kw)
    return distill.train(world["targets"], out, **args)


def _cli_train(world, out) -> list[str]:
    return ["train", str(world["targets"]), "--out", str(out), "--student", str(world["student"]),
            "--teacher", "tiny-teacher", "--teacher-config", str(world["cfg_file"]),
            "--teacher-pretrained", str(world["weights"]), "--steps", str(RUN["steps"]),
            "--batch-size", str(RUN["batch_size"]), "--lr", str(RUN["lr"]), "--warmup-steps", str(RUN["warmup_steps"]),
            "--save-every", str(RUN["save_every"]), "--seed", str(RUN["seed"])]


@pytest.fixture(scope="module")
def reference_run(world):
    """One uninterrupted single-process run: what resumed and DDP runs must reproduce."""
    return _train(world, world["root"] / "reference")


@pytest.fixture(scope="module")
def plain_student(world):
    return _train(world, world["root"] / "plain", steps=150, batch_size=32, lr=2e-3, warmup_steps=10,
                  save_every=150, eval_every=75, holdout=0.1, seed=0)


@pytest.fixture(scope="module")
def noise_aware_student(world):
    return _train(world, world["root"] / "noise-aware", steps=150, batch_size=32, lr=2e-3, warmup_steps=10,
                  save_every=150, holdout=0.1, seed=0, noise_aware=True)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_targets_are_the_teachers_embeddings_of_decoded_latents(world):
    """Against an independent float64 decode, preprocessing (32 px: no resize; OpenAI mean/std) and teacher."""
    from fastlclip.distill import read_targets

    t = read_targets(world["targets"])
    assert len(t) == 384 and t.info["latent_shape"] == [16, 8, 8] and len(set(t.keys)) == 384
    want = _float64_targets(world["vae"], world["teacher"], t.latents[:24])
    assert (t.embeddings[:24].double() - want).abs().max() < 2e-3  # stored as float16
    # the teacher is not degenerate: its embeddings do not all point one way
    e = F.normalize(t.embeddings.float(), dim=-1)
    assert (e @ F.normalize(e.mean(0), dim=0)).mean() < 0.5


def test_targets_resume_skips_finished_shards_and_refuses_other_settings(world):
    from fastlclip import distill

    report = distill.make_targets(world["shards"], world["targets"], vae=world["vae"], teacher=world["teacher"],
                                  progress=False)
    assert len(report.skipped) == 4 and not report.ok
    with pytest.raises(ValueError, match="other settings"):
        distill.make_targets(world["shards"], world["targets"], vae=world["vae"], teacher=world["teacher"],
                             space="diffusion", progress=False)


def test_diffusion_space_shards_give_the_same_targets(world, tmp_path):
    """Shards of pipeline latents (z = (raw - shift) * scaling, the VAE's own constants) with space='diffusion'."""
    from fastlclip import distill
    from fastlclip.corpus.readers import read_shard
    from fastlclip.vaes import latent_space

    space = latent_space(world["vae"])
    shard = tmp_path / "diffusion.tar"
    write_tar(shard, [(sample.key, {"latent.npy": npy_bytes(space.to_diffusion(sample.latent.double()).numpy())})
                      for sample in list(read_shard(world["shards"][0]))[:16]])
    distill.make_targets([shard], tmp_path / "t", vae=world["vae"], teacher=world["teacher"], space="diffusion",
                         progress=False)
    got, want = distill.read_targets(tmp_path / "t"), distill.read_targets(world["targets"])
    rows = [want.keys.index(k) for k in got.keys]
    assert len(rows) == 16
    assert (got.latents.float() - want.latents[rows].float()).abs().max() < 1e-2
    assert (got.embeddings.float() - want.embeddings[rows].float()).abs().max() < 2e-3


def test_cli_targets_from_a_diffusers_folder_and_open_clip_files(world, tmp_path):
    from fastlclip.distill import read_targets

    world["vae"].save_pretrained(tmp_path / "vae")
    argv = ["targets", str(world["shards"][0]), "--out", str(tmp_path / "t"), "--vae", str(tmp_path / "vae"),
            "--teacher", "tiny-teacher", "--teacher-config", str(world["cfg_file"]),
            "--teacher-pretrained", str(world["weights"])]
    assert _main(argv) == 0
    got, want = read_targets(tmp_path / "t"), read_targets(world["targets"])
    rows = [want.keys.index(k) for k in got.keys]
    assert len(rows) == 96 and torch.equal(got.latents, want.latents[rows])
    assert (got.embeddings.float() - want.embeddings[rows].float()).abs().max() < 2e-3


def test_cli_eval_prints_the_figures(world, plain_student, capsys):
    assert _main(["eval", str(plain_student), str(world["targets"]), "--classes", "red", "blue"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"rows", "cosine", "zeroshot_agreement", "baseline_cosine"}


def test_student_beats_the_mean_embedding_baseline(world, plain_student):
    from fastlclip import distill

    result = distill.evaluate(plain_student, world["targets"], classes=["red", "green", "blue", "grey"])
    assert result["rows"] > 20
    assert result["cosine"] > result["baseline_cosine"] + 0.3, result
    assert result["zeroshot_agreement"] > 0.4
    lines = [json.loads(x) for x in (plain_student.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert [x["step"] for x in lines if "loss" in x] == list(range(10, 151, 10))
    assert losses[-1] < losses[0] - 0.3
    assert [x["step"] for x in lines if "eval" in x] == [75, 150]


def test_checkpoint_is_a_complete_latent_clip_with_the_teachers_text_tower(world, plain_student):
    import fastlclip

    model = fastlclip.load(None, plain_student)
    tokens = fastlclip.tokenize(["a red square", "a photo of a dog"])
    with torch.no_grad():
        want = world["teacher"].encode_text(tokens, normalize=True)
        got = model.encode_text(tokens)
    assert (got - want).abs().max() < 1e-5
    assert model.logit_scale.item() == world["teacher"].logit_scale.item()
    assert model.cfg.vision.latent_channels == 16
    vae = world["vae"].config
    assert (model.latent_space.scaling_factor, model.latent_space.shift_factor) == (vae.scaling_factor,
                                                                                    vae.shift_factor)
    zs = fastlclip.ZeroShotClassifier(model, ["red", "blue"], ["a photo of a {}."], progress=False)
    raw = fastlclip.distill.read_targets(world["targets"]).latents[:4].float()
    assert zs.probs(raw, space="vae").shape == (4, 2)


def test_noise_aware_student_beats_a_plain_one_on_noised_latents(world, plain_student, noise_aware_student):
    """x_s = (1 - s) z + s eps in diffusion space (the VAE's own constants): the plain student reads it as a clean
    latent, the noise-aware one is told s. The noise is evaluate's (seed 0), so both see the same x_s."""
    import fastlclip
    from fastlclip import distill

    result = distill.evaluate(noise_aware_student, world["targets"], noise_levels=(0.5, 0.75))
    assert set(result["per_noise_level"]) == {"0.5", "0.75"}
    plain = fastlclip.load(None, plain_student)
    held = distill.read_targets(world["targets"]).split(0.1)[1]
    eps = torch.randn(len(held), *held.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    z = plain.latent_space.to_diffusion(held.latents.float())
    assert abs(z.std().item() - 1) < 0.1  # the test VAE's constants put its diffusion space at unit variance
    for s in (0.5, 0.75):
        with torch.no_grad():
            emb = plain.encode_latents((1 - s) * z + s * eps)
        plain_cos = (emb * F.normalize(held.embeddings.float(), dim=-1)).sum(-1).mean().item()
        assert result["per_noise_level"][str(s)]["cosine"] > plain_cos + 0.04, (s, result, plain_cos)
    assert result["per_noise_level"]["0.5"]["cosine"] > result["baseline_cosine"] + 0.2
    x = 0.5 * z + 0.5 * eps
    with pytest.raises(ValueError):
        plain.encode_latents(x, noise_level=0.5)


def test_resume_after_sigkill_is_exact(world, reference_run):
    """The CLI run started by ``world``, SIGKILLed at its first checkpoint, then the same settings again."""
    out = world["root"] / "killed"
    world["killer"].join()
    assert world["killed"].returncode == -signal.SIGKILL
    assert not (out / "final.safetensors").exists(), "the run ended before it could be killed"
    assert (out / "checkpoint.pt").exists(), world["killed"].stderr.read()[-2000:]
    final = _train(world, out)  # the same settings: resumes
    got, want = _weights(final), _weights(reference_run)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 31, 10))


def test_torchrun_two_processes_match_one(world, reference_run):
    """python -m torch.distributed.run --nproc_per_node 2 -m fastlclip.distill train ... (started by ``world``)."""
    _, err = world["ddp"].communicate(timeout=300)
    assert world["ddp"].returncode == 0, err[-3000:]
    got, want = _weights(world["root"] / "ddp" / "final.safetensors"), _weights(reference_run)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5, worst


def test_init_teacher_copies_the_tower_and_resamples_positions(world):
    import fastlclip
    from fastlclip import grids
    from fastlclip.distill.teacher import copy_image_tower
    from fastlclip.model_configs import ModelConfig

    cfg = dict(W.STUDENT, vae_cfg=W.VAE_CFG, vision_cfg=dict(W.STUDENT["vision_cfg"], layers=1))
    model = fastlclip.LatentCLIP(ModelConfig.from_dict(cfg))
    vit, src = model.visual.latent_vit, world["teacher"].visual
    conv = vit.conv1.weight.clone()
    copy_image_tower(vit, world["teacher"])
    assert torch.equal(vit.proj, src.proj) and torch.equal(vit.ln_post.weight, src.ln_post.weight)
    assert torch.equal(vit.transformer.resblocks[0].attn.in_proj_weight,
                       src.transformer.resblocks[0].attn.in_proj_weight)
    assert torch.equal(vit.conv1.weight, conv)  # the patch embedding is the student's own
    assert vit.positional_embedding.shape == (17, 64)
    assert torch.allclose(vit.positional_embedding, grids.resize_pos_embed(src.positional_embedding, (4, 4)))
    with pytest.raises(ValueError, match="match the teacher"):
        copy_image_tower(fastlclip.LatentCLIP(ModelConfig.from_dict(dict(cfg, vision_cfg=W.STUDENT["vision_cfg"])))
                         .visual.latent_vit, world["teacher"])


def test_two_stage_schedule():
    from fastlclip.distill.train import lr_lambda

    patch, rest = lr_lambda(0, 2, 10), lr_lambda(4, 2, 10)
    assert [patch(s) for s in (0, 1)] == [0.5, 1.0] and patch(10) == 0.0
    assert [rest(s) for s in range(6)] == [0, 0, 0, 0, 0.5, 1.0] and rest(10) == 0.0


def _main(argv) -> int:
    from fastlclip.distill.__main__ import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps"),
    (["--lr", "x"], "--lr"),
    (["--lr", "2"], "lr must be"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--holdout", "1.5"], "holdout"),
    (["--teacher", "no-such-model", "--teacher-config", None], "not an open_clip model"),
    (["--student", "nope.json"], "nope.json"),
    (["--teacher-pretrained", "/no/such/file.pt"], "does not exist"),
])
def test_cli_refuses_bad_arguments_in_one_line(world, capsys, args, message):
    argv = _cli_train(world, world["root"] / "never")
    for flag, value in zip(args[::2], args[1::2]):
        if value is None:  # drop the flag
            i = argv.index(flag)
            del argv[i:i + 2]
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (world["root"] / "never").exists()


def test_cli_refuses_a_folder_that_is_not_targets(world, capsys, tmp_path):
    argv = _cli_train(world, tmp_path / "run")
    argv[1] = str(tmp_path)
    assert _main(argv) == 2
    assert "not a targets folder" in capsys.readouterr().err


def test_image_shards_are_vae_encoded_and_the_image_itself_embedded(world, tmp_path):
    """PNG members (one wider than tall: centre-cropped); against float64 encode and teacher on the same pixels."""
    import numpy as np
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from fastlclip import distill

    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (32, 40 if i == 0 else 32, 3), dtype=np.uint8) for i in range(5)]
    shard = tmp_path / "images.tar"
    write_tar(shard, [(f"{i:04d}", {"png": png_bytes(p)}) for i, p in enumerate(pics)])
    report = distill.make_targets([shard], tmp_path / "t", vae=world["vae"], teacher=world["teacher"], progress=False)
    assert report.rows == 5 and not report.bad_samples
    t = distill.read_targets(tmp_path / "t")
    assert t.info["image_size"] == 32 and t.info["latent_shape"] == [16, 8, 8]
    x = torch.stack([torch.from_numpy(p[:, 4:36] if i == 0 else p).permute(2, 0, 1) for i, p in enumerate(pics)])
    x = x.double() / 255
    vae, teacher = copy.deepcopy(world["vae"]).double(), copy.deepcopy(world["teacher"]).double()
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = vae.encode(x * 2 - 1).latent_dist.mean
        emb = F.normalize(teacher.encode_image((x - mean) / std), dim=-1)
    assert (t.latents.double() - raw).abs().max() < 2e-3 * max(1.0, raw.abs().max().item())
    assert (t.embeddings.double() - emb).abs().max() < 2e-3


def test_bench_cpu_smoke_run(tmp_path, capsys):
    from bench import distill as bench_distill

    out = tmp_path / "distill.json"
    assert bench_distill.main(["--samples", "32", "--steps", "4", "--backends", "eager", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPU SMOKE RUN" in printed and "NOT throughput results" in printed and "384 GPU-h" in printed
    report = json.loads(out.read_text())
    assert report["smoke_test"] and report["command"].startswith("python -m bench.distill --samples 32")
    assert report["make_targets"]["rows"] == 32 and report["make_targets"]["samples_per_s"] > 0
    assert report["anchors"]["e_latentlpips_imagenet_top1"]["flux"] == 66.2


def test_triton_backend_trains_as_eager(world):
    """The fused kernels (under the interpreter on CPU) in training: every weight gradient of the image tower as
    eager's, and train(backend="triton") runs."""
    from fastlclip.kernels import launch

    if not launch.INTERPRET and not torch.cuda.is_available():
        pytest.skip("no Triton here: neither the interpreter nor a CUDA device")
    import fastlclip
    from fastlclip.distill.train import Student, distill_loss
    from fastlclip.runtime import activate

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = fastlclip.load(dict(W.STUDENT, vae_cfg=dict(W.VAE_CFG, scaling_factor=0.5, shift_factor=0.1)))
    fused = activate(copy.deepcopy(eager), "triton")
    raw, target = torch.randn(4, 16, 8, 8), torch.randn(4, 32)
    grads = []
    for model in (eager, fused):
        model.zero_grad()
        distill_loss(Student(model, False)(raw), target).backward()
        grads.append({n: p.grad for n, p in model.visual.latent_vit.named_parameters()})
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        assert (grads[1][name] - g).abs().max() <= 1e-4 * max(1e-3, g.abs().max().item()) + 1e-7, name
    runs = {b: _weights(_train(world, world["root"] / f"backend-{b}", steps=1, batch_size=4, warmup_steps=0,
                               save_every=1, backend=b)) for b in ("eager", "triton")}
    assert max((runs["eager"][k] - runs["triton"][k]).abs().max().item() for k in runs["eager"]) < 1e-5


# -- gaps found by mutation testing ---------------------------------------------------------------------------------
# Fast tests (no world fixture): a targets folder written directly, the tiny teacher built here, runs of a few steps.
# Their expectations are hand-written or computed from the documented recipe (data order, noise, loss) written out.
SCALE, SHIFT = 0.5, 0.1
SMALL_VAE = dict(W.VAE_CFG, scaling_factor=SCALE, shift_factor=SHIFT)


def _held(key: str, fraction: float) -> bool:
    """The documented split, written out: CRC32 of the key, per 100 000."""
    import zlib

    return zlib.crc32(key.encode()) % 100_000 < fraction * 100_000


def _write_targets(folder: Path, latents, embeddings, keys, per_file: int, vae="<AutoencoderKL module>") -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastlclip.distill.targets import KIND

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"kind": KIND, "vae": vae, "vae_cfg": SMALL_VAE,
                                                 "latent_shape": list(latents.shape[1:])}))
    for f, s in enumerate(range(0, len(keys), per_file)):
        lat = latents[s:s + per_file].half().flatten(1).numpy()
        emb = embeddings[s:s + per_file].half().numpy()
        table = pa.table({"key": keys[s:s + per_file],
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
                          "latent": pa.FixedSizeListArray.from_arrays(pa.array(lat.reshape(-1)), lat.shape[1])})
        # written in reverse name order: read_targets sorts the files
        pq.write_table(table, folder / f"{99 - f:05d}.parquet")
    empty = pa.table({"key": pa.array([], pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(0, np.float16)), 32),
                      "latent": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(0, np.float16)), 1024)})
    pq.write_table(empty, folder / "00000.parquet")  # a shard whose every sample was bad: skipped
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """24 rows of random latents (16x8x8) and unit embeddings in two files (reverse-sorted names), and the teacher."""
    import open_clip

    root = tmp_path_factory.mktemp("small")
    g = torch.Generator().manual_seed(5)
    keys = [f"s{i:03d}" for i in range(24)]
    lat = (torch.randn(24, 16, 8, 8, generator=g) * 2 + 0.3).half().float()
    emb = F.normalize(torch.randn(24, 32, generator=g), dim=-1).half().float()
    # the second file (rows 12..23) gets the lower name: sorted order is rows 12..23, then 0..11
    _write_targets(root / "targets", lat, emb, keys, 12)
    order = list(range(12, 24)) + list(range(12))
    torch.manual_seed(0)
    teacher = open_clip.model.CLIP(**W.TEACHER_CFG).eval()
    return dict(root=root, targets=root / "targets", keys=[keys[i] for i in order], latents=lat[order],
                embeddings=emb[order], teacher=teacher)


def _small_train(small, out, **kw):
    from fastlclip import distill

    args = dict(student=dict(W.STUDENT), teacher=small["teacher"], steps=4, batch_size=4, lr=1e-3, warmup_steps=1,
                save_every=2, log_every=1, seed=1, holdout=0.25, progress=False)
    args.update(kw)
    return distill.train(small["targets"], out, **args)


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_module():
    import importlib

    return importlib.import_module("fastlclip.distill.train")  # the package's `train` is the function


def test_read_targets_sorts_files_skips_empty_ones_and_splits_by_crc32(small):
    from fastlclip.distill import read_targets
    from fastlclip.distill.targets import is_holdout

    t = read_targets(small["targets"])
    assert t.keys == small["keys"] and len(t) == 24
    assert torch.equal(t.latents.float(), small["latents"]) and torch.equal(t.embeddings.float(), small["embeddings"])
    assert t.latents.dtype == t.embeddings.dtype == torch.float16 and t.info["latent_shape"] == [16, 8, 8]
    train_rows, held = t.split(0.25)
    want = [k for k in t.keys if _held(k, 0.25)]
    assert held.keys == want and train_rows.keys == [k for k in t.keys if k not in want]
    assert 0 < len(want) < 24
    rows = [t.keys.index(k) for k in held.keys]
    assert torch.equal(held.latents, t.latents[rows]) and torch.equal(held.embeddings, t.embeddings[rows])
    # CRC32("a") = 0xE8B7BE43 = 3904355907; 3904355907 % 100000 = 55907
    assert is_holdout("a", 0.56) and not is_holdout("a", 0.559) and not is_holdout("a", 0.0)
    assert t.split(0.0)[1].keys == [] and len(t.split(0.0)[0]) == 24


def test_read_targets_refuses_what_is_not_a_targets_folder(small, tmp_path):
    import shutil

    from fastlclip.distill import read_targets
    from fastlclip.distill.targets import KIND

    with pytest.raises(ValueError, match="no run.json"):
        read_targets(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "fastlclip.corpus scores"}))
    with pytest.raises(ValueError, match="corpus scores"):
        read_targets(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"kind": KIND, "latent_shape": [16, 8, 8]}))
    with pytest.raises(ValueError, match="no finished target files"):
        read_targets(tmp_path)
    shutil.copy(small["targets"] / "00000.parquet", tmp_path / "00000.parquet")
    with pytest.raises(ValueError, match="no target rows"):
        read_targets(tmp_path)
    dup = tmp_path / "dup"
    _write_targets(dup, small["latents"][:4], small["embeddings"][:4], ["a", "b", "a", "c"], 2)
    with pytest.raises(ValueError, match="more than one row"):
        read_targets(dup)


def test_distill_loss_is_one_minus_cosine_to_the_normalised_target():
    from fastlclip.distill.train import distill_loss

    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16)
    target = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float16)  # cosines 1 and 1/sqrt(2)
    loss = distill_loss(student, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx((0 + (1 - 2 ** -0.5)) / 2, abs=1e-6)
    assert distill_loss(student[:1], -target[:1]).item() == pytest.approx(2.0)


def test_lr_schedule_values():
    from fastlclip.distill.train import lr_lambda

    f = lr_lambda(0, 2, 10)  # warmup 0.5, 1; cosine over the 8 steps after
    assert f(6) == pytest.approx(0.5) and f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(10) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)  # past the end: stays at 0
    assert lr_lambda(0, 0, 10)(0) == 1.0 and lr_lambda(0, 0, 10)(5) == pytest.approx(0.5)  # no warmup
    g = lr_lambda(3, 1, 5)  # 0 before its start, one warmup step, then a one-step span
    assert [g(t) for t in range(6)] == [0.0, 0.0, 0.0, 1.0, 1.0, pytest.approx(0.0)]


def test_data_order_is_the_concatenated_seeded_permutations():
    from fastlclip.distill.train import DataOrder, step_noise

    n, b, seed = 10, 4, 3
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + e)) for e in range(3)]
    stream = torch.cat(perms)
    order = DataOrder(n, b, seed)
    for t in (0, 1, 2, 4, 3, 0, 6):  # epoch boundaries inside batches 2 and 4; out of order (cache)
        assert torch.equal(order.batch(t), stream[t * b:(t + 1) * b]), t
    assert not torch.equal(DataOrder(n, b, 4).batch(0), order.batch(0))
    s, eps = step_noise(seed, 5, 3, (2, 4, 4))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * 5 + 1)
    assert torch.equal(s, torch.rand(3, generator=g)) and torch.equal(eps, torch.randn(3, 2, 4, 4, generator=g))


def _model(noise_aware=False, layers=2):
    import fastlclip

    cfg = dict(W.STUDENT, vae_cfg=SMALL_VAE, text_cfg=dict(W.STUDENT["text_cfg"], context_length=77),
               vision_cfg=dict(W.STUDENT["vision_cfg"], noise_aware=noise_aware, layers=layers))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(cfg)
    model.check_finite = False
    if noise_aware:
        with torch.no_grad():
            for p in model.visual.latent_vit.noise_embed.parameters():
                p.normal_(0, 0.5)
    return model


def test_student_forward_renoises_in_diffusion_space():
    from fastlclip.distill.train import Student

    model = _model(noise_aware=True)
    g = torch.Generator().manual_seed(0)
    raw, eps, s = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g), torch.tensor([.2, .5, .9])
    z = (raw - SHIFT) * SCALE
    with torch.no_grad():
        got = Student(model, True)(raw, s, eps)
        want = model.encode_latents((1 - s.view(-1, 1, 1, 1)) * z + s.view(-1, 1, 1, 1) * eps, noise_level=s)
        assert torch.allclose(got, want, atol=1e-6)
        plain = _model()
        assert torch.allclose(Student(plain, False)(raw), plain.encode_latents(z), atol=1e-6)


def test_held_out_cosine_by_hand_in_chunks_and_per_noise_level():
    from fastlclip.distill.targets import Targets
    from fastlclip.distill.train import Student, held_out_cosine

    model = _model(noise_aware=True)
    g = torch.Generator().manual_seed(1)
    held = Targets(["a", "b", "c"], torch.randn(3, 16, 8, 8, generator=g).half(),
                   (torch.randn(3, 32, generator=g) * 3).half(), {})
    got = held_out_cosine(Student(model, True), held, (0.5, 0.75), seed=4, batch_size=2)
    target = F.normalize(held.embeddings.float(), dim=-1)
    z = (held.latents.float() - SHIFT) * SCALE
    eps = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert got["cosine"] == pytest.approx((model.encode_latents(z) * target).sum(-1).mean().item(), abs=1e-5)
        assert set(got["cosine_at"]) == {"0.5", "0.75"}
        for s in (0.5, 0.75):
            emb = model.encode_latents((1 - s) * z + s * eps, noise_level=s)
            assert got["cosine_at"][str(s)] == pytest.approx((emb * target).sum(-1).mean().item(), abs=1e-5)
    assert set(held_out_cosine(Student(model, True), held)) == {"cosine"}  # no levels asked: none reported


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps must be a positive"), (dict(steps=True), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(warmup_steps=-1), "warmup_steps must be a non-negative"), (dict(save_every=0), "save_every"),
    (dict(log_every=0), "log_every"), (dict(eval_every=0), "eval_every"), (dict(eval_every=1.5), "eval_every"),
    (dict(patch_steps=10), "below steps"), (dict(patch_steps=-1), "patch_steps"), (dict(lr=1), "lr"),
    (dict(lr=0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=True), "lr"), (dict(lr="0.1"), "lr"),
    (dict(weight_decay=1), "weight_decay"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay=False), "weight_decay"), (dict(holdout=1), "holdout"), (dict(holdout=-0.1), "holdout"),
    (dict(holdout="0.1"), "holdout"), (dict(init="pixel"), "init"), (dict(backend="cuda"), "backend"),
])
def test_check_train_args_bounds(change, message):
    from fastlclip.distill.train import check_train_args

    ok = dict(steps=10, batch_size=4, lr=0.5, warmup_steps=0, init="teacher", save_every=1, eval_every=None,
              patch_steps=9, holdout=0.0, weight_decay=0.0, log_every=1, backend="triton")
    check_train_args(**ok)  # every bound itself is accepted
    check_train_args(**dict(ok, patch_steps=0, eval_every=1, lr=1e-9, weight_decay=0.99, holdout=0.99))
    with pytest.raises(ValueError, match=message):
        check_train_args(**dict(ok, **change))


def _first_loss(small, cfg, seed, batch_size, holdout, noise_aware) -> float:
    """Step 1's loss from the recipe written out: init under ``seed``, batch 0 of epoch 0's permutation of the
    training rows, the step's noise, 1 - cos."""
    from fastlclip.model import LatentCLIP
    from fastlclip.model_configs import ModelConfig

    torch.manual_seed(seed)
    model = LatentCLIP(ModelConfig.from_dict(cfg, name="student"))
    model.check_finite = False
    rows = [i for i, k in enumerate(small["keys"]) if not _held(k, holdout)]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003))
    idx = torch.tensor(rows)[perm[:batch_size]]
    raw, target = small["latents"][idx], F.normalize(small["embeddings"][idx], dim=-1)
    with torch.no_grad():
        if noise_aware:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 1)
            s, eps = torch.rand(batch_size, generator=g), torch.randn(batch_size, 16, 8, 8, generator=g)
            x = (1 - s.view(-1, 1, 1, 1)) * (raw - SHIFT) * SCALE + s.view(-1, 1, 1, 1) * eps
            emb = model.encode_latents(x, noise_level=s)
        else:
            emb = model.encode_latents(raw, space="vae")
    return (1 - (emb * target).sum(-1)).mean().item()


@pytest.mark.parametrize("noise_aware", [False, True])
def test_first_step_loss_follows_the_recipe(small, tmp_path, noise_aware):
    from fastlclip.checkpoint import read_checkpoint

    final = _small_train(small, tmp_path / "run", steps=1, save_every=1, seed=2, noise_aware=noise_aware,
                         holdout=0.3)
    from fastlclip.checkpoint import SAFETENSORS_CONFIG_KEY

    _, meta = read_checkpoint(final)
    cfg = json.loads(meta[SAFETENSORS_CONFIG_KEY])
    assert cfg["vision_cfg"].get("noise_aware", False) is noise_aware and cfg["vae_cfg"] == SMALL_VAE
    assert json.loads(meta["fastlclip_distill"]) == {"teacher": "<CLIP module>", "holdout": 0.3, "noise_aware": noise_aware,
                                                     "steps": 1, "targets": str(small["targets"].resolve()),
                                                     "targets_vae": "<AutoencoderKL module>"}
    (line,) = _lines(tmp_path / "run")
    assert line["step"] == 1 and line["lr"] == pytest.approx(1e-3)
    assert line["loss"] == pytest.approx(_first_loss(small, cfg, 2, 4, 0.3, noise_aware), abs=1e-5)


def _float64_targets(vae, teacher, raw: torch.Tensor) -> torch.Tensor:
    """The targets written out in float64: decode the raw latents, map [-1, 1] to [0, 1], normalise with OpenAI's
    mean and std, embed with the teacher, L2-normalise."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    v64, t64 = copy.deepcopy(vae).double(), copy.deepcopy(teacher).double()
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        img = ((v64.decode(raw.double()).sample + 1) / 2).clamp(0, 1)
        return F.normalize(t64.encode_image((img - mean) / std), dim=-1)


def _capture_saves(train_mod, monkeypatch) -> list:
    """Every object the training run saves (a deep copy, as it was when saved), in order; still saved for real."""
    saved, real = [], train_mod.save_atomic

    def capture(obj, path):
        saved.append(copy.deepcopy(obj))
        real(obj, path)

    monkeypatch.setattr(train_mod, "save_atomic", capture)
    return saved


def test_resume_after_a_crash_is_exact_and_rewrites_the_lost_metrics(small, tmp_path, monkeypatch):
    """A run that dies at its second checkpoint (after logging steps 3 and 4) resumes from step 2 to the same
    weights and metrics as an uninterrupted one; other settings are refused."""
    import fastlclip

    train_mod = _train_module()
    real = train_mod.save_atomic
    saved = _capture_saves(train_mod, monkeypatch)
    ref = _small_train(small, tmp_path / "ref", eval_every=2, weight_decay=0.02)
    assert [s["step"] for s in saved] == [2, 4]
    opt = saved[0]["optimizer"]["param_groups"]
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in opt] == [(7.5e-4, 0.02, (0.9, 0.98), 1e-6)] * 2
    ref_lines = _lines(tmp_path / "ref")
    assert [x["step"] for x in ref_lines] == [1, 2, 2, 3, 4, 4] and "eval" in ref_lines[2] and "eval" in ref_lines[5]
    assert [x["lr"] for x in ref_lines if "lr" in x] == pytest.approx([1e-3, 7.5e-4, 2.5e-4, 0.0])

    def crash_at_second(obj, path):
        if obj["step"] > 2:
            raise RuntimeError("killed")
        real(obj, path)

    monkeypatch.setattr(train_mod, "save_atomic", crash_at_second)
    with pytest.raises(RuntimeError, match="killed"):
        _small_train(small, tmp_path / "run", eval_every=2, weight_decay=0.02)
    assert [x["step"] for x in _lines(tmp_path / "run")] == [1, 2, 2, 3, 4, 4]
    assert not (tmp_path / "run" / "final.safetensors").exists()
    monkeypatch.setattr(train_mod, "save_atomic", real)
    final = _small_train(small, tmp_path / "run", eval_every=2, weight_decay=0.02)
    assert _lines(tmp_path / "run") == ref_lines
    got, want = _weights(final), _weights(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list((tmp_path / "run").glob("*.tmp"))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and state["identity"]["weight_decay"] == 0.02
    # the text tower and logit scale are the teacher's, untouched by training
    teacher = small["teacher"].state_dict()
    assert torch.equal(got["token_embedding.weight"], teacher["token_embedding.weight"])
    assert torch.equal(got["text_projection"], teacher["text_projection"])
    assert torch.equal(got["logit_scale"], teacher["logit_scale"])
    # the held-out eval line, by hand
    model = fastlclip.load(None, final)
    held = [i for i, k in enumerate(small["keys"]) if _held(k, 0.25)]
    with torch.no_grad():
        emb = model.encode_latents(small["latents"][held], space="vae")
    want_cos = (emb * F.normalize(small["embeddings"][held], dim=-1)).sum(-1).mean().item()
    assert ref_lines[5]["eval"]["cosine"] == pytest.approx(want_cos, abs=1e-5)
    with pytest.raises(ValueError, match=r"\(lr differ\)"):
        _small_train(small, tmp_path / "run", eval_every=2, weight_decay=0.02, lr=2e-3)


def test_init_teacher_trains_the_patch_embedding_alone_first(small, tmp_path, monkeypatch):
    train_mod = _train_module()
    saved = _capture_saves(train_mod, monkeypatch)
    student = dict(W.STUDENT, vision_cfg=dict(W.STUDENT["vision_cfg"], layers=1))
    _small_train(small, tmp_path / "run", student=student, init="teacher", steps=3, patch_steps=2, save_every=1,
                 warmup_steps=1, lr=1e-2)
    src = small["teacher"].visual.state_dict()
    from fastlclip.distill.teacher import COPIED

    copied = [k for k in saved[0]["tower"] if k.startswith(COPIED)]
    assert "proj" in copied and "class_embedding" in copied and len(copied) > 6
    for state in saved[:2]:  # stage 1: the copied tower is the teacher's
        assert all(torch.equal(state["tower"][k], src[k]) for k in copied)
    assert not torch.equal(saved[1]["tower"]["conv1.weight"], saved[0]["tower"]["conv1.weight"])
    assert any(not torch.equal(saved[2]["tower"][k], src[k]) for k in copied)  # stage 2: everything
    # group 0 (patch) lr until step 2, then group 1's, each with its own warmup and cosine
    assert [x["lr"] for x in _lines(tmp_path / "run")] == pytest.approx([1e-2, 5e-3, 1e-2])
    assert saved[0]["identity"]["patch_steps"] == 2 and saved[0]["identity"]["init"] == "teacher"
    saved.clear()
    _small_train(small, tmp_path / "default", student=student, init="teacher", steps=6, save_every=6, log_every=6)
    assert saved[0]["identity"]["patch_steps"] == 1  # steps // 5
    saved.clear()
    _small_train(small, tmp_path / "scratch", steps=5, save_every=5, log_every=5)
    assert saved[0]["identity"]["patch_steps"] == 0


def test_train_refuses_mismatched_students_and_empty_training_sets(small, tmp_path):
    with pytest.raises(ValueError, match="embed_dim is 16"):
        _small_train(small, tmp_path / "a", student=dict(W.STUDENT, embed_dim=16))
    with pytest.raises(ValueError, match="16x8x8"):  # 48 px: neither 8x8 latents at 8x nor the targets' 32 px
        _small_train(small, tmp_path / "b", student=dict(W.STUDENT, vision_cfg=dict(W.STUDENT["vision_cfg"],
                                                                                     image_size=48)))
    with pytest.raises(ValueError, match="no training rows"):
        _small_train(small, tmp_path / "c", holdout=0.9999)


def test_trim_metrics_keeps_lines_up_to_the_checkpoint(tmp_path):
    from fastlclip.distill.train import _trim_metrics

    path = tmp_path / "metrics.jsonl"
    _trim_metrics(path, 3)
    assert not path.exists()
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4, 5)) + "\n")
    _trim_metrics(path, 3)
    assert path.read_text().splitlines() == [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3)]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    _trim_metrics(path, 0)
    assert path.read_text() == ""


def test_student_config_takes_the_targets_vae_and_the_teachers_text_tower(small):
    from fastlclip.distill.train import resolve_student, student_config, with_targets_vae

    info = {"vae": "sdxl", "vae_cfg": {"ignored": 1}, "latent_shape": [4, 8, 8]}
    cfg = with_targets_vae(dict(W.STUDENT, vae_cfg={"x": 1}), info)
    assert cfg["vae"] == "sdxl" and "vae_cfg" not in cfg
    assert with_targets_vae(dict(W.STUDENT, vae="sdxl"), info)["vae"] == "sdxl"
    with pytest.raises(ValueError, match="names the VAE 'flux1'"):
        with_targets_vae(dict(W.STUDENT, vae="flux1"), info)
    own = {"vae": "<module>", "vae_cfg": SMALL_VAE, "latent_shape": [16, 8, 8]}
    cfg = with_targets_vae(dict(W.STUDENT, vae="sdxl"), own)
    assert "vae" not in cfg and cfg["vae_cfg"] == SMALL_VAE
    full = student_config(dict(W.STUDENT), small["teacher"], own, noise_aware=True)
    assert full["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                "mlp_ratio": 4.0}
    assert full["vision_cfg"]["noise_aware"] is True and full["embed_dim"] == 32
    assert "noise_aware" not in student_config(dict(W.STUDENT), small["teacher"], own, False)["vision_cfg"]
    with pytest.raises(ValueError, match="16x8x4"):
        student_config(dict(W.STUDENT), small["teacher"], dict(own, latent_shape=[16, 8, 4]), False)
    src = dict(W.STUDENT)
    resolved = resolve_student(src)
    resolved["vision_cfg"]["width"] = 1
    assert src["vision_cfg"]["width"] == 64  # a deep copy
    with pytest.raises(ValueError, match="neither a registered config"):
        resolve_student("no-such-student")
    with pytest.raises(ValueError, match="vision_cfg"):
        resolve_student({"embed_dim": 32})


def test_evaluate_by_hand(small, tmp_path):
    """cosine, baseline, zero-shot agreement and per-noise-level figures against the formulas written out."""
    import fastlclip
    from fastlclip import distill

    for noise_aware in (False, True):
        final = _small_train(small, tmp_path / f"run{noise_aware}", steps=2, save_every=2, noise_aware=noise_aware,
                             holdout=0.3, eval_every=2)
        (evaluated,) = [x["eval"] for x in _lines(tmp_path / f"run{noise_aware}") if "eval" in x]
        assert set(evaluated) == ({"cosine", "cosine_at"} if noise_aware else {"cosine"})
        if noise_aware:  # the training run's eval: the three fixed noise levels
            assert set(evaluated["cosine_at"]) == {"0.25", "0.5", "0.75"}
        model = fastlclip.load(None, final)
        classes, templates = ["red", "blue", "green"], ("a photo of a {}.", "a {} thing.")
        held = [i for i, k in enumerate(small["keys"]) if _held(k, 0.3)]
        for holdout, rows in ((None, held), (0, list(range(24)))):
            got = distill.evaluate(final, small["targets"], classes, templates=templates, holdout=holdout,
                                   noise_levels=(0.4,), seed=6, batch_size=5)
            teacher = F.normalize(small["embeddings"][rows], dim=-1)
            raw = small["latents"][rows]
            with torch.no_grad():
                text = model.encode_text([t.format(c) for c in classes for t in templates]).view(3, 2, -1).mean(1)
                text = F.normalize(text, dim=-1)
                embs = {None: model.encode_latents(raw, space="vae")}
                if noise_aware:
                    eps = torch.randn(len(rows), 16, 8, 8, generator=torch.Generator().manual_seed(6))
                    embs[0.4] = model.encode_latents(0.6 * (raw - SHIFT) * SCALE + 0.4 * eps, noise_level=0.4)

            def fig(emb):
                return {"cosine": pytest.approx((emb * teacher).sum(-1).mean().item(), abs=1e-5),
                        "zeroshot_agreement": pytest.approx(
                            ((emb @ text.T).argmax(1) == (teacher @ text.T).argmax(1)).float().mean().item())}

            want = {"rows": len(rows), **fig(embs[None]),
                    "baseline_cosine": pytest.approx((teacher @ F.normalize(teacher.mean(0), dim=0)).mean().item(),
                                                     abs=1e-5)}
            if noise_aware:
                want["per_noise_level"] = {"0.4": fig(embs[0.4])}
            assert got == want, (noise_aware, holdout)
    assert set(distill.evaluate(final, small["targets"], holdout=0.3)) == {"rows", "cosine", "baseline_cosine",
                                                                             "per_noise_level"}
    assert set(distill.evaluate(final, small["targets"], holdout=0.3)["per_noise_level"]) == {"0.25", "0.5", "0.75"}
    with pytest.raises(ValueError, match="no held-out rows"):
        distill.evaluate(final, small["targets"], holdout=1e-9)


def test_teacher_preprocessing_is_open_clips_transform_on_tensors(small):
    """Resize of the shorter side (bicubic, antialiased) and centre crop, as torchvision does them for open_clip,
    then the tower's mean / std (its preprocess_cfg, else image_mean, else OpenAI's, written out)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from fastlclip.distill.teacher import embed_images, preprocess, resize_crop, teacher_mean_std

    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 40, 48, generator=g)
    want = TF.center_crop(TF.resize(img, 32, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1), 32)
    torch.testing.assert_close(resize_crop(img, 32), want, rtol=0, atol=1e-6)
    tall = torch.rand(1, 3, 50, 36, generator=g)
    want = TF.center_crop(TF.resize(tall, 32, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1), 32)
    torch.testing.assert_close(resize_crop(tall, 32), want, rtol=0, atol=1e-6)
    assert resize_crop(img[..., :32, :32], 32) is not None and torch.equal(resize_crop(img[..., :32, :32], 32),
                                                                            img[..., :32, :32])
    teacher = copy.deepcopy(small["teacher"])
    openai = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert teacher_mean_std(teacher) == openai
    teacher.visual.image_mean, teacher.visual.image_std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    assert teacher_mean_std(teacher) == ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    teacher.visual.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    assert teacher_mean_std(teacher) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    pix = TF.resize((x + 1) / 2, 32, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    torch.testing.assert_close(preprocess(teacher, x), (pix - 0.5) / 0.25, rtol=0, atol=1e-5)
    teacher.visual.image_size = 32  # an int, not a pair
    torch.testing.assert_close(preprocess(teacher, x[..., :32, :32]), ((x[..., :32, :32] + 1) / 2 - 0.5) / 0.25,
                               rtol=0, atol=1e-6)
    with torch.no_grad():
        want = F.normalize(teacher.encode_image((pix - 0.5) / 0.25), dim=-1)
        got = embed_images(teacher, x)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(embed_images(copy.deepcopy(teacher).double(), x), want, atol=1e-4)


def test_teacher_text_tower_config_state_and_refusals(small, tmp_path):
    import open_clip

    from fastlclip.distill.teacher import (check_teacher, copy_image_tower, load_teacher, register_teacher_config,
                                           text_config, text_state)

    teacher = small["teacher"]
    assert text_config(teacher) == {"embed_dim": 32, "text_cfg": {"context_length": 77, "vocab_size": 49408,
                                                                  "width": 32, "heads": 2, "layers": 1,
                                                                  "mlp_ratio": 4.0}}
    state = text_state(teacher)
    assert set(state) == {k for k in teacher.state_dict() if not k.startswith("visual.")}
    assert "logit_scale" in state and "text_projection" in state and "token_embedding.weight" in state
    quick = open_clip.model.CLIP(**W.TEACHER_CFG, quick_gelu=True)
    with pytest.raises(ValueError, match="text tower uses QuickGELU"):
        text_config(quick)
    student = _model(layers=1).visual.latent_vit
    with pytest.raises(ValueError, match="image tower uses QuickGELU"):
        copy_image_tower(student, quick)
    with pytest.raises(ValueError, match="open_clip CLIP with a ViT"):
        check_teacher(torch.nn.Linear(2, 2))
    model = load_teacher(copy.deepcopy(teacher).train().requires_grad_(True), device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-teacher'"):
        load_teacher("no-such-teacher")
    register_teacher_config("fast-tiny-teacher", W.TEACHER_CFG)
    with pytest.raises(FileNotFoundError, match="teacher weights not found"):
        load_teacher("fast-tiny-teacher", tmp_path / "missing.pt")
    weights = tmp_path / "w.pt"
    torch.save(teacher.state_dict(), weights)
    cfg_file = tmp_path / "other-tiny.json"
    cfg_file.write_text(json.dumps(W.TEACHER_CFG))
    loaded = load_teacher("fast-tiny-teacher-2", weights, cfg_file)  # registered from the file under this name
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in teacher.state_dict().items())
    assert not loaded.training
    with pytest.raises(ValueError, match="not a readable JSON file"):
        register_teacher_config("x", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="embed_dim, vision_cfg"):
        register_teacher_config("x", {"embed_dim": 32, "vision_cfg": {}})
    # the student tower must match: a wider one is refused, naming the first mismatch
    with pytest.raises(ValueError, match="match the teacher"):
        copy_image_tower(_model(layers=2).visual.latent_vit, teacher)


def _small_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**W.VAE_CFG).eval()
    vae.register_to_config(scaling_factor=SCALE, shift_factor=SHIFT)
    return vae


def _latent_shard(path: Path, latents, names) -> Path:
    write_tar(path, [(name, {"latent.npy": npy_bytes(x.numpy())}) for name, x in zip(names, latents)])
    return path


def test_make_targets_small_against_float64_decode_and_teacher(small, tmp_path):
    from fastlclip import distill

    vae, teacher = _small_vae(), small["teacher"]
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(5, 16, 8, 8, generator=g)
    shards = [_latent_shard(tmp_path / "a.tar", raw[:3], ["k0", "k1", "k2"]),
              _latent_shard(tmp_path / "b.tar", raw[3:], ["k3", "k4"])]
    report = distill.make_targets(shards, tmp_path / "t", vae=vae, teacher=teacher, batch_size=2, progress=False)
    assert report.rows == 5 and len(report.ok) == 2
    t = distill.read_targets(tmp_path / "t")
    assert t.info["latent_shape"] == [16, 8, 8] and t.info["space"] == "vae" and t.info["image_size"] is None
    assert t.info["teacher"] == "<CLIP module>" and t.info["dtype"] == "float32"
    rows = [t.keys.index(f"k{i}") for i in range(5)]
    assert torch.equal(t.latents[rows], raw.half())
    want = _float64_targets(vae, teacher, raw)
    assert (t.embeddings[rows].double() - want).abs().max() < 2e-3
    # diffusion-space shards: z = (raw - shift) * scale, decoded as raw
    z = (raw - SHIFT) * SCALE
    d = _latent_shard(tmp_path / "d.tar", z, [f"k{i}" for i in range(5)])
    distill.make_targets([d], tmp_path / "td", vae=vae, teacher=teacher, space="diffusion", progress=False)
    td = distill.read_targets(tmp_path / "td")
    rows = [td.keys.index(f"k{i}") for i in range(5)]
    assert (td.latents[rows].float() - raw).abs().max() < 1e-2
    assert (td.embeddings[rows].double() - want).abs().max() < 2e-3


def test_make_targets_checks_its_arguments_before_work(small, tmp_path):
    from fastlclip import distill

    vae, teacher = _small_vae(), small["teacher"]
    shard = _latent_shard(tmp_path / "a.tar", torch.randn(2, 16, 8, 8), ["a", "b"])
    four = _latent_shard(tmp_path / "four.tar", torch.randn(2, 4, 8, 8), ["a", "b"])
    for kw, message in ((dict(engine="spark"), "unknown engine"), (dict(batch_size=0), "batch_size must be a positive"),
                        (dict(batch_size=True), "batch_size"), (dict(workers=0), "workers must be"),
                        (dict(space="pixel"), "space must be"), (dict(on_error="ignore"), "on_error"),
                        (dict(dtype="float64"), "dtype must be")):
        with pytest.raises(ValueError, match=message):
            distill.make_targets([shard], tmp_path / "never", vae=vae, teacher=teacher, progress=False, **kw)
    with pytest.raises(ValueError, match="4 channels, the VAE 16"):
        distill.make_targets([four], tmp_path / "never", vae=vae, teacher=teacher, progress=False)
    assert not (tmp_path / "never").exists()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(ValueError, match="no readable"):
        distill.make_targets([bad], tmp_path / "never", vae=vae, teacher=teacher, progress=False)


def test_make_targets_of_image_shards_default_size_and_checks(small, tmp_path):
    import numpy as np

    from fastlclip import distill

    vae, teacher = _small_vae(), small["teacher"]
    rng = np.random.default_rng(1)
    pics = [rng.integers(0, 256, (34, 43, 3), dtype=np.uint8) for _ in range(2)]  # default size: 34 // 4 * 4 = 32
    shard = tmp_path / "images.tar"
    write_tar(shard, [(f"{i:04d}", {"png": png_bytes(p)}) for i, p in enumerate(pics)])
    for size in (30, 2, True):
        with pytest.raises(ValueError, match="multiple of the VAE's downsampling 4"):
            distill.make_targets([shard], tmp_path / "never", vae=vae, teacher=teacher, image_size=size, progress=False)
    report = distill.make_targets([shard], tmp_path / "t", vae=vae, teacher=teacher, progress=False)
    assert report.rows == 2
    t = distill.read_targets(tmp_path / "t")
    assert t.info["image_size"] == 32 and t.info["latent_shape"] == [16, 8, 8]
    report = distill.make_targets([shard], tmp_path / "t16", vae=vae, teacher=teacher, image_size=16, progress=False)
    assert distill.read_targets(tmp_path / "t16").info["latent_shape"] == [16, 4, 4]


def test_cli_in_process_on_the_small_targets(small, tmp_path, capsys):
    from fastlclip.distill.__main__ import main

    cfg_file, weights = W.save_teacher(small["teacher"], tmp_path / "teacher")
    student = tmp_path / "student.json"
    student.write_text(json.dumps(W.STUDENT))
    base = ["train", str(small["targets"]), "--out", str(tmp_path / "run"), "--student", str(student),
            "--teacher", "tiny-teacher", "--teacher-config", str(cfg_file), "--teacher-pretrained", str(weights),
            "--steps", "2", "--batch-size", "4", "--lr", "0.001", "--warmup-steps", "0", "--save-every", "2",
            "--seed", "0", "--holdout", "0.3", "--log-every", "1"]
    for change, message in ((["--teacher-config", str(tmp_path / "none.json")], "does not exist"),
                            (["--teacher-pretrained", str(tmp_path / "none.pt")], "does not exist"),
                            (["--patch-steps", "2"], "below steps"), (["--weight-decay", "1"], "weight_decay"),
                            (["--holdout", "1"], "holdout")):
        argv = list(base)
        if change[0] in argv:
            argv[argv.index(change[0]) + 1] = change[1]
        else:
            argv += change
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    argv = list(base)
    argv[1] = str(tmp_path)
    assert main(argv) == 2 and "not a targets folder" in capsys.readouterr().err
    assert main(base) == 0
    final = tmp_path / "run" / "final.safetensors"
    assert capsys.readouterr().out.strip() == str(final)
    assert [x["step"] for x in _lines(tmp_path / "run")] == [1, 2]
    assert main(["eval", str(final), str(small["targets"]), "--holdout", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 24 and set(result) == {"rows", "cosine", "baseline_cosine"}
    for argv, message in ((["eval", str(tmp_path / "none"), str(small["targets"])], "does not exist"),
                          (["eval", str(final), str(tmp_path)], "not a targets folder"),
                          (["eval", str(final), str(small["targets"]), "--holdout", "1"], "--holdout"),
                          (["eval", str(final), str(small["targets"]), "--holdout", "-0.1"], "--holdout"),
                          (["targets", str(tmp_path / "none.tar"), "--out", str(tmp_path / "x"), "--vae", "sdxl",
                            "--teacher", "tiny-teacher"], "none.tar"),
                          (["targets", str(small["targets"] / "00000.parquet"), "--out", str(tmp_path / "x"),
                            "--vae", "no-such-vae", "--teacher", "tiny-teacher"], "no-such-vae")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_first_sample_skips_bad_samples_and_shards_and_unwraps_a_batch_of_one(small, tmp_path):
    from fastlclip import distill

    bad_shard = tmp_path / "0-bad.tar"
    bad_shard.write_bytes(b"not a tar file at all" * 40)
    shard = tmp_path / "1-good.tar"
    write_tar(shard, [("a", {"latent.npy": b"not an npy file"}),
                      ("b", {"latent.npy": npy_bytes(torch.randn(1, 16, 8, 8).numpy())})])  # (1, C, H, W): a batch of one
    report = distill.make_targets([bad_shard, shard], tmp_path / "t", vae=_small_vae(), teacher=small["teacher"],
                                  progress=False)
    assert report.rows == 1 and len(report.failed) == 1
    assert distill.read_targets(tmp_path / "t").info["latent_shape"] == [16, 8, 8]


def test_vae_downsampling_and_registered_students():
    from fastlclip.distill.targets import _downsampling
    from fastlclip.distill.train import resolve_student
    from fastlclip.model_configs import _REGISTRY

    assert _downsampling({"block_out_channels": [1, 2, 3, 4]}) == 8
    assert _downsampling({"block_out_channels": [1, 2]}) == 2
    assert _downsampling({"encoder_block_out_channels": [1, 1, 1]}) == 4  # AutoencoderTiny's key
    assert _downsampling({}) == 8  # neither: the usual 4 blocks
    name = sorted(_REGISTRY)[0]
    cfg = resolve_student(name)
    assert cfg == _REGISTRY[name] and cfg is not _REGISTRY[name]
    cfg["vision_cfg"]["width"] = -1  # a deep copy: the registry is untouched
    assert _REGISTRY[name]["vision_cfg"]["width"] != -1


def test_holdout_boundary_and_subsets_keep_the_folder_info():
    from fastlclip.distill.targets import Targets, is_holdout

    # CRC32("b") % 100000 = 38681, and 0.38681 * 100000 is exactly 38681.0: the split is strict
    assert not is_holdout("b", 0.38681) and is_holdout("b", 0.38682)
    t = Targets(["a", "b", "c"], torch.zeros(3, 1, 1, 1), torch.zeros(3, 2), {"kind": "x"})
    rows, held = t.split(0.5)
    assert rows.info == held.info == {"kind": "x"} and rows.keys == ["a"] and held.keys == ["b", "c"]


def test_train_by_teacher_name_config_and_weights(small, tmp_path):
    """A teacher given by name, config and weights file: its text tower is the student's, its label and resolved
    weights path are the run's identity (other weights are refused on resume); arguments are checked first."""
    import shutil
    import uuid

    from fastlclip.checkpoint import read_checkpoint

    _, weights = W.save_teacher(small["teacher"], tmp_path / "teacher")
    name = f"small-cfg-teacher-{uuid.uuid4().hex[:8]}"  # open_clip's registry outlives a test: a name never used
    args = dict(teacher=name, teacher_config=dict(W.TEACHER_CFG), teacher_pretrained=str(weights),
                steps=1, save_every=1)
    final = _small_train(small, tmp_path / "run", **args)
    got, teacher = _weights(final), small["teacher"].state_dict()
    for k in ("token_embedding.weight", "text_projection", "positional_embedding", "logit_scale"):
        assert torch.equal(got[k], teacher[k]), k
    assert json.loads(read_checkpoint(final)[1]["fastlclip_distill"])["teacher"] == name
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["identity"]["teacher"] == name
    assert state["identity"]["teacher_pretrained"] == str(weights.resolve())
    other = tmp_path / "other.pt"
    shutil.copy(weights, other)
    with pytest.raises(ValueError, match=r"\(teacher_pretrained differ\)"):
        _small_train(small, tmp_path / "run", **dict(args, teacher_pretrained=str(other)))
    with pytest.raises(ValueError, match="below steps"):
        _small_train(small, tmp_path / "never", patch_steps=4)
    with pytest.raises(ValueError, match="eval_every"):
        _small_train(small, tmp_path / "never", eval_every=0)
    assert not (tmp_path / "never").exists()


def test_train_defaults(small, tmp_path):
    from fastlclip import distill

    run_dir = tmp_path / "new" / "run"  # folders made as needed
    distill.train(small["targets"], run_dir, student=dict(W.STUDENT), teacher=small["teacher"], steps=12,
                  batch_size=4, lr=1e-3, warmup_steps=0)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    identity = dict(state["identity"])  # what a resume must match, written out
    student = identity.pop("student")
    files = sorted(small["targets"].glob("*.parquet"))  # the digests, by hand: run.json, then the sorted files
    targets_sha = hashlib.sha256("".join(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()};"
                                         for f in [small["targets"] / "run.json", *files]).encode()).hexdigest()
    teacher_sha = hashlib.sha256()
    for name, t in small["teacher"].state_dict().items():
        teacher_sha.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode() + t.contiguous().numpy().tobytes())
    assert identity == {"targets": str(Path(small["targets"]).resolve()), "target_rows": 24, "teacher": "<CLIP module>",
                        "teacher_pretrained": None, "steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0,
                        "init": "scratch", "noise_aware": False, "seed": 0, "patch_steps": 0, "holdout": 0.05,
                        "weight_decay": 0.0, "targets_sha256": targets_sha,
                        "teacher_module_sha256": teacher_sha.hexdigest()}
    # the geometry of the targets' VAE (4x: 32 px images for the 8x8 latents), the tower as written
    assert student["vision_cfg"] == dict(W.STUDENT["vision_cfg"], image_size=32, latent_factor=4)
    assert student["embed_dim"] == W.STUDENT["embed_dim"]
    assert [x["step"] for x in _lines(run_dir)] == [10, 12]  # every 10 steps and the last; no eval lines


class _Boom:
    """Unpickling this would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles_code_from_a_checkpoint(small, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    torch.save({"identity": {}, "payload": _Boom(str(marker))}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint.pt can't be read \\(UnpicklingError: .*not a fastlclip.distill "
                                         "checkpoint"):
        _small_train(small, tmp_path / "run")
    assert not marker.exists()


# -- gaps found by mutation testing: teacher.py and the rest of targets.py -------------------------------------------

def test_copy_image_tower_copies_every_tower_tensor_and_resamples_positions(small):
    """Every class-token / ln_pre / transformer / ln_post / proj tensor equal to the teacher's, the patch embedding
    the student's own, the positional table's class row kept and its 4x4 grid resampled to the student's 2x2 with
    bicubic antialiased interpolation (open_clip's resize_pos_embed, written out with F.interpolate)."""
    import fastlclip
    from fastlclip.distill.teacher import copy_image_tower

    teacher = copy.deepcopy(small["teacher"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # no tensor left at its init value (layer norms start at 1 and 0 in both models)
        for p in teacher.visual.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    cfg = dict(W.STUDENT, vae_cfg=SMALL_VAE, text_cfg=dict(W.STUDENT["text_cfg"], context_length=77),
               vision_cfg=dict(W.STUDENT["vision_cfg"], layers=1, patch_size=4))  # 8x8 latents, patch 4: 2x2 grid
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = fastlclip.load(cfg).visual.latent_vit
    own_before = {k: v.clone() for k, v in vit.state_dict().items()}
    copy_image_tower(vit, teacher)
    src = teacher.visual.state_dict()
    got = vit.state_dict()
    copied = [k for k in src if k.split(".")[0] in ("class_embedding", "ln_pre", "transformer", "ln_post", "proj")]
    assert len(copied) > 10 and "proj" in copied and "class_embedding" in copied
    for k in copied:
        assert torch.equal(got[k], src[k]), k
        assert not torch.equal(own_before[k], src[k]), k  # the copy changed it
    for k in got:
        if k not in copied and k != "positional_embedding":
            assert torch.equal(got[k], own_before[k]), k  # conv1 and everything else: the student's own
    pos = src["positional_embedding"]
    assert pos.shape == (17, 64) and got["positional_embedding"].shape == (5, 64)
    grid = pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
    want = torch.cat([pos[:1], want.permute(0, 2, 3, 1).reshape(4, 64)])
    torch.testing.assert_close(got["positional_embedding"], want, rtol=0, atol=1e-6)


def test_register_teacher_config_under_a_fresh_name_from_a_dict_and_a_file(tmp_path):
    """open_clip's registry lives as long as the process, so each check uses a name no other test registered."""
    import uuid

    import open_clip

    from fastlclip.distill.teacher import load_teacher, register_teacher_config

    cfg = json.loads(json.dumps(W.TEACHER_CFG))
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    assert name not in open_clip.list_models()
    register_teacher_config(name, cfg)
    assert open_clip.get_model_config(name) == cfg
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(dict(cfg, embed_dim=16)), encoding="utf-8")
    register_teacher_config(name + "-file", cfg_file)
    assert open_clip.get_model_config(name + "-file") == dict(cfg, embed_dim=16)
    by_load = f"fresh-{uuid.uuid4().hex[:8]}"  # load_teacher registers the config under the teacher's name
    model = load_teacher(by_load, config=cfg_file)
    assert by_load in open_clip.list_models() and model.visual.output_dim == 16 and not model.training


def test_teacher_preprocessing_clamps_decodes_outside_minus_one_one(small):
    """A VAE decode overshoots [-1, 1]: the pixels are clamped to [0, 1] before the mean / std (as a decoded image
    saved to uint8 and read back by open_clip would be)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from fastlclip.distill.teacher import preprocess

    g = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1) * 1.8  # about 45 % of the values beyond +-1
    pix = ((x.double() + 1) / 2).clamp(0, 1)
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(small["teacher"], x).double(), (pix - mean) / std, rtol=0, atol=1e-5)


def test_copy_image_tower_refusals_name_the_first_mismatch(small):
    """A deeper student (keys the teacher lacks), a narrower one (same keys, other shapes), a deeper teacher (keys
    the student lacks): each refused before anything is copied, naming what differs."""
    import open_clip

    import fastlclip
    from fastlclip.distill.teacher import copy_image_tower

    def student(**kw):
        cfg = dict(W.STUDENT, vae_cfg=SMALL_VAE, text_cfg=dict(W.STUDENT["text_cfg"], context_length=77),
                   vision_cfg=dict(W.STUDENT["vision_cfg"], **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fastlclip.load(cfg).visual.latent_vit

    block1 = "['transformer.resblocks.1.attn.in_proj_bias', 'transformer.resblocks.1.attn.in_proj_weight', " \
             "'transformer.resblocks.1.attn.out_proj.bias', 'transformer.resblocks.1.attn.out_proj.weight']"
    deep_teacher = open_clip.model.CLIP(**dict(W.TEACHER_CFG, vision_cfg=dict(W.TEACHER_CFG["vision_cfg"], layers=2)))
    for vit, teacher, detail in (
            (student(layers=2), small["teacher"], "missing " + block1),
            (student(layers=1, width=32), small["teacher"], "class_embedding is (64,) in the teacher, (32,) in the student"),
            (student(layers=1), deep_teacher, "unexpected " + block1)):
        before = {k: v.clone() for k, v in vit.state_dict().items()}
        with pytest.raises(ValueError) as e:
            copy_image_tower(vit, teacher)
        assert str(e.value).endswith("(width, layers, heads, MLP ratio, embed_dim): " + detail), str(e.value)
        assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


def test_load_teacher_moves_to_the_device_and_check_teacher_needs_both_towers(small):
    from fastlclip.distill.teacher import check_teacher, load_teacher

    model = load_teacher(copy.deepcopy(small["teacher"]), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    same = copy.deepcopy(small["teacher"])
    assert load_teacher(same) is same and {p.device.type for p in same.parameters()} == {"cpu"}
    no_text = torch.nn.Module()
    no_text.visual = copy.deepcopy(small["teacher"].visual)  # a ViT tower, no token_embedding
    no_vit = torch.nn.Module()
    no_vit.visual, no_vit.token_embedding = torch.nn.Linear(2, 2), torch.nn.Embedding(4, 2)  # no conv1: not a ViT
    for bad in (no_text, no_vit):
        with pytest.raises(ValueError, match="open_clip CLIP with a ViT image tower"):
            check_teacher(bad)
    check_teacher(small["teacher"])


def test_target_spec_identity_and_build(small, tmp_path, monkeypatch):
    """The run.json identity written out by hand: module labels, a registered name kept, paths made absolute."""
    from fastlclip.distill.targets import KIND, TargetSpec

    vae, teacher = _small_vae(), small["teacher"]
    spec = TargetSpec(vae=vae, teacher=teacher, shape=(16, 8, 8), vae_cfg={"a": 1})
    assert spec.identity() == {
        "kind": KIND, "vae": "<AutoencoderKL module>", "vae_cfg": {"a": 1}, "teacher": "<CLIP module>",
        "teacher_pretrained": None, "teacher_config": None, "space": "vae", "latent_shape": [16, 8, 8],
        "image_size": None, "dtype": "float32"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae_dir").mkdir()
    (tmp_path / "w.pt").write_bytes(b"")
    spec = TargetSpec(vae="vae_dir", teacher="tiny", teacher_pretrained="w.pt", teacher_config={"embed_dim": 8},
                      space="diffusion", shape=(4, 2, 2), image_size=16, dtype="bfloat16")
    assert spec.identity() == {
        "kind": KIND, "vae": str(tmp_path / "vae_dir"), "vae_cfg": {}, "teacher": "tiny",
        "teacher_pretrained": str(tmp_path / "w.pt"), "teacher_config": {"embed_dim": 8}, "space": "diffusion",
        "latent_shape": [4, 2, 2], "image_size": 16, "dtype": "bfloat16"}
    spec = TargetSpec(vae="sdxl", teacher="tiny", teacher_pretrained="not-here.pt")  # kept as given
    assert (spec.identity()["vae"], spec.identity()["teacher_pretrained"]) == ("sdxl", "not-here.pt")
    # build(device) puts the VAE and the teacher there
    spec = TargetSpec(vae=copy.deepcopy(vae), teacher=copy.deepcopy(teacher), shape=(16, 8, 8),
                      vae_cfg=dict(SMALL_VAE), device="cpu")
    scorer = spec.build("meta")
    assert scorer.device == torch.device("meta") and scorer.vae.device.type == "meta"
    assert {p.device.type for p in scorer.teacher.parameters()} == {"meta"}


def test_target_scorer_builds_the_named_teacher_in_the_specs_dtype_and_device(small, tmp_path):
    """A teacher by a fresh name (its config registered, its weights loaded), the VAE frozen in eval mode, both in
    the spec's dtype; the device: build()'s, else the spec's, else the default (CPU here)."""
    import types
    import uuid

    from fastlclip.corpus.runner import BadSample
    from fastlclip.distill.targets import TargetSpec

    vae, teacher = _small_vae(), small["teacher"]
    weights = tmp_path / "w.pt"
    torch.save(teacher.state_dict(), weights)
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    spec = TargetSpec(vae=copy.deepcopy(vae), teacher=name, teacher_pretrained=str(weights),
                      teacher_config=json.loads(json.dumps(W.TEACHER_CFG)), shape=(16, 8, 8), vae_cfg=dict(SMALL_VAE),
                      dtype="float64")
    scorer = spec.build()
    assert scorer.device == torch.device("cpu") and scorer.shape == (16, 8, 8) and scorer.embed_dim == 32
    assert scorer.vae.dtype == torch.float64 and not scorer.vae.training
    assert not any(p.requires_grad for p in scorer.vae.parameters())
    got = scorer.teacher.state_dict()
    assert all(got[k].dtype == torch.float64 and torch.equal(got[k], v.double()) for k, v in teacher.state_dict().items()
               if v.is_floating_point())
    meta = TargetSpec(vae=copy.deepcopy(vae), teacher=copy.deepcopy(teacher), shape=(16, 8, 8),
                      vae_cfg=dict(SMALL_VAE), device="meta").build()  # no device given: the spec's
    assert meta.device == torch.device("meta") and meta.vae.device.type == "meta"
    assert {p.device.type for p in meta.teacher.parameters()} == {"meta"}
    # image shards: uint8 (3, H, W) only, scaled by 1 / 255 (no resize at the crop size)
    img = TargetSpec(vae=vae, teacher=teacher, shape=(16, 8, 8), vae_cfg=dict(SMALL_VAE), image_size=32)
    scorer = img.build()
    x = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 32, 32)
    got = scorer.check(types.SimpleNamespace(error=None, latent=x))
    torch.testing.assert_close(got, x.double().div(255).float(), rtol=0, atol=1e-7)
    assert got.max() == 1 and got.min() == 0
    for bad in (x.float(), x[:1], x[0], x[:, 0], x[None]):  # float, 1 channel, 2-D, (3, W), 4-D
        with pytest.raises(BadSample, match="not an RGB image"):
            scorer.check(types.SimpleNamespace(error=None, latent=bad))
    with pytest.raises(BadSample, match="broken"):
        scorer.check(types.SimpleNamespace(error="broken", latent=None))


def test_make_targets_with_a_teacher_by_name_config_file_weights_and_dtype(small, tmp_path, capsys):
    """The teacher by a fresh name (config from a JSON file, weights from a file), float16: the run.json records
    each as given, the embeddings match the module teacher's float64 ones, and progress lines go to stderr."""
    import uuid

    from fastlclip import distill

    vae, teacher = _small_vae(), small["teacher"]
    cfg_file, weights = W.save_teacher(teacher, tmp_path / "teacher")
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    raw = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    shard = _latent_shard(tmp_path / "a.tar", raw, ["k0", "k1", "k2"])
    report = distill.make_targets([shard], tmp_path / "t", vae=vae, teacher=name, teacher_config=str(cfg_file),
                                  teacher_pretrained=weights, dtype="float16", device="cpu")
    assert report.rows == 3
    assert "1/1" in capsys.readouterr().err  # progress on by default: shard 1 of 1
    t = distill.read_targets(tmp_path / "t")
    assert t.info["teacher"] == name and t.info["teacher_pretrained"] == str(weights.resolve())
    assert t.info["teacher_config"] == json.loads(cfg_file.read_text()) and t.info["dtype"] == "float16"
    want = _float64_targets(vae, teacher, raw)
    rows = [t.keys.index(f"k{i}") for i in range(3)]
    assert (t.embeddings[rows].double() - want).abs().max() < 2e-2  # float16 decode and teacher
    for dtype in ("bfloat16",):
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        distill.make_targets([shard], tmp_path / dtype, vae=vae, teacher=teacher, dtype=dtype, progress=False)
        assert distill.read_targets(tmp_path / dtype).info["dtype"] == dtype
        # the modules given are the caller's: scored in bfloat16 by copies, never cast in place
        assert {p.dtype for p in [*vae.parameters(), *teacher.parameters()]} == {torch.float32}
        assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


# -- gaps found by mutation testing: the command line (parser and main without the world) -----------------------
def _parse(argv) -> dict:
    from fastlclip.distill.__main__ import parser

    return vars(parser().parse_args([str(a) for a in argv]))


_TARGETS = ["targets", "a.tar", "--out", "o", "--vae", "sdxl", "--teacher", "t"]
_TRAIN = ["train", "T", "--out", "o", "--student", "s.json", "--teacher", "t", "--steps", "4", "--batch-size", "2",
          "--lr", "0.01", "--warmup-steps", "0", "--save-every", "1", "--seed", "0"]
_EVAL = ["eval", "c.safetensors", "T"]


@pytest.mark.parametrize("argv, function, expected", [
    (_TARGETS, "make_targets", {"space", "image_size", "batch_size", "engine", "workers", "device", "dtype",
                                "teacher_config", "teacher_pretrained"}),
    (_TRAIN, "train", {"init", "noise_aware", "patch_steps", "eval_every", "holdout", "weight_decay", "log_every",
                       "backend", "device", "teacher_config", "teacher_pretrained"}),
    (_EVAL, "evaluate", {"classes", "holdout", "device"}),
])
def test_cli_defaults_are_the_library_functions_defaults(argv, function, expected):
    """Every optional flag left out means what the Python call means with that argument left out."""
    import inspect

    from fastlclip import distill

    parsed = _parse(argv)
    defaults = {name: p.default for name, p in inspect.signature(getattr(distill, function)).parameters.items()
                if p.default is not inspect.Parameter.empty}
    compared = {name for name in parsed if name in defaults and f"--{name.replace('_', '-')}" not in argv}
    assert compared == expected
    assert {name: parsed[name] for name in compared} == {name: defaults[name] for name in compared}


@pytest.mark.parametrize("argv, flag, low", [
    (_TARGETS, "--image-size", 8), (_TARGETS, "--batch-size", 1), (_TARGETS, "--workers", 1),
    (_TRAIN, "--steps", 1), (_TRAIN, "--batch-size", 1), (_TRAIN, "--warmup-steps", 0), (_TRAIN, "--save-every", 1),
    (_TRAIN, "--seed", 0), (_TRAIN, "--patch-steps", 0), (_TRAIN, "--eval-every", 1), (_TRAIN, "--log-every", 1),
])
def test_cli_integer_flags_accept_their_least_value_and_refuse_one_less(argv, flag, low, capsys):
    def with_value(v):
        args = list(argv)
        if flag in args:
            args[args.index(flag) + 1] = str(v)
        else:
            args += [flag, str(v)]
        return args

    assert _parse(with_value(low))[flag[2:].replace("-", "_")] == low
    assert _main(with_value(low - 1)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {flag}: must be " in err, err


@pytest.mark.parametrize("argv", [_TARGETS, _TRAIN, _EVAL])
def test_cli_refuses_a_missing_required_argument(argv, capsys):
    """Each required flag (with its value) or positional left out, or the command itself: one line, exit 2."""
    assert _main([]) == 2 and "the following arguments are required: command" in capsys.readouterr().err
    flags = [i for i, a in enumerate(argv) if a.startswith("--")]
    cuts = [(i, i + 2) for i in flags] + [(i, i + 1) for i in range(1, flags[0] if flags else len(argv))]
    for start, stop in cuts:
        assert _main(argv[:start] + argv[stop:]) == 2, argv[start:stop]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "required" in err, err


def test_cli_offers_exactly_the_librarys_choices(capsys):
    import importlib

    targets, train = (importlib.import_module(f"fastlclip.distill.{m}") for m in ("targets", "train"))
    cases = [(_TARGETS, "--engine", targets.ENGINES), (_TARGETS, "--space", ("vae", "diffusion")),
             (_TARGETS, "--dtype", ("float32", "float16", "bfloat16")), (_TRAIN, "--init", train.INITS),
             (_TRAIN, "--backend", train.TRAIN_BACKENDS)]
    for argv, flag, choices in cases:
        for choice in choices:
            assert _parse([*argv, flag, choice])[flag[2:]] == choice
        assert _main([*argv, flag, "other"]) == 2 and "invalid choice" in capsys.readouterr().err
    assert _parse([*_TRAIN, "--noise-aware"])["noise_aware"] is True
    parsed = _parse([*_TRAIN, "--lr", "1e-3", "--holdout", "0.25", "--weight-decay", "0.5"])
    assert (parsed["lr"], parsed["holdout"], parsed["weight_decay"]) == (0.001, 0.25, 0.5)
    assert _main([*_EVAL, "--holdout", "x"]) == 2 and "'x' is not a number" in capsys.readouterr().err


@pytest.fixture
def record(monkeypatch):
    """fastlclip.distill's make_targets / train / evaluate replaced by recorders of their arguments."""
    from types import SimpleNamespace

    from fastlclip import distill

    calls, results = {}, {"make_targets": SimpleNamespace(ok=["a"], rows=5, skipped=["b", "c"], failed=[]),
                          "train": Path("/runs/final.safetensors"), "evaluate": {"rows": 3, "cosine": 0.5}}

    def recorder(name):
        def call(*args, **kwargs):
            calls[name] = (args, kwargs)
            result = results[name]
            if isinstance(result, Exception):
                raise result
            return result
        return call

    for name in results:
        monkeypatch.setattr(distill, name, recorder(name))
    return SimpleNamespace(calls=calls, results=results)


def test_cli_targets_passes_every_setting(record, tmp_path, capsys):
    shard, weights = tmp_path / "a.tar", tmp_path / "teacher.pt"
    write_tar(shard, [("k", {"latent.npy": npy_bytes(torch.zeros(4, 2, 2).numpy())})])
    weights.write_bytes(b"weights")
    argv = ["targets", shard, "--out", tmp_path / "t", "--vae", "sd15", "--teacher", "ViT-B-32", "--teacher-pretrained",
            weights, "--space", "diffusion", "--image-size", "16", "--batch-size", "3", "--engine", "ray",
            "--workers", "2", "--device", "cpu", "--dtype", "bfloat16"]
    assert _main([str(a) for a in argv]) == 0
    assert record.calls["make_targets"] == (([str(shard)], str(tmp_path / "t")), dict(
        vae="sd15", space="diffusion", image_size=16, batch_size=3, engine="ray", workers=2, device="cpu",
        dtype="bfloat16", teacher="ViT-B-32", teacher_pretrained=str(weights), teacher_config=None, prompts=True))
    assert capsys.readouterr().err.strip() == (f"[fastlclip.distill] 1 shards (5 targets), 2 already done, 0 failed "
                                               f"-> {tmp_path / 't'}")
    assert _main([str(a) for a in argv + ["--no-prompts"]]) == 0
    assert record.calls["make_targets"][1]["prompts"] is False
    capsys.readouterr()
    record.results["make_targets"].failed = ["d"]
    assert _main([str(a) for a in argv]) == 1  # a failed shard: exit 1, not the argument error's 2
    record.results["make_targets"] = ValueError("the VAE's latents have 4 channels\nmore")
    assert _main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "python -m fastlclip.distill targets: error: the VAE's latents have 4 channels | more")


def test_cli_train_and_eval_pass_every_setting(record, small, tmp_path, capsys, monkeypatch):
    student = tmp_path / "student.json"
    student.write_text(json.dumps(W.STUDENT))
    argv = ["train", small["targets"], "--out", tmp_path / "run", "--student", student, "--teacher", "ViT-B-32",
            "--steps", "4", "--batch-size", "6", "--lr", "0.01", "--warmup-steps", "1", "--save-every", "2",
            "--seed", "7", "--init", "teacher", "--noise-aware", "--patch-steps", "1", "--eval-every", "2",
            "--holdout", "0.2", "--weight-decay", "0.1", "--log-every", "3", "--backend", "triton", "--device", "cpu"]
    monkeypatch.delenv("RANK", raising=False)
    assert _main([str(a) for a in argv]) == 0
    assert record.calls["train"] == ((str(small["targets"]), str(tmp_path / "run")), dict(
        student=str(student), steps=4, batch_size=6, lr=0.01, warmup_steps=1, init="teacher", noise_aware=True,
        seed=7, save_every=2, eval_every=2, patch_steps=1, holdout=0.2, weight_decay=0.1, log_every=3,
        backend="triton", device="cpu", teacher="ViT-B-32", teacher_pretrained=None, teacher_config=None))
    assert capsys.readouterr().out == "/runs/final.safetensors\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 prints the path
    assert _main([str(a) for a in argv]) == 0 and capsys.readouterr().out == ""

    checkpoint = tmp_path / "final.safetensors"
    checkpoint.write_bytes(b"x")
    argv = ["eval", checkpoint, small["targets"], "--classes", "red", "blue", "--holdout", "0.25", "--device", "cuda:1"]
    assert _main([str(a) for a in argv]) == 0
    assert record.calls["evaluate"] == ((str(checkpoint), str(small["targets"]), ["red", "blue"]),
                                        dict(holdout=0.25, device="cuda:1"))
    assert capsys.readouterr().out == '{\n  "rows": 3,\n  "cosine": 0.5\n}\n'
    for holdout in ("0", "0.999"):
        assert _main(["eval", str(checkpoint), str(small["targets"]), "--holdout", holdout]) == 0
    assert record.calls["evaluate"][1]["holdout"] == 0.999
    record.results["evaluate"] = ValueError("embed_dim 32 is not the targets' 64")
    assert _main(["eval", str(checkpoint), str(small["targets"])]) == 2
    assert capsys.readouterr().err.strip().endswith("eval: error: embed_dim 32 is not the targets' 64")


def test_cli_registers_the_teacher_config_under_its_name_and_checks_patch_steps_first(record, small, tmp_path,
                                                                                        capsys):
    import uuid

    import open_clip

    name = f"cli-teacher-{uuid.uuid4().hex[:8]}"  # open_clip's registry outlives a test: a name no test used
    config = tmp_path / "teacher.json"
    config.write_text(json.dumps(W.TEACHER_CFG))
    student = tmp_path / "student.json"
    student.write_text(json.dumps(W.STUDENT))
    argv = ["train", str(small["targets"]), "--out", str(tmp_path / "run"), "--student", str(student), "--teacher",
            name, "--teacher-config", str(config), "--steps", "4", "--batch-size", "6", "--lr", "0.01",
            "--warmup-steps", "1", "--save-every", "2", "--seed", "7"]
    assert _main(argv) == 0 and name in open_clip.list_models()
    kwargs = record.calls.pop("train")[1]
    assert (kwargs["teacher"], kwargs["teacher_config"], kwargs["teacher_pretrained"]) == (name, str(config), None)
    assert _main([*argv, "--patch-steps", "4"]) == 2  # refused before any work: train() is never called
    assert "patch_steps (4) must be below steps (4)" in capsys.readouterr().err and "train" not in record.calls


@pytest.fixture
def runs(monkeypatch):
    """make_targets' engines replaced by recorders of what they are handed (no decoding, no teacher forward)."""
    import importlib

    from conftest import record_engines

    return record_engines(monkeypatch, importlib.import_module("fastlclip.distill.targets"))


def test_make_targets_hands_the_run_its_settings(small, tmp_path, runs, monkeypatch, capsys):
    """Defaults (one worker in this process, batches of 64, the "latent" column, skip bad samples), every setting
    passed on, this rank's shards (all of them for Ray), a nested output folder made and reusable, progress lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastlclip import distill

    vae, teacher = _small_vae(), small["teacher"]
    a = _latent_shard(tmp_path / "a.tar", torch.randn(2, 16, 8, 8), ["a0", "a1"])
    b = _latent_shard(tmp_path / "b.tar", torch.randn(1, 16, 8, 8), ["b0"])
    out = tmp_path / "x" / "y" / "t"
    for _ in range(2):  # the second call resumes into the same folder
        report = distill.make_targets([b, a], out, vae=vae, teacher=teacher, progress=False)
        assert report.rows == 0 and report.ok == []
    call = runs[-1]
    assert (call["engine"], call["mine"], call["workers"]) == ("local", [str(b), str(a)], 1)  # as given
    opts = call["opts"]
    assert (opts.out, opts.batch_size, opts.on_error, opts.member, opts.column) == (str(out), 64, "skip", None, "latent")
    assert len(opts.run_id) == 12 and int(opts.run_id, 16) >= 0 and opts.run_id != runs[0]["opts"].run_id
    assert call["spec"].teacher_pretrained is None and call["spec"].shape == (16, 8, 8)

    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    distill.make_targets([a, b], out / "2", vae=vae, teacher=teacher, teacher_pretrained=weights, batch_size=3,
                         workers=2, on_error="raise", member="latent.npy", progress=True)
    call = runs[-1]
    assert (call["workers"], call["opts"].batch_size, call["opts"].on_error, call["opts"].member) == (
        2, 3, "raise", "latent.npy")
    assert call["spec"].teacher_pretrained == str(weights)
    for done, name in enumerate(("a.tar", "b.tar"), 1):  # the progress line counts finished shards of this run
        call["report"]({"shard": str(tmp_path / name), "status": "skipped"})
        assert capsys.readouterr().err == f"[fastlclip.corpus] {done}/2 {name}: skipped (output exists)\n"

    distill.make_targets([a, b], out / "ray", vae=vae, teacher=teacher, engine="ray", progress=False)
    assert (runs[-1]["engine"], runs[-1]["mine"]) == ("ray", [str(a), str(b)])  # Ray shares the shards itself
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distill.make_targets([a, b], out / "r1", vae=vae, teacher=teacher, progress=False)
    assert runs[-1]["mine"] == [str(b)]  # shard i to rank i % WORLD_SIZE
    distill.make_targets([a, b], out / "r1-ray", vae=vae, teacher=teacher, engine="ray", progress=False)
    assert runs[-1]["mine"] == [str(a), str(b)]  # Ray ignores RANK: its actors share every shard
    count = len(runs)
    assert distill.make_targets([a], out / "r1b", vae=vae, teacher=teacher, progress=False).ok == []
    assert len(runs) == count  # no shard for this rank: nothing run
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    odd = tmp_path / "odd.tar"  # the latent under another member name, and a Parquet column of another name
    write_tar(odd, [("o0", {"lat.npy": npy_bytes(torch.randn(16, 8, 8).numpy())})])
    distill.make_targets([odd], out / "odd", vae=vae, teacher=teacher, member="lat.npy", progress=False)
    assert runs[-1]["opts"].member == "lat.npy"
    pq.write_table(pa.table({"key": ["p0"], "z": pa.array([torch.randn(16, 8, 8).tolist()])}), tmp_path / "p.parquet")
    distill.make_targets([tmp_path / "p.parquet"], out / "p", vae=vae, teacher=teacher, column="z", progress=False)
    assert runs[-1]["opts"].column == "z" and runs[-1]["spec"].shape == (16, 8, 8)


def test_make_targets_refuses_a_bad_teacher_or_image_size_before_work(small, tmp_path, runs):
    import numpy as np

    from fastlclip import distill
    from fastlclip.distill.teacher import register_teacher_config

    vae = _small_vae()
    shard = _latent_shard(tmp_path / "a.tar", torch.randn(1, 16, 8, 8), ["a"])
    register_teacher_config("tiny-teacher-by-name", W.TEACHER_CFG)
    with pytest.raises(ValueError):
        distill.make_targets([shard], tmp_path / "never", vae=vae, teacher="no-such-teacher", progress=False)
    with pytest.raises((ValueError, FileNotFoundError, OSError)):
        distill.make_targets([shard], tmp_path / "never", vae=vae, teacher="tiny-teacher-by-name",
                             teacher_pretrained=tmp_path / "missing.pt", progress=False)
    assert not (tmp_path / "never").exists() and runs == []
    distill.make_targets([shard], tmp_path / "t", vae=vae, teacher="tiny-teacher-by-name", progress=False)
    assert runs[-1]["spec"].teacher_pretrained is None  # by name, no weights: random (no file named "None")

    pics = tmp_path / "images.tar"
    write_tar(pics, [("i0", {"png": png_bytes(np.zeros((16, 16, 3), np.uint8))})])
    distill.make_targets([pics], tmp_path / "t4", vae=vae, teacher=small["teacher"], image_size=4, progress=False)
    assert runs[-1]["spec"].shape == (16, 1, 1)  # the least size: the VAE's downsampling itself
    for size in (16.0, "16", 3):
        with pytest.raises(ValueError, match="image_size must be a positive multiple"):
            distill.make_targets([pics], tmp_path / "never", vae=vae, teacher=small["teacher"], image_size=size,
                                 progress=False)


def test_a_vae_is_a_registered_name_a_diffusers_folder_or_a_pipeline_folder(tmp_path, runs, small):
    """vae_config reads a folder's config.json, or its vae/config.json (a pipeline's folder), given as a str or a
    Path; a config without latent_channels means diffusers' default, 4."""
    from fastlclip import distill
    from fastlclip.distill.targets import vae_config
    from fastlclip.vaes import get_vae_config

    vae = _small_vae()
    vae.save_pretrained(tmp_path / "plain")
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    want = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert want["latent_channels"] == 16
    for folder in (tmp_path / "plain", tmp_path / "pipeline"):
        assert vae_config(folder) == want and vae_config(str(folder)) == want
    assert vae_config(vae)["latent_channels"] == 16 and vae_config("sd3") == get_vae_config("sd3")
    with pytest.raises(ValueError, match="neither a registered VAE"):
        vae_config(str(tmp_path))
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({k: v for k, v in want.items() if k != "latent_channels"}))
    four = _latent_shard(tmp_path / "four.tar", torch.randn(1, 4, 8, 8), ["f"])
    distill.make_targets([four], tmp_path / "t", vae=str(old), teacher=small["teacher"], progress=False)
    assert runs[-1]["spec"].shape == (4, 8, 8)
    sixteen = _latent_shard(tmp_path / "sixteen.tar", torch.randn(1, 16, 8, 8), ["s"])
    with pytest.raises(ValueError, match="16 channels, the VAE 4"):
        distill.make_targets([sixteen], tmp_path / "never", vae=str(old), teacher=small["teacher"], progress=False)


def test_train_with_the_triton_backend_runs_the_fused_kernels(small, tmp_path, kernel_calls):
    """The Triton path's values equal eager's (test_triton_backend_trains_as_eager), so only the calls tell that
    backend="triton" trains through fastlclip.kernels: every block's attention and the patch embedding."""
    calls = kernel_calls
    _small_train(small, tmp_path / "eager", steps=1, save_every=1)
    assert calls == {"attention": 0, "patch_embed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU model on a CUDA machine: the kernels' PyTorch fallbacks run
        _small_train(small, tmp_path / "triton", steps=1, save_every=1, backend="triton")
    layers = W.STUDENT["vision_cfg"]["layers"]
    assert calls["patch_embed"] >= 1 and calls["attention"] >= layers


def test_evaluate_without_training_metadata_scores_every_row_and_fixes_its_noise(small, tmp_path):
    """A checkpoint without fastlclip's training record (another Latent-CLIP, or one re-saved) is evaluated on every
    row of the targets; a noise-aware student's default noise is seed 0's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastlclip import distill
    from fastlclip.checkpoint import SAFETENSORS_CONFIG_KEY

    final = _small_train(small, tmp_path / "run", steps=1, save_every=1, noise_aware=True, holdout=0.3)
    with safe_open(str(final), framework="pt") as f:
        weights, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert "fastlclip_distill" in meta
    bare = tmp_path / "bare.safetensors"
    save_file(weights, str(bare), metadata={SAFETENSORS_CONFIG_KEY: meta[SAFETENSORS_CONFIG_KEY]})
    assert distill.evaluate(bare, small["targets"])["rows"] == 24
    assert distill.evaluate(final, small["targets"])["rows"] == sum(_held(k, 0.3) for k in small["keys"])
    assert distill.evaluate(bare, small["targets"]) == distill.evaluate(bare, small["targets"], seed=0)
    assert distill.evaluate(bare, small["targets"]) != distill.evaluate(bare, small["targets"], seed=1)


# -- bad configs: constants out of range, nesting (issue 31, class 5) -----------------------------------
def test_cli_targets_refuses_a_deep_teacher_config_or_an_infinite_scaling_in_one_line(tmp_path, capsys):
    import numpy as np

    shard = tmp_path / "s.tar"
    write_tar(shard, [("a", {"latent.npy": npy_bytes(np.zeros((16, 8, 8), np.float32))})])
    deep = tmp_path / "deep.json"
    deep.write_text("{\"embed_dim\": " + "[" * 100_000 + "]" * 100_000 + "}")  # json: RecursionError
    base = ["targets", str(shard), "--out", str(tmp_path / "out"), "--teacher", "tiny-deep"]
    assert _main([*base, "--vae", "flux1", "--teacher-config", str(deep)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "teacher config" in err and "deep.json" in err and "nests too deeply" in err
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({**W.VAE_CFG, "_class_name": "AutoencoderKL",
                                                 "scaling_factor": 1e300}))
    assert _main([*base, "--vae", str(vae)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scaling_factor must be a finite number in [0.0001, 10000]" in err, err
    assert not (tmp_path / "out").exists()


# -- bad data (issue 31, class 4) -----------------------------------------------------------------------
@pytest.mark.parametrize("what", ["embedding", "latent"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_read_targets_names_the_file_and_row_of_a_non_finite_value(small, tmp_path, what, value):
    lat, emb = small["latents"].clone(), small["embeddings"].clone()
    (emb if what == "embedding" else lat)[6].view(-1)[3] = value  # file 99 holds rows 0..3, file 98 rows 4..7
    folder = _write_targets(tmp_path / "t", lat, emb, small["keys"], 4)
    from fastlclip.distill import read_targets

    with pytest.raises(ValueError, match=f"00098.parquet: row 2 \\(key '{small['keys'][6]}'\\) has a non-finite "
                                         f"{what}.*delete 00098.parquet and rerun"):
        read_targets(folder)


def _small_cli(small, tmp_path, folder, out) -> list[str]:
    """``train`` arguments for the small world: its teacher as open_clip files, the tiny student."""
    cfg, weights = W.save_teacher(small["teacher"], tmp_path / "teacher")
    student = tmp_path / "student.json"
    student.write_text(json.dumps(W.STUDENT))
    return ["train", str(folder), "--out", str(out), "--student", str(student), "--teacher", "tiny-teacher",
            "--teacher-config", str(cfg), "--teacher-pretrained", str(weights), "--steps", "4", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "0", "--save-every", "1", "--seed", "0", "--holdout", "0.25"]


def test_cli_train_on_a_nan_target_exits_2_in_one_line_before_training(small, tmp_path, capsys):
    emb = small["embeddings"].clone()
    emb[0, 0] = math.nan
    folder = _write_targets(tmp_path / "t", small["latents"], emb, small["keys"], 12)
    assert _main(_small_cli(small, tmp_path, folder, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite embedding" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_loss_that_becomes_non_finite_stops_training_with_exit_1(small, tmp_path, monkeypatch, capsys):
    """The loss of step 3 is NaN (a diverging run): steps 1 and 2 are saved, step 3 is neither applied nor saved."""
    mod = _train_module()
    real, calls = mod.distill_loss, []

    def loss(student, target):
        calls.append(1)
        out = real(student, target)
        return out * math.nan if len(calls) == 3 else out

    monkeypatch.setattr(mod, "distill_loss", loss)
    with pytest.raises(mod.TrainingDiverged, match="not finite at step 3.*checkpoint of step 2 is kept"):
        _small_train(small, tmp_path / "run", save_every=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["tower"].values())
    assert not (tmp_path / "run" / "final.safetensors").exists()
    assert [x["step"] for x in _lines(tmp_path / "run")] == [1, 2]

    calls.clear()  # the command line: one line, exit 1 (not the argument errors' 2)
    assert _main(_small_cli(small, tmp_path, small["targets"], tmp_path / "run2")) == 1
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("python -m fastlclip.distill train: error: the training loss is not "
                                                "finite at step 3"), err  # on its own line, after the progress bar


def test_resume_refuses_targets_or_teacher_weights_changed_in_place(small, tmp_path):
    """Same paths, same row count, other contents: the run identity's digests differ, so the resume is refused."""
    import shutil

    from fastlclip.distill.teacher import register_teacher_config

    targets = tmp_path / "targets"
    shutil.copytree(small["targets"], targets)
    teacher = copy.deepcopy(small["teacher"])

    def go(out, **kw):
        from fastlclip import distill

        args = dict(student=dict(W.STUDENT), teacher=teacher, steps=2, batch_size=4, lr=1e-3, warmup_steps=1,
                    save_every=1, seed=1, holdout=0.25, progress=False)
        args.update(kw)
        return distill.train(targets, out, **args)

    go(tmp_path / "a")
    go(tmp_path / "a")  # the same data: resumes (nothing left to do)
    emb = small["embeddings"].clone()
    emb[[0, 1]] = emb[[1, 0]]  # two rows' targets swapped: same keys, same row count
    _write_targets(targets, small["latents"], emb, small["keys"], 12)
    assert len(list(targets.glob("*.parquet"))) == len(list(small["targets"].glob("*.parquet")))
    with pytest.raises(ValueError, match=r"holds a run with other settings \(targets_sha256 differ\)"):
        go(tmp_path / "a")

    go(tmp_path / "b")
    with torch.no_grad():
        teacher.visual.proj.mul_(2)  # the same module object, other weights
    with pytest.raises(ValueError, match=r"\(teacher_module_sha256 differ\)"):
        go(tmp_path / "b")

    cfg, weights = W.save_teacher(small["teacher"], tmp_path / "teacher")
    register_teacher_config("tiny-teacher", cfg)
    go(tmp_path / "c", teacher="tiny-teacher", teacher_pretrained=str(weights))
    state = small["teacher"].state_dict()
    state["visual.proj"] = state["visual.proj"] * 2
    torch.save(state, weights)  # replaced at the same path
    with pytest.raises(ValueError, match=r"\(teacher_pretrained_sha256 differ\)"):
        go(tmp_path / "c", teacher="tiny-teacher", teacher_pretrained=str(weights))


def test_eval_refuses_targets_of_another_vae_with_the_same_channel_count(small, tmp_path, capsys):
    from fastlclip import distill

    final = _small_train(small, tmp_path / "run", steps=1, save_every=1)
    assert distill.evaluate(final, small["targets"], holdout=0.0)["rows"] == 24  # its own VAE: figures
    other = _write_targets(tmp_path / "other", small["latents"], small["embeddings"], small["keys"], 12)
    info = json.loads((other / "run.json").read_text())
    info["vae"], info["vae_cfg"] = "flux1", fastlclip_vae("flux1")  # 16 channels too, FLUX.1's constants
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"reads latents of the VAE 'custom' \(16 channels, scaling "
                                         rf"{SCALE}, shift {SHIFT}\); the targets .* were made with 'flux1' \(16 "
                                         r"channels, scaling 0.3611, shift 0.1159"):
        distill.evaluate(final, other, holdout=0.0)
    info["vae"], info["vae_cfg"] = "<AutoencoderKL module>", dict(SMALL_VAE, block_out_channels=[8, 8, 16])
    (other / "run.json").write_text(json.dumps(info))  # the same constants, another VAE layout
    with pytest.raises(ValueError, match="other settings differ if these agree"):
        distill.evaluate(final, other, holdout=0.0)
    assert _main(["eval", str(final), str(other), "--holdout", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "evaluate on targets made with the student's VAE" in err, err


def fastlclip_vae(name):
    import fastlclip

    return fastlclip.get_vae_config(name)


@pytest.mark.parametrize("where, key, value, message", [
    ("vision_cfg", "width", 2**20, "vision_cfg.width must be at most 16384"),
    ("vision_cfg", "layers", 10**7, "vision_cfg.layers must be at most 256"),
    ("text_cfg", "layers", 10**7, "text_cfg.layers must be at most 256"),
    ("text_cfg", "vocab_size", 10**400, "text_cfg.vocab_size must be at most"),
    ("vision_cfg", "image_size", [32, 0], "vision_cfg.image_size must be a positive integer"),
    ("vision_cfg", "patch_size", 64, "patch_size 64 is larger than the image"),
    ("vision_cfg", "mlp_ratio", math.inf, "vision_cfg.mlp_ratio must be a number in"),
    ("vision_cfg", "layers", [3, 4, 6, 3], "vision_cfg.layers must be an integer"),
    (None, None, None, "about 13 billion parameters"),  # each size within its limit, the model too large
], ids=lambda v: str(v)[:20])
def test_teacher_configs_are_bounded_before_anything_is_allocated(tmp_path, capsys, where, key, value, message):
    from fastlclip.distill.teacher import register_teacher_config

    cfg = copy.deepcopy(W.TEACHER_CFG)
    if where is None:
        cfg["vision_cfg"].update(width=16384, layers=4, head_width=64)
    else:
        cfg[where][key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        register_teacher_config("tiny-bounded", cfg)
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(cfg))
    shard = tmp_path / "s.tar"
    write_tar(shard, [("a", {"latent.npy": npy_bytes(np.zeros((16, 8, 8), np.float32))})])
    assert _main(["targets", str(shard), "--out", str(tmp_path / "out"), "--vae", "flux1", "--teacher", "tiny-bounded",
                  "--teacher-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_teacher_config_within_bounds_still_registers():
    import open_clip

    from fastlclip.distill.teacher import register_teacher_config

    register_teacher_config("tiny-ok", dict(W.TEACHER_CFG))
    assert "tiny-ok" in open_clip.list_models()


def _resume_error(small, out, **kw):
    with pytest.raises(ValueError) as e:
        _small_train(small, out, steps=2, save_every=1, **kw)
    return str(e.value)


def test_a_truncated_or_tampered_checkpoint_is_a_clear_error(small, tmp_path, capsys):
    run = tmp_path / "run"
    _small_train(small, run, steps=2, save_every=1)
    ckpt = run / "checkpoint.pt"
    good = ckpt.read_bytes()
    state = torch.load(ckpt, weights_only=True)

    ckpt.write_bytes(good[: len(good) // 2])  # a copy cut short
    msg = _resume_error(small, run)
    assert "checkpoint.pt can't be read" in msg and "truncated" in msg and "delete it" in msg
    ckpt.write_bytes(b"")
    assert "can't be read" in _resume_error(small, run)
    torch.save([1, 2, 3], ckpt)
    assert "not a fastlclip.distill checkpoint (it lacks identity, optimizer, rng" in _resume_error(small, run)

    def tampered(change):
        s = copy.deepcopy(state)
        change(s)
        torch.save(s, ckpt)
        return _resume_error(small, run)

    assert "step 7 is not in [1, 2]" in tampered(lambda s: s.update(step=7))
    assert "other settings (extra differ)" in tampered(lambda s: s["identity"].update(extra=1))  # a key only there
    key = next(k for k in state["tower"] if state["tower"][k].ndim == 2)
    shape = tuple(state["tower"][key].shape)
    msg = tampered(lambda s: s["tower"].update({key: torch.zeros(shape[0], shape[1] + 1)}))
    assert f"the tower's {key} is ({shape[0]}, {shape[1] + 1}), the student's {shape}" in msg
    msg = tampered(lambda s: s["tower"][key].view(-1).__setitem__(0, math.nan))
    assert f"the tower's {key} holds NaN or Inf" in msg
    assert "tensors are not the student's" in tampered(lambda s: s["tower"].pop(key))
    first = next(iter(state["optimizer"]["state"]))
    msg = tampered(lambda s: s["optimizer"]["state"][first].update(exp_avg=torch.zeros(3, 3)))
    assert "optimizer, scheduler or RNG state does not fit" in msg and "exp_avg is (3, 3)" in msg
    assert "RNG state is not a byte tensor" in tampered(lambda s: s.update(rng=torch.zeros(3)))

    ckpt.write_bytes(good)  # restored: the run resumes
    _small_train(small, run, steps=2, save_every=1)


def test_cli_train_on_a_truncated_checkpoint_or_misfit_teacher_weights_exits_2_in_one_line(small, tmp_path, capsys):
    argv = _small_cli(small, tmp_path, small["targets"], tmp_path / "run")
    assert _main(argv) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt can't be read" in err, err

    import open_clip

    wide = open_clip.model.CLIP(**dict(W.TEACHER_CFG, vision_cfg=dict(W.TEACHER_CFG["vision_cfg"], width=96)))
    weights = Path(argv[argv.index("--teacher-pretrained") + 1])
    torch.save(wide.state_dict(), weights)  # weights of another width than the config says
    argv[argv.index("--out") + 1] = str(tmp_path / "run2")
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "can't be loaded into the open_clip model 'tiny-teacher'" in err, err
    weights.write_bytes(b"PK\x03\x04 cut")  # a truncated file
    assert _main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the file complete" in err, err


def test_checkpoint_writes_are_fsynced_file_then_folder(small, tmp_path, monkeypatch):
    """Each write-then-rename (checkpoint.pt, final.safetensors, a trimmed metrics.jsonl) fsyncs the temporary file
    before the rename and the run folder after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    _small_train(small, run, steps=2, save_every=1)
    _small_train(small, run, steps=2, save_every=1)  # resumed: metrics.jsonl trimmed, final written again
    names = [e[2] for e in events if e[0] == "replace"]
    assert names.count(str(run / "checkpoint.pt")) == 2 and names.count(str(run / "final.safetensors")) == 2
    assert str(run / "metrics.jsonl") in names
    for i, e in enumerate(events):
        if e[0] == "replace":
            assert events[i - 1] == ("fsync", e[1]), events[i - 1:i + 2]  # the file's bytes, before
            assert events[i + 1] == ("fsync", str(run)), events[i - 1:i + 2]  # the folder's entry, after
