"""The reward server as an ASGI app (Starlette): ``create_app(reward) -> app``, run by ``python -m fastlclip.serve``.

Endpoints: ``GET /healthz`` (model, VAE, channels, device), ``POST /v1/score`` (verl-omni latent protocol v1,
see ``fastlclip.serve.protocol``), ``GET /metrics`` (Prometheus text). Every error is JSON ``{"error": ...}``:
400 bad request, 401 missing or wrong bearer token, 404, 405, 408 body not received in time (the connection
is then closed), 413 body over the limit, 503 with
``Retry-After`` when the queue is full, 500 for a failure of the server itself.

``reward`` may be a ``RewardEnsemble``: each batch is one trunk forward for every head, and replies carry the
weighted total in ``raw_scores`` with each head's score beside it (the extension of v1 in
``fastlclip.serve.protocol``). A model on a per-channel or packed latent space (Qwen-Image, FLUX.2) also takes its
diffusion grid and the pipeline's packed tokens with ``height`` / ``width``, the other extension of v1 there. A
model on a video space (Wan, HunyuanVideo, LTX-Video) takes clips (B, C, T, h, w) (LTX: or its packed tokens with
``frames``) and replies with each clip's pooled score and its per-frame scores (``frame_scores``): the video
extension of v1 in ``fastlclip.serve.protocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import math
import time

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import inputs
from ..rewards import LatentCLIPReward, RewardEnsemble, pool_frames
from ..vaes import LatentSpace
from . import protocol
from .batcher import Batcher, QueueFull

RETRY_AFTER_S = 1


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastlclip_requests", "Score requests answered, by HTTP status", ["code"], registry=r)
        self.disconnects = Counter("fastlclip_client_disconnects", "Score requests whose client hung up before the "
                                   "server had read the body (not answered, not counted in fastlclip_requests)",
                                   registry=r)
        self.batches = Counter("fastlclip_batches", "Batches scored (one forward each)", registry=r)
        self.latents = Counter("fastlclip_latents", "Latents scored", registry=r)
        self.latency = Histogram("fastlclip_request_latency_seconds", "Time from request to reply, /v1/score",
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("fastlclip_batch_size", "Latents per batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queued = Gauge("fastlclip_queued_latents", "Latents waiting for a batch", registry=r)
        self.in_flight = Gauge("fastlclip_requests_in_flight", "Score requests received and not yet answered", registry=r)

    def batch(self, n: int) -> None:
        self.batches.inc()
        self.latents.inc(n)
        self.batch_size.observe(n)


def _diffusion_space(model) -> tuple[LatentSpace | None, str | None]:
    """The model's latent space, or None and why not (FLUX.2 without ``vae_stats``: no diffusion space)."""
    try:
        return model.latent_space, None
    except ValueError as e:
        return None, (f"latent space {model.cfg.vae_name!r}: this model has no diffusion space ({e}); send VAE-space "
                      "latents (metadata space 'vae'), or serve a model config with \"vae_stats\" "
                      "(fastlclip.vaes.weight_stats(vae))")


def _model_info(model) -> dict:
    """/healthz's model fields; a per-channel or packed space adds ``diffusion_channels``, ``patch`` and ``pack``
    (what requests send), a model with no diffusion space ``vae_latents_only: true``."""
    v, (space, _) = model.cfg.vision, _diffusion_space(model)
    info = {"model": model.cfg.name, "vae": model.cfg.vae_name, "channels": v.latent_channels,
            "latent_size": v.latent_size, "resize": model.resize, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "backend": model.backend,
            "noise_aware": model.noise_aware, "scaling_factor": space.scaling_factor if space else None,
            "shift_factor": space.shift_factor if space else None}
    if space is None:
        info["vae_latents_only"] = True
    elif space.per_channel or space.pack:
        info.update(diffusion_channels=space.diffusion_channels, patch=space.patch, pack=space.pack)
    if space is not None and space.video:
        info.update(video=True, temporal=space.temporal, causal=space.causal)
    return info


def head_range(model, head: str) -> list[float] | None:
    """The range of an ensemble head's score: ``scale * [-1, 1]`` for a cosine, times ``logit_scale.exp()`` for a
    logit; None for a head with no bound (an MLP)."""
    form = model.forms[head]
    if form.form == "head":
        return None
    bound = abs(form.scale) * (model.logit_scale[head].float().exp().item() if form.form == "logit" else 1.0)
    return [-bound, bound]


def _ensemble_info(reward: RewardEnsemble) -> dict:
    m = reward.model
    return {"model": "ensemble", "heads": m.head_names, "head_weights": dict(reward.weights),
            "head_ranges": {h: head_range(m, h) for h in m.head_names}, "score_kind": protocol.SCORE_KIND_TOTAL}


