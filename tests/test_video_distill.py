"""fastlclip.distill on the video spaces (issue 34 part 3): targets from latent-clip shards (the clip decoded once as
its pipeline decodes, the teacher on every frame, a latent frame's target the normalised mean over the frames it
covers) against a float64 reference, a per-frame student per space that beats the mean-embedding baseline on
held-out clips, evaluation per frame, per clip and within clip, and the refusals."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_video as tv
import video_distill_world as VW
from corpus_shards import npy_bytes, png_bytes, write_tar

N = 80  # wan2.1's clips: 2 shards of 40; 20% of the clips held out; a student trained on the rest
SMALL = 8  # hunyuanvideo-1.5's clips (targets only: its tiny VAE decodes clip by clip, slowly)
RUN = dict(steps=60, batch_size=32, lr=2e-3, warmup_steps=5, save_every=1000, holdout=0.2, seed=0, progress=False)
CHANNELS = {"wan2.1": 16, "hunyuanvideo-1.5": 4}


def _targets(shards, out, vae, teacher, **kw):
    from fastlclip import distill

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' float32 cast notice
        return distill.make_targets(shards, out, vae=vae, teacher=teacher, batch_size=50, progress=False, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The teacher, and ``get(space)``: that space's tiny VAE, its clip shards (VAE space, a prompt each), targets
    and (wan2.1) a student trained on them, made once (torch on one thread: a shared CPU)."""
    from fastlclip import distill

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("video-distill")
    w = dict(root=root, teacher=VW.make_teacher())
    made = {}

    def get(space: str) -> dict:
        if space not in made:
            vae, out, n = tv.tiny_vae(space), root / space, N if space == "wan2.1" else SMALL
            shards, raw = VW.clip_shards(vae, out / "shards", n, n // 2, prompts=True)
            _targets(shards, out / "targets", vae, w["teacher"])
            final = None
            if space == "wan2.1":
                final = distill.train(out / "targets", out / "run", student=dict(VW.STUDENT), teacher=w["teacher"],
                                      **RUN)
            made[space] = dict(vae=vae, shards=shards, raw=raw, n=n, targets=out / "targets", final=final)
        return made[space]

    w["get"] = get
    yield w
    torch.set_num_threads(threads)


@pytest.mark.parametrize("space", ["wan2.1", "hunyuanvideo-1.5"])
def test_targets_are_the_normalised_mean_of_the_teachers_frames_over_each_latent_frames_span(world, space):
    from fastlclip.distill import read_targets

    s = world["get"](space)
    t = read_targets(s["targets"])
    c, T = CHANNELS[space], VW.LATENT_FRAMES
    assert t.info["latent_shape"] == [c, T, 8, 8]
    cls = type(s["vae"]).__name__
    assert t.info["video"] == {"space": f"{cls} ({c} channels, 4x spatial, 4x temporal, causal)", "latent_frames": T,
                               "frames": 9, "temporal": 4, "causal": True, "spans": [list(x) for x in VW.spans()]}
    assert len(t) == s["n"] * T and t.keys[:4] == ["000000@0", "000000@1", "000000@2", "000001@0"]
    assert t.clips[:4] == ["000000"] * 3 + ["000001"] and t.frames[:4].tolist() == [0, 1, 2, 0]
    assert t.prompts[:3] == ["a red square"] * 3
    n = min(12, s["n"])
    want = VW.reference_targets(s["vae"], world["teacher"], s["raw"][:n], VW.spans())  # (n, T, D) float64
    got = t.embeddings[:n * T].double().view(n, T, -1)
    assert (got - want).abs().max() < 2e-3  # float16 storage
    # each latent frame's own span: frame 0's target is the first frame alone, not a mean over the first four
    assert ((want[:, 0] - want[:, 1]).norm(dim=-1) > 1e-2).all()
    lat = t.latents[:n * T].double().view(n, T, c, 8, 8).transpose(1, 2)  # back to (n, C, T, h, w)
    assert (lat - s["raw"][:n]).abs().max() < 2e-3 * max(1.0, s["raw"].abs().max().item())


def test_diffusion_space_clips_are_decoded_as_the_pipeline_decodes(world, tmp_path):
    """Wan's per-channel statistics undone (``z * std + mean``) before the decode: the same targets and latents as
    the VAE-space shards of the same clips."""
    from fastlclip.distill import read_targets

    s = world["get"]("wan2.1")
    shards, raw = VW.clip_shards(s["vae"], tmp_path / "shards", 8, 8, diffusion=True)
    _targets(shards, tmp_path / "targets", s["vae"], world["teacher"], space="diffusion")
    t = read_targets(tmp_path / "targets")
    want = VW.reference_targets(s["vae"], world["teacher"], raw, VW.spans())
    assert (t.embeddings.double().view(8, VW.LATENT_FRAMES, -1) - want).abs().max() < 2e-3
    assert (t.latents.double().view(8, VW.LATENT_FRAMES, 16, 8, 8).transpose(1, 2) - raw).abs().max() < 2e-3
    assert t.info["space"] == "diffusion"


def test_a_distilled_video_student_beats_the_mean_embedding_baseline_per_frame(world):
    """On held-out clips (whole: every latent frame of a clip on one side of the split)."""
    from fastlclip import distill, load

    space = "wan2.1"
    s = world["get"](space)
    t = distill.read_targets(s["targets"])
    train, held = t.split(0.2)
    assert set(train.clips).isdisjoint(held.clips) and len(held) % VW.LATENT_FRAMES == 0 and len(held) > 0
    r = distill.evaluate(s["final"], s["targets"])
    assert r["rows"] == len(held)
    v = r["video"]["per_frame"]
    assert v["cosine"] > v["baseline_cosine"] + 0.05, r
    assert all(a > b for a, b in zip(v["by_t"], v["baseline_by_t"])), r
    model = load(None, s["final"])  # a Latent-CLIP of the space: clips (B, C, T, h, w) in
    assert model.latent_space.video and model.cfg.vision.latent_channels == CHANNELS[space]


def test_eval_per_frame_per_clip_and_within_clip_against_the_students_own_clip_scores(world, capsys):
    """``distill eval``'s figures recomputed here: the student's ``encode_latents`` on the held-out clips
    (B, C, T, h, w), cosines per frame, pooled per clip, and within-clip pairs counted one by one."""
    from fastlclip import distill, load
    from fastlclip.distill.__main__ import main

    s = world["get"]("wan2.1")
    classes = ["red", "green", "blue"]
    assert main(["eval", str(s["final"]), str(s["targets"]), "--classes", *classes]) == 0
    out = capsys.readouterr()
    r = json.loads(out.out)
    rows = {line.split()[0] + (line.split()[1] if line.startswith(("per", "within")) else "")
            for line in out.err.strip().splitlines()[1:]}
    assert {"perframe", "t=0", "t=1", "t=2", "perclip", "withinclip"} <= rows, out.err
    t = distill.read_targets(s["targets"])
    _, held = t.split(0.2)
    T, n = VW.LATENT_FRAMES, len(held) // VW.LATENT_FRAMES
    idx = [int(c) for c in held.clips[::T]]
    model = load(None, s["final"]).double()
    with torch.no_grad():
        emb = model.encode_latents(s["raw"][idx], space="vae", normalize=True)  # (n, T, D)
        text = F.normalize(model.encode_text([f"a photo of a {c}." for c in classes]), dim=-1)
        prompt = F.normalize(model.encode_text(["a red square"]), dim=-1)[0]
    target = F.normalize(held.embeddings.double(), dim=-1).view(n, T, -1)
    mean = F.normalize(target.reshape(n * T, -1).mean(0), dim=0)
    v = r["video"]
    assert v["clips"] == n and v["latent_frames"] == T
    assert v["per_frame"]["cosine"] == pytest.approx((emb * target).sum(-1).mean().item(), abs=1e-4)
    assert v["per_frame"]["by_t"] == pytest.approx((emb * target).sum(-1).mean(0).tolist(), abs=1e-4)
    assert v["per_frame"]["baseline_cosine"] == pytest.approx((target @ mean).mean().item(), abs=1e-5)
    pooled = lambda e: F.normalize(e.mean(1), dim=-1)  # noqa: E731
    assert v["per_clip"]["cosine"] == pytest.approx((pooled(emb) * pooled(target)).sum(-1).mean().item(), abs=1e-4)
    assert v["per_clip"]["baseline_cosine"] == pytest.approx((pooled(target) @ mean).mean().item(), abs=1e-5)
    score = pairs = 0
    for i in range(n):
        for txt in [*text, prompt]:
            s_r, t_r = emb[i] @ txt, target[i] @ txt
            for a in range(T):
                for b in range(a + 1, T):
                    dt, ds = (t_r[a] - t_r[b]).item(), (s_r[a] - s_r[b]).item()
                    if dt != 0:
                        pairs += 1
                        score += 1.0 if dt * ds > 0 else 0.5 if ds == 0 else 0.0
    assert v["within_clip"]["pairs"] == pairs == n * 4 * 3
    assert v["within_clip"]["agreement"] == pytest.approx(score / pairs, abs=0.02)  # float32 vs float64 near-ties
    assert v["within_clip"]["agreement"] > 0.5


def test_a_noise_aware_video_student_noises_each_latent_frame_in_diffusion_space(world, tmp_path):
    """``Student`` on latent frames (C, h, w): the frame read as a one-frame clip, noised in Wan's per-channel
    diffusion space (transcribed), as the model reads noised clips."""
    from fastlclip import distill
    from fastlclip.distill.train import Student, noise_shape

    s = world["get"]("wan2.1")
    model = tv.model(s["vae"], "wan2.1", side=8, noise_aware=True)
    model.check_finite = False
    raw = s["raw"][:3, :, 1].float()  # latent frame 1 of three clips
    shape = noise_shape(model.latent_space, raw.shape[1:])
    assert shape == (16, 8, 8)
    level, eps = torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    z = VW.to_diffusion_reference(s["vae"], raw.double()[:, :, None])
    noised = (1 - level.double().view(-1, 1, 1, 1, 1)) * z + level.double().view(-1, 1, 1, 1, 1) * eps.double()[:, :, None]
    with torch.no_grad():
        want = model.encode_latents(noised.float(), space="diffusion", noise_level=level)[:, 0]
        got = Student(model, True)(raw, level, eps)
    assert (got - want).abs().max() < 1e-4
    final = distill.train(s["targets"], tmp_path / "run", student=dict(VW.STUDENT), teacher=world["teacher"],
                          noise_aware=True, **dict(RUN, steps=4, eval_every=4))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(line["eval"]["cosine_at"]) == {"0.25", "0.5", "0.75"}
    per = distill.evaluate(final, s["targets"])["per_noise_level"]
    assert set(per) == {"0.25", "0.5", "0.75"} and all("per_clip" in v["video"] for v in per.values())


def test_single_frames_other_channels_packed_tokens_and_image_shards_are_refused_naming_the_space(world, tmp_path,
                                                                                                 capsys):
    from fastlclip import distill
    from fastlclip.distill.__main__ import main

    s = world["get"]("wan2.1")
    raw = s["raw"][:2].float().numpy()
    space = r"the video space AutoencoderKLWan \(16 channels, 4x spatial, 4x temporal, causal\)"
    cases = {"frames": (raw[:, :, 0], r"\(16, 8, 8\), single frames; " + space + r" takes clips \(16, T, h, w\)"),
             "channels": (raw[:, :4], r"\(4, 3, 8, 8\); " + space + r" takes clips \(16, T, h, w\) in vae space: "
                                      "wrong --vae or --space"),
             "tokens": (raw[:, :, 0].reshape(2, 16, 64).transpose(0, 2, 1), "packed tokens; " + space + " takes the "
                        "grid")}
    for name, (arrays, match) in cases.items():
        write_tar(tmp_path / f"{name}.tar", [(f"{i:06d}", {"latent.npy": npy_bytes(np.ascontiguousarray(a))})
                                              for i, a in enumerate(arrays)])
        with pytest.raises(ValueError, match=match):
            _targets([tmp_path / f"{name}.tar"], tmp_path / name, s["vae"], world["teacher"])
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match=space + ": a teacher set's targets are not supported on video"):
        distill.make_targets(s["shards"], tmp_path / "set", vae=s["vae"], teachers=["name=a,kind=open_clip,model=x"],
                             progress=False)
    write_tar(tmp_path / "images.tar", [("000000", {"png": png_bytes(np.zeros((32, 32, 3), np.uint8))})])
    with pytest.raises(ValueError, match="the shards hold images; " + space + " makes targets from latent clips"):
        _targets([tmp_path / "images.tar"], tmp_path / "images", s["vae"], world["teacher"])
    assert main(["targets", str(tmp_path / "frames.tar"), "--out", str(tmp_path / "cli"), "--vae", "wan2.1",
                 "--teacher", "ViT-B-32"]) == 2  # before work: one line naming the registered space
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "single frames; the video space 'wan2.1' (16 channels, 8x spatial, 4x " \
        "temporal, causal) takes clips (16, T, h, w)" in err, err
    assert not (tmp_path / "cli").exists()


