"""Reward-server throughput and robustness: ``python -m bench.serve``.

Starts ``python -m fastlclip.serve`` on 127.0.0.1 and, for each client count of ``--clients`` (default 1, 8,
32, 64), runs that many concurrent closed-loop clients, each sending ``--requests-per-client`` protocol v1
requests of ``--latents-per-request`` latents. Per level: latents/s, p50/p95/p99 request latency, latents
per forward (from the server's Prometheus counters), and the batching efficiency: server throughput against
in-process ``LatentCLIPReward.score`` at the server's batch size (1.0 = the server costs nothing). Every
reply is checked against the in-process scores of the same weights.

The fault run then interleaves well-formed requests with malformed bodies (garbage, a pickle, NaN, wrong
channels), clients that disconnect mid-body or before reading the reply, and a SIGTERM under load (a burst
of requests queued behind one large request, the signal sent once a quarter of them are in flight): every well-formed request must be
answered with the right scores or refused (503, or a closed connection for a request the server had not
begun when it stopped accepting), every request in flight at the SIGTERM answered, the server up until the
SIGTERM, and its exit status 0. Also measured there: client input that was once a 500 (JSON nested 100,000 deep
in the header or ``prompts``, an F8_E8M0 tensor, finite latents that overflow in the tower) must be 400, no 500 at
all in /metrics and hang-ups counted apart; a one-word million-character prompt answered (its time reported); idle
clients, half a request head and bodies shorter than their Content-Length all cut within ``--body-timeout-s``
(3 s here); and, on two more servers, a client in flight at SIGTERM cut after ``--shutdown-timeout-s 1``, or at
a second SIGTERM, each with exit status 1 and a line naming what was cut.

On CUDA: ``--model`` (default Latent-ViT-B-8-512; random weights unless ``--pretrained``) with the fastest
backend (``--backend auto``), bfloat16. The acceptance figure a verl-omni user would hold it to, 1,152 latents
(one flow_grpo epoch) in under 5 s on one GPU, is measured there: 1,152 one-latent requests from 64 clients.
Without CUDA the model is ``bench.tiny``'s random Latent-CLIP and the run is a smoke test of the server:
figures are not throughput results, and the acceptance figure is "not measured".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench import tiny
from fastlclip.runtime import BACKENDS
from bench.cli import Parser, positive_int, writable_file
from bench.provenance import run_record
from bench.report import NOT_MEASURED, fmt, save_results, table

V1 = {"x-drm-protocol-version": "1", "content-type": "application/octet-stream"}
ACCEPTANCE_LATENTS, ACCEPTANCE_SECONDS = 1152, 5.0
BODY_TIMEOUT_S = 3.0  # the server's --body-timeout-s here: the fault run's slow clients must be cut by then
LONG_WORD_LIMIT_S = 30.0
PROMPTS = ("a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv):
    p = Parser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=_int_list, default=[1, 8, 32, 64], help="concurrent client counts")
    p.add_argument("--requests-per-client", type=positive_int, default=None, help="default: 2 on CPU, 18 on CUDA")
    p.add_argument("--latents-per-request", type=positive_int, default=1)
    p.add_argument("--max-batch-size", type=positive_int, default=None, help="server's; default 8 on CPU, 64 on CUDA")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--model", default="Latent-ViT-B-8-512", help="config on CUDA (CPU: bench.tiny's)")
    p.add_argument("--pretrained", type=Path, help="checkpoint (default: random weights)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="server backend on CUDA (CPU: eager)")
    p.add_argument("--no-fault", action="store_true", help="skip the fault run")
    p.add_argument("--json", type=Path, help="results file (default on CUDA: profiles/results/<gpu>/serve.json)")
    a = p.parse_args(argv)
    if not (a.max_wait_ms >= 0 and a.max_wait_ms < float("inf")):
        p.error(f"--max-wait-ms must be a finite number >= 0, got {a.max_wait_ms}")
    if a.pretrained is not None and not a.pretrained.is_file():
        p.error(f"--pretrained: no such file: {a.pretrained}")
    if a.json is not None and (why := writable_file(a.json)):
        p.error(f"--json: {why}")
    return a


# -- the server and its clients -------------------------------------------------------------------------------------
class Server:
    """``python -m fastlclip.serve`` in a subprocess on a free loopback port; stderr kept in a file."""

    def __init__(self, args: list[str], log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "fastlclip.serve", *args, "--port", str(self.port),
                                      "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=log.open("w"))

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {timeout:.0f} s: {self.tail()}")
            time.sleep(0.2)

    def counters(self) -> dict[str, float]:
        import httpx

        return counters(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def tail(self) -> str:
        return " | ".join(self.log.read_text().strip().splitlines()[-5:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def counters(metrics_text: str) -> dict[str, float]:
    """The server's batch, latent, request (summed over status codes, and the 500s apart), in-flight and client
    hang-up counts from /metrics."""
    out = {"fastlclip_requests_total": 0.0}
    for line in metrics_text.splitlines():
        if line.startswith(("fastlclip_batches_total ", "fastlclip_latents_total ", "fastlclip_requests_in_flight ",
                            "fastlclip_client_disconnects_total ")):
            name, value = line.split()
            out[name] = float(value)
        elif line.startswith("fastlclip_requests_total{"):
            out["fastlclip_requests_total"] += float(line.split()[-1])
            if line.startswith('fastlclip_requests_total{code="500"}'):
                out["fastlclip_requests_500"] = float(line.split()[-1])
    return out


def make_requests(n: int, per_request: int, grid: int, dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, str]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(per_request, 4, grid, grid, generator=g).to(dtype), PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def body(latents: torch.Tensor, prompt: str) -> bytes:
    from safetensors.torch import save

    return save({"latents": latents.contiguous()}, metadata={"prompt": prompt})


def save_body(latents: torch.Tensor, prompts: list[str]) -> bytes:
    """A request of several latents, one prompt each."""
    from safetensors.torch import save

    return save({"latents": latents.contiguous()}, metadata={"prompts": json.dumps(prompts)})


def expected(reward, requests, batch: int) -> list[list[float]]:
    """In-process scores of every request (the reference the server's replies are checked against)."""
    with torch.inference_mode():
        return [reward.score(x.to(reward.model.device), p, batch_size=batch).float().cpu().tolist() for x, p in requests]


def close_enough(got: list[float], want: list[float], tol: float) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= tol for g, w in zip(got, want))


