"""The reward server: every endpoint and error code, scores equal to in-process ``LatentCLIPReward.score``,
batching under concurrency, a bad request failing alone, pickles never run, and the command line (loopback
rule, SIGTERM drains in-flight requests and exits 0). Tiny model, loopback only, bounded request counts."""

import asyncio
import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import httpx
import pytest
import torch
from safetensors.torch import save, save_file

import fastlclip
from fastlclip.serve import create_app, read_metadata

from conftest import TINY

V1 = {"x-drm-protocol-version": "1"}


@pytest.fixture(scope="module")
def reward(seeded_tiny_model):
    return fastlclip.LatentCLIPReward(seeded_tiny_model)


def body(latents, prompts=None, **tensors):
    meta = {} if prompts is None else {"prompt": prompts} if isinstance(prompts, str) else {"prompts": json.dumps(prompts)}
    return save({"latents": latents, **tensors}, metadata=meta)


def latents(b=1, seed=0, grid=16, channels=4):
    return torch.randn(b, channels, grid, grid, generator=torch.Generator().manual_seed(seed))


def run(app, coro_fn):
    """``coro_fn(client)`` against ``app`` in-process (ASGI), in a fresh event loop."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await coro_fn(client)
    return asyncio.run(main())


def post(app, content, headers=V1, **kw):
    return run(app, lambda c: c.post("/v1/score", content=content, headers=headers, **kw))


def test_healthz(reward):
    r = run(create_app(reward), lambda c: c.get("/healthz"))
    assert r.status_code == 200
    info = r.json()
    assert info["status"] == "ok" and info["channels"] == 4 and info["device"] == "cpu" and info["vae"] == reward.model.cfg.vae_name
    assert info["protocol_version"] == "1" and info["noise_aware"] is False


def test_scores_equal_in_process_scores(reward):
    app = create_app(reward, max_batch_size=4)
    x, prompts = latents(6, seed=1), [f"a photo of {w}" for w in ("a dog", "a cat", "a car", "a dog", "a tree", "a cup")]
    want = reward.score(x, prompts)
    r = post(app, body(x, prompts))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["protocol_version"] == "1" and "noise_level" not in out
    torch.testing.assert_close(torch.tensor(out["raw_scores"], dtype=torch.float32), want, rtol=0, atol=1e-5)
    # One prompt for all, fp16 on the wire, and VAE-space latents: each as the in-process score of the same latents.
    half = x.half()
    r = post(app, body(half, "a red dog"))
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), reward.score(half.float(), "a red dog"), rtol=0, atol=1e-5)
    raw = half.float() / fastlclip.SDXL_SCALING_FACTOR
    r = run(app, lambda c: c.post("/v1/score", content=save({"latents": raw}, metadata={"prompt": "a red dog", "space": "vae"}),
                                  headers=V1))
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), reward.score(half.float(), "a red dog"), rtol=0, atol=1e-5)


def test_v1_client_tensors_accepted_and_noise_level_ignored_by_a_clean_model(reward):
    x = latents(1, seed=2)
    r = post(create_app(reward), body(x, "a dog", u=torch.tensor([0.4]), seeds=torch.tensor([7]),
                                      prompt_embeds=torch.zeros(1, 3, 8), pooled_prompt_embeds=torch.zeros(1, 8)))
    assert r.status_code == 200, r.text
    assert r.json()["noise_level"] == "ignored"
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), reward.score(x, "a dog"), rtol=0, atol=1e-5)


def test_noise_aware_model_scores_latents_renoised_to_u_batched_by_noise_level():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load({**TINY, "vision_cfg": {**TINY["vision_cfg"], "noise_aware": True}})
    with torch.no_grad():  # a noise embedding that matters
        for p in model.visual.latent_vit.noise_embed.parameters():
            p.normal_(0, 0.5)
    reward = fastlclip.LatentCLIPReward(model)
    app = create_app(reward, max_batch_size=32, max_wait_ms=300)
    xs, us, seeds = [latents(1, 300 + i) for i in range(4)], [0.2, 0.6, 0.2, 0.6], [5, 6, 7, 8]

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/score", content=body(x, "a dog", u=torch.tensor([u]), seeds=torch.tensor([s])),
                                             headers=V1) for x, u, s in zip(xs, us, seeds)])

    replies = run(app, go)
    assert app.state.metrics.batches._value.get() == 2  # one batch per noise level
    for x, u, s, r in zip(xs, us, seeds, replies):
        assert r.status_code == 200 and r.json()["noise_level"] == pytest.approx(u)
        eps = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s))  # v1: (1 - u) x + u eps
        want = reward.score((1 - u) * x + u * eps, "a dog", noise_level=u)
        torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), want, rtol=0, atol=1e-5)
        assert abs(want.item() - reward.score(x, "a dog").item()) > 1e-3  # the noise level changed the score


class _Boom:
    """Unpickling this would create a file: the payload a pickle-based reward server would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("case, make, message", [
    ("pickle", None, "not a safetensors"),
    ("garbage", lambda: b"\x00\x01not safetensors", "not a safetensors"),
    ("short", lambda: b"abc", "not a safetensors"),
    ("truncated", lambda: body(latents())[:-10], "not a valid safetensors"),
    ("nan", lambda: body(latents().index_fill_(2, torch.tensor([3]), float("nan")), "a dog"), "NaN"),
    ("inf", lambda: body(latents().index_fill_(3, torch.tensor([0]), float("inf")), "a dog"), "NaN or Inf"),
    ("channels", lambda: body(latents(channels=16), "a dog"), "16 channels"),
    ("grid", lambda: body(latents(grid=12), "a dog"), "trained on 16x16"),
    ("rank", lambda: save({"latents": torch.zeros(4, 16, 16)}, metadata={"prompt": "a"}), "shape"),
    ("int", lambda: save({"latents": torch.zeros(1, 4, 16, 16, dtype=torch.int32)}, metadata={"prompt": "a"}), "float16"),
    ("no latents", lambda: save({"u": torch.tensor([0.1])}, metadata={"prompt": "a"}), "no 'latents'"),
    ("no prompts", lambda: body(latents()), "no prompts"),
    ("prompt count", lambda: body(latents(3), ["a", "b"]), "2 prompts for 3 latents"),
    ("empty prompt", lambda: body(latents(2), ["a", " "]), "empty"),
    ("prompts not json", lambda: save({"latents": latents()}, metadata={"prompts": "[a"}), "not JSON"),
    ("u range", lambda: body(latents(), "a", u=torch.tensor([1.5])), "[0, 1]"),
    ("u count", lambda: body(latents(3), "a", u=torch.tensor([0.1, 0.2])), "noise level"),
    ("seeds", lambda: body(latents(1), "a", seeds=torch.tensor([0.5])), "'seeds'"),
    ("unknown tensor", lambda: save({"latents": latents(), "images": torch.zeros(1)}, metadata={"prompt": "a"}), "unknown"),
    ("space", lambda: save({"latents": latents()}, metadata={"prompt": "a", "space": "pixel"}), "space"),
])
def test_bad_requests_are_400_with_a_json_reason(reward, tmp_path, case, make, message):
    marker = tmp_path / "pwned"
    content = pickle.dumps({"latents": _Boom(str(marker))}) if case == "pickle" else make()
    r = post(create_app(reward), content)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert not marker.exists()  # the pickle was never unpickled