def test_a_clip_of_another_T_is_a_bad_sample_naming_the_space_and_the_runs_T(world, tmp_path):
    from fastlclip.distill import read_targets

    s = world["get"]("wan2.1")
    raw = s["raw"][:3].float().numpy()
    write_tar(tmp_path / "mixed.tar", [("000000", {"latent.npy": npy_bytes(np.ascontiguousarray(raw[0]))}),
                                       ("000001", {"latent.npy": npy_bytes(np.ascontiguousarray(raw[1, :, :2]))}),
                                       ("000002", {"latent.npy": npy_bytes(np.ascontiguousarray(raw[2]))})])
    report = _targets([tmp_path / "mixed.tar"], tmp_path / "t", s["vae"], world["teacher"])
    assert report.rows == 2
    bad = [json.loads(x) for x in (tmp_path / "t" / "manifest.jsonl").read_text().splitlines()][0]["bad"]
    assert [b["key"] for b in bad] == ["000001"]
    assert "(16, 2, 8, 8)" in bad[0]["error"] and "the video space AutoencoderKLWan (16 channels" in bad[0]["error"] \
        and "T = 3 latent frames" in bad[0]["error"], bad
    assert read_targets(tmp_path / "t").clips == ["000000"] * 3 + ["000002"] * 3
    report = _targets([tmp_path / "mixed.tar"], tmp_path / "raise", s["vae"], world["teacher"], on_error="raise")
    assert len(report.failed) == 1 and "sample '000001'" in report.failed[0]["error"] \
        and "the video space AutoencoderKLWan" in report.failed[0]["error"]


