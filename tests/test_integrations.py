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
])
def test_verl_omni_waits_backoff_or_retry_after(monkeypatch, retry_after, kwargs, waits):
    got = []

    async def sleep(seconds):
        got.append(seconds)

    monkeypatch.setattr(verl_omni, "asyncio", type("A", (), {"sleep": staticmethod(sleep)}))
    app, seen = recording_server([(503, {} if retry_after is None else {"Retry-After": retry_after})])
    with serving(app) as url, pytest.raises(RuntimeError, match="answered 503"):
        asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", **kwargs))
    assert got == pytest.approx(waits) and len(seen) == len(waits) + 1


def test_verl_omni_timeout_applies():
    async def slow(request):
        await asyncio.sleep(2)
        return JSONResponse({"protocol_version": "1", "raw_scores": [0.25]})

    with serving(Starlette(routes=[Route("/v1/score", slow, methods=["POST"])])) as url:
        with pytest.raises(ConnectionError, match="after 1 tries: ReadTimeout"):
            asyncio.run(verl_omni.compute_score(latent(0), "a dog", {}, url + "/v1/score", timeout=0.2, max_retries=0))


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
