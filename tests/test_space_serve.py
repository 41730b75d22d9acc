"""Issue 33 part 3, the reward server and the RL adapters on the 2025-26 latent spaces (Qwen-Image, FLUX.2, SANA).

Each score is checked against the model called directly, in float64, on the pipeline's decode input, built by the
pipelines' own code transcribed in tests/test_latent_spaces_2026.py (diffusers 58eb52c0803e: Qwen-Image's
``_pack_latents`` / ``_unpack_latents`` and its decode input, FLUX.2's ``_pack_latents`` / ``_unpack_latents_with_ids``
/ denormalise / ``_unpatchify_latents``, SANA's ``latents / scaling_factor``); fastlclip's ``LatentSpace`` builds no
reference. The server runs in-process (httpx's ASGI transport), as in tests/test_serve.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import warnings

import httpx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save

import fastlclip
import tiny_spaces as ts
from fastlclip.integrations import flow_grpo, verl_omni
from fastlclip.serve import create_app
from test_serve import run
from test_latent_spaces_2026 import (flux2_decode_input, flux2_pack_latents, flux2_prepare_latent_ids,
                                     qwen_decode_input, qwen_pack_latents, qwen_unpack_latents)

V1 = {"x-drm-protocol-version": "1"}
PROMPTS = ["a red dog", "a green cat", "a blue car"]
SIDE = 16  # the tiny models' trained VAE latent: 16 x 16


def pipeline(name, vae, batch=3, height=SIDE, width=SIDE, seed=0):
    """``(grid, tokens, raw)`` for a ``height x width`` VAE latent: the diffusion grid the pipeline holds, the tokens
    it hands (None for SANA, which hands the grid) and its decode input, by the pipeline's own code (float64 values
    that float32 holds exactly, as they go on the wire)."""
    g = torch.Generator().manual_seed(seed)
    if name == "qwen-image":
        grid = torch.randn(batch, 16, height, width, generator=g).double()
        return grid, qwen_pack_latents(grid, batch, 16, height, width), _decode_input(name, vae, grid)
    if name == "flux2":
        grid = torch.randn(batch, 32, height // 2, width // 2, generator=g).double()
        return grid, flux2_pack_latents(grid), _decode_input(name, vae, grid)
    grid = torch.randn(batch, 8, height, width, generator=g).double()
    return grid, None, grid / vae.config.scaling_factor  # pipeline_sana.py


def _decode_input(name, vae, grid):
    """The pipeline's decode input for its diffusion ``grid``, packed and unpacked by its own code."""
    if name == "qwen-image":
        b, _, h, w = grid.shape
        tokens = qwen_pack_latents(grid, b, 16, h, w)
        # the tiny VAE's factor is 2: the pipeline's image height / width are twice the latent's
        return qwen_decode_input(qwen_unpack_latents(tokens, h * 2, w * 2, 2), dict(vae.config))[:, :, 0]
    return flux2_decode_input(flux2_pack_latents(grid), flux2_prepare_latent_ids(grid), vae)


@torch.no_grad()
def reference(model64, raw, prompts, noise_level=None):
    """The cosine of the model (float64) on the VAE's decode input: what every path must give."""
    img = model64.encode_latents(raw, space="vae", noise_level=noise_level)
    return (img * F.normalize(model64.encode_text(prompts), dim=-1)).sum(-1)


def body(latents, prompts=PROMPTS, meta=None, **tensors):
    return save({"latents": latents.float().contiguous(), **tensors},
                metadata={"prompts": json.dumps(prompts[:latents.shape[0]]), **(meta or {})})


def size(h, w):
    return {"height": torch.tensor([h]), "width": torch.tensor([w])}


def post(app, content):
    return run(app, lambda c: c.post("/v1/score", content=content, headers=V1))


def scores(r):
    assert r.status_code == 200, r.text
    return torch.tensor(r.json()["raw_scores"], dtype=torch.float64)