def create_app(reward: LatentCLIPReward | RewardEnsemble, *, max_batch_size: int = 32, max_wait_ms: float = 10.0,
               max_body_mb: float = 64.0, max_queue: int = 4096, token: str | None = None,
               body_timeout_s: float = 30.0) -> Starlette:
    """The server's app around ``reward`` (a ``LatentCLIPReward`` on diffusion-space latents, or a
    ``RewardEnsemble``: its ``weights`` are the server's default head weights, every head of the ensemble scored,
    a head it does not name weighing 0).

    ``max_batch_size`` latents per forward, batches leave after ``max_wait_ms``; ``max_queue`` latents may
    wait before requests are refused with 503; bodies over ``max_body_mb`` get 413; with ``token`` every
    request but ``/healthz`` needs ``Authorization: Bearer <token>``; a body not received within ``body_timeout_s``
    of the request's headers (sent slowly, or shorter than its ``Content-Length``) gets 408 and the connection is
    closed, so idle clients cannot hold connections.
    """
    body_timeout_s = inputs.check_number(body_timeout_s, "body_timeout_s (seconds a request's body may take)",
                                         positive=True)
    ensemble = isinstance(reward, RewardEnsemble)
    model = reward.model
    trunk = model.trunk if ensemble else model  # the image tower: its grid, VAE, device
    heads = model.head_names if ensemble else None
    defaults = None
    if ensemble:
        defaults = {h: float(reward.weights.get(h, 0.0)) for h in heads}
        if not any(defaults.values()):
            raise ValueError(f"the default head weights are all zero ({defaults}): give one head a positive weight")
    resize = reward.resize if ensemble else model.resize
    ranges = {h: head_range(model, h) for h in heads} if ensemble else None
    noise_aware = model.noise_aware
    metrics = _Metrics()
    limit = int(max_body_mb * 2**20)
    v = trunk.cfg.vision
    if reward.space != "diffusion":
        raise ValueError(f"the server takes a reward on diffusion-space latents (space='diffusion'), got "
                         f"space={reward.space!r}: requests say their space themselves (metadata 'space')")
    space, vae_only = _diffusion_space(trunk)
    video = trunk.video
    if video and (ensemble or vae_only is not None):
        raise ValueError(f"latent space {trunk.cfg.vae_name!r} is a video space: the server scores its clips with "
                         "one LatentCLIPReward on a model with a diffusion space" +
                         (", not a reward ensemble" if ensemble else f" ({vae_only})"))
    shapes = protocol.accepted_shapes(space, trunk.cfg.vae_name, v.latent_channels, v.latent_size)
    if vae_only is not None:  # no diffusion space: requests hold VAE latents, scored as such
        reward = copy.copy(reward)  # shares the model and the text cache
        reward.space = "vae"

    def score_fn(latents: torch.Tensor, prompts: list[str], noise) -> torch.Tensor:
        """(B,) scores; for an ensemble (B, heads); for clips (B, 1 + T), the pooled score then each frame's: one
        trunk forward per ``max_batch_size`` latents (clips: their frames in one forward)."""
        kw = {}
        if noise is not None:
            kw["noise_level"] = noise if isinstance(noise, float) else torch.tensor(noise, device=model.device)
        with torch.inference_mode():
            if not ensemble and not video:
                return reward.score(latents.to(model.device), prompts, batch_size=max_batch_size, **kw).float().cpu()
            out = []
            for s in range(0, latents.shape[0], max_batch_size):
                k = {"noise_level": kw["noise_level"][s:s + max_batch_size]} \
                    if isinstance(kw.get("noise_level"), torch.Tensor) else kw
                x, p = latents[s:s + max_batch_size].to(model.device), prompts[s:s + max_batch_size]
                if video:  # the pooled score is the reward's score: its pooling of these very frame scores
                    frames = reward.frame_scores(x, p, **k).float()
                    out.append(torch.cat([pool_frames(frames, reward.pooling)[:, None], frames], dim=1))
                else:
                    per_head = reward.score(x, p, **k)
                    out.append(torch.stack([per_head[h].float() for h in heads], dim=1))
            return torch.cat(out).cpu()

    batcher = Batcher(score_fn, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      noise_key=noise_aware, on_batch=metrics.batch)

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):].encode(), token.encode())

    def unauthorized() -> JSONResponse:
        return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' (the server's "
                           "--token-file)", {"WWW-Authenticate": "Bearer"})

    async def healthz(request: Request) -> JSONResponse:
        info = {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION, **_model_info(trunk)}
        if video:
            info["pooling"] = reward.pooling
        if ensemble:
            info.update(_ensemble_info(reward), head_weights=defaults, resize=resize)
        return JSONResponse(info)

    async def metrics_endpoint(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        metrics.queued.set(batcher.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: Request) -> bytes | None:
        """The body, or None once it is over the limit (read no further); TimeoutError after ``body_timeout_s``."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return None
        body = bytearray()
        async with asyncio.timeout(body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return None
        return bytes(body)

    async def reply(request: Request) -> JSONResponse:
        if not authorized(request):
            return unauthorized()
        version = request.headers.get("x-drm-protocol-version")
        if version != protocol.PROTOCOL_VERSION:
            return _error(400, f"header x-drm-protocol-version must be {protocol.PROTOCOL_VERSION!r}, got "
                               f"{version!r}: this server speaks verl-omni latent protocol v1")
        try:
            body = await read_body(request)
        except TimeoutError:
            return _error(408, f"the body did not arrive within {body_timeout_s:g} s of the request's headers (the "
                               "server's --body-timeout-s; or it is shorter than its Content-Length): send the whole "
                               "body at once, with its true length", {"Connection": "close"})
        if body is None:
            return _error(413, f"the body is over the server's limit of {max_body_mb:g} MiB (--max-body-mb); send "
                               "fewer latents per request")
        try:
            req = protocol.parse(body, channels=v.latent_channels, to_diffusion=space.to_diffusion if space else None,
                                 space=space, vae_only=vae_only)
            weights = protocol.head_weights(req.head_weights, heads, defaults)
        except protocol.LatentShapeError as e:
            return _error(400, f"{e}; {shapes}")
        except ValueError as e:  # ProtocolError is one
            return _error(400, str(e))
        try:  # the grid the tower reads: the VAE latent (one, converted by the model's space; a clip's first frame)
            probe = req.latents if space is None else space.to_vae(req.latents[:1])
            inputs.check_latents(probe[:, :, 0] if video else probe,
                                 channels=v.latent_channels, size=v.latent_size, patch=v.patch_size, resize=resize,
                                 check_finite=False, vae=trunk.cfg.vae_name)
        except ValueError as e:
            grid = " (the VAE latent the grid unpatchifies to)" if space is not None and space.patch != 1 else ""
            return _error(400, f"{e}{grid}; {shapes}")
        if noise_aware and req.noise_level is not None:
            if vae_only is not None:
                return _error(400, f"'u' (the noise level): {vae_only}; re-noising needs it. Send clean latents "
                                   "without 'u'")
            req.latents = protocol.renoise(req)
        try:
            scores = await batcher.submit(req)
        except QueueFull as e:
            return _error(503, str(e), {"Retry-After": str(RETRY_AFTER_S)})
        except (ValueError, TypeError) as e:  # refused by the model for this request alone
            return _error(400, str(e))
        flat = [x for s in scores for x in s] if ensemble or video else scores
        if not all(math.isfinite(s) for s in flat):  # finite latents, overflowed in the tower: the client's input
            peak = req.latents.abs().amax().item()
            return _error(400, f"'latents' are finite but overflowed to NaN/Inf inside the image tower (largest |latent| "
                               f"= {peak:.3g}; diffusion-space SDXL latents are of order 1-10): check the sampler or "
                               "scaling that produced them, or metadata 'space' (diffusion vs vae)")
        if video:
            out = {"protocol_version": protocol.PROTOCOL_VERSION, "raw_scores": [s[0] for s in scores],
                   "model": model.cfg.name, "frame_scores": [s[1:] for s in scores], "pooling": reward.pooling}
        elif not ensemble:
            out = {"protocol_version": protocol.PROTOCOL_VERSION, "raw_scores": scores, "model": model.cfg.name}
        else:
            per_head = {h: [s[i] for s in scores] for i, h in enumerate(heads)}
            total = [math.fsum(weights[h] * s[i] for i, h in enumerate(heads)) for s in scores]
            out = {"protocol_version": protocol.PROTOCOL_VERSION, "raw_scores": total, "model": "ensemble",
                   "score_kind": protocol.SCORE_KIND_TOTAL, "head_scores": per_head, "head_weights": weights,
                   "head_ranges": ranges}
        if req.noise_level is not None:
            out["noise_level"] = req.noise_level if noise_aware else "ignored"
        return JSONResponse(out)

    async def score(request: Request) -> JSONResponse:
        start = time.monotonic()
        with metrics.in_flight.track_inprogress():
            try:
                response = await reply(request)
            except ClientDisconnect:  # the client hung up mid-body: nobody to answer, and no failure of the server
                metrics.disconnects.inc()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            except Exception as e:  # a failure of the server itself (out of memory, ...): counted, and JSON
                response = _error(500, f"internal error: {type(e).__name__}: {e}")
        metrics.requests.labels(code=str(response.status_code)).inc()
        metrics.latency.observe(time.monotonic() - start)
        return response

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", exc.headers)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics_endpoint, methods=["GET"]),
                            Route("/v1/score", score, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.reward = batcher, metrics, reward
    app.state.requests_in_flight = lambda: int(metrics.in_flight._value.get())
    app.state.body_timeout_s = body_timeout_s
    return app
