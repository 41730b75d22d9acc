"""verl-omni reward function for the fastlclip server: ``compute_score``, wired like verl-omni's
``latent_http_scorer_client`` so a config entry selects it::

    reward:
      reward_functions:
        latent_clip:
          path: pkg://fastlclip.integrations.verl_omni
          name: compute_score
          server_url: http://127.0.0.1:8000/v1/score
          weight: 1.0

Rollouts skip the VAE decode with ``output_type="latent"``; the clean latent goes to the server as protocol v1
(a safetensors body, the prompt in its metadata). Only what is worth retrying is retried: connection errors, 429,
and 503 (after its ``Retry-After``, capped at ``MAX_RETRY_AFTER_S``); any other error status is raised at once
with the server's reason (``RewardServerError``). No number reaches the trainer unchecked: a 200 reply must be a
JSON object of this client's ``protocol_version`` with one real, finite cosine in [-1, 1] per latent sent, or the
call raises ``RewardServerError``. ``timeout=`` is the deadline of the whole call, retries included.

On the 2025-26 latent spaces the latent is the diffusion grid the pipeline holds (FLUX.2: 128 channels), or a
packed space's tokens (Qwen-Image, FLUX.2: ``(L, D)`` per sample) with ``height=`` / ``width=`` in the reward
config, the VAE latent's size, sent as the tensors ``height`` / ``width`` (the server's extension of v1).

On a video space (Wan, HunyuanVideo, LTX-Video; ``video=True`` in the reward config) the latent is a clip
``(C, T, h, w)`` or a batch of clips ``(B, C, T, h, w)`` as the pipeline holds it, or LTX-Video's packed tokens
``(L, D)`` / ``(B, L, D)`` with ``frames=`` (the clip's video frame count F, sent as the tensor ``frames``; with
clips it is checked by the server against T) and ``height=`` / ``width=`` for a non-square latent. The server's
reply then carries each clip's per-frame cosines (``frame_scores``) beside the pooled ``raw_scores``: both are
checked (one list of T per clip, the pooled score the reply's ``pooling`` of them), the pooled one is returned.

A reward-ensemble server (``python -m fastlclip.serve --pretrained ensemble.safetensors``) answers the extension
of v1 in ``fastlclip.serve.protocol``: ``raw_scores`` is the weighted total, ``score_kind: "weighted_total"``,
with ``head_scores``, ``head_weights`` and ``head_ranges``. Its checks are per head (one real finite score per
latent, in the head's stated range) and on the total (the weighted sum of the head scores); ``compute_score``
then returns ``{"score": total * score_scale + score_bias, "raw_score": total, "<head>_raw_score": ...}`` (verl's
reward functions may return a dict with ``"score"`` and extra keys, which the trainer logs as extra reward info).
``head_weights=`` sends the request's own weights.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import torch

RETRY_STATUS = (429, 503)
PROTOCOL_VERSION = "1"  # the verl-omni latent protocol this client speaks (the server's fastlclip.serve.protocol)
MAX_RETRY_AFTER_S = 30.0  # the longest wait a server's Retry-After can ask for (compute_score's max_retry_after)
SCORE_RANGE = (-1.0, 1.0)  # protocol v1's raw_scores are cosines
SCORE_TOLERANCE = 1e-4  # float32 rounding past the cosine's bounds that is accepted (and passed on as sent)
SCORE_KIND_TOTAL = "weighted_total"  # an ensemble server's raw_scores (fastlclip.serve.protocol)
TOTAL_TOLERANCE = 1e-9  # relative: the server sums in float64 the very numbers it sends
POOL_TOLERANCE = 1e-5  # a clip's pooled score against its frame scores (the server pools in float32)


class RewardServerError(RuntimeError):
    """The reward server at ``url`` answered ``status`` with an error, or with a reply that cannot be trusted
    (``problem`` says which): no score is passed on."""

    def __init__(self, url: str, status: int, problem: str):
        self.url, self.status, self.problem = url, status, problem
        super().__init__(f"reward server {url} answered {status}: {problem}")

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return type(self), (self.url, self.status, self.problem)


def _is_latent(x, packed: bool, video: bool) -> bool:
    """Whether ``solution_image`` holds latents (not RGB: 3 channels, or nothing)."""
    if not isinstance(x, torch.Tensor):
        return False
    if video:  # LTX-Video's tokens, or clips whose channel axis is not RGB's
        return x.ndim in (2, 3) or (x.ndim in (4, 5) and x.shape[-4] != 3)
    return x.ndim in ((2, 3) if packed else (3, 4)) and (packed or x.shape[-3] != 3)


def _latents(solution_image, extra_info, packed: bool = False, video: bool = False) -> torch.Tensor:
    """The latents to send, (B, C, H, W), or with ``packed`` a packed space's tokens (B, L, D) (one sample: (L, D));
    with ``video`` clips (B, C, T, h, w) (one: (C, T, h, w)) or LTX-Video's tokens (B, L, D) (one: (L, D))."""
    latents = (extra_info or {}).get("latents_clean")
    ranks = (2, 3, 4, 5) if video else (2, 3) if packed else (3, 4)
    if latents is None and _is_latent(solution_image, packed, video):
        latents = solution_image
    if not isinstance(latents, torch.Tensor):
        raise ValueError("no latents to score: pass extra_info['latents_clean'] or a latent tensor as solution_image "
                         "(roll out with output_type='latent'); got an RGB image or nothing")
    if latents.ndim not in ranks:
        raise ValueError(f"latents of shape {tuple(latents.shape)}: expected " + (
            "clips (C, T, h, w) or (B, C, T, h, w), or LTX-Video's packed tokens (L, D) / (B, L, D) with frames="
            if video else "a packed space's tokens (L, D) or (B, L, D) (height= and width= are given)" if packed else
            "(C, H, W) or (B, C, H, W); a packed space's tokens (B, L, D) need height= and width=; clips (B, C, T, "
            "h, w) of a video space need video=True"))
    if latents.ndim in ((2, 4) if video else ranks[:1]):
        latents = latents[None]
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    if latents.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        latents = latents.float()
    return latents.detach().to("cpu").contiguous()


