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


class RewardServerError(RuntimeError):
    """The reward server at ``url`` answered ``status`` with an error, or with a reply that cannot be trusted
    (``problem`` says which): no score is passed on."""

    def __init__(self, url: str, status: int, problem: str):
        self.url, self.status, self.problem = url, status, problem
        super().__init__(f"reward server {url} answered {status}: {problem}")

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return type(self), (self.url, self.status, self.problem)


def _latents(solution_image, extra_info) -> torch.Tensor:
    latents = (extra_info or {}).get("latents_clean")
    if latents is None and isinstance(solution_image, torch.Tensor) and solution_image.ndim in (3, 4) \
            and solution_image.shape[-3] != 3:
        latents = solution_image
    if not isinstance(latents, torch.Tensor):
        raise ValueError("no latents to score: pass extra_info['latents_clean'] or a latent tensor as solution_image "
                         "(roll out with output_type='latent'); got an RGB image or nothing")
    if latents.ndim == 3:
        latents = latents[None]
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    if latents.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        latents = latents.float()
    return latents.detach().to("cpu").contiguous()


def _prompt(ground_truth, extra_info) -> str:
    prompt = ground_truth if isinstance(ground_truth, str) and ground_truth.strip() else (extra_info or {}).get("raw_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("no prompt: pass it as ground_truth or extra_info['raw_prompt']")
    return prompt


def request_body(latents: torch.Tensor, prompt: str, noise_level: float | None = None, seed: int | None = None) -> bytes:
    """A protocol v1 body: ``latents`` (and ``u``, ``seeds`` when given), the prompt in the metadata."""
    from safetensors.torch import save

    tensors = {"latents": latents}
    if noise_level is not None:
        tensors["u"] = torch.full((latents.shape[0],), float(noise_level), dtype=torch.float32)
    if seed is not None:
        tensors["seeds"] = torch.full((latents.shape[0],), int(seed), dtype=torch.int64)
    return save(tensors, metadata={"prompts": json.dumps([prompt] * latents.shape[0])})


def _reason(response) -> str:
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def raw_scores(response, url: str, n: int) -> list[float]:
    """The ``n`` scores of a 200 reply, checked: a JSON object with ``protocol_version`` this client's and
    ``raw_scores`` a list of ``n`` real, finite numbers (not booleans) in the cosine's range [-1, 1] (within
    ``SCORE_TOLERANCE``); anything else raises ``RewardServerError``."""
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
    raw = reply.get("raw_scores")
    if not isinstance(raw, list):
        raise invalid(f"'raw_scores' must be a list of {n} numbers, got {type(raw).__name__} {str(raw)[:40]}")
    if len(raw) != n:
        raise invalid(f"{len(raw)} scores for the {n} latent(s) sent")
    lo, hi = SCORE_RANGE
    scores = []
    for i, r in enumerate(raw):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise invalid(f"score {i} is {str(r)[:40]!r} ({type(r).__name__}), not a number")
        try:
            x = float(r)
        except OverflowError:  # an integer past float range
            x = math.inf
        if not math.isfinite(x):
            raise invalid(f"score {i} is {x}, not finite")
        if not lo - SCORE_TOLERANCE <= x <= hi + SCORE_TOLERANCE:
            raise invalid(f"score {i} is {x!r}, outside the cosine's range [{lo:g}, {hi:g}]")
        scores.append(x)
    return scores


_sleep = asyncio.sleep  # waits between tries (the tests replace it)


async def compute_score(solution_image, ground_truth, extra_info, server_url: str, token: str | None = None,
                        timeout: float = 120.0, max_retries: int = 2, score_scale: float = 1.0, score_bias: float = 0.0,
                        noise_level: float | None = None, noise_seed: int | None = None, retry_backoff: float = 0.5,
                        max_retry_after: float = MAX_RETRY_AFTER_S, **kwargs) -> dict:
    """Score one rollout on the server at ``server_url`` (its ``/v1/score``).

    Returns ``{"score": raw * score_scale + score_bias, "clip_raw_score": raw}``, ``raw`` the cosine the
    server's ``LatentCLIPReward.score`` gives (lists when the latents hold several samples). ``noise_level``
    (and ``noise_seed``) go to the server as ``u`` (and ``seeds``): a noise-aware model uses it, another
    ignores it. Other keyword arguments of the reward config are accepted and unused.

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
    latents = _latents(solution_image, extra_info)
    body = request_body(latents, _prompt(ground_truth, extra_info), noise_level, noise_seed)
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
    raw = raw_scores(response, server_url, latents.shape[0])
    if latents.shape[0] == 1:
        return {"score": raw[0] * score_scale + score_bias, "clip_raw_score": raw[0]}
    return {"score": [r * score_scale + score_bias for r in raw], "clip_raw_score": raw}
