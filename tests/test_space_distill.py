"""fastlclip.distill on the 2025-26 latent spaces (issue 33: Qwen-Image, FLUX.2, SANA / DC-AE): targets from image
shards (each pipeline's encode) and diffusion-space latent shards (each pipeline's decode), a student per space that
beats the mean-embedding baseline, noise-aware training in diffusion space, the 32x geometry, the refusals."""

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import space_distill_world as SW
import tiny_spaces as ts

N = 160  # images: 2 shards of 80; 20% held out
RUN = dict(steps=60, batch_size=32, lr=2e-3, warmup_steps=5, save_every=1000, holdout=0.2, seed=0, progress=False)
CHANNELS = {"qwen-image": 16, "flux2": 8, "sana": 8}  # the tiny VAEs' latent channels (tests/tiny_spaces.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The teacher and the image shards (torch on one thread: a shared CPU), and ``get(space)``: that space's
    tiny VAE, targets from the image shards and a student trained on them, made once."""
    from fastlclip import distill

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("space-distill")
    w = dict(root=root, teacher=SW.make_teacher(), shards=SW.image_shards(root / "images", N, 80))
    made = {}

    def get(space: str) -> dict:
        if space not in made:
            vae, out = ts.tiny_vae(space), root / space
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # diffusers' float32 cast notice
                distill.make_targets(w["shards"], out / "targets", vae=vae, teacher=w["teacher"], batch_size=80,
                                     progress=False)
            final = distill.train(out / "targets", out / "run", student=dict(SW.STUDENT), teacher=w["teacher"], **RUN)
            made[space] = dict(vae=vae, targets=out / "targets", final=final)
        return made[space]

    w["get"] = get
    yield w
    torch.set_num_threads(threads)


def _teacher64(teacher, images: torch.Tensor) -> torch.Tensor:
    """The teacher's normalised embeddings of images in [-1, 1] at its own 32 px (no resize), float64, with the
    OpenAI mean / std written out."""
    import copy

    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = ((images.double() + 1) / 2).clamp(0, 1)
    with torch.no_grad():
        return F.normalize(copy.deepcopy(teacher).double().encode_image((x - mean) / std), dim=-1)


@pytest.mark.parametrize("space", ts.SPACES)
def test_image_targets_are_the_pipelines_encode_and_the_images_own_embedding(world, space):
    from fastlclip import vaes
    from fastlclip.distill import read_targets

    s = world["get"](space)
    t = read_targets(s["targets"])
    assert len(t) == N and t.keys == [f"{i:06d}" for i in range(N)]
    assert t.info["latent_shape"] == [CHANNELS[space], 16, 16] and t.info["image_size"] == 32
    pixels = SW.uint8_images(N, 2)
    raw = SW.encode_reference(s["vae"], pixels[:24])
    assert (t.latents[:24].double() - raw).abs().max() < 2e-3 * max(1.0, raw.abs().max().item())  # float16
    want = _teacher64(world["teacher"], pixels[:24].double() / 255 * 2 - 1)
    assert (t.embeddings[:24].double() - want).abs().max() < 2e-3
    if space == "flux2":  # the statistics of its weights, for the student's config
        stats = t.info["vae_stats"]
        assert stats == vaes.weight_stats(s["vae"])
        assert torch.equal(torch.tensor(stats["running_mean"]), s["vae"].bn.running_mean.double())
        assert torch.equal(torch.tensor(stats["running_var"]), s["vae"].bn.running_var.double())
    else:
        assert "vae_stats" not in t.info


@pytest.mark.parametrize("space", ts.SPACES)
def test_a_distilled_student_beats_the_mean_embedding_baseline(world, space):
    import fastlclip
    from fastlclip import distill, vaes

    s = world["get"](space)
    result = distill.evaluate(s["final"], s["targets"])
    assert result["rows"] == len(distill.read_targets(s["targets"]).split(0.2)[1]) > 10
    assert result["cosine"] > result["baseline_cosine"] + 0.25, result
    model = fastlclip.load(None, s["final"])
    v = model.cfg.vision  # the space's geometry: its channels and factor, the 16x16 grid in 4x4 patches
    assert (v.latent_channels, v.latent_factor, v.image_size, v.latent_size, v.patch_size) == \
        (CHANNELS[space], vaes.vae_factor(s["vae"]), 32, 16, 4)
    want, got = vaes.latent_space(s["vae"]), model.latent_space
    assert (got.channels, got.mean, got.std, got.patch, got.pack, got.scaling_factor) == \
        (want.channels, want.mean, want.std, want.patch, want.pack, want.scaling_factor)


@pytest.mark.parametrize("space", ts.SPACES)
def test_diffusion_space_shards_are_decoded_as_the_pipeline_decodes(world, space, tmp_path):
    """Shards of the pipeline's diffusion latents (Qwen-Image: its packed tokens; FLUX.2: the patchified grid):
    the stored latent is the VAE latent, the target the teacher's embedding of the decode."""
    from fastlclip import distill

    s = world["get"](space)
    shards, raw = SW.latent_shards(s["vae"], tmp_path / "shards", 16, 8, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = distill.make_targets(shards, tmp_path / "t", vae=s["vae"], teacher=world["teacher"], space="diffusion",
                                      progress=False)
    assert report.rows == 16 and not report.bad_samples
    t = distill.read_targets(tmp_path / "t")
    assert t.info["latent_shape"] == [CHANNELS[space], 16, 16]
    assert t.info.get("input_shape") == {"qwen-image": [64, 64], "flux2": [32, 8, 8], "sana": None}[space]
    # the shards hold float32 diffusion latents: their VAE latents agree to float32 and float16 storage
    assert (t.latents.double() - raw).abs().max() < 2e-3 * max(1.0, raw.abs().max().item())
    want = _teacher64(world["teacher"], SW.decode_reference(s["vae"], raw))
    assert (t.embeddings.double() - want).abs().max() < 2e-3
    # the same VAE: the image-trained student evaluates on them
    assert distill.evaluate(s["final"], tmp_path / "t", holdout=0.0)["rows"] == 16


def test_shards_of_the_other_space_are_refused_before_any_work(world, tmp_path):
    from corpus_shards import npy_bytes, write_tar

    from fastlclip import distill

    qwen, flux2 = world["get"]("qwen-image"), world["get"]("flux2")
    tokens, _ = SW.latent_shards(qwen["vae"], tmp_path / "tokens", 2, 2)
    with pytest.raises(ValueError, match=r"latents are \(64, 64\): packed tokens are diffusion space"):
        distill.make_targets(tokens, tmp_path / "never", vae=qwen["vae"], teacher=world["teacher"], progress=False)
    raw = tmp_path / "raw.tar"  # FLUX.2 VAE latents (8 channels) given as its diffusion grid (32)
    write_tar(raw, [("a", {"latent.npy": npy_bytes(torch.zeros(8, 16, 16).numpy())})])
    with pytest.raises(ValueError, match="have 8 channels, the VAE 32 in diffusion space"):
        distill.make_targets([raw], tmp_path / "never", vae=flux2["vae"], teacher=world["teacher"], space="diffusion",
                             progress=False)
    odd = tmp_path / "odd.tar"  # 63 tokens: no square grid
    write_tar(odd, [("a", {"latent.npy": npy_bytes(torch.zeros(63, 64).numpy())})])
    with pytest.raises(ValueError, match=r"diffusion-space latents are \(63, 64\).*not a square grid"):
        distill.make_targets([odd], tmp_path / "never", vae=qwen["vae"], teacher=world["teacher"], space="diffusion",
                             progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("space", ts.SPACES)
def test_noise_aware_students_noise_the_diffusion_space_the_pipeline_holds(world, space, tmp_path):
    """The student's noised input, ``(1 - s) z + s eps`` over the diffusion grid, is the pipeline's (transcribed),
    converted back to VAE space as the pipeline decodes; training and evaluation run on it."""
    from fastlclip import distill
    from fastlclip.distill.train import Student, noise_shape

    s = world["get"](space)
    model = ts.model(s["vae"], space, noise_aware=True)
    model.check_finite = False
    raw = SW.encode_reference(s["vae"], SW.uint8_images(3, 7)).float()
    shape = noise_shape(model.latent_space, raw.shape[1:])
    assert shape == {"qwen-image": (16, 16, 16), "flux2": (32, 8, 8), "sana": (8, 16, 16)}[space]
    level, eps = torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    z = SW.to_diffusion_reference(s["vae"], raw.double(), packed=False)
    noised = SW.to_vae_reference(s["vae"], (1 - level.double().view(-1, 1, 1, 1)) * z
                                 + level.double().view(-1, 1, 1, 1) * eps.double())
    with torch.no_grad():
        want = model.encode_latents(noised.float(), space="vae", noise_level=level)
        got = Student(model, True)(raw, level, eps)
    assert (got - want).abs().max() < 1e-4
    final = distill.train(s["targets"], tmp_path / "run", student=dict(SW.STUDENT), teacher=world["teacher"],
                          noise_aware=True, **dict(RUN, steps=4, eval_every=4))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(line["eval"]["cosine_at"]) == {"0.25", "0.5", "0.75"}
    per = distill.evaluate(final, s["targets"])["per_noise_level"]
    assert set(per) == {"0.25", "0.5", "0.75"} and all(-1 <= v["cosine"] <= 1 for v in per.values())


def test_a_32x_space_gives_the_student_a_16x16_grid_at_512_px():
    """The student config on DC-AE targets (SANA's registered config, nothing built): the VAE's 32x factor, so
    16x16 latents at 512 px; a config written for 8x at the targets' image size keeps its patch's 64 px; a config
    for other images, or a patch that doesn't divide the grid, is refused naming the space."""
    from fastlclip import vaes
    from fastlclip.distill.train import fit_student, resolve_student
    from fastlclip.model_configs import ModelConfig

    sana = {"vae": "sana", "vae_cfg": vaes.get_vae_config("sana"), "latent_shape": [32, 16, 16], "image_size": 512}
    cfg = fit_student("Latent-ViT-B-8-512", sana)  # 512 px, 8x, patch 8 (64 px)
    v = ModelConfig.from_dict(cfg).vision
    assert (v.image_size, v.latent_factor, v.latent_size, v.patch_size, v.latent_channels) == (512, 32, 16, 2, 32)
    assert cfg["vae"] == "sana" and "vae_stats" not in cfg
    at_1024 = dict(sana, latent_shape=[32, 32, 32], image_size=1024)
    with pytest.raises(ValueError, match=r"the targets' latents are 32x32x32 \(1024 px images in the space 'sana' "
                                         r"\(AutoencoderDC, 32x\)\); the student config describes 512 px images at 8x "
                                         r"\(64x64 latents\): set vision_cfg.image_size to 1024"):
        fit_student("Latent-ViT-B-8-512", at_1024)
    b8 = resolve_student("Latent-ViT-B-8-512")
    big = fit_student(dict(b8, vision_cfg=dict(b8["vision_cfg"], image_size=1024)), at_1024)
    assert ModelConfig.from_dict(big).vision.latent_size == 32 and big["vision_cfg"]["patch_size"] == 2
    tiny = dict(SW.STUDENT, vision_cfg=dict(SW.STUDENT["vision_cfg"], image_size=512, latent_factor=32))
    assert fit_student(tiny, sana)["vision_cfg"]["patch_size"] == 4  # written for 32x: its own patch
    sdxl = fit_student("Latent-ViT-B-8-512", {"vae": "sdxl", "vae_cfg": {}, "latent_shape": [4, 64, 64]})
    assert (sdxl["vision_cfg"]["patch_size"], sdxl["vision_cfg"]["image_size"]) == (8, 512)  # as it was
    for bad, message in (({"patch_size": 3}, "patch_size 3 does not divide the 16x16 latent grid of the targets' "
                                             r"space 'sana' \(AutoencoderDC, 32x\), 512 px images.*\[1, 2, 4, 8, 16\]"),
                         ({"patch_size": 1, "latent_factor": 8, "image_size": 512},
                          r"patch \(1 latent pixels at 8x, 8 px\) is no whole number of latent pixels of the targets' "
                          "space 'sana'")):
        with pytest.raises(ValueError, match=message):
            fit_student(dict(SW.STUDENT, vision_cfg=dict(SW.STUDENT["vision_cfg"], **bad)), sana)


def test_flux2_targets_without_readable_statistics_are_an_error(world, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from fastlclip import distill, vaes
    from fastlclip.distill.__main__ import main
    from fastlclip.distill.targets import vae_config, vae_stats

    with pytest.raises(ValueError, match="'flux2': AutoencoderKLFlux2's latent statistics .* live in its weights, "
                                         "and a registered name has none"):
        distill.make_targets(world["shards"], tmp_path / "t", vae="flux2", teacher=world["teacher"], progress=False)
    assert not (tmp_path / "t").exists()
    code = main(["targets", str(world["shards"][0]), "--out", str(tmp_path / "cli"), "--vae", "flux2",
                 "--teacher", "ViT-B-32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "live in its weights" in err, err
    assert not (tmp_path / "cli").exists()
    vae = ts.tiny_vae("flux2")
    vae.save_pretrained(tmp_path / "flux2")
    assert vae_stats(tmp_path / "flux2", vae_config(tmp_path / "flux2")) == \
        dict(vaes.weight_stats(vae), source=vaes.weight_stats(tmp_path / "flux2")["source"])
    weights = next((tmp_path / "flux2").glob("*.safetensors"))
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("bn.")}, str(weights))
    with pytest.raises(ValueError, match="no bn.running_mean / bn.running_var tensor"):
        distill.make_targets(world["shards"], tmp_path / "t", vae=str(tmp_path / "flux2"), teacher=world["teacher"],
                             progress=False)


def test_train_command_line_refuses_a_patch_that_does_not_fit_the_space_before_work(world, tmp_path, capsys):
    from fastlclip.distill.__main__ import main

    student = tmp_path / "student.json"
    student.write_text(json.dumps(dict(SW.STUDENT, vision_cfg=dict(SW.STUDENT["vision_cfg"], patch_size=3))))
    code = main(["train", str(world["get"]("flux2")["targets"]), "--out", str(tmp_path / "run"), "--student",
                 str(student), "--teacher", "ViT-B-32", "--steps", "2", "--batch-size", "4", "--lr", "1e-3",
                 "--warmup-steps", "0", "--save-every", "1", "--seed", "0", "--noise-aware"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "patch_size 3 does not divide the 16x16 latent grid of the targets' space '<AutoencoderKLFlux2 module>'" in err
    assert not (tmp_path / "run").exists()


def test_eval_refuses_another_spaces_targets_naming_both(world, tmp_path, capsys):
    from fastlclip import distill
    from fastlclip.distill.__main__ import main

    qwen, sana, flux2 = (world["get"](n) for n in ("qwen-image", "sana", "flux2"))
    with pytest.raises(ValueError, match=r"reads latents of the VAE 'custom' \(AutoencoderKLQwenImage: 16 channels, "
                                         r"per-channel statistics from config.*were made with "
                                         r"'<AutoencoderDC module>' \(AutoencoderDC: 8 channels, scaling 0.41407"):
        distill.evaluate(qwen["final"], sana["targets"])
    assert main(["eval", str(qwen["final"]), str(qwen["targets"])]) == 0  # its own: the figures, as JSON
    assert json.loads(capsys.readouterr().out)["cosine"] > 0.5
    assert main(["eval", str(sana["final"]), str(flux2["targets"])]) == 2  # 8 channels both
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AutoencoderDC: 8 channels" in err and "AutoencoderKLFlux2: 8 channels" in err
    # FLUX.2 targets of the same config but other weights' statistics: another space
    other = tmp_path / "other"
    shutil.copytree(flux2["targets"], other)
    info = json.loads((other / "run.json").read_text())
    info["vae_stats"]["running_mean"][0] += 1.0
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="evaluate on targets made with the student's VAE"):
        distill.evaluate(flux2["final"], other)
