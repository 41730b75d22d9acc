"""A reward ensemble served and adapted (issue 32, part 4): the server's per-head scores are
``RewardEnsemble.score``'s (the reward object called directly), its total the weighted sum with the request's
weights or the server's defaults, bad weights are 400, one trunk forward per batch; single-model replies are
v1's, unchanged; verl-omni's ``compute_score`` and the flow_grpo scorer return every head. A tiny random
ensemble built here, in-process ASGI or uvicorn on 127.0.0.1, bounded in time."""

import asyncio
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save

import fastlclip
from distill_world import STUDENT, VAE_CFG
from fastlclip.integrations import flow_grpo, verl_omni
from fastlclip.serve import create_app
from fastlclip.serve.app import head_range
from test_integrations import serving
from test_serve import V1, post, run, serve_main

HEADS = ("hps", "pick", "aes")


def tiny_ensemble(seed: int = 0, noise_aware: bool = False):
    """A tiny random ``LatentEnsemble``, built without training (the values do not matter, only that every path
    computes the same ones): tests/distill_world.py's student trunk (16-channel latents of its VAE, 8x8), an
    ``open_clip`` head ``hps`` (cos), a transformers head ``pick`` (logit, logit scale 50) and an aesthetic head
    ``aes`` on ``hps``: the head kinds tests/test_ensemble_student.py trains."""
    from fastlclip.ensemble import LatentEnsemble

    oc_text = {"type": "open_clip", "embed_dim": 24,
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    hf_text = {"type": "hf", "projection_dim": 16,
               "config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                          "eos_token_id": 49407, "pad_token_id": 0}}
    heads = [{"name": "hps", "kind": "open_clip", "embed_dim": 24, "base": None, "text": oc_text,
              "reward": {"form": "cos", "constant": 1.0, "scale": 1.0, "preset": "hps"}},
             {"name": "pick", "kind": "hf", "embed_dim": 16, "base": None, "text": hf_text,
              "reward": {"form": "logit", "constant": 30.0, "scale": 1.0, "preset": "pickscore"}},
             {"name": "aes", "kind": "aesthetic", "embed_dim": 1, "base": "hps", "mlp_sizes": [24, 16, 8, 8, 4, 1],
              "reward": {"form": "head", "constant": 10.0, "scale": 1.0, "preset": "aesthetic"}}]
    torch.manual_seed(seed)
    trunk = {**STUDENT, "vae_cfg": VAE_CFG, "vision_cfg": {**STUDENT["vision_cfg"], "noise_aware": noise_aware}}
    model = LatentEnsemble(trunk, heads, {"test": "tests/test_serve_ensemble.py"})
    with torch.no_grad():
        model.logit_scale["pick"].fill_(math.log(50.0))
        model.logit_scale["hps"].fill_(math.log(100.0))
    return model.eval()


PROMPTS = ["a red square", "a blue thing", "a photo of a dog"]
DEFAULTS = {"hps": 5.0, "pick": 0.05, "aes": 0.5}


@pytest.fixture(scope="module")
def model():
    return tiny_ensemble()


@pytest.fixture(scope="module")
def reward(model):
    return fastlclip.RewardEnsemble(model, weights=DEFAULTS)


def lat(b=3, seed=0):
    return torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


def body(x, prompts, weights=None):
    meta = {"prompts": json.dumps(prompts)}
    if weights is not None:
        meta["head_weights"] = weights if isinstance(weights, str) else json.dumps(weights)
    return save({"latents": x}, metadata=meta)


def direct(model, x, prompts):
    """Each head's scores from a fresh RewardEnsemble on the same model, called in process."""
    with torch.no_grad():
        return {h: v.tolist() for h, v in fastlclip.RewardEnsemble(model, weights={"hps": 1.0}).score(x, prompts).items()}


def test_head_scores_are_reward_ensemble_scores_and_the_total_is_weighted(model, reward):
    app = create_app(reward)
    x = lat()
    want = direct(model, x, PROMPTS)
    for weights, applied in ((None, DEFAULTS), ({"pick": 2.0, "aes": 1}, {"hps": 0.0, "pick": 2.0, "aes": 1.0})):
        r = post(app, body(x, PROMPTS, weights))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["protocol_version"] == "1" and out["score_kind"] == "weighted_total" and out["model"] == "ensemble"
        assert out["head_weights"] == applied and list(out["head_scores"]) == list(HEADS)
        for h in HEADS:
            assert out["head_scores"][h] == pytest.approx(want[h], abs=1e-5)
        total = [sum(applied[h] * want[h][i] for h in HEADS) for i in range(3)]
        assert out["raw_scores"] == pytest.approx(total, abs=1e-4)
    # the ranges: a cosine's, a logit's (logit scale 50), none for the MLP
    assert out["head_ranges"] == {"hps": [-1.0, 1.0], "pick": pytest.approx([-50.0, 50.0]), "aes": None}
    assert head_range(model, "pick") == pytest.approx([-50.0, 50.0])
    info = run(app, lambda c: c.get("/healthz")).json()
    assert info["heads"] == list(HEADS) and info["head_weights"] == DEFAULTS and info["channels"] == 16


@pytest.mark.parametrize("weights, message", [
    ({"clip": 1.0}, "unknown heads ['clip']"),
    ({"hps": -1}, "finite number >= 0"),
    ({"hps": 1e400}, "finite number >= 0"),  # JSON overflows to inf
    ('{"hps": NaN}', "finite number >= 0"),
    ({"hps": True}, "finite number >= 0"),
    ({"hps": "1"}, "finite number >= 0"),
    ({"hps": 0, "pick": 0.0}, "all zero"),
    ({}, "non-empty JSON object"),
    ([1, 2], "non-empty JSON object"),
    ("{hps: 1", "not JSON"),
])
def test_bad_head_weights_are_400_naming_the_problem(reward, weights, message):
    if isinstance(weights, dict) and weights.get("hps") == 1e400:
        weights = '{"hps": 1e400}'
    r = post(create_app(reward), body(lat(1), PROMPTS[:1], weights))
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_one_trunk_forward_per_batch_for_every_head(model):
    reward = fastlclip.RewardEnsemble(model, weights=DEFAULTS)
    app = create_app(reward, max_batch_size=8, max_wait_ms=200)
    calls = []
    hook = model.trunk.visual.latent_vit.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        async def go(c):
            bodies = [body(lat(2, seed=s), PROMPTS[:2], {"hps": 1.0 + s}) for s in range(3)]
            return await asyncio.gather(*(c.post("/v1/score", content=b, headers=V1) for b in bodies))
        replies = run(app, go)
    finally:
        hook.remove()
    assert all(r.status_code == 200 for r in replies)
    assert calls == [6]  # three requests, different weights: one batch, one trunk forward for all heads
    for s, r in enumerate(replies):
        want = direct(model, lat(2, seed=s), PROMPTS[:2])
        assert r.json()["raw_scores"] == pytest.approx([(1.0 + s) * v for v in want["hps"]], abs=1e-5)


def test_a_noise_aware_ensemble_scores_latents_renoised_to_u():
    """Per-latent noise levels and seeds: each head's score is RewardEnsemble.score on the latents re-noised as
    protocol.renoise does, at those levels, in one trunk forward (chunked by the batch size)."""
    from fastlclip.serve import protocol

    model = tiny_ensemble(seed=1, noise_aware=True)
    assert model.noise_aware
    with torch.no_grad():  # the noise embedding starts at zero: make the noise level matter
        for prm in model.trunk.visual.latent_vit.noise_embed.parameters():
            prm.copy_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(2)))
    reward = fastlclip.RewardEnsemble(model, weights={"pick": 1.0})
    x, u, seeds = lat(3, seed=4), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([3, 4, 5])
    r = post(create_app(reward, max_batch_size=2), save({"latents": x, "u": u, "seeds": seeds},
                                                        metadata={"prompts": json.dumps(PROMPTS)}))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["noise_level"] == pytest.approx([0.1, 0.5, 0.9])
    noised = protocol.renoise(protocol.ScoreRequest(x, PROMPTS, (0.1, 0.5, 0.9), (3, 4, 5)))
    with torch.no_grad():
        want = fastlclip.RewardEnsemble(model, weights={"hps": 1.0}).score(noised, PROMPTS, noise_level=u)
        clean = fastlclip.RewardEnsemble(model, weights={"hps": 1.0}).score(noised, PROMPTS)
    assert (want["hps"] - clean["hps"]).abs().max() > 1e-3  # u reaches the trunk
    for h in HEADS:
        assert out["head_scores"][h] == pytest.approx(want[h].tolist(), abs=1e-5)
    assert out["raw_scores"] == pytest.approx(want["pick"].tolist(), abs=1e-5)


