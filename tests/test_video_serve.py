"""Issue 34 part 4: the reward server and the RL adapters on the video spaces (Wan 2.1, HunyuanVideo, LTX-Video).

Every score is checked against the model called directly in float64: each latent frame converted by diffusers'
pipeline code (tests/test_video_spaces.py's transcriptions: Wan's decode input, HunyuanVideo's ``latents /
scaling_factor``, LTX-Video's ``_denormalize_latents`` and ``_pack_latents``) and read by the image tower alone
(``model.visual.latent_vit``), one frame at a time; the cosine to the text tower's features per frame, pooled by
hand. ``LatentSpace`` builds no reference. The server runs in-process (httpx's ASGI transport).
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings

import httpx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save

import fastlclip
import tiny_video as tv
from fastlclip.integrations import flow_grpo, verl_omni
from fastlclip.serve import create_app
from test_serve import run
from test_video_spaces import decode_input, ltx_pack_latents

V1 = {"x-drm-protocol-version": "1"}
PROMPTS = ["a dog running on a beach", "a red car at night", "a bird over the sea"]
NAMES = ["wan2.1", "hunyuanvideo", "ltx-video"]


def clips(vae, batch=3, frames=3, height=4, width=4, seed=0):
    """Diffusion-space clips (float64 values float32 holds exactly, as they go on the wire)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vae.config.get("z_dim") or vae.config.latent_channels, frames, height, width,
                       generator=g).float().double()


@torch.no_grad()
def reference(name, vae, model64, z, prompts=PROMPTS, noise_level=None):
    """(B, T) per-frame cosines: each latent frame of the pipeline's decode input through the tower alone."""
    raw = decode_input(name, vae, z)
    txt = F.normalize(model64.encode_text(prompts[:z.shape[0]]), dim=-1)
    u = None if noise_level is None else noise_level.double()
    return torch.stack([(F.normalize(model64.visual.latent_vit(raw[:, :, t], noise_level=u), dim=-1) * txt).sum(-1)
                        for t in range(z.shape[2])], 1)


def body(latents, prompts=PROMPTS, meta=None, **tensors):
    return save({"latents": latents.float().contiguous(), **tensors},
                metadata={"prompts": json.dumps(prompts[:latents.shape[0]]), **(meta or {})})


def post(app, content):
    return run(app, lambda c: c.post("/v1/score", content=content, headers=V1))


def replied(r):
    """``(raw_scores, frame_scores)`` of a 200 reply, float64."""
    assert r.status_code == 200, r.text
    out = r.json()
    return torch.tensor(out["raw_scores"], dtype=torch.float64), torch.tensor(out["frame_scores"], dtype=torch.float64)


def n(x):
    return torch.tensor([x])


@pytest.fixture(scope="module", params=NAMES)
def world(request):
    """``(name, vae (float64), app on a float32 model taking other grids, the same model in float64)``."""
    name = request.param
    vae = tv.tiny_vae(name).double()
    model = tv.model(vae, name)
    model.resize = "interpolate"  # non-square latents: the tower resamples its positions
    model64 = tv.model(vae, name).double()
    model64.resize = "interpolate"
    return name, vae, create_app(fastlclip.LatentCLIPReward(model)), model64


def test_clips_score_as_the_model_frame_by_frame_pooled_by_the_mean(world):
    name, vae, app, model64 = world
    z = clips(vae)
    frames = reference(name, vae, model64, z)
    raw, per_frame = replied(post(app, body(z)))
    torch.testing.assert_close(per_frame, frames, rtol=0, atol=2e-5)
    torch.testing.assert_close(raw, frames.mean(1), rtol=0, atol=2e-5)
    # an independent form of the same number: each latent frame scored as a one-frame clip, in float64
    with torch.no_grad():
        one = torch.stack([fastlclip.LatentCLIPReward(model64).score(z[:, :, t:t + 1], PROMPTS) for t in range(3)], 1)
    torch.testing.assert_close(raw, one.mean(1), rtol=0, atol=2e-5)
    f = 1 + 2 * (8 if name == "ltx-video" else 4)  # the clip's video frames: F = 1 + (T - 1) * temporal
    for sent in (body(z, frames=n(f)), body(z, frames=torch.full((3,), f)),  # frames: one, or one per clip
                 body(decode_input(name, vae, z), meta={"space": "vae"})):  # the VAE's clips
        got, got_frames = replied(post(app, sent))
        torch.testing.assert_close(got_frames, frames, rtol=0, atol=2e-5)
        torch.testing.assert_close(got, frames.mean(1), rtol=0, atol=2e-5)
    if name != "ltx-video":
        return
    torch.testing.assert_close(replied(post(app, body(ltx_pack_latents(z), frames=n(f))))[1], frames, rtol=0, atol=2e-5)
    # a non-square latent's tokens with height / width; the transposed latent has as many tokens and is another clip
    wide = clips(vae, height=4, width=8, seed=1)
    want = reference(name, vae, model64, wide)
    tokens = ltx_pack_latents(wide)
    torch.testing.assert_close(replied(post(app, body(tokens, frames=n(f), height=n(4), width=n(8))))[1], want,
                               rtol=0, atol=2e-5)
    _, other = replied(post(app, body(tokens, frames=n(f), height=n(8), width=n(4))))
    assert (other - want).abs().max() > 1e-3


