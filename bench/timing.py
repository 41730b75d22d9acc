"""Per-phase timing of ReNO iterations with CUDA events, and hooks that split the VAE decode out of a reward."""

from __future__ import annotations

import statistics

import torch
from torch import nn

# Phases a breakdown reports, in iteration order; vae_* appear only for decode-then-CLIP rewards, text_enc
# (prompt encoding every iteration) and host_sync (.item() calls) only in the reno pipeline.
BREAKDOWN = ("text_enc", "unet_fwd", "vae_fwd", "reward_fwd", "host_sync", "reward_bwd", "vae_bwd", "unet_bwd",
             "optimizer")


class PhaseLog:
    """A ``fastlclip.reno.PhaseTimer`` that only records the phase sequence (used where nothing is timed)."""

    def __init__(self):
        self.current: str | None = None
        self.iterations: list[list[str]] = [[]]

    def phase(self, name: str) -> None:
        self.current = name
        self.iterations[-1].append(name)

    def end_iteration(self) -> None:
        self.current = None
        self.iterations.append([])


class CudaPhaseTimer(PhaseLog):
    """Records a CUDA event at each phase start; ``durations_ms`` synchronises once and attributes the gaps.

    The time between two marks goes to the phase begun at the first; a phase marked twice in an iteration
    is summed. ``device``: the CUDA device the timed work runs on (e.g. ``generator.device``); events go on
    that device's current stream. None: the current device.
    """

    def __init__(self, device: torch.device | str | int | None = None):
        super().__init__()
        self.device = device
        self._events: list[list[tuple[str | None, torch.cuda.Event]]] = [[]]

    def _record(self, name: str | None) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self._events[-1].append((name, event))

    def phase(self, name: str) -> None:
        super().phase(name)
        self._record(name)

    def end_iteration(self) -> None:
        self._record(None)
        super().end_iteration()
        self._events.append([])

    def durations_ms(self) -> list[dict[str, float]]:
        """Per finished iteration, milliseconds per phase."""
        torch.cuda.synchronize(self.device)
        out = []
        for marks in self._events[:-1]:
            d: dict[str, float] = {}
            for (name, start), (_, end) in zip(marks, marks[1:]):
                d[name] = d.get(name, 0.0) + start.elapsed_time(end)
            out.append(d)
        return out


def median_breakdown(iterations: list[dict[str, float]]) -> dict[str, float]:
    """Median per phase over the iterations that ran a backward pass (all but ReNO's last)."""
    full = [it for it in iterations if "unet_bwd" in it] or iterations
    phases = [p for p in BREAKDOWN if any(p in it for it in full)]
    return {p: statistics.median(it.get(p, 0.0) for it in full) for p in phases}


def instrument_vae(vae: nn.Module, timer: PhaseLog) -> list:
    """Hooks marking the VAE decode inside a reward's forward as ``vae_fwd`` and its backward as ``vae_bwd``.

    Starts at ``post_quant_conv`` (or the decoder), ends after ``decoder``; marks only during the reward
    forward, so recomputation under checkpointing does not re-mark. Returns handles to ``.remove()``.
    """
    start = getattr(vae, "post_quant_conv", None) or vae.decoder

    def pre(module, args):
        if timer.current == "reward_fwd":
            timer.phase("vae_fwd")

    def post(module, args, output):
        if timer.current != "vae_fwd":
            return
        timer.phase("reward_fwd")
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: timer.phase("vae_bwd"))

    return [start.register_forward_pre_hook(pre), vae.decoder.register_forward_hook(post)]