def test_single_model_replies_are_v1_unchanged(seeded_tiny_model):
    app = create_app(fastlclip.LatentCLIPReward(seeded_tiny_model))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    r = post(app, save({"latents": x}, metadata={"prompt": "a dog"}))
    assert r.status_code == 200 and set(r.json()) == {"protocol_version", "raw_scores", "model"}
    r = post(app, save({"latents": x}, metadata={"prompt": "a dog", "head_weights": '{"hps": 1}'}))
    assert r.status_code == 400 and "no heads" in r.json()["error"]


def test_verl_omni_returns_the_weighted_score_and_every_head(model, reward):
    x = lat(2, seed=3)
    want = direct(model, x, ["a dog"] * 2)
    with serving(create_app(reward)) as url:
        one = asyncio.run(verl_omni.compute_score(None, "a dog", {"latents_clean": x[:1]}, url + "/v1/score",
                                                  score_scale=0.1, score_bias=1.0))
        two = asyncio.run(verl_omni.compute_score(x, "a dog", {}, url + "/v1/score", head_weights={"aes": 2.0}))
    total = sum(DEFAULTS[h] * want[h][0] for h in HEADS)
    assert set(one) == {"score", "raw_score", "hps_raw_score", "pick_raw_score", "aes_raw_score"}
    assert one["raw_score"] == pytest.approx(total, abs=1e-4) and one["score"] == pytest.approx(total * 0.1 + 1.0, abs=1e-5)
    for h in HEADS:
        assert one[f"{h}_raw_score"] == pytest.approx(want[h][0], abs=1e-5)
        assert two[f"{h}_raw_score"] == pytest.approx(want[h], abs=1e-5)
    assert two["score"] == pytest.approx([2.0 * v for v in want["aes"]], abs=1e-5)