def test_ltx_video_targets_record_its_weights_statistics_for_the_students_config(world, tmp_path):
    """LTX-Video keeps its latent statistics in its weights: the targets' run.json records them (``vae_stats``), the
    student's config carries them and reads one 4x4 latent frame of its 8x space (a 2x2 patch)."""
    from fastlclip import vaes
    from fastlclip.distill import read_targets
    from fastlclip.distill.train import fit_student

    vae = tv.tiny_vae("ltx-video")
    shards, raw = VW.clip_shards(vae, tmp_path / "shards", 4, 4, latent_frames=2)
    _targets(shards, tmp_path / "targets", vae, world["teacher"])
    t = read_targets(tmp_path / "targets")
    assert t.info["vae_stats"] == vaes.weight_stats(vae) and t.info["video"]["spans"] == [[0, 1], [1, 9]]
    assert t.latents.shape == (8, 8, 4, 4)
    want = VW.reference_targets(vae, world["teacher"], raw, [(0, 1), (1, 9)])  # F = 1 + 8 (T - 1)
    assert (t.embeddings.double().view(4, 2, -1) - want).abs().max() < 2e-3
    with pytest.raises(ValueError, match="'ltx-video': AutoencoderKLLTXVideo's latent statistics .* live in its "
                                         "weights, and a registered name has none"):
        _targets(shards, tmp_path / "named", "ltx-video", world["teacher"])
    cfg = fit_student(dict(VW.STUDENT, vision_cfg=dict(VW.STUDENT["vision_cfg"], latent_factor=8)), t.info)
    assert cfg["vae_stats"] == t.info["vae_stats"]
    assert {k: cfg["vision_cfg"][k] for k in ("image_size", "latent_factor", "latent_n_channels", "patch_size")} == \
        {"image_size": 32, "latent_factor": 8, "latent_n_channels": 8, "patch_size": 2}