async def closed_loop(url: str, clients: int, requests, want, tol: float) -> dict:
    """``clients`` concurrent clients share ``requests`` (each sends its share one after another)."""
    import httpx

    latencies, wrong, refused = [], 0, 0

    async def client(c, k):
        nonlocal wrong, refused
        for i in range(k, len(requests), clients):
            t0 = time.perf_counter()
            r = await c.post(f"{url}/v1/score", content=body(*requests[i]), headers=V1)
            latencies.append(time.perf_counter() - t0)
            if r.status_code == 503:
                refused += 1
            elif r.status_code != 200 or not close_enough(r.json()["raw_scores"], want[i], tol):
                wrong += 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, k) for k in range(clients)])
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "latencies": latencies, "wrong": wrong, "refused_503": refused}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` % of the values at or below it."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def hostile_bodies(grid: int) -> list[bytes]:
    """Client input that was once a 500: JSON nested 100,000 deep in the header and in ``prompts``, a safetensors
    dtype the torch loader does not map (F8_E8M0), finite latents that overflow in the tower (3e38)."""
    from safetensors.torch import save

    def raw(header: bytes, data: bytes = b"") -> bytes:
        return len(header).to_bytes(8, "little") + header + data

    deep = b"[" * 100_000 + b"]" * 100_000
    e8m0 = json.dumps({"latents": {"dtype": "F8_E8M0", "shape": [1, 4, grid, grid], "data_offsets": [0, 4 * grid * grid]},
                       "__metadata__": {"prompt": "a"}}).encode()
    return [raw(b'{"__metadata__": {"prompt": "a"}, "x": ' + deep + b"}"),
            save({"latents": torch.zeros(1, 4, grid, grid)}, metadata={"prompts": deep.decode()}),
            raw(e8m0, bytes(4 * grid * grid)), body(torch.full((1, 4, grid, grid), 3e38), "a cat")]


async def slow_clients(server: Server, n: int, limit_s: float) -> dict:
    """``n`` clients that connect and send nothing, ``n`` that send half a request head, ``n`` whose body is shorter
    than their Content-Length: each must be cut by the server (408 for the bodies) within ``limit_s``."""
    async def one(kind: str) -> tuple[str, float, bytes]:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = b"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\nx-drm-protocol-version: 1\r\n"
        writer.write({"idle": b"", "slow_head": head, "lying_length": head + b"content-length: 100000\r\n\r\nab"}[kind])
        await writer.drain()
        try:
            reply = await asyncio.wait_for(reader.read(), limit_s)  # until the server closes the connection
        except asyncio.TimeoutError:
            reply = None
        writer.close()
        return kind, time.perf_counter() - t0, reply

    done = await asyncio.gather(*[one(k) for k in ("idle", "slow_head", "lying_length") for _ in range(n)])
    cut = [(k, t) for k, t, reply in done if reply is not None and (k != "lying_length" or reply.startswith(b"HTTP/1.1 408"))]
    return {"slow_clients": len(done), "slow_clients_cut": len(cut),
            "slowest_cut_s": max((t for _, t in cut), default=None)}


async def long_word_prompt(server: Server, grid: int, limit_s: float) -> dict:
    """One latent with a one-word prompt of a million characters: BPE is super-linear in a word's length, so before
    the prompt cap this held the scoring thread for minutes; it must be answered (200) within ``limit_s``."""
    import httpx

    content = body(torch.randn(1, 4, grid, grid), "a" * 10**6)
    async with httpx.AsyncClient(timeout=limit_s) as c:
        t0 = time.perf_counter()
        try:
            status = (await c.post(f"{server.url}/v1/score", content=content, headers=V1)).status_code
        except httpx.TimeoutException:
            status = None
    return {"long_word_status": status, "long_word_s": time.perf_counter() - t0}


def shutdown_cuts(server_args: list[str], tmp: Path) -> dict:
    """A slow client in flight at SIGTERM: with ``--shutdown-timeout-s 1`` the server must exit 1 about a second
    later naming what it cut; with a long deadline, a second SIGTERM must end it at once (exit 1)."""
    out = {}
    for case, extra in (("deadline", ["--shutdown-timeout-s", "1"]), ("second_sigterm", ["--shutdown-timeout-s", "600"])):
        server = Server([*server_args, *extra, "--body-timeout-s", "600"], tmp / f"server-{case}.log")
        try:
            server.wait_ready()
            held = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            held.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\nx-drm-protocol-version: 1\r\ncontent-length: 1000\r\n\r\nab")
            time.sleep(0.5)
            t0 = time.perf_counter()
            server.proc.send_signal(signal.SIGTERM)
            if case == "second_sigterm":
                time.sleep(0.5)
                server.proc.send_signal(signal.SIGTERM)
            try:
                status = server.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                status = "did not exit within 60 s"
            held.close()
            out[case] = {"exit_status": status, "exit_s": time.perf_counter() - t0, "said": server.tail()[-200:],
                         "ok": status == 1 and "cut short" in server.tail()}
        finally:
            server.stop()
    return out


async def fault_run(server: Server, requests, want, tol: float, grid: int, burst: int) -> dict:
    """Well-formed clients under malformed bodies, disconnects and a SIGTERM (module docstring)."""
    import pickle

    import httpx

    stop = asyncio.Event()
    tally = {"well_formed_sent": 0, "answered_right": 0, "refused_503": 0, "answered_wrong": 0, "malformed_sent": 0,
             "malformed_400": 0, "malformed_other": 0, "disconnects": 0, "alive_before_sigterm": None,
             "answered_after_sigterm": 0, "in_flight_at_sigterm": None, "closed_at_shutdown": 0}
    good = body(*requests[0])
    malformed = [b"\x00garbage", pickle.dumps({"latents": [1.0] * 8}),
                 body(torch.full((1, 4, grid, grid), float("nan")), "a cat"), body(torch.zeros(1, 16, grid, grid), "a cat"),
                 *hostile_bodies(grid)]

    async def one_well_formed(c, i, content=None, expect=None):
        x, p = requests[i % len(requests)]
        tally["well_formed_sent"] += 1
        try:
            r = await c.post(f"{server.url}/v1/score", content=body(x, p) if content is None else content, headers=V1)
        except httpx.TransportError:
            if "sigterm_at" not in tally:
                raise
            tally["closed_at_shutdown"] += 1  # not begun by the server when it stopped accepting: refused
            return
        if "sigterm_at" in tally:
            tally["answered_after_sigterm"] += 1
        if r.status_code == 503:
            tally["refused_503"] += 1
        elif r.status_code == 200 and close_enough(r.json()["raw_scores"], expect or want[i % len(requests)], tol):
            tally["answered_right"] += 1
        else:
            tally["answered_wrong"] += 1

    async def well_formed(c, k):
        i = k
        while not stop.is_set():
            await one_well_formed(c, i)
            i += 7

    async def bad(c):
        i = 0
        while not stop.is_set():
            tally["malformed_sent"] += 1
            r = await c.post(f"{server.url}/v1/score", content=malformed[i % len(malformed)], headers=V1)
            tally["malformed_400" if r.status_code == 400 else "malformed_other"] += 1
            i += 1

    async def disconnecting():
        i = 0
        while not stop.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            head = (f"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\nx-drm-protocol-version: 1\r\n"
                    f"content-length: {len(good)}\r\n\r\n").encode()
            writer.write(head + (good[:len(good) // 2] if i % 2 == 0 else good))  # mid-body, or before the reply
            await writer.drain()
            writer.close()
            tally["disconnects"] += 1
            i += 1
            await asyncio.sleep(0.02)

    async with httpx.AsyncClient(timeout=600) as c:
        tasks = [asyncio.create_task(well_formed(c, k)) for k in range(8)]
        tasks += [asyncio.create_task(bad(c)), asyncio.create_task(disconnecting())]
        tally.update(await long_word_prompt(server, grid, LONG_WORD_LIMIT_S))
        tally.update(await slow_clients(server, 4, BODY_TIMEOUT_S + 5))
        await asyncio.sleep(1.0)
        tally["alive_before_sigterm"] = server.proc.poll() is None
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        now = counters((await c.get(f"{server.url}/metrics")).text)
        tally["server_500s"] = int(now.get("fastlclip_requests_500", 0))
        tally["client_disconnects_counted"] = int(now.get("fastlclip_client_disconnects_total", 0))
        # Then a burst, eight forwards' worth, and the SIGTERM as soon as the server holds a quarter of it in flight
        # (its counters say so): those must all be answered. Burst requests the server has not begun by then meet
        # a closed socket, which counts as a refusal (clients retry those).
        # First one request of 8 x `burst` latents (32 MiB at most), so that the burst queues behind its forwards: a
        # fast server (the
        # tiny CPU model) otherwise answers each burst request as it arrives, never holding a quarter at once.
        x0 = requests[0][0]
        k = max(1, min(8 * burst, (32 * 2**20) // (x0.numel() * x0.element_size())))  # 32 MiB at most
        heavy = torch.cat([requests[i % len(requests)][0] for i in range(k)])
        heavy_body = save_body(heavy, [requests[i % len(requests)][1] for i in range(k) for _ in range(x0.shape[0])])
        heavy_want = [v for i in range(k) for v in want[i % len(requests)]]
        tasks = [asyncio.create_task(one_well_formed(c, 0, heavy_body, heavy_want))]
        await asyncio.sleep(0.05)
        tasks += [asyncio.create_task(one_well_formed(c, i)) for i in range(burst)]
        deadline = time.monotonic() + 60
        while True:
            now = counters((await c.get(f"{server.url}/metrics")).text)
            if now["fastlclip_requests_in_flight"] >= max(1, burst // 4) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        tally["in_flight_at_sigterm"] = int(now["fastlclip_requests_in_flight"])
        tally["sigterm_at"] = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        results += await asyncio.gather(*tasks, return_exceptions=True)
        del tally["sigterm_at"]
    errors = [f"{type(e).__name__}: {e}" for e in results if isinstance(e, BaseException)]
    try:
        tally["exit_status"] = server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        tally["exit_status"] = "did not exit within 120 s"
    tally["client_errors"] = errors[:5]
    tally["ok"] = (tally["alive_before_sigterm"] and tally["answered_wrong"] == 0 and tally["malformed_other"] == 0
                   and not errors and tally["exit_status"] == 0 and tally["server_500s"] == 0
                   and tally["long_word_status"] == 200 and tally["slow_clients_cut"] == tally["slow_clients"]
                   and tally["answered_after_sigterm"] >= tally["in_flight_at_sigterm"] > 0)
    return tally


# -- the run --------------------------------------------------------------------------------------------------------
def build(a, cuda: bool, tmp: Path):
    """The in-process reward and the server's --model/--pretrained for the same weights."""
    import fastlclip
    from safetensors.torch import save_file

    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        name = a.model
        pretrained = a.pretrained
    else:
        name = tmp / "tiny.json"
        name.write_text(json.dumps(tiny.LATENT_CLIP))
        pretrained = None
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(str(name), pretrained, device=device, dtype=dtype)
    if pretrained is None:  # random weights: give the server the same ones
        pretrained = tmp / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, pretrained)
    if cuda and a.backend != "eager":
        model = fastlclip.load(str(name), pretrained, device=device, dtype=dtype, backend=a.backend)
    model.check_finite = False
    return fastlclip.LatentCLIPReward(model), str(name), str(pretrained), dtype


def in_process_rate(reward, grid: int, batch: int, dtype, cuda: bool) -> float:
    """Latents/s of ``reward.score`` on batches of ``batch`` (warm, text cached)."""
    x = torch.randn(batch, 4, grid, grid).to(device=reward.model.device, dtype=dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            reward.score(x, prompts)
        sync()
        reps, t0 = 0, time.perf_counter()
        while reps < 5 or time.perf_counter() - t0 < 1.0:
            reward.score(x, prompts)
            reps += 1
        sync()
    return reps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    per_client = a.requests_per_client or (18 if cuda else 2)
    batch = a.max_batch_size or (64 if cuda else 8)
    if not cuda:
        print("CPU SMOKE RUN: no CUDA device. Tiny random-weight Latent-CLIP (bench.tiny) served on CPU: the figures "
              "show that the server batches and answers correctly; they are NOT throughput results.")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        reward, name, pretrained, dtype = build(a, cuda, tmp)
        grid = reward.model.latent_size
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        reference = in_process_rate(reward, grid, batch, dtype, cuda)
        server_args = ["--model", name, "--pretrained", pretrained, "--device", "cuda" if cuda else "cpu",
                       "--dtype", str(dtype).removeprefix("torch."), "--backend", a.backend if cuda else "eager",
                       "--max-batch-size", str(batch), "--max-wait-ms", str(a.max_wait_ms)]
        shutdown_args = list(server_args)
        server_args += ["--body-timeout-s", str(BODY_TIMEOUT_S)]
        rows, acceptance, fault = [], None, None
        server = Server(server_args, tmp / "server.log")
        try:
            server.wait_ready()
            for clients in a.clients:
                requests = make_requests(clients * per_client, a.latents_per_request, grid, dtype, seed=clients)
                want = expected(reward, requests, batch)
                asyncio.run(closed_loop(server.url, clients, requests[:clients], want[:clients], tol))  # warm-up
                before = server.counters()
                res = asyncio.run(closed_loop(server.url, clients, requests, want, tol))
                after = server.counters()
                n = len(requests) * a.latents_per_request
                batches = after["fastlclip_batches_total"] - before["fastlclip_batches_total"]
                rate = n / res["wall_s"]
                rows.append({"clients": clients, "requests": len(requests), "latents": n, "wall_s": res["wall_s"],
                             "latents_per_s": rate, "p50_ms": 1e3 * percentile(res["latencies"], 50),
                             "p95_ms": 1e3 * percentile(res["latencies"], 95),
                             "p99_ms": 1e3 * percentile(res["latencies"], 99),
                             "latents_per_batch": n / batches if batches else None,
                             "batching_efficiency": rate / reference, "wrong": res["wrong"],
                             "refused_503": res["refused_503"]})
                print(f"  {clients} clients: {rate:.0f} latents/s", file=sys.stderr, flush=True)
            if cuda:
                requests = make_requests(ACCEPTANCE_LATENTS, 1, grid, dtype, seed=1152)
                want = expected(reward, requests, batch)
                res = asyncio.run(closed_loop(server.url, 64, requests, want, tol))
                acceptance = {"latents": ACCEPTANCE_LATENTS, "clients": 64, "wall_s": res["wall_s"],
                              "passed": res["wall_s"] < ACCEPTANCE_SECONDS and not res["wrong"] and not res["refused_503"],
                              "wrong": res["wrong"], "refused_503": res["refused_503"]}
            if not a.no_fault:
                requests = make_requests(32, a.latents_per_request, grid, dtype, seed=7)
                fault = asyncio.run(fault_run(server, requests, expected(reward, requests, batch), tol, grid, 8 * batch))
        finally:
            server.stop()
        if fault is not None:
            fault["shutdown_cuts"] = shutdown_cuts(shutdown_args, tmp)
            fault["ok"] = fault["ok"] and all(v["ok"] for v in fault["shutdown_cuts"].values())

    print("\n" + table(["clients", "requests", "latents/s", "p50 ms", "p95 ms", "p99 ms", "latents/forward",
                        "efficiency", "wrong", "503"],
                       [[r["clients"], r["requests"], fmt(r["latents_per_s"], ".0f"), fmt(r["p50_ms"], ".1f"),
                         fmt(r["p95_ms"], ".1f"), fmt(r["p99_ms"], ".1f"), fmt(r["latents_per_batch"], ".1f"),
                         fmt(r["batching_efficiency"], ".2f"), r["wrong"], r["refused_503"]] for r in rows]))
    print(f"in-process LatentCLIPReward.score at batch {batch}: {reference:.0f} latents/s (efficiency = server / this)")
    if acceptance:
        print(f"acceptance: {ACCEPTANCE_LATENTS} latents in {acceptance['wall_s']:.2f} s "
              f"({'PASS' if acceptance['passed'] else 'FAIL'}, limit {ACCEPTANCE_SECONDS:g} s)")
    else:
        print(f"acceptance ({ACCEPTANCE_LATENTS} latents in < {ACCEPTANCE_SECONDS:g} s on one GPU): {NOT_MEASURED} (no CUDA)")
    if fault:
        print(f"fault run: {'OK' if fault['ok'] else 'FAILED'}: {fault['answered_right']} right, {fault['refused_503']} "
              f"refused (503), {fault['answered_wrong']} wrong of {fault['well_formed_sent']} well-formed; "
              f"{fault['malformed_400']}/{fault['malformed_sent']} malformed got 400; {fault['disconnects']} "
              f"disconnects; SIGTERM with {fault['in_flight_at_sigterm']} requests in flight, "
              f"{fault['answered_after_sigterm']} answered after it, {fault['closed_at_shutdown']} not yet begun "
              f"refused (connection closed), then exit status "
              f"{fault['exit_status']}" + (f"; client errors: {fault['client_errors']}" if fault["client_errors"] else ""))
        cuts = fault["shutdown_cuts"]
        print(f"  {fault['server_500s']} server 500s, {fault['client_disconnects_counted']} hang-ups counted apart; a "
              f"one-word 1,000,000-character prompt: {fault['long_word_status']} in {fault['long_word_s']:.2f} s; "
              f"{fault['slow_clients_cut']}/{fault['slow_clients']} idle, slow-head and short-body clients cut, the "
              f"last after {fmt(fault['slowest_cut_s'], '.1f')} s (--body-timeout-s {BODY_TIMEOUT_S:g}); a client "
              f"in flight at SIGTERM: exit {cuts['deadline']['exit_status']} after "
              f"{cuts['deadline']['exit_s']:.1f} s (--shutdown-timeout-s 1), exit "
              f"{cuts['second_sigterm']['exit_status']} {cuts['second_sigterm']['exit_s']:.1f} s after a first SIGTERM "
              "when a second follows 0.5 s later")
    report = {**run_record("bench.serve", argv), "device": device_name, "smoke_test": not cuda,
              "model": a.model if cuda else "bench.tiny.LATENT_CLIP", "pretrained": str(a.pretrained) if a.pretrained else None,
              "dtype": str(dtype).removeprefix("torch."), "backend": a.backend if cuda else "eager",
              "max_batch_size": batch, "max_wait_ms": a.max_wait_ms, "latents_per_request": a.latents_per_request,
              "in_process_latents_per_s": reference, "rows": rows,
              "acceptance": acceptance or NOT_MEASURED, "fault_run": fault or "skipped (--no-fault)"}
    save_results(report, a.json, device_name, "serve.json", measured=cuda)
    failed = any(r["wrong"] for r in rows) or (fault is not None and not fault["ok"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