def _latent_size(height, width) -> tuple[int, int] | None:
    """``height`` / ``width`` checked: both None, or both positive integers (the VAE latent's size)."""
    if height is None and width is None:
        return None
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, the VAE latent's {name} (image {name} / VAE factor), "
                             f"given with the other for packed tokens; got {v!r}")
    return height, width


def _prompt(ground_truth, extra_info) -> str:
    prompt = ground_truth if isinstance(ground_truth, str) and ground_truth.strip() else (extra_info or {}).get("raw_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("no prompt: pass it as ground_truth or extra_info['raw_prompt']")
    return prompt


def request_body(latents: torch.Tensor, prompt: str, noise_level: float | None = None, seed: int | None = None,
                 head_weights: dict | None = None, height: int | None = None, width: int | None = None,
                 frames: int | None = None) -> bytes:
    """A protocol v1 body: ``latents`` (and ``u``, ``seeds`` when given), the prompt in the metadata (and
    ``head_weights`` for an ensemble server); ``height`` / ``width``, the VAE latent's size for a packed space's
    tokens, and ``frames``, a clip's video frame count, as int64 tensors (the server's extensions of v1)."""
    from safetensors.torch import save

    tensors = {"latents": latents}
    if frames is not None:
        tensors["frames"] = torch.tensor([int(frames)], dtype=torch.int64)
    if height is not None:
        tensors["height"] = torch.tensor([int(height)], dtype=torch.int64)
    if width is not None:
        tensors["width"] = torch.tensor([int(width)], dtype=torch.int64)
    if noise_level is not None:
        tensors["u"] = torch.full((latents.shape[0],), float(noise_level), dtype=torch.float32)
    if seed is not None:
        tensors["seeds"] = torch.full((latents.shape[0],), int(seed), dtype=torch.int64)
    meta = {"prompts": json.dumps([prompt] * latents.shape[0])}
    if head_weights is not None:
        meta["head_weights"] = json.dumps(dict(head_weights))
    return save(tensors, metadata=meta)


def _reason(response) -> str:
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _numbers(values, n: int, what: str, invalid, bounds=None) -> list[float]:
    """``values`` checked: a list of ``n`` real, finite numbers (not booleans), within ``bounds`` (lo, hi) up to
    ``SCORE_TOLERANCE`` times the bound's size (at least 1) when given."""
    if not isinstance(values, list):
        raise invalid(f"{what} must be a list of {n} numbers, got {type(values).__name__} {str(values)[:40]}")
    if len(values) != n:
        raise invalid(f"{len(values)} scores for the {n} latent(s) sent" + ("" if what == "'raw_scores'" else f" in {what}"))
    out = []
    name = "score" if what == "'raw_scores'" else f"{what} score"
    for i, r in enumerate(values):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise invalid(f"{name} {i} is {str(r)[:40]!r} ({type(r).__name__}), not a number")
        try:
            x = float(r)
        except OverflowError:  # an integer past float range
            x = math.inf
        if not math.isfinite(x):
            raise invalid(f"{name} {i} is {x}, not finite")
        if bounds is not None:
            lo, hi = bounds
            tol = SCORE_TOLERANCE * max(1.0, abs(lo), abs(hi))
            if not lo - tol <= x <= hi + tol:
                kind = "the cosine's range" if bounds == SCORE_RANGE and what == "'raw_scores'" else "its range"
                raise invalid(f"{name} {i} is {x!r}, outside {kind} [{lo:g}, {hi:g}]")
        out.append(x)
    return out


def _check_frames(reply: dict, raw: list[float], t: int | None, invalid) -> None:
    """A video reply's ``frame_scores``: one list of T real, finite cosines per clip (``t`` when known, else the
    same length for every clip), and each ``raw_scores`` entry the reply's ``pooling`` (mean or min) of them."""
    frames, pooling = reply.get("frame_scores"), reply.get("pooling")
    if not isinstance(frames, list) or len(frames) != len(raw):
        raise invalid(f"a video reply's 'frame_scores' must be a list of {len(raw)} lists (one per clip), got "
                      f"{type(frames).__name__} {str(frames)[:40]}")
    if pooling not in ("mean", "min"):
        raise invalid(f"a video reply's 'pooling' must be 'mean' or 'min', got {str(pooling)[:40]!r}")
    t = t or (len(frames[0]) if isinstance(frames[0], list) else 0)
    for i, (values, r) in enumerate(zip(frames, raw)):
        if not isinstance(values, list) or len(values) != t or not t:
            raise invalid(f"frame_scores[{i}] must be a list of the clip's {t} latent frames' scores, got "
                          f"{str(values)[:40]}")
        values = _numbers(values, t, f"frame_scores[{i}]", invalid, SCORE_RANGE)
        want = math.fsum(values) / t if pooling == "mean" else min(values)
        if abs(r - want) > POOL_TOLERANCE:
            raise invalid(f"score {i} is {r!r}, not the {pooling} of its frame scores ({want!r})")


def checked_reply(response, url: str, n: int, video: bool = False, frames: int | None = None
                  ) -> tuple[list[float], dict[str, list[float]] | None]:
    """The ``n`` scores of a 200 reply, checked, and for an ensemble server's reply each head's ``n`` scores
    (None for a single model's). A JSON object with ``protocol_version`` this client's; for a single model,
    ``raw_scores`` a list of ``n`` real, finite cosines in [-1, 1] (within ``SCORE_TOLERANCE``); for an
    ensemble (``score_kind: "weighted_total"``), ``head_scores`` ``{head: n numbers}`` each within its
    ``head_ranges`` entry ([lo, hi], or null for an unbounded head), ``head_weights`` finite, >= 0, not all zero,
    over the same heads, and ``raw_scores`` the weighted sum of the head scores (``TOTAL_TOLERANCE``). A ``video``
    reply also has ``frame_scores``, ``frames`` (T, when known) scores per clip, pooled into ``raw_scores`` by its
    ``pooling`` (``POOL_TOLERANCE``). Anything else raises ``RewardServerError``."""
    def invalid(what: str) -> RewardServerError:
        return RewardServerError(url, response.status_code, f"invalid reply, {what}; no score is passed on")

    try:
        reply = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise invalid(f"the body is not JSON: {response.text[:200]!r}") from None
    if not isinstance(reply, dict):
        raise invalid(f"the body is JSON {type(reply).__name__}, not an object")
    version = reply.get("protocol_version")
    if version != PROTOCOL_VERSION:
        raise invalid(f"protocol_version {version!r}: this client speaks {PROTOCOL_VERSION!r} (verl-omni latent "
                      "protocol v1); run a server of the same version")
    kind = reply.get("score_kind")
    if kind is None and "head_scores" not in reply:
        raw = _numbers(reply.get("raw_scores"), n, "'raw_scores'", invalid, SCORE_RANGE)
        if video:
            _check_frames(reply, raw, frames, invalid)
        return raw, None
    if video:
        raise invalid("an ensemble's reply to clips: a video space is served by one model, with frame_scores")
    if kind != SCORE_KIND_TOTAL:
        raise invalid(f"score_kind {str(kind)[:40]!r}: this client reads a single model's cosines (no score_kind) "
                      f"or an ensemble's {SCORE_KIND_TOTAL!r}")
    heads, weights, ranges = reply.get("head_scores"), reply.get("head_weights"), reply.get("head_ranges")
    for name, value in (("head_scores", heads), ("head_weights", weights), ("head_ranges", ranges)):
        if not isinstance(value, dict) or not value:
            raise invalid(f"an ensemble reply's {name!r} must be a non-empty object by head, got "
                          f"{type(value).__name__}")
    if set(weights) != set(heads) or set(ranges) != set(heads):
        raise invalid(f"'head_scores', 'head_weights' and 'head_ranges' name different heads ({sorted(heads)[:6]}, "
                      f"{sorted(weights)[:6]}, {sorted(ranges)[:6]})")
    per_head = {}
    for h, values in heads.items():
        bounds = ranges[h]
        if bounds is not None:
            if not isinstance(bounds, list) or len(bounds) != 2 or any(
                    isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) for b in bounds) \
                    or bounds[0] > bounds[1]:
                raise invalid(f"head_ranges[{h!r}] must be null or [lo, hi], finite, lo <= hi, got {str(bounds)[:60]}")
            bounds = (float(bounds[0]), float(bounds[1]))
        per_head[h] = _numbers(values, n, f"head {h!r}", invalid, bounds)
    for h, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise invalid(f"head_weights[{h!r}] is {str(w)[:40]!r}, not a finite number >= 0")
    if not any(weights.values()):
        raise invalid("head_weights are all zero")
    total = _numbers(reply.get("raw_scores"), n, "'raw_scores'", invalid)
    for i, t in enumerate(total):
        terms = [float(weights[h]) * per_head[h][i] for h in per_head]
        want = math.fsum(terms)
        if abs(t - want) > TOTAL_TOLERANCE * (1.0 + math.fsum(abs(x) for x in terms)):
            raise invalid(f"score {i} is {t!r}, not the weighted sum of its head scores ({want!r})")
    return total, per_head