def test_min_pooling_and_healthz():
    name = "wan2.1"
    vae = tv.tiny_vae(name).double()
    app = create_app(fastlclip.LatentCLIPReward(tv.model(vae, name), pooling="min"))
    z = clips(vae, frames=4)
    frames = reference(name, vae, tv.model(vae, name).double(), z)
    r = post(app, body(z))
    raw, per_frame = replied(r)
    assert r.json()["pooling"] == "min"
    torch.testing.assert_close(raw, frames.amin(1), rtol=0, atol=2e-5)
    torch.testing.assert_close(per_frame, frames, rtol=0, atol=2e-5)
    info = run(app, lambda c: c.get("/healthz")).json()
    assert (info["vae"], info["video"], info["temporal"], info["causal"], info["pooling"]) == (name, True, 4, True, "min")


def test_clips_are_renoised_per_clip_in_their_own_shape():
    name = "hunyuanvideo"
    vae = tv.tiny_vae(name).double()
    # 3 clips, 2 per forward: each chunk keeps its clips' own noise levels
    app = create_app(fastlclip.LatentCLIPReward(tv.model(vae, name, noise_aware=True)), max_batch_size=2)
    model64 = tv.model(vae, name, noise_aware=True).double()
    z, u, seeds = clips(vae), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([4, 5, 6])
    # v1's (1 - u) x + u eps per clip, eps from its seed in the clip's (C, T, h, w) shape
    eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    w = u.double().view(-1, 1, 1, 1, 1)
    frames = reference(name, vae, model64, (1 - w) * z + w * eps.double(), noise_level=u)
    r = post(app, body(z, u=u, seeds=seeds))
    raw, per_frame = replied(r)
    torch.testing.assert_close(per_frame, frames, rtol=0, atol=2e-5)
    torch.testing.assert_close(raw, frames.mean(1), rtol=0, atol=2e-5)
    assert r.json()["noise_level"] == pytest.approx([0.2, 0.5, 0.9])


def test_clips_of_one_shape_share_a_batch_and_other_lengths_do_not():
    name = "wan2.1"
    vae = tv.tiny_vae(name).double()
    app = create_app(fastlclip.LatentCLIPReward(tv.model(vae, name)), max_wait_ms=300)
    model64 = tv.model(vae, name).double()
    sent = [clips(vae, 2, 3, seed=0), clips(vae, 1, 3, seed=1), clips(vae, 2, 2, seed=2)]

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/score", content=body(z), headers=V1) for z in sent])

    replies = run(app, go)
    assert app.state.metrics.batches._value.get() == 2  # T = 3 together, T = 2 alone
    for z, r in zip(sent, replies):
        frames = reference(name, vae, model64, z)
        raw, per_frame = replied(r)
        assert per_frame.shape == frames.shape
        torch.testing.assert_close(per_frame, frames, rtol=0, atol=2e-5)
        torch.testing.assert_close(raw, frames.mean(1), rtol=0, atol=2e-5)


# (space, body maker, what the 400 must say); the space's shapes follow, then a good request is answered
BAD = [
    ("wan2.1", lambda: body(torch.randn(3, 16, 4, 4)), r"must be clips \(B, 16, T, h, w\).*one frame is latents\[:, :, None\]"),
    ("wan2.1", lambda: body(torch.randn(3, 8, 3, 4, 4)), r"'latents' have 8 channels, the model takes 16"),
    ("hunyuanvideo", lambda: body(torch.randn(3, 16, 3, 4, 4), meta={"space": "vae"}),
     r"'latents' have 16 channels, the model takes 4 in VAE space"),
    ("wan2.1", lambda: body(torch.randn(3, 16, 3, 4, 4), frames=n(13)),
     r"'frames' 13 video frames are 4 latent frames \(F = 1 \+ \(T - 1\) \* 4\), the clip has T = 3"),
    ("hunyuanvideo", lambda: body(torch.randn(3, 4, 3, 4, 4), frames=n(10)),
     r"10 frames do not fit its causal 4x temporal layout.*use 9 or 13 frames"),
    ("wan2.1", lambda: body(torch.randn(3, 16, 3, 4, 4), frames=torch.tensor([9, 13, 9])),
     r"'frames' differs between the latents of one request.*one request per clip length"),
    ("ltx-video", lambda: body(torch.randn(3, 48, 8)), r"packed video tokens need the tensor 'frames'.*F = 1 \+ \(T - 1\) \* 8"),
    ("ltx-video", lambda: body(torch.randn(3, 40, 8), frames=n(17)), r"40 packed tokens are not 3 latent frames"),
    ("ltx-video", lambda: body(torch.randn(3, 48, 8), frames=n(17), height=n(4), width=n(8)),
     r"for 3 latent frames of 4 x 8, expected \(B, 96, 8\)"),
    ("wan2.1", lambda: body(torch.randn(3, 16, 3, 4, 4), height=n(4), width=n(8)),
     r"say a 4 x 8 VAE latent, the clips \(3, 16, 3, 4, 4\) are 4 x 4"),
    ("hunyuanvideo", lambda: body(torch.randn(3, 4, 3, 6, 6)), r"latents are 6x6, this model was trained on 4x4"),
]


