"""The RL adapters against a server and models built here: verl-omni's async ``compute_score`` (scores, scale and
bias, where latents and prompts come from, what is retried and what is not) and flow_grpo's scorer (latents
without a decode, images through the VAE encoder)."""

import asyncio
import contextlib
import socket
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import fastlclip
from fastlclip.integrations import flow_grpo, verl_omni
from fastlclip.loss import normalized
from fastlclip.serve import create_app

from conftest import TINY, tiny_vae


@pytest.fixture(scope="module")
def reward(seeded_tiny_model):
    return fastlclip.LatentCLIPReward(seeded_tiny_model)


@contextlib.contextmanager
def serving(app):
    """``app`` on uvicorn in a thread, on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server_url(reward):
    with serving(create_app(reward, token="tok")) as url:
        yield url + "/v1/score"


def latent(seed, b=1):
    return torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_verl_omni_scores_as_in_process(reward, server_url):
    x = latent(1)
    want = reward.score(x, "a red dog").item()
    out = asyncio.run(verl_omni.compute_score(None, "a red dog", {"latents_clean": x}, server_url, token="tok",
                                              score_scale=2.0, score_bias=-0.5, unused_config_key=1))
    assert out["clip_raw_score"] == pytest.approx(want, abs=1e-5)
    assert out["score"] == pytest.approx(2.0 * want - 0.5, abs=1e-5)
    # The latent as solution_image (C, H, W, bf16 on the wire), the prompt from extra_info["raw_prompt"].
    y = latent(2)[0].bfloat16()
    out = asyncio.run(verl_omni.compute_score(y, None, {"raw_prompt": "a cat"}, server_url, token="tok", noise_level=0.4))
    assert out["clip_raw_score"] == pytest.approx(reward.score(y[None].float(), "a cat").item(), abs=1e-5)


def test_verl_omni_refuses_what_it_cannot_send(server_url):
    with pytest.raises(ValueError, match="latents_clean"):
        asyncio.run(verl_omni.compute_score(torch.rand(3, 32, 32), "a dog", {}, server_url))
    with pytest.raises(ValueError, match="raw_prompt"):
        asyncio.run(verl_omni.compute_score(latent(0), "", {}, server_url))


def test_verl_omni_does_not_retry_client_errors(server_url):
    with pytest.raises(RuntimeError, match="401"):  # no token
        asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, server_url))
    with pytest.raises(RuntimeError, match="400: 'latents' have 8 channels"):
        asyncio.run(verl_omni.compute_score(torch.zeros(1, 8, 16, 16), "a dog", {}, server_url, token="tok"))


def scripted_server(statuses):
    """A stub answering each POST with the next status of ``statuses``; counts the calls."""
    calls = []

    async def score(request):
        await request.body()
        status = statuses[min(len(calls), len(statuses) - 1)]
        calls.append(status)
        if status == 200:
            return JSONResponse({"protocol_version": "1", "raw_scores": [0.25]})
        return JSONResponse({"error": f"status {status}"}, status_code=status, headers={"Retry-After": "0"})

    return Starlette(routes=[Route("/v1/score", score, methods=["POST"])]), calls


@pytest.mark.parametrize("statuses, retries, ok, calls_made", [
    ([503, 429, 200], 2, True, 3),  # worth retrying
    ([503, 503, 503], 1, False, 2),  # retries spent
    ([400, 200], 2, False, 1),  # a client error is final
    ([500, 200], 2, False, 1),  # so is a server error other than 503
])
def test_verl_omni_retries_only_429_and_503(statuses, retries, ok, calls_made):
    app, calls = scripted_server(statuses)
    with serving(app) as url:
        call = verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", max_retries=retries, retry_backoff=0.01)
        if ok:
            assert asyncio.run(call) == {"score": 0.25, "clip_raw_score": 0.25}
        else:
            with pytest.raises(RuntimeError, match=f"answered {statuses[calls_made - 1]}"):
                asyncio.run(call)
    assert len(calls) == calls_made


def test_verl_omni_retries_connection_errors_then_says_so():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="after 3 tries"):
        asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, f"http://127.0.0.1:{port}/v1/score",
                                            max_retries=2, retry_backoff=0.01))


def test_flow_grpo_scores_latents_without_decode_and_images_through_the_encoder(reward):
    vae = tiny_vae()
    fn = flow_grpo.latent_clip_score("cpu", model=reward.model, batch_size=3, vae=vae)
    x, prompts = latent(5, b=5), ["a dog", "a cat", "a car", "a tree", "a cup"]
    scores, info = fn(x, prompts, [{}] * 5)
    assert info == {} and isinstance(scores, np.ndarray) and scores.shape == (5,)
    np.testing.assert_allclose(scores, reward.score(x, prompts).numpy(), atol=1e-5)

    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    scores, _ = fn(images, prompts[:2], None)
    with torch.no_grad():  # independent path: the VAE's posterior mean by diffusers, then the tower on VAE latents
        raw = vae.encode(images * 2 - 1).latent_dist.mean
        img = normalized(reward.model.encode_latents(raw, space="vae", normalize=False))
        want = (img * reward.text_features(prompts[:2])).sum(-1)
    np.testing.assert_allclose(scores, want.numpy(), atol=1e-5)
    uint8 = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()  # flow_grpo's NHWC arrays
    scores_u8, _ = fn(uint8, prompts[:2], None)
    np.testing.assert_allclose(scores_u8, scores, atol=2e-2)
    with pytest.raises(ValueError, match="channels"):
        fn(torch.zeros(1, 5, 16, 16), ["a"], None)


# -- gaps found by mutation testing (profiles/mutation.md) ------------------------------------------------


def test_request_body_carries_latents_noise_seeds_and_prompts():
    from safetensors import safe_open
    from safetensors.torch import load

    x = latent(7, b=2)
    body = verl_omni.request_body(x, "a dog", noise_level=0.4, seed=7)
    tensors = load(body)
    assert set(tensors) == {"latents", "u", "seeds"} and torch.equal(tensors["latents"], x)
    assert tensors["u"].dtype == torch.float32 and tensors["u"].tolist() == [pytest.approx(0.4)] * 2
    assert tensors["seeds"].dtype == torch.int64 and tensors["seeds"].tolist() == [7, 7]
    assert set(load(verl_omni.request_body(x, "a dog"))) == {"latents"}


def test_latents_keep_half_precision_and_widen_others_to_float32():
    assert verl_omni._latents(latent(0).bfloat16(), None).dtype == torch.bfloat16
    assert verl_omni._latents(latent(0).half(), None).dtype == torch.float16
    x = latent(0).double()
    got = verl_omni._latents(None, {"latents_clean": x})
    assert got.dtype == torch.float32 and torch.equal(got, x.float())


def recording_server(script):
    """A stub answering each POST with the next (status, headers) of ``script`` (200: two raw scores); records
    each request's headers and body tensors."""
    from safetensors.torch import load

    seen = []

    async def score(request):
        seen.append((dict(request.headers), load(await request.body())))
        status, headers = script[min(len(seen), len(script)) - 1]
        if status == 200:
            return JSONResponse({"protocol_version": "1", "raw_scores": [0.25, -0.5]})
        return JSONResponse({"error": f"status {status}"}, status_code=status, headers=headers)

    return Starlette(routes=[Route("/v1/score", score, methods=["POST"])]), seen