class _Reply:
    status_code = 200

    def __init__(self, obj):
        self.text = json.dumps(obj)

    def json(self):
        return json.loads(self.text)


GOOD = {"protocol_version": "1", "raw_scores": [0.5 * 0.25 + 2 * 30.0 + 1.5], "score_kind": "weighted_total",
        "head_scores": {"hps": [0.25], "pick": [30.0], "aes": [1.5]}, "head_weights": {"hps": 0.5, "pick": 2, "aes": 1},
        "head_ranges": {"hps": [-1, 1], "pick": [-50, 50], "aes": None}}


@pytest.mark.parametrize("change, problem", [
    ({"score_kind": "cosine"}, "score_kind 'cosine'"),
    ({"score_kind": None}, "score_kind 'None'"),
    ({"raw_scores": [1.0]}, "not the weighted sum of its head scores"),
    ({"head_scores": {"hps": [1.5], "pick": [30.0], "aes": [1.5]}}, "outside its range [-1, 1]"),
    ({"head_scores": {"hps": [0.25], "pick": [51.0], "aes": [1.5]}}, "outside its range [-50, 50]"),
    ({"head_scores": {"hps": [0.25], "pick": [30.0], "aes": [float("nan")]}}, "not finite"),
    ({"head_scores": {"hps": [0.25, 0.1], "pick": [30.0], "aes": [1.5]}}, "2 scores for the 1 latent(s) sent in head 'hps'"),
    ({"head_weights": {"hps": 0.5, "pick": 2}}, "name different heads"),
    ({"head_weights": {"hps": -0.5, "pick": 2, "aes": 1}}, "not a finite number >= 0"),
    ({"head_weights": {"hps": 0, "pick": 0, "aes": 0}}, "all zero"),
    ({"head_ranges": {"hps": [1, -1], "pick": None, "aes": None}}, "lo <= hi"),
    ({"head_scores": []}, "non-empty object by head"),
])
def test_verl_omni_checks_an_ensemble_reply_per_head(change, problem):
    assert verl_omni.checked_reply(_Reply(GOOD), "u", 1) == (GOOD["raw_scores"], {"hps": [0.25], "pick": [30.0],
                                                                                    "aes": [1.5]})
    with pytest.raises(verl_omni.RewardServerError, match="invalid reply") as e:
        verl_omni.checked_reply(_Reply({**GOOD, **change}), "u", 1)
    assert problem in str(e.value)
    # a single model's reply keeps the cosine's checks: a total out of [-1, 1] without score_kind is refused
    with pytest.raises(verl_omni.RewardServerError, match="outside the cosine's range"):
        verl_omni.raw_scores(_Reply({"protocol_version": "1", "raw_scores": GOOD["raw_scores"]}), "u", 1)