@pytest.fixture(scope="module")
def apps():
    """A server per space on its trained grid only (resize None), and its float64 twin."""
    out = {}
    for name in NAMES:
        vae = tv.tiny_vae(name).double()
        out[name] = vae, create_app(fastlclip.LatentCLIPReward(tv.model(vae, name))), tv.model(vae, name).double()
    return out


@pytest.mark.parametrize("name, make, message", BAD, ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD)])
def test_bad_clips_are_400_naming_the_space_and_the_server_keeps_serving(apps, name, make, message):
    vae, app, model64 = apps[name]
    z = clips(vae)

    async def go(c):
        return (await c.post("/v1/score", content=make(), headers=V1),
                await c.post("/v1/score", content=body(z), headers=V1))

    bad, good = run(app, go)
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert re.search(message, error), error
    c = vae.config.get("z_dim") or vae.config.latent_channels
    assert f"latent space {name!r} takes clips (B, {c}, T, 4, 4)" in error, error  # the space and its shapes
    assert "'frames' (the video frame count F), when sent, must give T" in error
    torch.testing.assert_close(replied(good)[1], reference(name, vae, model64, z), rtol=0, atol=2e-5)


def test_frames_to_an_image_space_and_a_video_model_the_server_cannot_serve_are_refused():
    import tiny_spaces as ts

    app = create_app(fastlclip.LatentCLIPReward(ts.model(ts.tiny_vae("sana"), "sana")))
    r = post(app, body(torch.randn(1, 8, 16, 16), frames=n(9)))
    assert r.status_code == 400 and "latent space 'sana' is an image space: send no 'frames'" in r.json()["error"]
    vae = tv.tiny_vae("ltx-video")
    cfg = tv.model_config(vae, "ltx-video")
    del cfg["vae_stats"]  # LTX-Video's statistics live in its weights: without them, no diffusion space
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(cfg)
    with pytest.raises(ValueError, match="'ltx-video' is a video space.*no diffusion space"):
        create_app(fastlclip.LatentCLIPReward(model))


# -- the adapters ---------------------------------------------------------------------------------------------------
def test_verl_omni_sends_a_clip_clips_and_ltx_tokens(world, monkeypatch):
    name, vae, app, model64 = world
    z = clips(vae)
    frames = reference(name, vae, model64, z, PROMPTS[:1] * 3)  # compute_score sends one prompt for its clips
    client = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: client(transport=httpx.ASGITransport(app=app), **kw))

    def score(solution, extra, **kw):
        return asyncio.run(verl_omni.compute_score(solution, PROMPTS[0], extra, "http://test/v1/score", **kw))

    out = score(None, {"latents_clean": z.float()}, video=True, score_scale=2.0)
    torch.testing.assert_close(torch.tensor(out["clip_raw_score"], dtype=torch.float64), frames.mean(1), rtol=0,
                               atol=2e-5)
    assert out["score"] == pytest.approx([2 * s for s in out["clip_raw_score"]])
    one = score(z[1].float(), None, video=True)  # one clip (C, T, h, w) as solution_image
    assert one["clip_raw_score"] == pytest.approx(frames[1].mean().item(), abs=2e-5)
    f = 1 + 2 * (8 if name == "ltx-video" else 4)
    assert score(z[1].float(), None, frames=f)["clip_raw_score"] == pytest.approx(one["clip_raw_score"], abs=1e-6)
    with pytest.raises(verl_omni.RewardServerError, match=f"400: latent space '{name}'.*the clip has T = 3"):
        score(z[1].float(), None, frames=f + 8 * (name == "ltx-video") + 4 * (name != "ltx-video"))
    with pytest.raises(ValueError, match=r"clips \(B, C, T, h, w\) of a video space need video=True"):
        score(None, {"latents_clean": z.float()})
    if name != "ltx-video":
        return
    tokens = ltx_pack_latents(z).float()
    out = score(None, {"latents_clean": tokens}, frames=f)
    torch.testing.assert_close(torch.tensor(out["clip_raw_score"], dtype=torch.float64), frames.mean(1), rtol=0,
                               atol=2e-5)
    assert score(tokens[1], None, frames=f)["clip_raw_score"] == pytest.approx(frames[1].mean().item(), abs=2e-5)
    with pytest.raises(ValueError, match="packed video tokens .* need frames="):
        score(tokens, None, video=True)