def test_verl_omni_sends_protocol_headers_noise_and_seed_and_returns_lists(monkeypatch):
    app, seen = recording_server([(200, {})])
    with serving(app) as url:
        out = asyncio.run(verl_omni.compute_score(latent(0, b=2), "a dog", {}, url + "/v1/score", token="tok",
                                                  score_scale=2.0, score_bias=0.5, noise_level=0.3, noise_seed=11))
    assert out == {"score": [1.0, -0.5], "clip_raw_score": [0.25, -0.5]}
    headers, tensors = seen[0]
    assert headers["content-type"] == "application/octet-stream" and headers["x-drm-protocol-version"] == "1"
    assert headers["authorization"] == "Bearer tok"
    assert tensors["u"].tolist() == [pytest.approx(0.3)] * 2 and tensors["seeds"].tolist() == [11, 11]


@pytest.mark.parametrize("retry_after, kwargs, waits", [
    (None, {}, [0.5, 1.0]),  # defaults: 2 retries, backoff 0.5 doubling
    (None, {"retry_backoff": 0.1, "max_retries": 3}, [0.1, 0.2, 0.4]),
    ("1.5", {"retry_backoff": 0.1}, [1.5, 1.5]),  # Retry-After when longer than the backoff
    ("0", {"retry_backoff": 0.1}, [0.1, 0.2]),
    ("soon", {"retry_backoff": 0.1}, [0.1, 0.2]),  # not a number of seconds: ignored
    ("1.2.3", {"retry_backoff": 0.1}, [0.1, 0.2]),
    ("3600", {"retry_backoff": 0.1}, [30.0, 30.0]),  # Retry-After capped: 30 s by default (the documented cap)
    ("3600", {"max_retry_after": 2.0}, [2.0, 2.0]),  # or the cap asked for
    ("5", {"max_retry_after": 0.0, "retry_backoff": 0.1}, [0.1, 0.2]),  # a cap of 0: the backoff alone
])
def test_verl_omni_waits_backoff_or_retry_after(monkeypatch, retry_after, kwargs, waits):
    got = []

    async def sleep(seconds):
        got.append(seconds)

    monkeypatch.setattr(verl_omni, "_sleep", sleep)
    app, seen = recording_server([(503, {} if retry_after is None else {"Retry-After": retry_after})])
    with serving(app) as url, pytest.raises(RuntimeError, match="answered 503"):
        asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", **kwargs))
    assert got == pytest.approx(waits) and len(seen) == len(waits) + 1