@pytest.fixture(scope="module", params=ts.SPACES)
def world(request):
    """``(name, vae (float64), app on a float32 model that takes other grids, the same model in float64)``."""
    name = request.param
    vae = ts.tiny_vae(name).double()
    model = ts.model(vae, name)
    model.resize = "interpolate"  # non-square latents: the tower resamples its positions
    model64 = ts.model(vae, name).double()
    model64.resize = "interpolate"
    return name, vae, create_app(fastlclip.LatentCLIPReward(model)), model64


@pytest.mark.parametrize("height, width", [(SIDE, SIDE), (16, 8)])
def test_grid_tokens_and_vae_latents_score_as_the_model_on_the_pipelines_decode_input(world, height, width):
    name, vae, app, model64 = world
    grid, tokens, raw = pipeline(name, vae, height=height, width=width)
    want = reference(model64, raw, PROMPTS)
    torch.testing.assert_close(scores(post(app, body(grid))), want, rtol=0, atol=2e-5)
    # height / width may come with a grid too (checked against it)
    torch.testing.assert_close(scores(post(app, body(grid, **size(height, width)))), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(scores(post(app, body(raw, meta={"space": "vae"}))), want, rtol=0, atol=2e-5)
    if tokens is None:
        r = post(app, body(grid.flatten(2).transpose(1, 2)))  # SANA hands its grid; tokens are not its form
        assert r.status_code == 400 and "'sana'" in r.json()["error"] and "(B, 8, 16, 16)" in r.json()["error"]
        return
    torch.testing.assert_close(scores(post(app, body(tokens, **size(height, width)))), want, rtol=0, atol=2e-5)
    per_sample = {"height": torch.full((3,), height), "width": torch.full((3,), width)}  # one per latent, equal
    torch.testing.assert_close(scores(post(app, body(tokens, **per_sample))), want, rtol=0, atol=2e-5)
    if height == width:  # a square latent's tokens need no height / width
        torch.testing.assert_close(scores(post(app, body(tokens))), want, rtol=0, atol=2e-5)
    else:  # the transposed latent has as many tokens: without its height and width it is another image
        r = post(app, body(tokens, **size(width, height)))
        assert r.status_code == 200 and (scores(r) - want).abs().max() > 1e-3


def test_grids_tokens_and_vae_latents_of_one_size_share_a_batch():
    vae = ts.tiny_vae("flux2").double()
    app = create_app(fastlclip.LatentCLIPReward(ts.model(vae, "flux2")), max_wait_ms=300)
    grid, tokens, raw = pipeline("flux2", vae)

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/score", content=b, headers=V1)
                                      for b in (body(grid), body(tokens), body(raw, meta={"space": "vae"}))])

    first, *rest = [scores(r) for r in run(app, go)]
    assert app.state.metrics.batches._value.get() == 1  # one grid, one batch
    for s in rest:
        torch.testing.assert_close(s, first, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen-image", "flux2"])
def test_noise_is_drawn_in_the_grids_shape_so_tokens_and_grid_score_alike(name):
    vae = ts.tiny_vae(name).double()
    app = create_app(fastlclip.LatentCLIPReward(ts.model(vae, name, noise_aware=True)))
    model64 = ts.model(vae, name, noise_aware=True).double()
    grid, tokens, _ = pipeline(name, vae)
    u, seeds = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([4, 5, 6])
    # v1's (1 - u) x + u eps on the diffusion grid, eps from each latent's seed in the grid's shape; then the
    # pipeline's own packing and decode input
    eps = torch.stack([torch.randn(grid.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    noisy = (1 - u.double().view(-1, 1, 1, 1)) * grid + u.double().view(-1, 1, 1, 1) * eps.double()
    want = reference(model64, _decode_input(name, vae, noisy), PROMPTS, noise_level=u.double())
    for sent in (grid, tokens):
        r = post(app, body(sent, u=u, seeds=seeds))
        torch.testing.assert_close(scores(r), want, rtol=0, atol=2e-5)
        assert r.json()["noise_level"] == pytest.approx([0.2, 0.5, 0.9])


# (space, body maker, what the 400 must say): each names the space (and the shapes it takes), then a good request
BAD = [
    ("qwen-image", lambda: body(torch.randn(3, 64, 65)), r"packed tokens of shape \(3, 64, 65\).*expected \(B, 64, 64\)"),
    ("flux2", lambda: body(torch.randn(3, 64, 31)), r"expected \(B, 64, 32\)"),
    ("qwen-image", lambda: body(torch.randn(3, 64, 64), **size(16, 8)), r"for a 16 x 8 latent, expected \(B, 32, 64\)"),
    ("flux2", lambda: body(torch.randn(3, 64, 32), **size(8, 16)), r"for a 8 x 16 latent, expected \(B, 32, 32\)"),
    ("qwen-image", lambda: body(torch.randn(3, 32, 64)), r"32 packed tokens are not a square grid.*height and width"),
    ("flux2", lambda: body(torch.randn(3, 32, 32), height=torch.tensor([16])), r"'height' and 'width' go together"),
    ("flux2", lambda: body(torch.randn(3, 32, 32), height=torch.tensor([16, 8, 16]), width=torch.tensor([8, 16, 8])),
     r"'height' differs between the latents of one request.*one request per latent size"),
    ("qwen-image", lambda: body(torch.randn(3, 64, 64), height=torch.tensor([16.0]), width=torch.tensor([16.0])),
     r"'height'.*integer"),
    ("flux2", lambda: body(torch.randn(3, 8, 16, 16)), r"'latents' have 8 channels, the model takes 32"),
    ("flux2", lambda: body(torch.randn(3, 32, 8, 8), **size(16, 8)),
     r"say a 16 x 8 VAE latent, the 'latents' grid \(3, 32, 8, 8\) is a 16 x 16 one"),
    ("flux2", lambda: body(torch.randn(3, 8, 15, 16), meta={"space": "vae"}), r"15 x 16 are not a whole number of 2 x 2"),
    ("flux2", lambda: body(torch.randn(3, 32, 8, 8), meta={"space": "vae"}), r"have 32 channels, the model takes 8 in VAE"),
    ("qwen-image", lambda: body(torch.randn(3, 16, 1, 16, 16)), r"\(B, 16, H, W\) or \(B, L, D\) packed tokens"),
    ("sana", lambda: body(torch.randn(3, 64, 8)), r"\(B, 8, H, W\) with B > 0, got \(3, 64, 8\)"),
    ("flux2", lambda: body(torch.randn(3, 32, 6, 8)), r"latents are 12x16.*\(the VAE latent the grid unpatchifies to\)"),
]


@pytest.fixture(scope="module")
def apps():
    """A server per space, on its trained grid only (resize None), and its float64 twin."""
    out = {}
    for name in ts.SPACES:
        vae = ts.tiny_vae(name).double()
        out[name] = vae, create_app(fastlclip.LatentCLIPReward(ts.model(vae, name))), ts.model(vae, name).double()
    return out


@pytest.mark.parametrize("name, make, message", BAD, ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD)])
def test_bad_latents_are_400_naming_the_space_and_its_shapes_and_the_server_keeps_serving(apps, name, make, message):
    vae, app, model64 = apps[name]
    grid, tokens, raw = pipeline(name, vae)

    async def go(c):
        bad = await c.post("/v1/score", content=make(), headers=V1)
        good = await c.post("/v1/score", content=body(grid if tokens is None else tokens), headers=V1)
        return bad, good

    bad, good = run(app, go)
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert re.search(message, error), error
    if "differs" not in error and "integer" not in error and "together" not in error:
        assert f"latent space {name!r} takes diffusion latents" in error  # the shapes it takes, named
        shapes = {"qwen-image": "(B, 16, 16, 16), the pipeline's packed tokens (B, 64, 64)",
                  "flux2": "(B, 32, 8, 8), the pipeline's packed tokens (B, 64, 32)", "sana": "(B, 8, 16, 16), or"}
        assert shapes[name] in error and "VAE latents (B, {}, 16, 16)".format(vae_channels(name)) in error
    torch.testing.assert_close(scores(good), reference(model64, raw, PROMPTS), rtol=0, atol=2e-5)


def vae_channels(name):
    return {"qwen-image": 16, "flux2": 8, "sana": 8}[name]


def test_healthz_says_what_a_packed_space_takes(apps):
    info = run(apps["flux2"][1], lambda c: c.get("/healthz")).json()
    assert (info["vae"], info["channels"], info["diffusion_channels"], info["patch"], info["pack"]) == ("flux2", 8, 32, 2, 1)
    info = run(apps["qwen-image"][1], lambda c: c.get("/healthz")).json()
    assert (info["channels"], info["diffusion_channels"], info["patch"], info["pack"]) == (16, 16, 1, 2)
    assert "pack" not in run(apps["sana"][1], lambda c: c.get("/healthz")).json()  # SANA: v1's fields only


def test_flux2_without_its_statistics_serves_vae_latents_and_refuses_diffusion_ones():
    vae = ts.tiny_vae("flux2").double()
    cfg = ts.model_config(vae, "flux2")
    del cfg["vae_stats"]

    def load(config):  # the same random weights each time
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fastlclip.load(config)

    model, model64 = load(cfg), load(cfg).double()
    noisy = load({**cfg, "vision_cfg": {**cfg["vision_cfg"], "noise_aware": True}})
    app = create_app(fastlclip.LatentCLIPReward(model))
    info = run(app, lambda c: c.get("/healthz")).json()
    assert info["vae_latents_only"] is True and info["scaling_factor"] is None
    grid, tokens, raw = pipeline("flux2", vae)
    for sent in (grid, tokens):
        r = post(app, body(sent))
        assert r.status_code == 400 and r.json()["error"].startswith("latent space 'flux2': this model has no diffusion")
        assert "vae_stats" in r.json()["error"] and "metadata space 'vae'" in r.json()["error"]
    want = reference(model64, raw, PROMPTS)
    torch.testing.assert_close(scores(post(app, body(raw, meta={"space": "vae"}))), want, rtol=0, atol=2e-5)
    r = post(app, body(raw[:, :4], meta={"space": "vae"}))
    assert r.status_code == 400 and "takes VAE latents (B, 8, 16, 16) with metadata space 'vae' here" in r.json()["error"]
    r = post(create_app(fastlclip.LatentCLIPReward(noisy)), body(raw, meta={"space": "vae"}, u=torch.tensor(0.5)))
    assert r.status_code == 400 and r.json()["error"].startswith("'u' (the noise level): latent space 'flux2'")


def test_a_reward_on_vae_latents_is_refused_by_the_server():
    model = ts.model(ts.tiny_vae("sana"), "sana")
    with pytest.raises(ValueError, match="space='vae'"):
        create_app(fastlclip.LatentCLIPReward(model, space="vae"))


# -- the adapters ---------------------------------------------------------------------------------------------------
def test_verl_omni_sends_packed_tokens_with_height_and_width(world, monkeypatch):
    name, vae, app, model64 = world
    grid, tokens, raw = pipeline(name, vae, height=16, width=8)
    want = reference(model64, raw, PROMPTS[:1] * 3)  # compute_score sends one prompt for its latents
    client = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: client(transport=httpx.ASGITransport(app=app), **kw))

    def score(solution, extra, **kw):
        return asyncio.run(verl_omni.compute_score(solution, PROMPTS[0], extra, "http://test/v1/score", **kw))

    out = score(None, {"latents_clean": grid.float()})  # the grid (B, C, h, w): v1 as it was
    torch.testing.assert_close(torch.tensor(out["clip_raw_score"], dtype=torch.float64), want, rtol=0, atol=2e-5)
    if tokens is None:
        return
    one = score(tokens[1].float(), None, height=16, width=8)  # one sample's (L, D) tokens as solution_image
    assert one["clip_raw_score"] == pytest.approx(want[1].item(), abs=2e-5)
    out = score(None, {"latents_clean": tokens.float()}, height=16, width=8, score_scale=2.0)
    torch.testing.assert_close(torch.tensor(out["clip_raw_score"], dtype=torch.float64), want, rtol=0, atol=2e-5)
    assert out["score"] == pytest.approx([2 * s for s in out["clip_raw_score"]])
    with pytest.raises(ValueError, match="height must be a positive integer"):
        score(None, {"latents_clean": tokens.float()}, width=8)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\); a packed space's tokens \(B, L, D\) need height= and width="):
        score(tokens[0].float(), {"latents_clean": tokens[0].float()})
    with pytest.raises(verl_omni.RewardServerError, match=f"400: .*{name}"):  # the wrong size: the server says why
        score(None, {"latents_clean": tokens.float()}, height=8, width=8)


