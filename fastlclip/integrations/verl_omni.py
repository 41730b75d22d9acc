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
(a safetensors body, the prompt in its metadata). Only what is worth retrying is retried: connection errors and
timeouts, 429, and 503 (after its ``Retry-After``); any other error status is raised at once with the server's
reason.
"""

from __future__ import annotations

import asyncio
import json

import torch

RETRY_STATUS = (429, 503)


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


async def compute_score(solution_image, ground_truth, extra_info, server_url: str, token: str | None = None,
                        timeout: float = 120.0, max_retries: int = 2, score_scale: float = 1.0, score_bias: float = 0.0,
                        noise_level: float | None = None, noise_seed: int | None = None, retry_backoff: float = 0.5,
                        **kwargs) -> dict:
    """Score one rollout on the server at ``server_url`` (its ``/v1/score``).

    Returns ``{"score": raw * score_scale + score_bias, "clip_raw_score": raw}``, ``raw`` the cosine the
    server's ``LatentCLIPReward.score`` gives (lists when the latents hold several samples). ``noise_level``
    (and ``noise_seed``) go to the server as ``u`` (and ``seeds``): a noise-aware model uses it, another
    ignores it. Other keyword arguments of the reward config are accepted and unused.
    """
    import httpx

    body = request_body(_latents(solution_image, extra_info), _prompt(ground_truth, extra_info), noise_level, noise_seed)
    headers = {"content-type": "application/octet-stream", "x-drm-protocol-version": "1"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(timeout=timeout) as client:
        for attempt in range(max_retries + 1):
            last = attempt == max_retries
            wait = retry_backoff * 2**attempt
            try:
                response = await client.post(server_url, content=body, headers=headers)
            except httpx.TransportError as e:
                if last:
                    raise ConnectionError(f"reward server {server_url} unreachable after {attempt + 1} tries: "
                                          f"{type(e).__name__}: {e}") from e
            else:
                if response.status_code == 200:
                    break
                if response.status_code not in RETRY_STATUS or last:
                    raise RuntimeError(f"reward server {server_url} answered {response.status_code}: {_reason(response)}")
                retry_after = response.headers.get("retry-after", "")
                wait = max(wait, float(retry_after)) if retry_after.replace(".", "", 1).isdigit() else wait
            await asyncio.sleep(wait)
    raw = response.json()["raw_scores"]
    if len(raw) == 1:
        raw = raw[0]
        return {"score": raw * score_scale + score_bias, "clip_raw_score": raw}
    return {"score": [r * score_scale + score_bias for r in raw], "clip_raw_score": raw}