def test_verl_omni_timeout_applies():
    async def slow(request):
        await asyncio.sleep(1)
        return JSONResponse({"protocol_version": "1", "raw_scores": [0.25]})

    with serving(Starlette(routes=[Route("/v1/score", slow, methods=["POST"])])) as url:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"timeout=0.2 s .* after 1 tries; last: no reply yet"):
            asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", timeout=0.2, max_retries=0))
        assert time.monotonic() - start < 0.9


def test_flow_grpo_loads_a_config_in_the_dtype_asked():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = flow_grpo.latent_clip_score("cpu", model=TINY, pretrained=None, dtype=torch.bfloat16)
        torch.manual_seed(0)
        ref = fastlclip.LatentCLIPReward(fastlclip.load(TINY, dtype=torch.bfloat16))
    x = latent(8, b=2)
    scores, _ = fn(x, ["a dog", "a cat"], None)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref.score(x, ["a dog", "a cat"]).numpy(), rtol=0, atol=1e-6)


def test_flow_grpo_loads_the_official_checkpoint_by_default_and_batches_64(reward, monkeypatch):
    loaded, forwards = [], []
    monkeypatch.setattr(fastlclip, "load", lambda *a, **k: loaded.append((a, k)) or reward.model)
    encode = reward.model.encode_latents
    monkeypatch.setattr(reward.model, "encode_latents", lambda x, *a, **k: forwards.append(len(x)) or encode(x, *a, **k))
    fn = flow_grpo.latent_clip_score("cpu")
    assert loaded == [(("Latent-ViT-B-8-512", "hf-hub:wendlerc/latent-clip-b-8-512-34b-80k"),
                       {"device": "cpu", "dtype": torch.float32})]
    fn(latent(9, b=65), ["a dog"], None)
    assert forwards == [64, 1]


# -- issue 31: the adapters never pass a wrong reward ---------------------------------------------------------


@pytest.fixture(scope="module")
def reply_server():
    """A stub answering every POST with 200 and the raw body in ``reply[0]`` (JSON as text, or anything)."""
    from starlette.responses import Response

    reply = [b""]

    async def score(request):
        await request.body()
        return Response(reply[0], media_type="application/json")

    with serving(Starlette(routes=[Route("/v1/score", score, methods=["POST"])])) as url:
        yield url + "/v1/score", reply


