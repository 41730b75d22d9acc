"""The rewards the cost benchmark compares, built with random weights, and the choice of Latent-CLIP backend."""

from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import fastlclip
from fastlclip import runtime

from . import tiny


@dataclass(frozen=True)
class RewardSpec:
    key: str
    kind: str  # "latent": Latent-CLIP on the latents; "pixel": a decode, then open_clip
    model: str  # fastlclip config name or open_clip model name
    label: str
    decoder: str | None = None  # pixel rewards: "vae" (the SDXL VAE, ReNO's) or "taesd" (the tiny autoencoder taesdxl)


REWARDS = {s.key: s for s in (
    RewardSpec("latent-b8", "latent", "Latent-ViT-B-8-512", "Latent-ViT-B/8"),
    RewardSpec("latent-b4plus", "latent", "Latent-ViT-B-4-512-plus", "Latent-ViT-B/4-plus"),
    RewardSpec("pixel-b32", "pixel", "ViT-B-32", "decode + CLIP ViT-B/32", "vae"),
    RewardSpec("pixel-l14", "pixel", "ViT-L-14", "decode + CLIP ViT-L/14", "vae"),
    RewardSpec("pixel-h14", "pixel", "ViT-H-14", "decode + CLIP ViT-H/14", "vae"),
    RewardSpec("taesd-b32", "pixel", "ViT-B-32", "TAESD-XL decode + CLIP ViT-B/32", "taesd"),
    RewardSpec("taesd-h14", "pixel", "ViT-H-14", "TAESD-XL decode + CLIP ViT-H/14", "taesd"),
)}
BASELINE = "pixel-b32"  # the paper's decode-then-CLIP baseline
# A tiny AutoencoderTiny for the CPU smoke runs (factor 8 like taesdxl: 3 upsamplings), random weights.
TINY_TAESD = {"encoder_block_out_channels": [8, 8, 8, 8], "decoder_block_out_channels": [8, 8, 8, 8],
              "num_encoder_blocks": [1, 1, 1, 1], "num_decoder_blocks": [1, 1, 1, 1], "latent_channels": 4,
              "scaling_factor": 1.0}


def tiny_autoencoder(*, device, dtype, smoke: bool = False):
    """``diffusers.AutoencoderTiny`` built offline from the shipped taesdxl config (random weights: for timing; load
    ``AutoencoderTiny.from_pretrained(local_folder)`` for real use), or a tiny one for the smoke runs."""
    from diffusers import AutoencoderTiny

    from fastlclip.model_configs import taesdxl_config

    with torch.device(device):
        taesd = AutoencoderTiny.from_config(TINY_TAESD if smoke else taesdxl_config())
    nn.Module.to(taesd, device=device, dtype=dtype)  # nn.Module.to: ModelMixin.to warns about fp32-only modules it lacks
    return taesd.eval().requires_grad_(False)


def load_latent_clip(model, *, device, dtype, backend: str, resize: str | None = "interpolate"):
    """``fastlclip.load`` with random weights (intended here, so its warning is silenced). ``resize``: the
    latent-grid policy for generators at other sizes than the tower's (1024 px: 128x128 latents)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        m = fastlclip.load(model, device=device, dtype=dtype, backend=backend, resize=resize)
    # The reward's per-call NaN check is a host sync every iteration; the benchmark times the compute.
    m.check_finite = False
    return m


def build(spec: RewardSpec, *, vae, device, dtype, backend: str = "eager", smoke: bool = False,
          resize: str | None = "interpolate"):
    """The reward for ``spec``; ``smoke`` swaps in the tiny configs of ``bench.tiny`` (same code path)."""
    if spec.kind == "latent":
        model = load_latent_clip(tiny.LATENT_CLIP if smoke else spec.model, device=device, dtype=dtype, backend=backend,
                                 resize=resize)
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
    if spec.decoder == "taesd":
        vae = tiny_autoencoder(device=device, dtype=dtype, smoke=smoke)
    reward = fastlclip.PixelCLIPReward(vae, clip, tokenizer=tokenizer)
    reward.check_finite = False  # as the Latent-CLIP rows: no per-call host sync on either side of a comparison
    return reward


def _loss_grad(model, latents: torch.Tensor, prompt: str) -> tuple[float, torch.Tensor]:
    """Reward loss and its gradient w.r.t. ``latents`` with ``model``'s current backend."""
    x = latents.detach().requires_grad_(True)
    loss = fastlclip.LatentCLIPReward(model)(x, prompt)
    (grad,) = torch.autograd.grad(loss, x)
    return float(loss), grad


# When a backend "agrees" with eager, per model dtype: (the loss's difference in cosine units, |dloss| /
# logit_scale.exp(); the least cosine between the two gradients). fp32: both are exact up to reduction order, so
# 1e-4 / 0.9999. bf16/fp16: a unit roundoff of 2^-9 (bf16) per element; two implementations of a 12-layer tower
# land a few roundoffs apart, about 1e-3 in a cosine of unit features, so 5e-3 passes that and fails what the
# old bound (the loss within ~1.0, i.e. 0.07 in cosine at the random-weights scale 14.3) let through; gradients
# go through the backward's extra roundings, so 0.99 as before.
AGREEMENT = {torch.float32: (1e-4, 0.9999), torch.float16: (5e-3, 0.99), torch.bfloat16: (5e-3, 0.99)}