def test_protocol_version_header_required(reward):
    app = create_app(reward)
    for headers in ({}, {"x-drm-protocol-version": "2"}):
        r = post(app, body(latents(), "a dog"), headers=headers)
        assert r.status_code == 400 and "x-drm-protocol-version" in r.json()["error"]


def test_404_405_413(reward):
    app = create_app(reward, max_body_mb=0.01)  # 10 KiB: one 4x16x16 fp32 latent is 4 KiB
    r = run(app, lambda c: c.get("/v2/score"))
    assert r.status_code == 404 and "error" in r.json()
    r = run(app, lambda c: c.get("/v1/score"))
    assert r.status_code == 405 and "error" in r.json()
    assert post(app, body(latents(1), "a dog")).status_code == 200
    r = post(app, body(latents(4), "a dog"))
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]

    async def chunks():  # no Content-Length: the limit holds while streaming
        yield body(latents(4), "a dog")
    r = post(app, chunks())
    assert r.status_code == 413


def test_bearer_token(reward):
    app = create_app(reward, token="s3cret")
    x = body(latents(), "a dog")
    for headers in (V1, {**V1, "authorization": "Bearer wrong"}, {**V1, "authorization": "s3cret"}):
        r = post(app, x, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    assert post(app, x, headers={**V1, "authorization": "Bearer s3cret"}).status_code == 200
    assert run(app, lambda c: c.get("/metrics")).status_code == 401
    assert run(app, lambda c: c.get("/metrics", headers={"authorization": "Bearer s3cret"})).status_code == 200
    assert run(app, lambda c: c.get("/healthz")).status_code == 200


class _GatedReward(fastlclip.LatentCLIPReward):
    """Scores only once ``gate`` is set; refuses the prompt "poison" inside the forward (as a model error would)."""

    def __init__(self, model):
        super().__init__(model)
        self.gate = threading.Event()
        self.started = threading.Event()

    def score(self, latents, prompts, **kw):
        self.started.set()
        assert self.gate.wait(30)
        if "poison" in prompts:
            raise ValueError("poisoned prompt")
        return super().score(latents, prompts, **kw)


def test_a_failing_forward_is_500_json_and_counted(reward):
    class Broken(fastlclip.LatentCLIPReward):
        def score(self, *args, **kw):
            raise RuntimeError("CUDA out of memory (simulated)")

    app = create_app(Broken(reward.model))
    r = post(app, body(latents(), "a dog"))
    assert r.status_code == 500 and "out of memory" in r.json()["error"]
    assert 'fastlclip_requests_total{code="500"} 1.0' in run(app, lambda c: c.get("/metrics")).text


def test_queue_full_is_503_with_retry_after(reward):
    gated = _GatedReward(reward.model)
    app = create_app(gated, max_batch_size=1, max_wait_ms=0, max_queue=1)

    async def go(c):
        first = asyncio.create_task(c.post("/v1/score", content=body(latents(1, 1), "a dog"), headers=V1))
        while not gated.started.is_set():  # the first is in the forward, blocked
            await asyncio.sleep(0.01)
        second = asyncio.create_task(c.post("/v1/score", content=body(latents(1, 2), "a dog"), headers=V1))
        while app.state.batcher.queued < 1:  # the second waits in the queue, which is now full
            await asyncio.sleep(0.01)
        third = await c.post("/v1/score", content=body(latents(1, 3), "a dog"), headers=V1)
        gated.gate.set()
        return third, await first, await second

    third, first, second = run(app, go)
    assert third.status_code == 503 and third.headers["retry-after"] == "1" and "queued" in third.json()["error"]
    assert first.status_code == second.status_code == 200


def test_a_bad_request_fails_alone(reward):
    gated = _GatedReward(reward.model)
    gated.gate.set()
    app = create_app(gated, max_batch_size=64, max_wait_ms=200)
    prompts = ["a dog", "poison", "a cat", "a tree"]
    xs = [latents(1, 10 + i) for i in range(4)]

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/score", content=body(x, p), headers=V1) for x, p in zip(xs, prompts)])

    replies = run(app, go)
    assert [r.status_code for r in replies] == [200, 400, 200, 200]
    assert "poisoned" in replies[1].json()["error"]
    for x, p, r in zip(xs, prompts, replies):
        if p != "poison":
            torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), reward.score(x, p), rtol=0, atol=1e-5)