@pytest.mark.parametrize("b, body, problem", [
    (1, '{"protocol_version": "1", "raw_scores": [0.25, 0.5]}', "2 scores for the 1 latent"),  # a list for one latent
    (1, '{"protocol_version": "1", "raw_scores": []}', "0 scores for the 1 latent"),
    (2, '{"protocol_version": "1", "raw_scores": 0.25}', "'raw_scores' must be a list of 2 numbers"),  # one number for two
    (2, '{"protocol_version": "1", "raw_scores": [0.25, NaN]}', "score 1 is nan, not finite"),
    (1, '{"protocol_version": "1", "raw_scores": [Infinity]}', "score 0 is inf, not finite"),
    (1, '{"protocol_version": "1", "raw_scores": [-Infinity]}', "not finite"),
    (1, '{"protocol_version": "1", "raw_scores": [1e400]}', "not finite"),  # JSON overflows to inf
    (1, '{"protocol_version": "1", "raw_scores": [1.01]}', "outside the cosine's range"),
    (1, '{"protocol_version": "1", "raw_scores": [-1.5]}', "outside the cosine's range"),
    (1, '{"protocol_version": "1", "raw_scores": [7]}', "outside the cosine's range"),
    (1, '{"protocol_version": "1", "raw_scores": [true]}', "score 0 is 'True' (bool), not a number"),
    (1, '{"protocol_version": "1", "raw_scores": ["0.5"]}', "(str), not a number"),
    (1, '{"protocol_version": "1", "raw_scores": [null]}', "(NoneType), not a number"),
    (1, '{"protocol_version": "2", "raw_scores": [0.25]}', "protocol_version '2': this client speaks '1'"),
    (1, '{"protocol_version": 1, "raw_scores": [0.25]}', "protocol_version 1: this client speaks '1'"),
    (1, '{"raw_scores": [0.25]}', "protocol_version None"),
    (1, '{"protocol_version": "1"}', "'raw_scores' must be a list of 1 numbers, got NoneType"),
    (1, '[0.25]', "not an object"),
    (1, '<html>upstream proxy error</html>', "the body is not JSON: '<html>upstream proxy error</html>'"),
    (1, '', "the body is not JSON"),
    (1, b'\xff\xfe\x00garbage', "the body is not JSON"),
])
def test_verl_omni_refuses_every_reply_it_cannot_trust(reply_server, b, body, problem):
    url, reply = reply_server
    reply[0] = body.encode() if isinstance(body, str) else body
    with pytest.raises(verl_omni.RewardServerError) as info:
        asyncio.run(verl_omni.compute_score(latent(0, b=b), "a dog", {}, url, max_retries=0))
    err = info.value
    assert isinstance(err, RuntimeError) and err.url == url and err.status == 200
    assert problem in str(err) and url in str(err) and "answered 200" in str(err)


@pytest.mark.parametrize("b, body, want", [
    (1, '{"protocol_version": "1", "raw_scores": [1.00005]}', 1.00005),  # float32 rounding past 1: kept as sent
    (1, '{"protocol_version": "1", "raw_scores": [-1]}', -1.0),  # an integer cosine is a float
    (2, '{"protocol_version": "1", "raw_scores": [-1.0, 1.0], "model": "x", "extra": 3}', [-1.0, 1.0]),
])
def test_verl_omni_accepts_valid_replies_at_the_bounds(reply_server, b, body, want):
    url, reply = reply_server
    reply[0] = body.encode()
    out = asyncio.run(verl_omni.compute_score(latent(0, b=b), "a dog", {}, url, max_retries=0))
    assert out == {"score": want, "clip_raw_score": want}
    raw = out["clip_raw_score"]
    assert all(type(v) is float for v in (raw if b > 1 else [raw]))


def test_verl_omni_error_is_picklable_and_versions_agree():
    import pickle

    from fastlclip.serve import protocol

    err = pickle.loads(pickle.dumps(verl_omni.RewardServerError("http://h/v1/score", 200, "bad")))
    assert (err.url, err.status, err.problem, str(err)) == ("http://h/v1/score", 200, "bad",
                                                            "reward server http://h/v1/score answered 200: bad")
    assert verl_omni.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION == "1"


def test_verl_omni_timeout_is_a_deadline_for_the_whole_call():
    calls = []

    async def slow_503(request):  # each try takes 0.3 s, then asks for an immediate retry
        await request.body()
        calls.append(time.monotonic())
        await asyncio.sleep(0.3)
        return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "0"})

    with serving(Starlette(routes=[Route("/v1/score", slow_503, methods=["POST"])])) as url:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"timeout=1 s \(the deadline for the whole call"):
            asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", timeout=1.0,
                                                max_retries=8, retry_backoff=0.01))
        elapsed = time.monotonic() - start
    # 9 tries of 0.3 s each and their backoffs would take 5.3 s; the deadline ends the call at about 1 s, after at
    # most 4 tries.
    assert 0.9 < elapsed < 1.8 and 2 <= len(calls) <= 4