def test_flow_grpo_scores_the_grid_and_the_packed_tokens(world):
    name, vae, app, model64 = world
    model = app.state.reward.model
    grid, tokens, raw = pipeline(name, vae, height=16, width=8)
    want = reference(model64, raw, PROMPTS).float().numpy()
    fn = flow_grpo.latent_clip_score("cpu", model=model, batch_size=2, height=16, width=8)  # batch 3: two chunks
    got, _ = fn(grid.float(), PROMPTS, {})
    assert got.dtype == "float32" and abs(got - want).max() < 2e-5
    if tokens is None:
        with pytest.raises(TypeError, match=r"\(B, C, H, W\)"):
            fn(torch.randn(3, 32, 8), PROMPTS, {})
        return
    got, _ = fn(tokens.float(), PROMPTS, {})
    assert abs(got - want).max() < 2e-5
    with pytest.raises(ValueError, match=f"'{name}'.*not a square grid"):  # no height / width: a square latent
        flow_grpo.latent_clip_score("cpu", model=model)(tokens.float(), PROMPTS, {})
    with pytest.raises(ValueError, match=f"latent space '{name}': its diffusion grid; or its packed tokens"):
        fn(torch.randn(3, 5, 8, 8), PROMPTS, {})


# -- the command line, and a reward ensemble on these spaces --------------------------------------------------------
def test_the_command_line_serves_a_flux2_model_from_its_json_config(tmp_path, monkeypatch):
    """``python -m fastlclip.serve --model config.json --pretrained weights``: the config names FLUX.2 and carries its
    vae_stats; the app it builds scores packed tokens as the model on the decode input (uvicorn not started)."""
    from test_video_serve_cli import serve

    vae = ts.tiny_vae("flux2").double()
    model64 = ts.model(vae, "flux2").double()
    code, app = serve(tmp_path, monkeypatch, ts.model_config(vae, "flux2"), ts.model(vae, "flux2"))
    assert code == 0
    _, tokens, raw = pipeline("flux2", vae)
    torch.testing.assert_close(scores(post(app, body(tokens))), reference(model64, raw, PROMPTS), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["qwen-image", "flux2"])
def test_a_reward_ensemble_on_a_packed_space_serves_and_scores_tokens(name):
    from test_space_ensemble import ensemble_on

    model64, vae = ensemble_on(name)
    weights = {"hps": 5.0, "pick": 0.05, "aes": 0.5}
    app = create_app(fastlclip.RewardEnsemble(copy.deepcopy(model64).float(), weights))
    _, tokens, raw = pipeline(name, vae, height=model64.trunk.latent_size, width=model64.trunk.latent_size)
    with torch.no_grad():  # every head's value on the decode input, in float64
        want = fastlclip.RewardEnsemble(model64, weights, space="vae").score(raw, PROMPTS)
    r = post(app, body(tokens))
    assert r.status_code == 200, r.text
    for head, values in r.json()["head_scores"].items():
        torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), want[head].double(), rtol=1e-5,
                                   atol=2e-4)
    details, _ = flow_grpo.latent_clip_score("cpu", model=copy.deepcopy(model64).float(), batch_size=2)(
        tokens.float(), PROMPTS, {})
    for head in weights:
        assert abs(details[head] - want[head].float().numpy()).max() < 2e-4