def test_24_concurrent_clients_batched_and_right(reward):
    app = create_app(reward, max_batch_size=32, max_wait_ms=50)
    xs = [latents(1 + i % 2, 100 + i) for i in range(24)]
    prompts = [f"prompt {i % 5}" for i in range(24)]

    async def go(c):
        return await asyncio.gather(*[c.post("/v1/score", content=body(x, p), headers=V1) for x, p in zip(xs, prompts)])

    replies = run(app, go)
    assert all(r.status_code == 200 for r in replies)
    got = torch.tensor([s for r in replies for s in r.json()["raw_scores"]])
    want = torch.cat([reward.score(x, p) for x, p in zip(xs, prompts)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    batches = app.state.metrics.batches._value.get()
    assert 1 <= batches < 24
    text = run(app, lambda c: c.get("/metrics")).text
    assert 'fastlclip_requests_total{code="200"} 24.0' in text
    assert f"fastlclip_batches_total {batches}" in text
    assert "fastlclip_request_latency_seconds_bucket" in text


def test_read_metadata_reads_the_header():
    assert read_metadata(save({"x": torch.zeros(1)}, metadata={"prompt": "a dog"})) == {"prompt": "a dog"}


# -- the command line -----------------------------------------------------------------------------------------------
def serve_cmd(*args):
    return [sys.executable, "-m", "fastlclip.serve", *args]


@pytest.mark.parametrize("args, message", [
    (["--host", "192.168.1.4"], "not a loopback address"),  # without --token-file
    (["--host", "0.0.0.0"], "not a loopback address"),
    (["--port", "http"], "--port"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--max-body-mb", "nan"], "--max-body-mb"),
    (["--device", "tpu"], "--device"),
    (["--pretrained", "/nonexistent/ckpt.pt"], "no such file"),
    (["--token-file", "/nonexistent/token"], "--token-file"),
])
def test_cli_arguments_checked_before_work(capsys, args, message):
    """Each refusal is one line and exit 2, before any model loads (the entry point itself runs in the SIGTERM test)."""
    from fastlclip.serve.__main__ import main

    base = {"--model": "m", "--pretrained": __file__}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    with pytest.raises(SystemExit) as exit_:
        main([a for kv in base.items() for a in kv])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_and_exits_0(reward, tmp_path):
    cfg, weights = tmp_path / "tiny.json", tmp_path / "tiny.safetensors"
    cfg.write_text(json.dumps(TINY))
    save_file({k: v.contiguous() for k, v in reward.model.state_dict().items()}, weights)
    port = free_port()
    proc = subprocess.Popen(serve_cmd("--model", str(cfg), "--pretrained", str(weights), "--port", str(port),
                                      "--max-wait-ms", "1500", "--log-level", "warning"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        xs = [latents(1, 200 + i) for i in range(4)]

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                tasks = [asyncio.create_task(c.post("/v1/score", content=body(x, "a dog"), headers=V1)) for x in xs]
                await asyncio.sleep(0.5)  # sent, waiting for their batch (max-wait 1.5 s)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        replies = asyncio.run(go())
        assert [r.status_code for r in replies] == [200] * 4
        want = reward.score(torch.cat(xs), "a dog")
        torch.testing.assert_close(torch.tensor([r.json()["raw_scores"][0] for r in replies]), want, rtol=0, atol=1e-5)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