def agreement(loss: float, ref_loss: float, grad: torch.Tensor, ref_grad: torch.Tensor, logit_scale: float,
              dtype: torch.dtype) -> tuple[bool, str]:
    """Whether a backend's reward loss and gradient agree with eager's (``AGREEMENT``), and the figures."""
    cos_tol, grad_tol = AGREEMENT.get(dtype, AGREEMENT[torch.bfloat16])
    dcos = abs(loss - ref_loss) / logit_scale
    gcos = torch.nn.functional.cosine_similarity(grad.double().flatten(), ref_grad.double().flatten(), dim=0).item()
    ok = dcos <= cos_tol and gcos >= grad_tol
    return ok, (f"loss {loss:.6g} vs {ref_loss:.6g} (cosine off by {dcos:.2e}, at most {cos_tol:g}), gradient cosine "
                f"{gcos:.5f} (at least {grad_tol:g})")


def _fell_back(caught) -> list:
    return [w for w in caught if issubclass(w.category, RuntimeWarning) or w.category.__name__ == "BackendFallbackWarning"]


def fastest_agreeing_backend(model, latents: torch.Tensor, prompt: str, backends=None, *, trials: int = 5,
                             steps: int = 20) -> tuple[str, str]:
    """``auto`` on one loaded model: each backend timed by ``fastlclip.runtime.time_backends`` (the timing the
    library's own ``backend="auto"`` uses), kept only when it runs as itself (no fallback warning) and its loss
    and gradient on ``latents`` and ``prompt`` agree with eager's. Leaves ``model`` on eager."""
    backends = list(dict.fromkeys(("eager", *(backends or runtime.BACKENDS))))
    times, failures, checks = {}, {}, {}
    for backend in backends:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                timed, failed = runtime.time_backends(model, (backend,), trials=trials, steps=steps)
                if backend in timed:
                    model.set_backend(backend)
                    checks[backend] = _loss_grad(model, latents, prompt)
        except Exception as e:  # noqa: BLE001 - any failure rules the backend out; the reason is reported
            failed = {backend: f"{type(e).__name__}: {e}"}
            timed = {}
        finally:
            model.set_backend("eager")
            gc.collect()  # drop captured graphs before the next backend
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        fell_back = _fell_back(caught)
        if backend not in timed:
            failures[backend] = failed.get(backend, "skipped by time_backends (its kernels cannot run here)")
        elif fell_back and backend != "eager":  # it ran a slower equivalent path: not this backend's own figure
            failures[backend] = f"fell back: {fell_back[0].message}"
        else:
            times[backend] = timed[backend]
    if "eager" not in times:
        raise RuntimeError(f"the eager Latent-CLIP reward does not run here: {failures.get('eager')}")
    ref_loss, ref_grad = checks["eager"]
    logit_scale = model.logit_scale.detach().float().exp().item()
    for backend in list(times):
        loss, grad = checks[backend]
        ok, figures = agreement(loss, ref_loss, grad, ref_grad, logit_scale, model.dtype)
        if not ok:
            failures[backend] = f"disagrees with eager ({figures})"
            del times[backend]
    best = min(times, key=times.get)
    shown = ", ".join(f"{b} {ms:.2f} ms" for b, ms in times.items())
    failed = f"; ruled out: {failures}" if failures else ""
    return best, (f"auto: fastest batch-1 reward step (fastlclip.runtime.time_backends: median of {trials} x {steps} "
                  f"back-to-back calls, CUDA events) agreeing with eager: {shown}{failed}")


def choose_latent_backend(requested: str, spec: RewardSpec, *, device, dtype, latent_shape, prompt: str,
                          trials: int = 5, steps: int = 20, resize: str | None = "interpolate") -> tuple[str, str]:
    """The backend to run and why.

    ``auto``: on CUDA, :func:`fastest_agreeing_backend` on one model (random weights); eager elsewhere. A
    named backend is taken as asked, without loading a model to probe it (an unknown name is a ValueError,
    never a silent eager run); if it then fails to build, the benchmark records that configuration's error.
    """
    if requested != "auto":
        if requested not in runtime.BACKENDS:
            raise ValueError(f"unknown Latent-CLIP backend {requested!r}: choose auto or one of {', '.join(runtime.BACKENDS)}")
        return requested, f"backend {requested!r} as asked"
    if torch.device(device).type != "cuda":
        return "eager", "auto without CUDA: eager (the fast backends are CUDA-only)"
    torch.manual_seed(0)
    model = load_latent_clip(spec.model, device=device, dtype=dtype, backend="eager", resize=resize)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    try:
        return fastest_agreeing_backend(model, latents, prompt, trials=trials, steps=steps)
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
