"""The rewards the cost benchmark compares, built with random weights, and the choice of Latent-CLIP backend."""

from __future__ import annotations

import gc
import logging
import statistics
import warnings
from dataclasses import dataclass

import torch

from . import tiny


@dataclass(frozen=True)
class RewardSpec:
    key: str
    kind: str  # "latent": Latent-CLIP on the latents; "pixel": VAE decode, then open_clip
    model: str  # fastlclip config name or open_clip model name
    label: str


REWARDS = {s.key: s for s in (
    RewardSpec("latent-b8", "latent", "Latent-ViT-B-8-512", "Latent-ViT-B/8"),
    RewardSpec("latent-b4plus", "latent", "Latent-ViT-B-4-512-plus", "Latent-ViT-B/4-plus"),
    RewardSpec("pixel-b32", "pixel", "ViT-B-32", "decode + CLIP ViT-B/32"),
    RewardSpec("pixel-l14", "pixel", "ViT-L-14", "decode + CLIP ViT-L/14"),
    RewardSpec("pixel-h14", "pixel", "ViT-H-14", "decode + CLIP ViT-H/14"),
)}
BASELINE = "pixel-b32"  # the paper's decode-then-CLIP baseline


def load_latent_clip(model, *, device, dtype, backend: str):
    """``fastlclip.load`` with random weights (intended here, so its warning is silenced)."""
    import fastlclip

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        m = fastlclip.load(model, device=device, dtype=dtype, backend=backend)
    # The reward's per-call NaN check is a host sync every iteration; the benchmark times the compute.
    m.check_finite = False
    return m


def build(spec: RewardSpec, *, vae, device, dtype, backend: str = "eager", smoke: bool = False):
    """The reward for ``spec``; ``smoke`` swaps in the tiny configs of ``bench.tiny`` (same code path)."""
    import fastlclip

    if spec.kind == "latent":
        model = load_latent_clip(tiny.LATENT_CLIP if smoke else spec.model, device=device, dtype=dtype, backend=backend)
        return fastlclip.LatentCLIPReward(model)
    import open_clip

    if smoke:
        clip, tokenizer = tiny.open_clip_model(), None
    else:
        logging.disable(logging.WARNING)  # open_clip logs that no pretrained weights were loaded: intended
        try:
            with torch.device(device):
                clip = open_clip.create_model(spec.model, device=device)
        finally:
            logging.disable(logging.NOTSET)
        tokenizer = open_clip.get_tokenizer(spec.model)
    clip = clip.to(device=device, dtype=dtype)
    return fastlclip.PixelCLIPReward(vae, clip, tokenizer=tokenizer)


def _loss_grad_ms(reward, latents: torch.Tensor, prompt: str, repeats: int) -> tuple[float, torch.Tensor, float]:
    """Loss, gradient w.r.t. the latents, and median ms (CUDA events, after one warm-up call) of fwd + bwd."""
    times, loss, grad = [], None, None
    for i in range(repeats + 1):
        x = latents.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = reward(x, prompt)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        grad = x.grad
        if i:
            times.append(start.elapsed_time(end))
    return float(loss), grad, statistics.median(times)


def choose_latent_backend(requested: str, spec: RewardSpec, *, device, dtype, latent_shape, prompt: str,
                          repeats: int = 10) -> tuple[str, str]:
    """The backend to run and why.

    ``auto``: on CUDA, the fastest reward forward + backward among the backends whose loss and gradient
    agree with eager's (same random weights); eager elsewhere. A named backend that fails to load falls
    back to eager, said in the reason.
    """
    import fastlclip
    from fastlclip import model as fl_model

    if requested != "auto":
        try:
            load_latent_clip(spec.model, device=device, dtype=dtype, backend=requested)
        except (ValueError, RuntimeError, ImportError) as e:
            return "eager", f"backend {requested!r} unavailable ({e}); fell back to eager"
        return requested, f"backend {requested!r} as asked"
    if torch.device(device).type != "cuda":
        return "eager", "auto without CUDA: eager (the fast backends are CUDA-only)"
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    results, failures = {}, {}
    for backend in dict.fromkeys(("eager", *fl_model.BACKENDS)):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.manual_seed(0)  # the same random weights for every backend
                reward = fastlclip.LatentCLIPReward(load_latent_clip(spec.model, device=device, dtype=dtype, backend=backend))
                results[backend] = _loss_grad_ms(reward, latents, prompt, repeats)
            fell_back = [w for w in caught if issubclass(w.category, RuntimeWarning)
                         or w.category.__name__ == "BackendFallbackWarning"]
            if fell_back and backend != "eager":  # it ran a slower equivalent path: not this backend's own figure
                failures[backend] = f"fell back: {fell_back[0].message}"
                del results[backend]
        except Exception as e:  # noqa: BLE001 - any failure rules the backend out; the reason is reported
            failures[backend] = f"{type(e).__name__}: {e}"
        finally:
            reward = None
            gc.collect()  # drop the model (and any captured graphs) before the next backend loads
            torch.cuda.empty_cache()
    if "eager" not in results:
        raise RuntimeError(f"the eager Latent-CLIP reward does not run here: {failures['eager']}")
    ref_loss, ref_grad, _ = results["eager"]
    for backend, (loss, grad, _) in list(results.items()):
        cos = torch.nn.functional.cosine_similarity(grad.float().flatten(), ref_grad.float().flatten(), dim=0).item() \
            if grad is not None else float("nan")
        if not (abs(loss - ref_loss) <= 1e-2 * max(1.0, abs(ref_loss)) and cos >= 0.99):
            failures[backend] = f"disagrees with eager (loss {loss:.4g} vs {ref_loss:.4g}, gradient cosine {cos:.4f})"
            del results[backend]
    best = min(results, key=lambda b: results[b][2])
    shown = ", ".join(f"{b} {r[2]:.2f} ms" for b, r in results.items())
    failed = f"; ruled out: {failures}" if failures else ""
    return best, f"auto: fastest reward fwd+bwd agreeing with eager (median of {repeats}, CUDA events): {shown}{failed}"
