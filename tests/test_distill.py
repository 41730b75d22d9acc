"""fastlclip.distill on a tiny world (tests/distill_world.py): targets, training, exact resume, DDP, evaluation."""

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distill_world as W

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
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from fastlclip.distill import read_targets

    t = read_targets(world["targets"])
    assert len(t) == 384 and t.info["latent_shape"] == [16, 8, 8] and len(set(t.keys)) == 384
    vae, teacher = copy.deepcopy(world["vae"]).double(), copy.deepcopy(world["teacher"]).double()
    raw = t.latents[:24].double()
    with torch.no_grad():
        img = ((vae.decode(raw).sample + 1) / 2).clamp(0, 1)
        mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        want = F.normalize(teacher.encode_image((img - mean) / std), dim=-1)
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
    import io
    import tarfile

    import numpy as np

    from fastlclip import distill
    from fastlclip.corpus.readers import read_shard
    from fastlclip.vaes import latent_space

    space = latent_space(world["vae"])
    shard = tmp_path / "diffusion.tar"
    with tarfile.open(shard, "w") as tf:
        for sample in list(read_shard(world["shards"][0]))[:16]:
            buf = io.BytesIO()
            np.save(buf, space.to_diffusion(sample.latent.double()).numpy())
            info = tarfile.TarInfo(f"{sample.key}.latent.npy")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
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
    import io
    import tarfile

    import numpy as np
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from PIL import Image

    from fastlclip import distill

    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (32, 40 if i == 0 else 32, 3), dtype=np.uint8) for i in range(5)]
    shard = tmp_path / "images.tar"
    with tarfile.open(shard, "w") as tf:
        for i, p in enumerate(pics):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
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
    from fastlclip.kernels import _launch

    if not _launch.INTERPRET and not torch.cuda.is_available():
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
