"""Timing on the GPU: CUDA-event medians of back-to-back calls, and the batch-1 reward step per backend."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from ..kernels import launch
from ..loss import normalized
from ..model import LatentCLIP
from .backends import BACKENDS, activate, install
from .common import reward_loss


def time_backends(model: LatentCLIP, backends=BACKENDS, *, trials: int = 5, steps: int = 20) -> tuple[dict, dict]:
    """Median ms of one batch-1 reward step (forward + backward to the latents) per backend, CUDA events
    over back-to-back steps; failures by backend. Leaves the model on ``"eager"`` with its weights'
    ``requires_grad`` and its train/eval mode as they were."""
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    check_finite = model.check_finite
    times, failures = {}, {}
    try:
        model.check_finite = False
        model.requires_grad_(False).eval()  # as a reward sets it
        with torch.no_grad():
            txt = normalized(model.encode_text("a photo of a cat", normalize=False))[0]
        v = model.cfg.vision
        latents = torch.randn(1, v.latent_channels, v.latent_size, v.latent_size, device=model.device,
                              dtype=model.dtype, requires_grad=True)

        def step():
            torch.autograd.grad(reward_loss(model, latents, "diffusion", txt), latents)

        for backend in backends:
            if backend == "triton" and not launch.kernels_available(model.device):
                continue
            try:
                activate(model, backend)
                times[backend] = time_cuda(step, trials=trials, steps=steps, device=model.device)
            except Exception as e:  # noqa: BLE001 - a backend that fails is ruled out; the reason is kept
                failures[backend] = f"{type(e).__name__}: {e}"
            finally:
                install(model, None)
                torch.cuda.empty_cache()
    finally:
        model.check_finite = check_finite
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        for m, training in zip(model.modules(), modes):
            m.training = training
    return times, failures


def time_cuda(fn: Callable[[], object], *, trials: int = 5, steps: int = 20, warmup: int = 3,
              device: torch.device | str | int | None = None) -> float:
    """Median over ``trials`` of the mean ms per call of ``steps`` back-to-back calls (CUDA events, one
    synchronisation at the end: calls pipeline as they do in a loop that never waits for the GPU).

    ``device``: the CUDA device ``fn`` runs on (its events and synchronisation are that device's); None:
    the current device. Pass the model's (``model.device``) when it may not be the current one.
    """
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        events = []
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) / steps for s, e in events)
