"""The reward server: every endpoint and error code, scores equal to in-process ``LatentCLIPReward.score``,
batching under concurrency, a bad request failing alone, pickles never run, and the command line (loopback
rule, SIGTERM drains in-flight requests and exits 0). Tiny model, loopback only, bounded request counts."""

import asyncio
import copy
import json
import math
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

from conftest import TINY, tiny_noise_aware

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
            return await asyncio.wait_for(coro_fn(client), 60)  # a server that never answers fails, not hangs
    return asyncio.run(main())


def post(app, content, headers=V1, **kw):
    return run(app, lambda c: c.post("/v1/score", content=content, headers=headers, **kw))


def serve_main(monkeypatch, argv):
    """``python -m fastlclip.serve``'s ``main(argv)`` with uvicorn stubbed out: ``(exit code, the app it built)``."""
    import fastlclip.serve.__main__ as cli

    seen = {}

    class NoServer:
        started, cut = True, None

        def __init__(self, config, in_flight):
            seen["app"] = config.app

        def run(self):
            pass

    monkeypatch.setattr(cli, "graceful_server", NoServer)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    return cli.main(argv), seen.get("app")


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
    model = tiny_noise_aware(0)
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


def wait_healthy(proc, port: int, timeout: float) -> None:
    """Until the server process on ``port`` answers /healthz 200; fails if it exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


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
        wait_healthy(proc, port, 120)
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


# -- gaps found by mutation testing ---------------------------------------------------------------------------------
def _eps(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_renoise_per_latent_noise_levels_and_seeds():
    """(1 - u) x + u eps, written out: one u or one per latent; one seed for all latents or one each."""
    from fastlclip.serve.protocol import ScoreRequest, renoise

    x = latents(3, seed=9, grid=4)
    got = renoise(ScoreRequest(x, ["a"] * 3, (0.1, 0.5, 0.9), (3, 4, 5)))
    want = torch.stack([(1 - u) * x[i] + u * _eps(s, (4, 4, 4)) for i, (u, s) in enumerate(zip((0.1, 0.5, 0.9),
                                                                                              (3, 4, 5)))])
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got = renoise(ScoreRequest(x[:2], ["a"] * 2, 0.5, (3, 4)))  # a seed per latent, two latents
    torch.testing.assert_close(got, 0.5 * x[:2] + 0.5 * torch.stack([_eps(3, (4, 4, 4)), _eps(4, (4, 4, 4))]),
                               rtol=0, atol=1e-6)
    got = renoise(ScoreRequest(x, ["a"] * 3, 0.3, (7,)))  # one seed: the same noise for every latent
    torch.testing.assert_close(got, 0.7 * x + 0.3 * _eps(7, (4, 4, 4)).expand(3, -1, -1, -1), rtol=0, atol=1e-6)


def _parse(**tensors):
    from fastlclip.serve.protocol import parse

    meta = tensors.pop("meta", {"prompt": "a"})
    return parse(save({"latents": latents(3, grid=4), **tensors}, metadata=meta), channels=4,
                 to_diffusion=lambda z: z * 2 + 1)


def test_parse_noise_level_seeds_prompts_and_space():
    from fastlclip.serve.protocol import ProtocolError

    req = _parse()
    assert req.noise_level is None and req.seeds == (0,) and req.prompts == ["a"] * 3 and req.size == 3
    assert _parse(u=torch.tensor(0.25)).noise_level == 0.25
    assert _parse(u=torch.tensor([0.0])).noise_level == 0.0 and _parse(u=torch.tensor([1.0])).noise_level == 1.0
    assert _parse(u=torch.tensor([0.5, 0.5, 0.5], dtype=torch.float16)).noise_level == 0.5
    assert _parse(u=torch.tensor([0.5, 0.25, 1.0])).noise_level == (0.5, 0.25, 1.0)
    assert _parse(seeds=torch.tensor([9])).seeds == (9,) and _parse(seeds=torch.tensor(4)).seeds == (4,)
    assert _parse(seeds=torch.tensor([1, 2, 3], dtype=torch.int32)).seeds == (1, 2, 3)
    for bad in (torch.tensor([1, 0, 1]), torch.full((1, 1), 0.5), torch.tensor([0.1, 0.2]), torch.tensor([float("nan")]),
                torch.tensor([-0.01])):
        with pytest.raises(ProtocolError, match="'u'"):
            _parse(u=bad)
    for bad in (torch.tensor([True]), torch.zeros(1, 1, dtype=torch.int64), torch.tensor([1, 2]),
                torch.tensor([1.0])):
        with pytest.raises(ProtocolError, match="'seeds'"):
            _parse(seeds=bad)
    assert _parse(meta={"prompts": json.dumps(["x"])}).prompts == ["x"] * 3
    assert _parse(meta={"prompts": json.dumps(["x", "y", "z"]), "prompt": "ignored"}).prompts == ["x", "y", "z"]
    for meta, message in (({"prompts": json.dumps("xyz")}, "list of strings"), ({"prompts": "[1, 2, 3]"}, "strings"),
                          ({"prompt": ""}, "empty"), ({}, "no prompts")):
        with pytest.raises(ProtocolError, match=message):
            _parse(meta=meta)
    x = latents(3, grid=4)
    vae = _parse(meta={"prompt": "a", "space": "vae"}).latents
    torch.testing.assert_close(vae, x * 2 + 1, rtol=0, atol=0)
    torch.testing.assert_close(_parse(meta={"prompt": "a", "space": "diffusion"}).latents, x, rtol=0, atol=0)


def test_parse_latent_dtypes_and_shapes():
    from fastlclip.serve.protocol import ProtocolError, parse

    def go(x):
        return parse(save({"latents": x}, metadata={"prompt": "a"}), channels=4, to_diffusion=None)

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        req = go(latents(2, grid=4).to(dtype))
        assert req.latents.dtype == torch.float32 and req.latents.shape == (2, 4, 4, 4)
    for bad, message in ((torch.zeros(1, 4, 4, 4, dtype=torch.float64), "float16"), (torch.zeros(0, 4, 4, 4), "B > 0"),
                         (torch.zeros(1, 1, 4, 4, 4), "shape"), (torch.zeros(1, 3, 4, 4), "3 channels")):
        with pytest.raises(ProtocolError, match=message):
            go(bad)


def test_read_metadata_edge_cases():
    import struct

    from fastlclip.serve.protocol import ProtocolError

    assert read_metadata(save({"x": torch.zeros(1)})) == {}
    header = json.dumps({"__metadata__": ["not", "a", "dict"]}).encode()
    assert read_metadata(struct.pack("<Q", len(header)) + header) == {}
    header = json.dumps([1, 2]).encode()
    assert read_metadata(struct.pack("<Q", len(header)) + header) == {}
    header = json.dumps({"__metadata__": {"a": "b"}}).encode()
    assert read_metadata(struct.pack("<Q", len(header)) + header) == {"a": "b"}  # exactly the body's length
    with pytest.raises(ProtocolError, match="exceeds"):
        read_metadata(struct.pack("<Q", len(header) + 1) + header)
    with pytest.raises(ProtocolError, match="not JSON"):
        read_metadata(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(ProtocolError, match=r"\(7 bytes\)"):
        read_metadata(b"1234567")
    with pytest.raises(ProtocolError, match="header is not JSON"):  # 8 bytes: a header length, then nothing
        read_metadata(struct.pack("<Q", 0))


def _request(b, seed, grid=4, noise=None, prompt="p"):
    from fastlclip.serve.protocol import ScoreRequest

    return ScoreRequest(latents(b, seed, grid=grid), [f"{prompt}{i}" for i in range(b)], noise)


def _batcher_run(requests, **kw):
    """Submit ``requests`` at once to a Batcher whose score is each latent's first value; return the replies and
    the batches scored (latent count, prompts, noise level)."""
    from fastlclip.serve.batcher import Batcher

    calls, sizes = [], []

    def score_fn(x, prompts, noise):
        calls.append((x.shape[0], list(prompts), noise))
        return x.flatten(1)[:, 0] * 2

    batcher = Batcher(score_fn, on_batch=sizes.append, **kw)

    async def go():
        out = await asyncio.wait_for(asyncio.gather(*[batcher.submit(r) for r in requests], return_exceptions=True), 5)
        await batcher.close()
        return out

    return asyncio.run(go()), calls, sizes, batcher


def test_batcher_groups_by_shape_and_noise_level_up_to_the_batch_size():
    reqs = [_request(2, 1), _request(1, 2, grid=8), _request(2, 3), _request(1, 4), _request(3, 5), _request(1, 6, grid=8)]
    replies, calls, sizes, batcher = _batcher_run(reqs, max_batch_size=4, max_wait_ms=300)
    for r, got in zip(reqs, replies):  # each reply is its own latents' scores, in order
        assert got == pytest.approx((r.latents.flatten(1)[:, 0] * 2).tolist())
    # oldest first: 4x4 requests 1 and 3 fill a batch (2 + 2), then the 8x8 pair, then 4 (1) + 5 (3) = 4
    assert [c[:2] for c in calls] == [(4, ["p0", "p1", "p0", "p1"]), (2, ["p0", "p0"]), (4, ["p0", "p0", "p1", "p2"])]
    assert sizes == [4, 2, 4] and batcher.queued == 0
    big = [_request(5, 7), _request(1, 8)]  # larger than a batch: alone, in one call
    replies, calls, _, _ = _batcher_run(big, max_batch_size=4, max_wait_ms=300)
    assert [c[0] for c in calls] == [5, 1] and replies[0] == pytest.approx((big[0].latents.flatten(1)[:, 0] * 2).tolist())
    noisy = [_request(1, 9, noise=0.2), _request(1, 10, noise=0.6), _request(1, 11, noise=0.2)]
    _, calls, _, _ = _batcher_run(noisy, max_batch_size=2, max_wait_ms=300, noise_key=True)
    assert [(c[0], c[2]) for c in calls] == [(2, 0.2), (1, 0.6)]
    _, calls, _, _ = _batcher_run(noisy, max_batch_size=3, max_wait_ms=300)  # a clean model: one batch, no level
    assert [(c[0], c[2]) for c in calls] == [(3, None)]


def test_batcher_leaves_a_partial_batch_after_max_wait():
    t0 = time.monotonic()
    replies, calls, _, _ = _batcher_run([_request(1, 1), _request(1, 2)], max_batch_size=8, max_wait_ms=300)
    waited = time.monotonic() - t0
    assert [c[0] for c in calls] == [2] and 0.25 < waited < 5


def test_batcher_queue_limit_counts_latents():
    from fastlclip.serve.batcher import Batcher, QueueFull

    gate = threading.Event()

    def score_fn(x, prompts, noise):
        assert gate.wait(30)
        return x.flatten(1)[:, 0]

    async def go():
        batcher = Batcher(score_fn, max_batch_size=2, max_wait_ms=0, max_queue=3)
        first = asyncio.ensure_future(batcher.submit(_request(2, 1)))  # taken at once, blocked in the forward
        while batcher.queued or not batcher._pending == []:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(_request(1, 2)))
        third = asyncio.ensure_future(batcher.submit(_request(2, 3)))  # 1 + 2 = 3 latents: still fits
        await asyncio.sleep(0.05)
        assert batcher.queued == 3
        with pytest.raises(QueueFull, match="3 latents are queued"):
            await batcher.submit(_request(1, 4))
        gate.set()
        out = await asyncio.wait_for(asyncio.gather(first, second, third), 5)
        await batcher.close()
        empty = Batcher(lambda x, p, n: x.flatten(1)[:, 0], max_queue=1)
        out.append(await empty.submit(_request(4, 5)))  # an empty queue takes a request over the limit
        await empty.close()
        return out

    assert [len(r) for r in asyncio.run(asyncio.wait_for(go(), 10))] == [2, 1, 2, 4]


def test_healthz_reports_the_model(reward):
    info = run(create_app(reward), lambda c: c.get("/healthz")).json()
    assert info == {"status": "ok", "protocol_version": "1", "model": reward.model.cfg.name, "vae": reward.model.cfg.vae_name,
                    "channels": 4, "latent_size": 16, "resize": None, "device": "cpu", "dtype": "float32",
                    "backend": "eager", "noise_aware": False, "scaling_factor": 0.13025, "shift_factor": 0.0}


def test_body_limit_is_exact_with_and_without_content_length(reward):
    content = body(latents(1), "a dog")
    n = len(content)

    async def stream():
        yield content[:100]
        yield content[100:]

    for mb, status in ((n / 2**20, 200), ((n - 1) / 2**20, 413)):
        app = create_app(reward, max_body_mb=mb)
        assert post(app, content).status_code == status
        assert post(app, stream()).status_code == status


def test_replies_metrics_and_errors_in_detail(reward):
    app = create_app(reward, max_batch_size=2, token="tok")
    auth = {**V1, "authorization": "Bearer tok"}
    r = post(app, body(latents(3), "a dog"), headers=auth)
    assert r.status_code == 200 and r.json()["model"] == reward.model.cfg.name and len(r.json()["raw_scores"]) == 3
    assert post(app, body(latents(1), "a dog"), headers={**V1, "authorization": "Bearer tokX"}).status_code == 401
    assert post(app, body(latents(1), "a dog"), headers={**V1, "authorization": "bearer tok"}).status_code == 401
    assert post(app, b"junk", headers=auth).status_code == 400
    text = run(app, lambda c: c.get("/metrics", headers={"authorization": "Bearer tok"})).text
    for line in ('fastlclip_requests_total{code="200"} 1.0', 'fastlclip_requests_total{code="401"} 2.0',
                 'fastlclip_requests_total{code="400"} 1.0', "fastlclip_latents_total 3.0", "fastlclip_batches_total 1.0",
                 'fastlclip_batch_size_bucket{le="2.0"} 0.0', 'fastlclip_batch_size_bucket{le="4.0"} 1.0',
                 "fastlclip_queued_latents 0.0", "fastlclip_requests_in_flight 0.0",
                 "fastlclip_request_latency_seconds_count 4.0",
                 'fastlclip_request_latency_seconds_bucket{le="30.0"} 4.0'):  # each well under 30 s
        assert line in text, line
    r = run(app, lambda c: c.get("/metrics", headers={"authorization": "Bearer tok"}))
    assert r.headers["content-type"].startswith("text/plain; version=")  # Prometheus' text format
    r = run(app, lambda c: c.get("/nowhere"))
    assert r.status_code == 404 and r.json() == {"error": "Not Found: GET /nowhere"}
    r = run(app, lambda c: c.put("/healthz"))
    assert r.status_code == 405 and r.json()["error"] == "Method Not Allowed: PUT /healthz" and r.headers["allow"]


def test_a_type_error_from_the_model_is_400():
    class Refusing(fastlclip.LatentCLIPReward):
        def score(self, *args, **kw):
            raise TypeError("not for this request")

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = create_app(Refusing(fastlclip.load(TINY)))
    r = post(app, body(latents(1), "a"))
    assert r.status_code == 400 and r.json() == {"error": "not for this request"}


def test_noise_aware_reply_per_latent_levels_and_default_seed():
    model = tiny_noise_aware(0)
    reward = fastlclip.LatentCLIPReward(model)
    app = create_app(reward)
    x, u = latents(3, seed=40), torch.tensor([0.1, 0.5, 0.8])
    r = post(app, body(x, "a dog", u=u))  # no seeds: seed 0 for every latent
    assert r.status_code == 200 and r.json()["noise_level"] == pytest.approx([0.1, 0.5, 0.8])
    eps = _eps(0, x.shape[1:])
    want = reward.score((1 - u.view(-1, 1, 1, 1)) * x + u.view(-1, 1, 1, 1) * eps, "a dog", noise_level=u)
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), want, rtol=0, atol=1e-5)
    r = post(app, body(x, "a dog"))  # no u: clean latents, no noise level in the reply
    assert "noise_level" not in r.json()
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), reward.score(x, "a dog"), rtol=0, atol=1e-5)


# -- the command line, in process ----------------------------------------------------------------------------------
def test_cli_value_parsers():
    import argparse

    from fastlclip.serve.__main__ import _non_negative_float, _port, is_loopback, read_token

    assert [_port(t) for t in ("0", "8080", "65535")] == [0, 8080, 65535]
    for bad in ("65536", "-1", "http", "80.0"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 65535\]"):
            _port(bad)
    assert _non_negative_float("0") == 0.0 and _non_negative_float("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number"):
        _non_negative_float("x")
    for bad in ("-0.5", "inf", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite number >= 0"):
            _non_negative_float(bad)
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "example.com", "[::]", "LOCALHOST.example"))


def test_cli_token_file(tmp_path):
    from fastlclip.serve.__main__ import read_token

    f = tmp_path / "token"
    f.write_text("  s3cret\n")
    assert read_token(f) == "s3cret"
    for text, message in (("", "an empty file"), (" \n", "an empty file"), ("a b", "whitespace inside")):
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_token(f)
    with pytest.raises(ValueError, match="cannot read it"):
        read_token(tmp_path / "missing")


def _cli_args(*extra):
    from fastlclip.serve.__main__ import parser

    return parser().parse_args(["--model", "m", "--pretrained", __file__, *extra])


def test_cli_check_args(tmp_path, monkeypatch):
    from fastlclip.serve.__main__ import check_args

    token = tmp_path / "token"
    token.write_text("tok")
    assert check_args(_cli_args()) == ("cpu", None)
    assert check_args(_cli_args("--host", "0.0.0.0", "--token-file", str(token), "--device", "cpu")) == ("cpu", "tok")
    assert check_args(_cli_args("--pretrained", "hf-hub:org/repo")) == ("cpu", None)  # not looked up here
    with pytest.raises(ValueError, match="--device cuda"):
        check_args(_cli_args("--device", "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_args(_cli_args())[0] == "cuda"


class _FakeServer:
    """Stands in for uvicorn: records its config, runs nothing."""

    made = []

    def __init__(self, config):
        self.config, self.started = config, True
        _FakeServer.made.append(self)

    def run(self):
        pass


def test_cli_main_builds_the_app_it_was_asked_for(reward, tmp_path, monkeypatch):
    import signal as signal_module

    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from fastlclip.serve.__main__ import main

    cfg, weights, token = tmp_path / "tiny.json", tmp_path / "tiny.safetensors", tmp_path / "token"
    cfg.write_text(json.dumps(TINY))
    save_file({k: v.contiguous() for k, v in reward.model.state_dict().items()}, weights)
    token.write_text("tok")
    configs, handlers = [], {}
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: configs.append((app, kw)) or (app, kw))
    monkeypatch.setattr(uvicorn, "Server", _FakeServer)
    monkeypatch.setattr(signal_module, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))
    args = ["--model", str(cfg), "--pretrained", str(weights), "--host", "[::1]", "--port", "9001",
            "--max-batch-size", "5", "--max-wait-ms", "7.5", "--max-body-mb", "0.5", "--max-queue", "11",
            "--text-cache-size", "3", "--token-file", str(token), "--resize", "pool", "--log-level", "warning",
            "--body-timeout-s", "2.5", "--shutdown-timeout-s", "7"]
    assert main(args) == 0
    app, kw = configs[-1]
    assert issubclass(kw.pop("http"), H11Protocol)
    assert kw == {"host": "::1", "port": 9001, "log_level": "warning", "timeout_graceful_shutdown": 7.0}
    assert app.state.body_timeout_s == 2.5
    assert set(handlers) == {signal_module.SIGTERM, signal_module.SIGINT}
    assert all(h(signal_module.SIGTERM, None) is None for h in handlers.values())
    b, r = app.state.batcher, app.state.reward
    assert (b.max_batch_size, b.max_wait, b.max_queue, b.noise_key) == (5, 0.0075, 11, False)
    assert r.text_cache_size == 3 and r.model.resize == "pool" and r.model.check_finite is False
    assert r.model.dtype == torch.float32 and r.model.backend == "eager" and str(r.model.device) == "cpu"
    for k, v in reward.model.state_dict().items():
        assert torch.equal(r.model.state_dict()[k], v), k
    auth = {**V1, "authorization": "Bearer tok"}
    assert post(app, body(latents(1), "a"), headers=V1).status_code == 401
    assert post(app, body(latents(1), "a"), headers=auth).status_code == 200
    big = body(latents(2, grid=128), "a")  # 512 KiB of latents and a header: over 0.5 MiB
    assert len(big) > 2**19 and post(app, big, headers=auth).status_code == 413
    # defaults: 127.0.0.1:8000, float32 eager on the CPU, no resize, batch 32, 10 ms, 4096 latents
    assert main(["--model", str(cfg), "--pretrained", str(weights), "--dtype", "auto"]) == 0
    app, kw = configs[-1]
    assert issubclass(kw.pop("http"), H11Protocol)
    assert kw == {"host": "127.0.0.1", "port": 8000, "log_level": "info", "timeout_graceful_shutdown": 30.0}
    assert app.state.body_timeout_s == 30.0
    b, r = app.state.batcher, app.state.reward
    assert (b.max_batch_size, b.max_wait, b.max_queue) == (32, 0.01, 4096) and r.model.resize is None
    assert r.text_cache_size == 4096 and r.model.dtype == torch.float32
    assert main(["--model", str(cfg), "--pretrained", str(weights), "--dtype", "bfloat16"]) == 0
    assert configs[-1][0].state.reward.model.dtype == torch.bfloat16
    _FakeServer.made[-1].started = False
    monkeypatch.setattr(_FakeServer, "run", lambda self: setattr(self, "started", False))
    assert main(["--model", str(cfg), "--pretrained", str(weights)]) == 1  # the server never started


def test_cli_main_reports_a_model_that_does_not_load(tmp_path, capsys):
    from fastlclip.serve.__main__ import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", json.dumps(TINY) and "no-such-model", "--pretrained", str(bad)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "could not load the model" in lines[0]


def test_cli_main_loads_on_the_chosen_device_dtype_and_backend(seeded_tiny_model, tmp_path, monkeypatch, capsys):
    """What main() asks fastlclip.load for, the CUDA defaults included (a recorder stands in for load and a CUDA
    machine), and the load error in one line: its first line, or its type when it says nothing."""
    import uvicorn

    from fastlclip.serve.__main__ import main

    asked = []

    def load(*args, **kwargs):
        asked.append((args, kwargs))
        if isinstance(failure, BaseException):
            raise failure
        return copy.deepcopy(seeded_tiny_model)

    monkeypatch.setattr(fastlclip, "load", load)
    monkeypatch.setattr(uvicorn, "Server", _FakeServer)
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: app)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    failure = None

    def run(*extra):
        assert main(["--model", "m", "--pretrained", str(tmp_path), *extra]) == 0
        return asked[-1][1]

    assert run() == dict(device="cpu", dtype=torch.float32, backend="eager", resize=None)
    assert run("--backend", "triton", "--resize", "interpolate")["backend"] == "triton"
    assert run("--dtype", "float16")["dtype"] == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run() == dict(device="cuda", dtype=torch.bfloat16, backend="auto", resize=None)
    assert run("--device", "cpu") == dict(device="cpu", dtype=torch.float32, backend="eager", resize=None)
    assert run("--dtype", "float32", "--backend", "graph") == dict(device="cuda", dtype=torch.float32,
                                                                  backend="graph", resize=None)
    assert asked[-1][0] == ("m", str(tmp_path))
    capsys.readouterr()
    for failure, said in ((KeyError(), "KeyError"), (ValueError("first line\nsecond"), "first line")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", "m", "--pretrained", str(tmp_path)])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"python -m fastlclip.serve: error: could not load the model: {said}\n"


def test_create_app_defaults(reward):
    app = create_app(reward)
    b = app.state.batcher
    assert (b.max_batch_size, b.max_wait, b.max_queue, b.noise_key) == (32, 0.01, 4096, False)
    content = body(latents(1), "a dog")
    for length, status in ((64 * 2**20 + 1, 413), (64 * 2**20, 200)):  # 64 MiB by the Content-Length it claims
        r = post(app, content, headers={**V1, "content-length": str(length)})
        assert r.status_code == status, r.text
    assert "64 MiB" in post(app, content, headers={**V1, "content-length": str(2**30)}).json()["error"]


def test_the_models_resize_policy_applies_to_requests():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(TINY, resize="interpolate")
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(2, seed=3, grid=12)
    r = post(create_app(reward), body(x, "a dog"))
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), reward.score(x, "a dog"), rtol=0, atol=1e-5)


def test_an_error_outside_scoring_is_500_json():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(TINY)
    app = create_app(fastlclip.LatentCLIPReward(model))
    del model.backend  # /healthz now fails inside the route

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/healthz")

    r = asyncio.run(main())
    assert r.status_code == 500 and r.json()["error"].startswith("internal error: AttributeError: ")


def test_shutdown_stops_the_batchers_worker(reward):
    from starlette.testclient import TestClient

    app = create_app(reward)
    with TestClient(app) as client:
        assert client.post("/v1/score", content=body(latents(1), "a dog"), headers=V1).status_code == 200
        worker = app.state.batcher._worker
        assert worker is not None and not worker.done()
    assert app.state.batcher._worker is None and worker.cancelled()
    from fastlclip.serve.batcher import Batcher

    idle = Batcher(lambda x, p, n: x.flatten(1)[:, 0])
    asyncio.run(idle.close())  # never started: nothing to stop
    assert idle._worker is None


# --- gaps found by mutation testing (second serve run: the batcher's worker, scoring and readiness; metrics) ---

def test_batcher_a_full_batch_leaves_at_once_and_only_its_key_counts():
    # two 1-latent requests fill a batch of 2 exactly: they leave at once, long before max_wait (10 s)
    t0 = time.monotonic()
    _, calls, _, _ = _batcher_run([_request(1, 1), _request(1, 2)], max_batch_size=2, max_wait_ms=10_000)
    assert [c[0] for c in calls] == [2] and time.monotonic() - t0 < 3
    # one latent of each shape is not a full batch of either: both wait max_wait (300 ms), then leave apart
    t0 = time.monotonic()
    _, calls, _, _ = _batcher_run([_request(1, 1), _request(1, 2, grid=8)], max_batch_size=2, max_wait_ms=300)
    assert [c[0] for c in calls] == [1, 1] and time.monotonic() - t0 > 0.25


def test_batcher_a_failing_batch_scores_each_request_alone():
    from fastlclip.serve.batcher import Batcher

    calls = []

    def score_fn(x, prompts, noise):
        calls.append(list(prompts))
        if "bad0" in prompts:
            raise ValueError("bad prompt")
        return x.flatten(1)[:, 0] + 1

    reqs = [_request(2, 1), _request(1, 2, prompt="bad"), _request(1, 3, prompt="q")]

    async def go():
        b = Batcher(score_fn, max_batch_size=8, max_wait_ms=0)
        out = await asyncio.wait_for(asyncio.gather(*[b.submit(r) for r in reqs], return_exceptions=True), 5)
        alone = await asyncio.wait_for(asyncio.gather(b.submit(_request(1, 4, prompt="bad")), return_exceptions=True), 5)
        await b.close()
        return out, alone

    (good, bad, q), (alone,) = asyncio.run(go())
    assert good == pytest.approx((reqs[0].latents.flatten(1)[:, 0] + 1).tolist())
    assert q == pytest.approx((reqs[2].latents.flatten(1)[:, 0] + 1).tolist())
    assert isinstance(bad, ValueError) and str(bad) == "bad prompt"
    assert isinstance(alone, ValueError) and str(alone) == "bad prompt"
    # the batch once, then each request alone, then the lone bad request once (not retried)
    assert calls == [["p0", "p1", "bad0", "q0"], ["p0", "p1"], ["bad0"], ["q0"], ["bad0"]]


def test_batcher_drops_a_request_cancelled_while_queued():
    from fastlclip.serve.batcher import Batcher

    calls = []

    def score_fn(x, prompts, noise):
        calls.append(list(prompts))
        return x.flatten(1)[:, 0]

    async def go():
        b = Batcher(score_fn, max_batch_size=8, max_wait_ms=200)
        kept = asyncio.ensure_future(b.submit(_request(1, 1, prompt="a")))
        gone = asyncio.ensure_future(b.submit(_request(2, 2, prompt="b")))
        await asyncio.sleep(0.05)  # both queued, the batch not yet due
        assert b.queued == 3
        gone.cancel()
        out = await asyncio.wait_for(kept, 5)
        assert b.queued == 0
        await b.close()
        return out

    out = asyncio.run(go())
    assert len(out) == 1 and calls == [["a0"]]


def test_metrics_names_help_and_buckets():
    from prometheus_client import generate_latest

    from fastlclip.serve.app import _Metrics

    m, other = _Metrics(), _Metrics()  # each app has its own registry
    m.requests.labels(code="200").inc()
    m.batch(3)
    text = generate_latest(m.registry).decode()
    assert "fastlclip_batches_total 0.0\n" in generate_latest(other.registry).decode()
    for line in ("# HELP fastlclip_requests_total Score requests answered, by HTTP status",
                 'fastlclip_requests_total{code="200"} 1.0',
                 "# HELP fastlclip_batches_total Batches scored (one forward each)", "fastlclip_batches_total 1.0",
                 "# HELP fastlclip_latents_total Latents scored", "fastlclip_latents_total 3.0",
                 "# HELP fastlclip_request_latency_seconds Time from request to reply, /v1/score",
                 "# HELP fastlclip_batch_size Latents per batch",
                 "# HELP fastlclip_queued_latents Latents waiting for a batch", "# TYPE fastlclip_queued_latents gauge",
                 "# HELP fastlclip_requests_in_flight Score requests received and not yet answered",
                 "# TYPE fastlclip_requests_in_flight gauge", "# TYPE fastlclip_request_latency_seconds histogram"):
        assert line + "\n" in text, line
    les = lambda name: [l.split('le="')[1].split('"')[0] for l in text.splitlines() if l.startswith(name + "_bucket")]
    assert les("fastlclip_request_latency_seconds") == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0",
                                                        "2.5", "5.0", "10.0", "30.0", "+Inf"]
    assert les("fastlclip_batch_size") == ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "+Inf"]
    assert [l for l in text.splitlines() if l.startswith("fastlclip_batch_size_bucket")][1:3] == [
        'fastlclip_batch_size_bucket{le="2.0"} 0.0', 'fastlclip_batch_size_bucket{le="4.0"} 1.0']


def test_batcher_defaults_and_scoring_thread():
    from fastlclip.serve.batcher import Batcher

    b = Batcher(lambda x, p, n: x)
    assert (b.max_batch_size, b.max_wait, b.max_queue, b.noise_key) == (32, 0.01, 4096, False)
    assert Batcher(lambda x, p, n: x, max_wait_ms=250).max_wait == 0.25
    names = []

    def score_fn(x, prompts, noise):
        names.append(threading.current_thread().name)
        return x.flatten(1)[:, 0]

    async def go():
        b = Batcher(score_fn, max_wait_ms=0)
        await asyncio.wait_for(b.submit(_request(1, 1)), 5)
        await b.close()

    asyncio.run(go())
    assert len(names) == 1 and names[0].startswith("fastlclip-score_")  # the forward runs on the batcher's own thread


def test_batcher_a_later_request_does_not_delay_the_oldest():
    # A (4x4) waits 400 ms; B (8x8) arriving at 250 ms wakes the worker, which must wait only the 150 ms left for A
    from fastlclip.serve.batcher import Batcher

    async def go():
        b = Batcher(lambda x, p, n: x.flatten(1)[:, 0], max_batch_size=8, max_wait_ms=400)
        t0 = time.monotonic()
        a = asyncio.ensure_future(b.submit(_request(1, 1)))
        await asyncio.sleep(0.25)
        other = asyncio.ensure_future(b.submit(_request(1, 2, grid=8)))
        await asyncio.wait_for(a, 5)
        took = time.monotonic() - t0
        await asyncio.wait_for(other, 5)
        await b.close()
        return took

    took = asyncio.run(go())
    assert 0.35 < took < 0.6


def test_batcher_close_cancels_its_worker_in_its_loop():
    from fastlclip.serve.batcher import Batcher

    async def go():
        b = Batcher(lambda x, p, n: x.flatten(1)[:, 0], max_wait_ms=0)
        await asyncio.wait_for(b.submit(_request(1, 1)), 5)
        worker = b._worker
        await b.close()
        return worker.cancelled(), b._worker  # checked while the loop still runs (asyncio.run would cancel it anyway)

    assert asyncio.run(go()) == (True, None)


def test_batcher_answers_the_rest_of_a_batch_when_one_client_left():
    # request 1 is cancelled while its batch is in the forward: request 2, after it in the same batch, still gets its scores
    from fastlclip.serve.batcher import Batcher

    started, gate = threading.Event(), threading.Event()

    def score_fn(x, prompts, noise):
        started.set()
        assert gate.wait(5)
        return x.flatten(1)[:, 0]

    reqs = [_request(1, 1), _request(2, 2)]

    async def go():
        b = Batcher(score_fn, max_batch_size=8, max_wait_ms=50)
        first, second = (asyncio.ensure_future(b.submit(r)) for r in reqs)
        while not started.is_set():
            await asyncio.sleep(0.01)
        first.cancel()
        gate.set()
        out = await asyncio.wait_for(second, 5)
        await b.close()
        return out, first.cancelled()

    out, cancelled = asyncio.run(go())
    assert cancelled and out == pytest.approx(reqs[1].latents.flatten(1)[:, 0].tolist())


# -- client input is a 400, never a 500; hang-ups are not server failures; useless options refused -------------------
def _raw_header(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors body with the header given as is (what a hostile or broken client may send)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("case, content, message", [
    ("nested header", lambda: _raw_header(b'{"__metadata__": {"prompt": "a"}, "x": ' + b"[" * 100_000 + b"]" * 100_000
                                          + b"}"), "nests JSON too deeply"),
    ("nested prompts", lambda: save({"latents": latents()}, metadata={"prompts": "[" * 100_000 + "]" * 100_000}),
     "'prompts' nests JSON too deeply"),
    ("F8_E8M0", lambda: _raw_header({"latents": {"dtype": "F8_E8M0", "shape": [1, 4, 16, 16], "data_offsets": [0, 1024]},
                                     "__metadata__": {"prompt": "a"}}, bytes(1024)), "'F8_E8M0'"),
])
def test_hostile_bodies_are_400_naming_the_problem(reward, case, content, message):
    """Each was a 500 (RecursionError, KeyError from the safetensors loader's dtype table)."""
    app = create_app(reward)
    r = post(app, content())
    assert r.status_code == 400, r.text
    assert message in r.json()["error"] and ("safetensors" in r.json()["error"] or "JSON list" in r.json()["error"])
    assert 'code="500"' not in run(app, lambda c: c.get("/metrics")).text


def test_finite_latents_that_overflow_in_the_tower_are_400(seeded_tiny_model):
    """The server turns the model's finiteness check off (it checks the latents on the host): latents finite on the
    wire (3e38 fits float32) that overflow inside the tower were NaN scores, a 500 from the JSON encoder."""
    model = copy.deepcopy(seeded_tiny_model)
    model.check_finite = False
    app = create_app(fastlclip.LatentCLIPReward(model), max_batch_size=4, max_wait_ms=200)

    async def go(c):  # batched with a well-formed request, which is still answered
        return await asyncio.gather(c.post("/v1/score", content=body(torch.full((1, 4, 16, 16), 3e38), "a"), headers=V1),
                                    c.post("/v1/score", content=body(latents(1), "a dog"), headers=V1))

    bad, good = run(app, go)
    assert bad.status_code == 400, bad.text
    assert "overflowed" in bad.json()["error"] and "3e+38" in bad.json()["error"]
    assert good.status_code == 200 and math.isfinite(good.json()["raw_scores"][0])
    assert app.state.metrics.batches._value.get() == 1


def test_a_client_that_hangs_up_mid_body_is_counted_apart_from_500s(reward):
    app = create_app(reward)
    content = body(latents(1), "a dog")
    messages = [{"type": "http.request", "body": content[:100], "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
             "headers": [(b"x-drm-protocol-version", b"1"), (b"content-length", str(len(content)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    text = run(app, lambda c: c.get("/metrics")).text
    assert "fastlclip_client_disconnects_total 1.0" in text
    assert 'code="500"' not in text and "fastlclip_requests_in_flight 0.0" in text


@pytest.mark.parametrize("args, message", [
    (["--max-wait-ms", "1e9"], "at most 10000 ms"),
    (["--max-wait-ms", "10001"], "--max-wait-ms"),
    (["--body-timeout-s", "0"], "--body-timeout-s"),
    (["--shutdown-timeout-s", "inf"], "--shutdown-timeout-s"),
])
def test_cli_refuses_options_that_make_the_server_useless(capsys, args, message):
    from fastlclip.serve.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "m", "--pretrained", __file__, *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_cli_refuses_a_body_limit_no_request_fits(reward, tmp_path, capsys, monkeypatch):
    """Checked once the model is known (its latent size): one line, exit 2, before the server starts."""
    import uvicorn

    from fastlclip.serve.__main__ import main, min_body_bytes

    cfg, weights = tmp_path / "tiny.json", tmp_path / "tiny.safetensors"
    cfg.write_text(json.dumps(TINY))
    save_file({k: v.contiguous() for k, v in reward.model.state_dict().items()}, weights)
    monkeypatch.setattr(uvicorn, "Server", _FakeServer)
    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: app)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    need = min_body_bytes(4, 16)
    assert need == 8 + 4 * 16 * 16 * 4 + 16 * 1024
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(cfg), "--pretrained", str(weights), "--max-body-mb", str(0.9 * need / 2**20)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--max-body-mb" in lines[0] and "too small" in lines[0]
    assert main(["--model", str(cfg), "--pretrained", str(weights), "--max-body-mb", str(need / 2**20)]) == 0


# -- one small request cannot stall or grow the server --------------------------------------------------------------
def test_the_tokenizer_never_sees_more_than_the_caps(monkeypatch):
    """A one-word megabyte prompt held the only scoring thread for minutes (BPE is super-linear in a word's length):
    texts are cut to MAX_PROMPT_CHARS and words to MAX_WORD_BYTES before BPE; what CLIP reads is unchanged."""
    import functools

    from open_clip.tokenizer import SimpleTokenizer

    from fastlclip import inputs

    seen_texts, seen_words = [], []
    encode, bpe = SimpleTokenizer.encode, SimpleTokenizer.bpe
    monkeypatch.setattr(SimpleTokenizer, "encode", lambda self, text: seen_texts.append(len(text)) or encode(self, text))
    monkeypatch.setattr(SimpleTokenizer, "bpe", lambda self, word: seen_words.append(len(word)) or bpe(self, word))
    monkeypatch.setattr(inputs, "_tokenizer", functools.lru_cache(maxsize=None)(inputs._tokenizer.__wrapped__))
    with pytest.warns(UserWarning, match="truncated"):
        inputs.tokenize(["a" * 10**6, "\U0001F602" * 10**6, "x" * 3000 + " a dog"])
    assert seen_texts and max(seen_texts) <= inputs.MAX_PROMPT_CHARS
    assert max(seen_words) <= inputs.MAX_WORD_BYTES
    # The cap keeps the tokens CLIP reads: long prompts of words tokenise as the uncapped tokenizer does.
    ref = SimpleTokenizer()
    words = ["a", "photo", "of", "blackandwhitephotography", "lake,", "dawn", "\U0001F602", "2024"]
    for n in (80, 400, 900):
        text = " ".join(words[(i * 7) % len(words)] for i in range(n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(inputs.tokenize(text), ref(text)), n


def test_the_tokenizer_word_cache_is_bounded_in_bytes(monkeypatch):
    import functools

    from fastlclip import inputs

    monkeypatch.setattr(inputs, "TOKENIZER_CACHE_BYTES", 20_000)
    monkeypatch.setattr(inputs, "_tokenizer", functools.lru_cache(maxsize=None)(inputs._tokenizer.__wrapped__))
    tok = inputs._tokenizer(77)
    words = ["".join(chr(ord("a") + (i // 26**k) % 26) for k in range(4)) for i in range(2000)]  # 2000 unique words
    for i in range(0, 2000, 50):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inputs.tokenize(" ".join(words[i:i + 50]))
    cache = tok.cache
    assert cache.bytes <= 20_000 and len(cache) < 200
    assert cache.bytes == sum(cache.cost(k, v) for k, v in cache.items())
    assert all(t in cache and cache[t] == t for t in ("<start_of_text>", "<end_of_text>"))  # the special tokens stay
    assert words[-1] in cache.keys() and words[0] not in cache.keys()  # least recently used out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(inputs.tokenize("<start_of_text> a dog"), inputs._tokenizer.__wrapped__(77)("<start_of_text> a dog"))
    assert torch.equal(inputs.tokenize(words[0]), inputs._tokenizer.__wrapped__(77)(words[0]))  # evicted, recomputed


def test_a_megabyte_prompt_is_scored_as_its_first_max_prompt_chars(reward):
    from fastlclip import inputs

    app = create_app(reward)
    x, prompt = latents(1, seed=5), "a red dog " * 100_000  # 1 MB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = post(app, body(x, prompt))
        want = reward.score(x, prompt[:inputs.MAX_PROMPT_CHARS])
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["raw_scores"]), want, rtol=0, atol=1e-5)
    assert max(map(len, reward._text_cache)) <= inputs.MAX_PROMPT_CHARS  # the text-feature cache's keys: small


class _ThreadServer:
    """The app under uvicorn in a thread of this process, on a free loopback port (signals: call handle_exit)."""

    def __init__(self, app, **config):
        import uvicorn

        from fastlclip.serve.__main__ import graceful_server

        self.port = free_port()
        self.server = graceful_server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
                                                     **config), app.state.requests_in_flight)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def connect(self, content_length: int, sent: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(b"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\nx-drm-protocol-version: 1\r\n"
                  b"content-length: %d\r\n\r\n" % content_length + sent)
        return s

    def stop(self):
        self.server.should_exit = self.server.force_exit = True
        self.thread.join(10)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed(reward):
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="body_timeout_s"):
            create_app(reward, body_timeout_s=bad)
    app = create_app(reward, body_timeout_s=0.5)
    srv = _ThreadServer(app)
    try:
        content = body(latents(1), "a dog")
        t0 = time.monotonic()
        lying = srv.connect(len(content) + 100, content)  # a Content-Length longer than the body
        slow = srv.connect(len(content))
        for i in range(0, 30):  # a byte every 50 ms: 1.5 s, past the 0.5 s deadline
            try:
                slow.sendall(content[i:i + 1])
            except OSError:
                break
            time.sleep(0.05)
        for s in (lying, slow):
            reply = _read_all(s)  # the server closes the connection: recv returns b"" (else the 10 s socket timeout)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"--body-timeout-s" in reply and b"connection: close" in reply.lower()
            s.close()
        assert time.monotonic() - t0 < 5
        ok = httpx.post(f"http://127.0.0.1:{srv.port}/v1/score", content=content, headers=V1, timeout=10)
        assert ok.status_code == 200
        assert 'fastlclip_requests_total{code="408"} 2.0' in httpx.get(f"http://127.0.0.1:{srv.port}/metrics").text
    finally:
        srv.stop()


def test_a_second_sigterm_forces_the_exit_and_says_what_was_cut(reward):
    """uvicorn forces the exit on a second SIGINT only; a second SIGTERM was ignored while a slow client held on."""
    app = create_app(reward, body_timeout_s=60)
    srv = _ThreadServer(app, timeout_graceful_shutdown=60)
    try:
        held = srv.connect(1000, b"x" * 10)  # in flight, its body never completes
        deadline = time.monotonic() + 5
        while app.state.requests_in_flight() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        srv.server.handle_exit(signal.SIGTERM, None)
        time.sleep(0.5)
        assert srv.thread.is_alive()  # graceful: waiting for the request in flight
        srv.server.handle_exit(signal.SIGTERM, None)
        srv.thread.join(5)
        assert not srv.thread.is_alive()
        assert srv.server.cut == ("a second SIGTERM during the graceful shutdown: cut 1 request in flight and 1 open "
                                  "connection")
        held.close()
    finally:
        srv.stop()


def test_the_graceful_shutdown_has_a_deadline_then_exit_1_naming_what_was_cut(reward, tmp_path):
    cfg, weights = tmp_path / "tiny.json", tmp_path / "tiny.safetensors"
    cfg.write_text(json.dumps(TINY))
    save_file({k: v.contiguous() for k, v in reward.model.state_dict().items()}, weights)
    port = free_port()
    proc = subprocess.Popen(serve_cmd("--model", str(cfg), "--pretrained", str(weights), "--port", str(port),
                                      "--shutdown-timeout-s", "1", "--log-level", "critical"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, port, 60)
        held = socket.create_connection(("127.0.0.1", port), timeout=10)  # a slow client: its body never completes
        held.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\nx-drm-protocol-version: 1\r\ncontent-length: 1000\r\n\r\nab")
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 1
        assert time.monotonic() - t0 < 10
        lines = proc.stderr.read().strip().splitlines()
        assert lines[-1] == ("python -m fastlclip.serve: shutdown cut short by the graceful shutdown ran past "
                             "--shutdown-timeout-s 1: cut 1 request in flight and 1 open connection"), lines
        held.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_connection_that_sends_no_request_head_in_time_is_closed(reward):
    """Clients that connect and send nothing, or their headers a byte at a time, held a descriptor each forever."""
    from fastlclip.serve.__main__ import http_protocol

    srv = _ThreadServer(create_app(reward), http=http_protocol(0.5))
    try:
        t0 = time.monotonic()
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        partial = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        partial.sendall(b"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        for s in (silent, partial):
            assert _read_all(s) == b""  # closed by the server (else the 10 s socket timeout raises)
            s.close()
        assert time.monotonic() - t0 < 5
        # A client that sends its request in time is served, and its kept-alive connection reused.
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=10) as c:
            for _ in range(2):
                assert c.post("/v1/score", content=body(latents(1), "a dog"), headers=V1).status_code == 200
    finally:
        srv.stop()