class Reply:
    """A 200 reply with a JSON body, as httpx gives it."""
    status_code, text = 200, ""

    def __init__(self, body):
        self.body = body

    def json(self):
        return self.body


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.pop("frame_scores"), "'frame_scores' must be a list of 2 lists"),
    (lambda r: r["frame_scores"][1].pop(), r"frame_scores\[1\] must be a list of the clip's 3"),
    (lambda r: r.update(raw_scores=[0.2, 0.3]), r"score 1 is 0.3, not the mean of its frame scores"),
    (lambda r: r.update(pooling="min"), r"score 0 is 0.2, not the min of its frame scores \(0.1\)"),
    (lambda r: r.update(pooling="max"), "'pooling' must be 'mean' or 'min'"),
    (lambda r: r["frame_scores"][0].__setitem__(2, 1.5), r"frame_scores\[0\] score 2 is 1.5, outside its range"),
])
def test_verl_omni_checks_a_video_reply(change, problem):
    reply = {"protocol_version": "1", "raw_scores": [0.2, 0.4], "frame_scores": [[0.1, 0.2, 0.3], [0.4, 0.4, 0.4]],
             "pooling": "mean"}
    assert verl_omni.checked_reply(Reply(reply), "u", 2, video=True, frames=3) == ([0.2, 0.4], None)
    change(reply)
    with pytest.raises(verl_omni.RewardServerError, match=problem):
        verl_omni.checked_reply(Reply(reply), "u", 2, video=True, frames=3)


def test_flow_grpo_scores_clips_and_ltx_tokens(world):
    name, vae, app, model64 = world
    model = app.state.reward.model
    z = clips(vae)
    frames = reference(name, vae, model64, z)
    f = 1 + 2 * (8 if name == "ltx-video" else 4)
    fn = flow_grpo.latent_clip_score("cpu", model=model, batch_size=2, frames=f)  # 3 clips: two chunks
    got, _ = fn(z.float(), PROMPTS, {})
    assert got.dtype == "float32" and abs(got - frames.mean(1).numpy()).max() < 2e-5
    got, _ = flow_grpo.latent_clip_score("cpu", model=model, pooling="min")(z.float(), PROMPTS, {})
    assert abs(got - frames.amin(1).numpy()).max() < 2e-5
    with pytest.raises(ValueError, match=f"'{name}': {f + 1} frames do not fit"):
        flow_grpo.latent_clip_score("cpu", model=model, frames=f + 1)(z.float(), PROMPTS, {})
    with pytest.raises(TypeError, match=f"latent space '{name}' is a video space.*output_type='latent'"):
        fn(z[:, :, 0].float(), PROMPTS, {})
    with pytest.raises(ValueError, match=f"latent space '{name}': clips of 5 channels"):
        fn(torch.randn(3, 5, 3, 4, 4), PROMPTS, {})
    if name != "ltx-video":
        return
    got, _ = fn(ltx_pack_latents(z).float(), PROMPTS, {})
    assert abs(got - frames.mean(1).numpy()).max() < 2e-5
    with pytest.raises(ValueError, match="packed video tokens need frames="):
        flow_grpo.latent_clip_score("cpu", model=model)(ltx_pack_latents(z).float(), PROMPTS, {})
    with pytest.raises(ValueError, match=r"frames=25 video frames are 4 latent frames \(F = 1 \+ \(T - 1\) \* 8\)"):
        flow_grpo.latent_clip_score("cpu", model=model, frames=25)(z.float(), PROMPTS, {})


def test_verl_omni_refuses_an_ensembles_reply_to_clips():
    reply = {"protocol_version": "1", "raw_scores": [0.2], "score_kind": "weighted_total", "head_scores": {"a": [0.2]},
             "head_weights": {"a": 1.0}, "head_ranges": {"a": [-1, 1]}}
    assert verl_omni.checked_reply(Reply(reply), "u", 1)[0] == [0.2]  # fine for images
    with pytest.raises(verl_omni.RewardServerError, match="an ensemble's reply to clips"):
        verl_omni.checked_reply(Reply(reply), "u", 1, video=True)
