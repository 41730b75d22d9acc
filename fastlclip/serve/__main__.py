"""``python -m fastlclip.serve --model NAME --pretrained FILE``: the batching Latent-CLIP reward server.

``--pretrained ensemble.safetensors`` without ``--model`` serves a reward ensemble (``fastlclip.LatentEnsemble``):
every head from one trunk forward per batch, the weighted total with each head's score beside it, the default
head weights from ``--head-weight NAME=W`` (1 for every head not named).

Every argument is checked before the model loads; an error is one line on stderr and exit status 2. The
server binds 127.0.0.1 unless told otherwise, and refuses a non-loopback ``--host`` without
``--token-file``. SIGTERM (or Ctrl+C) stops accepting connections, answers the requests in flight, and
exits with status 0; what is still in flight ``--shutdown-timeout-s`` later, or at a second SIGTERM (or Ctrl+C), is
cut, and the server exits with status 1 and a line on stderr saying what was cut.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from pathlib import Path

from ..cli import Parser, head_weight, int_at_least, positive_float

DTYPES = ("float32", "float16", "bfloat16")
# A lone request waits --max-wait-ms for batchmates; beyond 10 s every request at low load would wait that long,
# an RL trainer's whole step, and clients time out (verl-omni's adapter: 120 s, retried).
MAX_WAIT_MS = 10_000.0


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


_non_negative_float.what = "a finite number >= 0"


def _wait_ms(text: str) -> float:
    value = _non_negative_float(text)
    if value > MAX_WAIT_MS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WAIT_MS:g} ms, got {text!r}: a lone request waits "
                                         "this long for batchmates; 1-50 ms batches well")
    return value


_wait_ms.what = f"a number of milliseconds, 0 to {MAX_WAIT_MS:g}"


def min_body_bytes(channels: int, size: int) -> int:
    """The smallest useful ``--max-body-mb``, in bytes: one float32 latent of the trained grid, and 16 KiB for the
    safetensors header and the prompt."""
    return 8 + channels * size * size * 4 + 16 * 1024


def default_head_weights(heads: list[str], given: list[tuple[str, float]] | None) -> dict[str, float]:
    """The server's default head weights: 1 for each head, or as ``--head-weight`` says; raises ValueError for a
    head named twice, an unknown head, or weights all zero."""
    given = given or []
    names = [n for n, _ in given]
    if len(set(names)) != len(names):
        raise ValueError(f"--head-weight names a head twice: {sorted({n for n in names if names.count(n) > 1})}")
    unknown = [n for n in names if n not in heads]
    if unknown:
        raise ValueError(f"--head-weight {unknown[0]}: the ensemble has no such head; its heads: {', '.join(heads)}")
    weights = {h: 1.0 for h in heads}
    weights.update(dict(given))
    if not any(weights.values()):
        raise ValueError(f"--head-weight: every head weighs 0 ({', '.join(heads)}); give one a positive weight")
    return weights


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 65535], got {text!r}")
    return int(text)


_port.what = "a port number, 0 to 65535"


def parser() -> argparse.ArgumentParser:
    from ..runtime import BACKENDS

    p = Parser(prog="python -m fastlclip.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="registered config name (fastlclip.list_models()) or a JSON config; omit it for a "
                                    "reward ensemble file, or a checkpoint that names its config")
    p.add_argument("--pretrained", required=True, help="checkpoint: .pt, .safetensors, a folder, or hf-hub:<repo>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token-file)")
    p.add_argument("--port", type=_port, default=8000, help="port to bind")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto", help="see fastlclip.runtime (auto: eager on CPU)")
    p.add_argument("--max-batch-size", type=int_at_least(1), default=32, help="latents per forward")
    p.add_argument("--max-wait-ms", type=_wait_ms, default=10.0, help="longest a batch waits to fill")
    p.add_argument("--max-body-mb", type=positive_float, default=64.0,
                   help="larger bodies get 413; at least one float32 latent of the model's grid and a prompt")
    p.add_argument("--max-queue", type=int_at_least(1), default=4096, help="latents waiting; beyond, 503 + Retry-After")
    p.add_argument("--text-cache-size", type=int_at_least(1), default=4096, help="prompts whose text features are kept")
    p.add_argument("--body-timeout-s", type=positive_float, default=30.0,
                   help="a request's headers must arrive within this of the connection (or of the last reply), else the "
                        "connection is closed; its body within this of its headers, else 408 and closed")
    p.add_argument("--shutdown-timeout-s", type=positive_float, default=30.0,
                   help="after SIGTERM, requests still in flight this much later are cut (exit status 1)")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token clients must send")
    p.add_argument("--resize", choices=("none", "interpolate", "pool"), default="none",
                   help="policy for latent grids other than the trained one (fastlclip.grids)")
    p.add_argument("--pooling", choices=("mean", "min"),
                   help="a video space's model: how a clip's per-frame cosines pool to its score (default mean)")
    p.add_argument("--head-weight", type=head_weight, action="append", metavar="NAME=W", dest="head_weights",
                   help="a reward ensemble's default weight for head NAME (repeat; heads not named weigh 1); requests "
                        "may send their own in metadata 'head_weights'")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn's log level")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: cannot read it ({e.strerror or e})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--token-file {path}: must hold one token (no spaces), got "
                         f"{'an empty file' if not token else 'whitespace inside'}")
    return token


def check_args(args) -> tuple[str, str | None]:
    """The device, and the token; raises ValueError naming the bad argument."""
    import torch

    if not is_loopback(args.host) and args.token_file is None:
        raise ValueError(f"--host {args.host} is not a loopback address: anyone who reaches it could use the server; "
                         "pass --token-file FILE (clients send 'Authorization: Bearer <token>'), or bind 127.0.0.1")
    token = read_token(args.token_file) if args.token_file is not None else None
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu")
    spec = args.pretrained
    if not spec.startswith("hf-hub:") and not Path(spec).expanduser().exists():
        raise ValueError(f"--pretrained {spec}: no such file or folder")
    return device, token


def http_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for a request's headers: a connection that has not sent a whole request
    head within ``header_timeout_s`` of opening (or of its last reply) is closed, so clients that connect and send
    nothing, or their headers slowly, cannot hold descriptors. (The body has its own deadline, in the app.)"""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def graceful_server(config, in_flight):
    """A ``uvicorn.Server`` whose graceful shutdown ends: a second SIGTERM forces the exit as a second SIGINT does
    (uvicorn ignores it), and ``config.timeout_graceful_shutdown`` bounds the wait. ``server.cut`` then says what
    was cut (None when nothing was); ``in_flight()`` counts the app's requests in flight."""
    import uvicorn

    class Server(uvicorn.Server):
        cut: str | None = None

        def note(self, why: str) -> None:
            if self.cut is None:
                n, conns = in_flight(), len(self.server_state.connections)
                self.cut = (f"{why}: cut {n} request{'s' * (n != 1)} in flight and {conns} open "
                            f"connection{'s' * (conns != 1)}")

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig in (signal.SIGTERM, signal.SIGINT):
                self.note(f"a second {signal.Signals(sig).name} during the graceful shutdown")
                self.force_exit = True
            super().handle_exit(sig, frame)

        async def _wait_tasks_to_complete(self) -> None:
            try:
                await super()._wait_tasks_to_complete()
            except BaseException:  # the graceful-shutdown deadline cancels the wait
                self.note(f"the graceful shutdown ran past --shutdown-timeout-s "
                          f"{self.config.timeout_graceful_shutdown:g}")
                raise

    return Server(config)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        device, token = check_args(args)
    except ValueError as e:
        p.error(str(e))

    import torch
    import uvicorn

    import fastlclip

    from ..checkpoint import CheckpointError
    from .app import create_app

    dtype = torch.bfloat16 if args.dtype == "auto" and device == "cuda" else getattr(torch, args.dtype, torch.float32)
    backend = "eager" if args.backend == "auto" and device == "cpu" else args.backend
    from ..ensemble import LatentEnsemble, ensemble_metadata

    resize = None if args.resize == "none" else args.resize
    try:
        if args.model is None and ensemble_metadata(args.pretrained) is not None:
            if backend not in ("auto", "eager"):
                raise ValueError(f"--backend {backend}: a reward ensemble is served with the eager backend")
            model = fastlclip.load(None, args.pretrained, device=device, dtype=dtype)
        else:
            model = fastlclip.load(args.model, args.pretrained, device=device, dtype=dtype, backend=backend,
                                   resize=resize)
    except (CheckpointError, ValueError, TypeError, FileNotFoundError, KeyError) as e:
        p.error(f"could not load the model: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    ensemble = isinstance(model, LatentEnsemble)
    if args.head_weights and not ensemble:
        p.error("--head-weight is for a reward ensemble file (--pretrained ensemble.safetensors, no --model); this "
                "is a single model with no heads")
    if ensemble:
        try:
            weights = default_head_weights(model.head_names, args.head_weights)
        except ValueError as e:
            p.error(str(e))
    trunk = model.trunk if ensemble else model
    if args.pooling is not None and (ensemble or not trunk.video):
        p.error(f"--pooling is for a model on a video space (fastlclip.list_vaes(video=True)); this model reads "
                f"{trunk.cfg.vae_name!r} images")
    v = trunk.cfg.vision
    if args.max_body_mb * 2**20 < (need := min_body_bytes(v.latent_channels, v.latent_size)):
        p.error(f"--max-body-mb {args.max_body_mb:g} is too small for one request: one float32 "
                f"{v.latent_channels}x{v.latent_size}x{v.latent_size} latent and its prompt need {need / 2**20:.3g} MiB; "
                "pass at least that (the default, 64, holds hundreds)")
    trunk.check_finite = False  # the server checks each request's latents itself, on the host
    if ensemble:
        reward = fastlclip.RewardEnsemble(model, weights, resize=resize, text_cache_size=args.text_cache_size)
    else:
        reward = fastlclip.LatentCLIPReward(model, text_cache_size=args.text_cache_size,
                                            pooling=args.pooling or "mean")
    app = create_app(reward, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                     max_body_mb=args.max_body_mb, max_queue=args.max_queue, token=token,
                     body_timeout_s=args.body_timeout_s)
    server = graceful_server(uvicorn.Config(app, host=args.host.strip("[]"), port=args.port, log_level=args.log_level,
                                            timeout_graceful_shutdown=args.shutdown_timeout_s,
                                            http=http_protocol(args.body_timeout_s)),
                             app.state.requests_in_flight)
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully; with these handlers that ends in exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if getattr(server, "cut", None):
        print(f"{p.prog}: shutdown cut short by {server.cut}", file=sys.stderr, flush=True)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