def test_flow_grpo_returns_multi_scores_dict_of_every_head(model, tmp_path):
    x = lat(5, seed=7)
    prompts = ["a dog", "a cat", "green", "a red square", "a blue thing"]
    want = direct(model, x, prompts)
    fn = flow_grpo.latent_clip_score("cpu", model, batch_size=2, weights={"hps": 2.0, "pick": 0.5})
    details, extra = fn(x, prompts, {})
    assert extra == {} and list(details) == [*HEADS, "avg"]
    for h in HEADS:
        assert isinstance(details[h], np.ndarray) and details[h] == pytest.approx(want[h], abs=1e-5)
    assert details["avg"] == pytest.approx([2.0 * a + 0.5 * b for a, b in zip(want["hps"], want["pick"])], abs=1e-4)
    # from the file, as fastlclip.load(None, path): the same scores, weights 1 each by default
    from fastlclip.ensemble import save_ensemble

    path = save_ensemble(model, tmp_path / "ens.safetensors")
    details, _ = flow_grpo.latent_clip_score("cpu", None, str(path))(x, "a dog", {})
    want = direct(model, x, ["a dog"] * 5)
    assert details["avg"] == pytest.approx([sum(want[h][i] for h in HEADS) for i in range(5)], abs=1e-4)
    with pytest.raises(ValueError, match="latents only"):
        fn(torch.rand(1, 3, 64, 64), "a dog", {})
    with pytest.raises(ValueError, match="unknown head 'clip'"):
        flow_grpo.latent_clip_score("cpu", model, weights={"clip": 1.0})
    with pytest.raises(ValueError, match="all zero"):
        flow_grpo.latent_clip_score("cpu", model, weights={"hps": 0})


@pytest.mark.parametrize("args, message, needs_file", [
    (["--head-weight", "hps"], "NAME=WEIGHT", False),
    (["--head-weight", "hps=-1"], "finite number >= 0", False),
    (["--head-weight", "hps=nan"], "finite number >= 0", False),
    (["--head-weight", "clip=1"], "no such head; its heads: hps, pick, aes", True),
    (["--head-weight", "hps=1", "--head-weight", "hps=2"], "names a head twice", True),
    (["--head-weight", "hps=0", "--head-weight", "pick=0", "--head-weight", "aes=0"], "every head weighs 0", True),
    (["--backend", "triton"], "eager backend", True),
])
def test_cli_head_weights_checked_at_start(model, tmp_path, capsys, args, message, needs_file):
    """Each refusal is one line on stderr and exit 2; head names are checked against the file's heads once it
    loads, before the server starts."""
    from fastlclip.ensemble import save_ensemble
    from fastlclip.serve.__main__ import main

    path = save_ensemble(model, tmp_path / "ens.safetensors") if needs_file else __file__
    with pytest.raises(SystemExit) as exit_:
        main(["--pretrained", str(path), "--device", "cpu", *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_cli_serves_an_ensemble_file_with_default_weights(model, tmp_path, monkeypatch):
    """``--pretrained ensemble.safetensors`` without ``--model``: the app gets a RewardEnsemble with the
    --head-weight defaults (1 for heads not named); uvicorn itself is not started here."""
    from fastlclip.ensemble import save_ensemble

    path = save_ensemble(model, tmp_path / "ens.safetensors")
    code, app = serve_main(monkeypatch, ["--pretrained", str(path), "--device", "cpu", "--head-weight", "pick=0.05"])
    assert code == 0
    reward = app.state.reward
    assert isinstance(reward, fastlclip.RewardEnsemble) and reward.weights == {"hps": 1.0, "pick": 0.05, "aes": 1.0}
    r = post(app, body(lat(1), PROMPTS[:1]))
    assert r.status_code == 200 and r.json()["head_weights"] == {"hps": 1.0, "pick": 0.05, "aes": 1.0}