def test_verl_omni_does_not_begin_a_wait_that_ends_past_the_deadline():
    app, seen = recording_server([(503, {"Retry-After": "4"})])
    with serving(app) as url:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"answered 503 \(the next try, after a wait of 4 s, would start past"):
            asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", timeout=2.0))
        assert time.monotonic() - start < 1.5 and len(seen) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout": 0}, "timeout must be a positive number"), ({"timeout": float("inf")}, "timeout must be"),
    ({"timeout": None}, "timeout must be"), ({"max_retry_after": -1}, "max_retry_after must be"),
])
def test_verl_omni_checks_its_deadline_and_cap(kwargs, match):
    with pytest.raises(ValueError, match=match):
        asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, "http://127.0.0.1:9/v1/score", **kwargs))


@pytest.fixture(scope="module")
def grpo(reward):
    vae = tiny_vae()
    return flow_grpo.latent_clip_score("cpu", model=reward.model, batch_size=3, vae=vae), vae


def pixel_scores(reward, vae, images, prompts):
    """Independent reference for [0, 1] NCHW float images: diffusers' VAE posterior mean, the tower on VAE latents."""
    with torch.no_grad():
        raw = vae.encode(images * 2 - 1).latent_dist.mean
        img = normalized(reward.model.encode_latents(raw, space="vae", normalize=False))
        return (img * reward.text_features(prompts)).sum(-1).numpy()


def test_flow_grpo_refuses_rgba_arrays_rather_than_scoring_them_as_latents(grpo):
    fn, _ = grpo  # the tiny model takes 4-channel latents, so an RGBA array permuted to NCHW would pass as one
    rgba = np.zeros((1, 16, 16, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"RGBA .* pass images\[\.\.\., :3\]"):
        fn(rgba, ["a dog"], None)
    with pytest.raises(ValueError, match="RGBA"):
        fn(rgba.astype(np.float32) / 255, ["a dog"], None)
    with pytest.raises(TypeError, match="NHWC"):  # latents as a numpy array: not images, and not guessed
        fn(latent(0).numpy(), ["a dog"], None)


def test_flow_grpo_takes_float_arrays_as_0_1_and_uint8_as_0_255(reward, grpo):
    fn, vae = grpo
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(12))
    prompts = ["a dog", "a cat"]
    want = pixel_scores(reward, vae, images, prompts)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(fn(nhwc, prompts, None)[0], want, atol=1e-5)  # float NHWC: not divided by 255 again
    np.testing.assert_allclose(fn(nhwc.astype(np.float64), prompts, None)[0], want, atol=1e-5)
    u8 = (nhwc * 255).round().astype(np.uint8)
    np.testing.assert_allclose(fn(u8, prompts, None)[0], pixel_scores(reward, vae, torch.from_numpy(u8).permute(
        0, 3, 1, 2).double().div(255).float(), prompts), atol=1e-5)
    np.testing.assert_allclose(fn(images.mul(255).round().byte(), prompts, None)[0],  # a uint8 NCHW tensor too
                               fn(u8, prompts, None)[0], atol=1e-6)
    with_nan = nhwc.copy()
    with_nan[1, 3, 5, 2] = np.nan
    for bad in (nhwc * 255, nhwc - 0.5, with_nan):
        with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
            fn(bad, prompts, None)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        fn(images * 2 - 1, prompts, None)  # a [-1, 1] tensor
    with pytest.raises(TypeError, match="uint8 .* or float"):
        fn(u8.astype(np.int32), prompts, None)


def test_flow_grpo_takes_a_str_as_one_prompt(reward, grpo):
    fn, _ = grpo
    x = latent(13, b=5)  # as many latents as "a dog" has letters: taken letter by letter, it would score silently
    scores, _ = fn(x, "a dog", None)
    want = torch.stack([reward.score(x[i:i + 1], ["a dog"])[0] for i in range(5)]).numpy()
    np.testing.assert_allclose(scores, want, atol=1e-5)
    with pytest.raises(ValueError, match="got 2 prompts for a batch of 5"):
        fn(x, ["a dog", "a cat"], None)
    with pytest.raises(TypeError, match="prompts must be a str or a sequence of str"):
        fn(x, [b"a dog"], None)