def raw_scores(response, url: str, n: int) -> list[float]:
    """The ``n`` scores of a 200 reply, checked by :func:`checked_reply` (a single model's cosines, or an ensemble's
    weighted totals); anything else raises ``RewardServerError``."""
    return checked_reply(response, url, n)[0]


_sleep = asyncio.sleep  # waits between tries (the tests replace it)


async def compute_score(solution_image, ground_truth, extra_info, server_url: str, token: str | None = None,
                        timeout: float = 120.0, max_retries: int = 2, score_scale: float = 1.0, score_bias: float = 0.0,
                        noise_level: float | None = None, noise_seed: int | None = None, retry_backoff: float = 0.5,
                        max_retry_after: float = MAX_RETRY_AFTER_S, head_weights: dict | None = None,
                        height: int | None = None, width: int | None = None, video: bool = False,
                        frames: int | None = None, **kwargs) -> dict:
    """Score one rollout on the server at ``server_url`` (its ``/v1/score``).

    Returns ``{"score": raw * score_scale + score_bias, "clip_raw_score": raw}``, ``raw`` the cosine the
    server's ``LatentCLIPReward.score`` gives (lists when the latents hold several samples). From a reward-ensemble
    server: ``{"score": total * score_scale + score_bias, "raw_score": total, "<head>_raw_score": value, ...}``,
    the total the server's weighted sum of its heads' scores (``head_weights={head: weight}`` sends this call's
    weights, else the server's defaults apply). ``noise_level``
    (and ``noise_seed``) go to the server as ``u`` (and ``seeds``): a noise-aware model uses it, another
    ignores it. ``height`` and ``width`` (both or neither): the VAE latent's size (image size / VAE factor) when
    the latents are a packed space's tokens, ``(L, D)`` or ``(B, L, D)`` as Qwen-Image's and FLUX.2's pipelines
    hold them; they go to the server as the tensors ``height`` / ``width`` (its extension of v1), which unpacks the
    tokens through the model's latent space. ``video=True`` (a server on a video space): the latents are clips
    ``(C, T, h, w)`` / ``(B, C, T, h, w)``, or LTX-Video's packed tokens ``(L, D)`` / ``(B, L, D)`` with ``frames``
    (the clip's video frame count F; ``frames`` alone implies ``video``); the score is each clip's pooled score, the
    reply's per-frame scores checked against it. Other keyword arguments of the reward config are accepted and
    unused.

    Every reply is checked before a number is returned (:func:`raw_scores`: JSON, ``protocol_version``, one
    real finite cosine per latent sent); an error status or a reply that fails a check raises
    ``RewardServerError`` (a ``RuntimeError``) naming the server, the status and the problem. ``timeout`` (s) is
    a deadline for the whole call, every try and every wait between tries included: past it, ``TimeoutError``.
    Between tries the wait is ``retry_backoff * 2**try``, or the server's ``Retry-After`` (in seconds) when
    longer, but never more than ``max_retry_after`` (``MAX_RETRY_AFTER_S``, 30 s); a wait that would end past
    the deadline is not begun (``TimeoutError`` at once). Connection errors raise ``ConnectionError`` once the
    retries are spent.
    """
    import httpx

    def seconds(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < math.inf

    if not seconds(timeout) or timeout == 0:
        raise ValueError(f"timeout must be a positive number of seconds (the deadline of the whole call), got "
                         f"{timeout!r}")
    if not seconds(max_retry_after):
        raise ValueError(f"max_retry_after must be a finite number of seconds >= 0, got {max_retry_after!r}")
    size = _latent_size(height, width)
    video = bool(video) or frames is not None
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be a positive integer, the clip's video frame count F, got {frames!r}")
    latents = _latents(solution_image, extra_info, packed=size is not None, video=video)
    if video and latents.ndim == 3 and frames is None:
        raise ValueError(f"packed video tokens {tuple(latents.shape)} (LTX-Video's) need frames=, the clip's video "
                         "frame count F, for the server to unpack them")
    body = request_body(latents, _prompt(ground_truth, extra_info), noise_level, noise_seed, head_weights,
                        *(size or (None, None)), frames=frames)
    headers = {"content-type": "application/octet-stream", "x-drm-protocol-version": PROTOCOL_VERSION}
    if token:
        headers["authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + timeout

    def past_deadline(tries: int, last: str) -> TimeoutError:
        return TimeoutError(f"reward server {server_url}: no score within timeout={timeout:g} s (the deadline for the "
                            f"whole call, retries and waits included) after {tries} tries; last: {last}")

    async with httpx.AsyncClient(timeout=None) as client:  # the deadline below is the only timeout
        for attempt in range(max_retries + 1):
            last = attempt == max_retries
            wait = retry_backoff * 2**attempt
            remaining = deadline - time.monotonic()
            try:
                response = await asyncio.wait_for(client.post(server_url, content=body, headers=headers),
                                                  max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise past_deadline(attempt + 1, "no reply yet") from None
            except httpx.TransportError as e:
                if last:
                    raise ConnectionError(f"reward server {server_url} unreachable after {attempt + 1} tries: "
                                          f"{type(e).__name__}: {e}") from e
                failure = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 200:
                    break
                if response.status_code not in RETRY_STATUS or last:
                    raise RewardServerError(server_url, response.status_code, _reason(response))
                failure = f"answered {response.status_code}"
                retry_after = response.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():  # seconds; an HTTP date is ignored
                    wait = max(wait, min(float(retry_after), max_retry_after))
            if time.monotonic() + wait >= deadline:
                raise past_deadline(attempt + 1, f"{failure} (the next try, after a wait of {wait:g} s, would start "
                                                 "past the deadline)")
            await _sleep(wait)
    raw, per_head = checked_reply(response, server_url, latents.shape[0], video,
                                  latents.shape[2] if video and latents.ndim == 5 else None)
    one = latents.shape[0] == 1
    if per_head is not None:
        out = {"score": raw[0] * score_scale + score_bias if one else [r * score_scale + score_bias for r in raw],
               "raw_score": raw[0] if one else raw}
        for h, values in per_head.items():
            out[f"{h}_raw_score"] = values[0] if one else values
        return out
    if one:
        return {"score": raw[0] * score_scale + score_bias, "clip_raw_score": raw[0]}
    return {"score": [r * score_scale + score_bias for r in raw], "clip_raw_score": raw}
