"""Dynamic batching: requests queue, and one worker scores them together, one no-grad forward per batch.

A batch holds requests of one key (latent shape, noise level), oldest first, up to ``max_batch_size``
latents (a video space's clips: the shape holds the frame count T, so clips of different lengths never share a
batch); it leaves when it is full or its oldest request has waited ``max_wait_ms``. A request larger than
``max_batch_size`` is a batch of its own, scored in chunks. The forward runs on one worker thread, so the
event loop keeps accepting requests meanwhile. If a batch's forward raises, each of its requests is scored
alone: a bad request fails by itself, never its batchmates.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from .protocol import ScoreRequest


class QueueFull(Exception):
    """More latents are waiting than the queue holds (HTTP 503, retry later)."""


@dataclass(eq=False)
class _Item:
    request: ScoreRequest
    key: tuple
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class Batcher:
    """Queue ``ScoreRequest``s and answer each with its scores (a list of floats, or of rows).

    ``score_fn(latents, prompts, noise_level) -> (B,) or (B, k) tensor`` does the scoring (a no-grad forward);
    ``noise_key`` says whether requests of different noise levels are kept apart (a noise-aware model) or not.
    ``max_queue`` bounds the latents waiting; ``on_batch(n_latents)`` is told of every batch run.
    """

    def __init__(self, score_fn: Callable, *, max_batch_size: int = 32, max_wait_ms: float = 10.0,
                 max_queue: int = 4096, noise_key: bool = False, on_batch: Callable[[int], None] | None = None):
        self.score_fn = score_fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.noise_key = noise_key
        self.on_batch = on_batch or (lambda n: None)
        self._pending: list[_Item] = []
        self._waiting = 0  # latents in _pending
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fastlclip-score")

    @property
    def queued(self) -> int:
        """Latents waiting for a batch."""
        return self._waiting

    async def submit(self, request: ScoreRequest) -> list[float]:
        if self._waiting + request.size > self.max_queue and self._waiting:
            raise QueueFull(f"{self._waiting} latents are queued (the limit is {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            # Started in the serving event loop on first use (and anew if the app moves to another loop).
            self._pending, self._waiting = [], 0
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        key = (tuple(request.latents.shape[1:]), request.noise_level if self.noise_key else None)
        item = _Item(request, key, loop.create_future())
        self._pending.append(item)
        self._waiting += request.size
        self._wake.set()
        return await item.future

    async def close(self) -> None:
        """Stop the worker, once the server has answered its in-flight requests."""
        if self._worker is not None and not self._worker.done() and self._worker.get_loop() is asyncio.get_running_loop():
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._worker = None

    def _take(self) -> list[_Item]:
        """The oldest request and the next ones of its key, up to ``max_batch_size`` latents."""
        key, batch, n = self._pending[0].key, [], 0
        for item in self._pending:
            if item.key == key and (not batch or n + item.request.size <= self.max_batch_size):
                batch.append(item)
                n += item.request.size
        taken = set(map(id, batch))
        self._pending = [i for i in self._pending if id(i) not in taken]
        self._waiting -= n
        return batch

    def _ready(self) -> bool:
        first = self._pending[0]
        if time.monotonic() - first.arrival >= self.max_wait:
            return True
        return sum(i.request.size for i in self._pending if i.key == first.key) >= self.max_batch_size

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._pending = [i for i in self._pending if not i.future.done()]  # requests cancelled while queued
            self._waiting = sum(i.request.size for i in self._pending)
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._ready():
                self._wake.clear()
                left = self.max_wait - (time.monotonic() - self._pending[0].arrival)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(left, 0))
                except asyncio.TimeoutError:
                    pass
                continue
            batch = self._take()
            results = await loop.run_in_executor(self._executor, self._score, batch)
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _score(self, batch: list[_Item]) -> list:
        """Scores per request: one forward for the batch; if it fails, each request alone."""
        requests = [i.request for i in batch]
        try:
            scores = self._forward(requests)
        except Exception as e:
            return [e] if len(requests) == 1 else [self._alone(r) for r in requests]
        out, start = [], 0
        for r in requests:
            out.append(scores[start:start + r.size])
            start += r.size
        return out

    def _alone(self, request: ScoreRequest):
        try:
            return self._forward([request])
        except Exception as e:  # this request's own failure: it goes to its client alone
            return e

    def _forward(self, requests: list[ScoreRequest]) -> list:
        latents = torch.cat([r.latents for r in requests]) if len(requests) > 1 else requests[0].latents
        prompts = [p for r in requests for p in r.prompts]
        noise = requests[0].noise_level if self.noise_key else None
        scores = self.score_fn(latents, prompts, noise)
        self.on_batch(latents.shape[0])
        return scores.tolist()
