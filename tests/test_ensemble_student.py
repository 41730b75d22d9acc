"""The multi-head student and the ensemble reward (issue 32, parts 3 and 4), on CPU with tiny everything: a
16-channel AutoencoderKL (tests/distill_world.py), a tiny open_clip teacher with a weights file, a tiny
transformers CLIPModel + processor, a tiny aesthetic MLP (tests/ensemble_world.py, on
tests/test_ensemble_teachers.py's builders).

ReNO's loss forms are written out from ExplainableML/ReNO at bd6f6ac (rewards/hps.py, pickscore.py, clip.py,
aesthetic.py), as in tests/test_ensemble_teachers.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from distill_world import STUDENT, make_vae
from fastlclip import ensemble as ens_mod
from fastlclip.distill import make_targets, read_targets
from fastlclip.distill import teachers as tt
import importlib

train_mod = importlib.import_module("fastlclip.distill.train")
from ensemble_world import prompt_shards, spec_args, teacher_files

N = 200
PROMPTS = ["a red square", "a blue thing", "green", "a photo of a dog", "an orange cat on a mat"]


def _shards(vae, folder, n, per_shard):  # every fourth sample has no prompt
    return prompt_shards(vae, folder, n, per_shard, lambda i: PROMPTS[i % len(PROMPTS)] if i % 4 else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens_student")
    vae = make_vae()
    files = teacher_files(d, vae)
    specs = files["specs"]
    shards = _shards(vae, d / "shards", N, 50)
    make_targets(shards, d / "targets", vae=vae, teachers=specs, batch_size=50, progress=False)
    return {"dir": d, "vae": vae, "specs": specs, "targets": d / "targets", "oc": files["oc"], "hf": files["hf"],
            "mlp": files["mlp"]}


def _train(world, out, **kw):
    args = dict(student=STUDENT, teachers=world["specs"], steps=200, batch_size=32, lr=2e-3, warmup_steps=20,
                seed=0, save_every=100, holdout=0.2, progress=False, device="cpu")
    args.update(kw)
    return train_mod.train(world["targets"], out, **args)


@pytest.fixture(scope="module")
def trained(world):
    return _train(world, world["dir"] / "run", eval_every=200, reward_weight=0.5)


def _lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# -- part 3: training --------------------------------------------------------------------------------
def test_multi_head_student_beats_the_mean_embedding_per_head(world, trained):
    data = read_targets(world["targets"], teacher="hps")
    train_set, held = data.split(0.2)
    assert len(held) >= 20
    model = fastlclip.load(None, trained)
    assert isinstance(model, ens_mod.LatentEnsemble) and model.head_names == ["hps", "pick", "aes"]
    with torch.no_grad():
        embs = model.encode_latents(held.latents.float(), space="vae")
    figures = {}
    for h in ("hps", "pick"):
        mean = F.normalize(train_set.columns[h].float().mean(0), dim=0)
        target = F.normalize(held.columns[h].float(), dim=-1)
        baseline = (target @ mean).mean().item()
        got = (embs[h] * target).sum(-1).mean().item()
        figures[h] = (got, baseline)
        assert got - baseline > 0.35 * (1 - baseline), (h, got, baseline)  # over a third of the gap to 1 closed
    # the aesthetic head on the student's hps prediction vs its target score
    aes = model.score("aes", embs)
    base = held.scores["aes"].float()
    err, err_mean = (aes - base).abs().mean().item(), (base - train_set.scores["aes"].float().mean()).abs().mean().item()
    corr = torch.corrcoef(torch.stack([aes, base]))[0, 1].item()
    figures["aes"] = {"mae": err, "mae_of_mean": err_mean, "pearson": corr}
    # Not asserted: the tiny random MLP's scores barely vary (an affine map on a direction the student's 0.6-cosine
    # predictions don't resolve); this only checks that the head reads the student's hps prediction.
    assert torch.isfinite(aes).all() and aes.shape == base.shape
    print("held-out:", json.dumps(figures))
    # metrics per head; the eval line's cosines are the loaded model's
    lines = _lines(world["dir"] / "run")
    assert set(lines[0]["heads"]) == {"hps", "pick"} and set(lines[0]["reward"]) == {"hps", "pick", "aes"}
    ev = [x["eval"] for x in lines if "eval" in x][-1]
    for h in ("hps", "pick"):
        assert ev["heads"][h]["cosine"] == pytest.approx(figures[h][0], abs=1e-4)


def test_resume_with_several_heads_is_exact(world, tmp_path, monkeypatch):
    kw = dict(steps=6, save_every=3, eval_every=3, reward_weight=0.3, noise_aware=True, log_every=2)
    ref = _train(world, tmp_path / "ref", **kw)
    real = train_mod.save_atomic

    def crash(obj, path):
        if obj["step"] > 3:
            raise RuntimeError("killed")
        real(obj, path)

    monkeypatch.setattr(train_mod, "save_atomic", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _train(world, tmp_path / "run", **kw)
    monkeypatch.setattr(train_mod, "save_atomic", real)
    final = _train(world, tmp_path / "run", **kw)
    from safetensors.torch import load_file

    got, want = load_file(str(final)), load_file(str(ref))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _lines(tmp_path / "run") == _lines(tmp_path / "ref")
    with pytest.raises(ValueError, match="other settings"):
        _train(world, tmp_path / "run", **{**kw, "head_weights": {"pick": 2.0}})


def test_init_from_a_named_teacher_and_errors(world, tmp_path):
    cfg = dict(STUDENT, vision_cfg=dict(STUDENT["vision_cfg"], layers=1))  # the teacher's tower: 1 layer, width 64
    out = _train(world, tmp_path / "init", student=cfg, steps=2, init="teacher", init_teacher="hps", patch_steps=1)
    model = fastlclip.load(None, out)
    assert model.head_names == ["hps", "pick", "aes"]
    with pytest.raises(ValueError, match="init_teacher= must name one of \\['hps'\\]"):
        _train(world, tmp_path / "x", steps=2, init="teacher", init_teacher="pick")
    with pytest.raises(ValueError, match="head_weights names 'nope'"):
        _train(world, tmp_path / "x", steps=2, head_weights={"nope": 1.0})
    with pytest.raises(ValueError, match="not the set"):
        _train(world, tmp_path / "x", steps=2, teachers=world["specs"][:1])
    with pytest.raises(ValueError, match="not both"):
        _train(world, tmp_path / "x", steps=2, teacher="ViT-B-32")


# -- part 4: the ensemble model and reward -----------------------------------------------------------
def test_load_round_trip_and_text_towers_are_the_teachers(world, trained):
    model = fastlclip.load(None, trained)
    again = fastlclip.LatentEnsemble.load(trained)
    a, b = model.tensors(), again.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = ens_mod.ensemble_metadata(trained)
    assert [h["name"] for h in meta["heads"]] == ["hps", "pick", "aes"]
    assert meta["heads"][0]["text"]["type"] == "open_clip" and meta["heads"][1]["text"]["type"] == "hf"
    assert meta["heads"][1]["reward"] == {"form": "logit", "constant": 30.0, "scale": 1.0, "preset": "pickscore"}
    assert meta["trunk"]["vae_cfg"] and meta["heads"][2]["mlp_sizes"] == [32, 16, 8, 8, 4, 1]
    built = tt.build_teachers(world["specs"])
    prompts = ["a photo of a dog", "an orange cat on a mat, watercolour", "green",
               " ".join(f"word{i} and" for i in range(60))]  # over 77 tokens: truncated, keeping the end token
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastlclip.tokenize warns of the truncation
        for h in ("hps", "pick"):  # open_clip's BPE on the transformers tower: the CLIPTokenizer's embedding
            torch.testing.assert_close(model.encode_text(prompts, h), built[h].embed_texts(prompts), atol=1e-5, rtol=1e-5)
        assert model.logit_scale["pick"].exp().item() == pytest.approx(50.0)


def test_one_trunk_forward_whatever_the_heads(world, trained):
    model = fastlclip.load(None, trained)
    calls = []
    vit = model.trunk.visual.latent_vit
    hook = vit.register_forward_hook(lambda *a: calls.append(1))
    try:
        lat = torch.randn(2, 16, 8, 8)
        embs = model.encode_latents(lat)
        assert set(embs) == {"hps", "pick"} and len(calls) == 1
        reward = fastlclip.RewardEnsemble(model, weights={"hps": 5.0, "pick": 0.05, "aes": 1.0})
        reward(lat, "a dog")
        assert len(calls) == 2
        reward.score(lat, ["a dog", "a cat"])
        assert len(calls) == 3
        # ReNO's list of rewards: one per head, all read from one trunk forward per latents tensor
        heads = reward.heads()
        assert [(h.name, h.weighting) for h in heads] == [("hps", 5.0), ("pick", 0.05), ("aes", 1.0)]
        total = sum(h(lat, "a dog") * h.weighting for h in heads)
        assert len(calls) == 4
        torch.testing.assert_close(total, reward(lat, "a dog"))  # the same latents, unchanged: no new forward
        assert len(calls) == 4
        lat.add_(0.1)  # latents changed in place (an optimizer step): the next call runs the trunk again
        heads[0](lat, "a dog")
        heads[1](lat, "a dog")
        assert len(calls) == 5
    finally:
        hook.remove()


def test_reward_ensemble_is_renos_losses(world, trained):
    model = fastlclip.load(None, trained)
    lat = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = {"hps": 5.0, "pick": 0.05, "aes": 0.5}
    reward = fastlclip.RewardEnsemble(model, weights=weights)
    loss = reward(lat, "a photo of a dog")
    with torch.no_grad():
        embs = model.encode_latents(lat)
        t_h, t_p = model.encode_text(["a photo of a dog"], "hps"), model.encode_text(["a photo of a dog"], "pick")
        hps = 1 - torch.diagonal(embs["hps"] @ t_h.T)[0]  # ReNO's HPSLoss: the first sample
        pick = 30 - (model.logit_scale["pick"].exp() * (embs["pick"] @ t_p.T)).mean()
        aes = 10.0 - model.mlp["aes"](F.normalize(embs["hps"], dim=-1)).mean()
    losses = reward.losses(lat, "a photo of a dog")
    torch.testing.assert_close(losses["hps"][0], hps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["pick"].mean(), pick, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(losses["aes"].mean(), aes, atol=1e-5, rtol=1e-5)
    want = 5.0 * (1 - (embs["hps"] @ t_h.T).squeeze(-1)).mean() + 0.05 * pick + 0.5 * aes
    torch.testing.assert_close(loss.detach(), want, atol=1e-4, rtol=1e-5)
    loss.backward()
    assert lat.grad is not None and torch.isfinite(lat.grad).all() and lat.grad.abs().sum() > 0
    scores = reward.score(lat.detach(), ["a photo of a dog"] * 3)
    torch.testing.assert_close(scores["pick"], model.logit_scale["pick"].exp() * (embs["pick"] @ t_p.T).squeeze(-1),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores["aes"], 10.0 - losses["aes"].detach(), atol=1e-5, rtol=1e-5)
    assert len(reward._text_cache["hps"]) == 1  # text features cached per head


def test_errors(world, trained, tmp_path):
    model = fastlclip.load(None, trained)
    with pytest.raises(ValueError, match="unknown head 'clip'.*hps, pick, aes"):
        fastlclip.RewardEnsemble(model, weights={"clip": 1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        fastlclip.RewardEnsemble(model, weights={"hps": -1.0})
    with pytest.raises(TypeError, match="LatentEnsemble"):
        fastlclip.RewardEnsemble(torch.nn.Linear(2, 2), weights={"hps": 1.0})
    with pytest.raises(ValueError, match="not a fastlclip ensemble file"):
        ens_mod.load_ensemble(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"), metadata={ens_mod.ENSEMBLE_META_KEY: "{}"})
    with pytest.raises(ValueError, match="not fastlclip's format"):
        fastlclip.load(None, tmp_path / "plain.safetensors")
    with pytest.raises(KeyError, match="unknown head"):
        model.head("nope")
    # a tampered file: a tensor missing, metadata that names a head without its fields
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(trained), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(trained))
    save_file({k: v for k, v in sd.items() if k != "proj.pick.weight"}, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="cut.safetensors: its tensors are not this ensemble's .*proj.pick.weight"):
        fastlclip.load(None, tmp_path / "cut.safetensors")
    info = json.loads(meta[ens_mod.ENSEMBLE_META_KEY])
    info["heads"][0].pop("text")
    save_file(sd, str(tmp_path / "meta.safetensors"), metadata={ens_mod.ENSEMBLE_META_KEY: json.dumps(info)})
    with pytest.raises(ValueError, match="meta.safetensors: its ensemble metadata does not describe an ensemble"):
        fastlclip.load(None, tmp_path / "meta.safetensors")
    # a single Latent-CLIP file is not an ensemble: LatentEnsemble.load says so, fastlclip.load loads it as before
    single = tmp_path / "single.safetensors"
    tiny = fastlclip.LatentCLIP(fastlclip.model_configs.ModelConfig.from_dict(dict(STUDENT, vae="flux1")))
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(single),
              metadata={"fastlclip_config": json.dumps(dict(STUDENT, vae="flux1"))})
    with pytest.raises(ValueError, match="not a fastlclip ensemble file"):
        fastlclip.LatentEnsemble.load(single)
    assert isinstance(fastlclip.load(None, single), fastlclip.LatentCLIP)


_spec_args = spec_args


def test_torchrun_two_processes_match_one_with_several_heads(world, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))

    def argv(out):
        return ["-m", "fastlclip.distill", "train", str(world["targets"]), "--out", str(out), "--student", str(student),
                "--steps", "3", "--batch-size", "8", "--lr", "0.001", "--warmup-steps", "1", "--save-every", "3",
                "--seed", "1", "--device", "cpu", "--noise-aware", "--reward-weight", "0.2", *_spec_args(world["dir"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *argv(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, *argv(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = load_file(str(tmp_path / "ddp" / "final.safetensors")), load_file(str(tmp_path / "one" / "final.safetensors"))
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5, worst


def test_cli_trains_an_ensemble(world, tmp_path, capsys, monkeypatch):
    from fastlclip.distill.__main__ import main

    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    argv = ["train", str(world["targets"]), "--out", str(tmp_path / "run"), "--student", str(student), "--steps", "2",
            "--batch-size", "4", "--lr", "0.001", "--warmup-steps", "0", "--save-every", "1", "--seed", "0",
            "--device", "cpu", "--head-weight", "hps=5", "--head-weight", "pick=0.5", "--reward-weight", "0.1"]
    argv += _spec_args(world["dir"])
    monkeypatch.delenv("RANK", raising=False)
    assert main(argv) == 0
    final = capsys.readouterr().out.strip()
    model = fastlclip.load(None, final)
    assert model.head_names == ["hps", "pick", "aes"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["identity"]["teachers"]["head_weights"] == {"hps": 5.0, "pick": 0.5, "aes": 1.0}
    assert state["identity"]["teachers"]["reward_weight"] == 0.1
    bad = [a for a in argv if not a.startswith("name=") and a != "--teacher-spec"]  # --head-weight etc. alone
    assert main(bad + ["--teacher", "ViT-B-32"]) == 2
    assert "--head-weight, --reward-weight go with --teacher-spec" in capsys.readouterr().err
    assert main(argv + ["--teacher", "ViT-B-32"]) == 2
    assert "not both" in capsys.readouterr().err
