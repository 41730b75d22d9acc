"""What a tiny-autoencoder decode buys in gradient fidelity, measured on tiny models (CPU, seconds).

A TAESD-style decoder (``diffusers.AutoencoderTiny``) is trained to imitate a VAE's decode, as madebyollin's
taesdxl imitates the SDXL VAE. Here both are tiny (``bench.tiny.VAE``, ``bench.rewards.TINY_TAESD``): the VAE
keeps random weights, the tiny decoder is distilled onto it for a few hundred steps on random diffusion
latents. Then, on held-out latents, the gradient that ``PixelCLIPReward(taesd, clip)`` sends to the latents
is compared (cosine) with ``PixelCLIPReward(vae, clip)``'s, same CLIP, next to the untrained decoder's.
This shows the *kind* of approximation a user buys; the figure says nothing about taesdxl against the real
SDXL VAE: with real weights the comparison must be repeated (``gradient_cosines`` takes any two decoders).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

import fastlclip

from . import rewards as bench_rewards, tiny

PROMPT = "a photo of a red dog and a green cat"


def gradient_cosines(vae, taesd, clip, latents: torch.Tensor, prompt: str = PROMPT) -> list[float]:
    """Per-sample cosine between the latent gradients of decode-then-CLIP with ``taesd`` and with ``vae``."""
    full, approx = fastlclip.PixelCLIPReward(vae, clip), fastlclip.PixelCLIPReward(taesd, clip)
    out = []
    for z in latents.split(1):
        grads = []
        for reward in (full, approx):
            x = z.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(reward(x, prompt), x)
            grads.append(g.flatten().float())
        out.append(F.cosine_similarity(grads[0], grads[1], dim=0).item())
    return out


def distill(vae, taesd, *, steps: int, batch: int = 8, lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Train ``taesd``'s decoder to match ``vae``'s decode on random diffusion latents; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    side = tiny.IMAGE_SIZE // 8
    params = list(taesd.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        z = torch.randn(batch, 4, side, side, generator=g)
        with torch.no_grad():
            target = vae.decode(z / vae.config.scaling_factor).sample
        loss = F.mse_loss(taesd.decode(z).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return losses


def tiny_fidelity(steps: int = 300, samples: int = 8, seed: int = 0) -> dict:
    """The gradient-cosine comparison on tiny models (see the module docstring)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny.VAE).eval().requires_grad_(False)
    clip = tiny.open_clip_model().eval()
    taesd = bench_rewards.tiny_autoencoder(device="cpu", dtype=torch.float32, smoke=True)
    held_out = torch.randn(samples, 4, tiny.IMAGE_SIZE // 8, tiny.IMAGE_SIZE // 8,
                           generator=torch.Generator().manual_seed(seed + 1))
    before = gradient_cosines(vae, taesd, clip, held_out)
    losses = distill(vae, taesd, steps=steps, seed=seed)
    after = gradient_cosines(vae, taesd, clip, held_out)
    with torch.no_grad():
        target = vae.decode(held_out / vae.config.scaling_factor).sample
        pixel_mse = F.mse_loss(taesd.decode(held_out).sample, target).item()
    return {
        "what": "gradient cosine, TAESD-style decode + CLIP vs VAE decode + CLIP, on the latents (tiny models, CPU)",
        "distill_steps": steps, "distill_mse_first": losses[0], "distill_mse_last": losses[-1],
        "held_out_pixel_mse": pixel_mse, "held_out_pixel_var": target.var().item(),
        "cosine_untrained_median": statistics.median(before), "cosine_distilled_median": statistics.median(after),
        "cosine_distilled_min": min(after), "samples": samples,
        "caveat": "tiny random-weight VAE and a tiny decoder distilled onto it for a few hundred steps: this shows the "
                  "kind of approximation, not taesdxl's; with real weights (SDXL VAE, taesdxl) the comparison must be "
                  "repeated (bench.fidelity.gradient_cosines)",
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import positive_int

    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=positive_int, default=300, help="distillation steps (default 300)")
    p.add_argument("--samples", type=positive_int, default=8, help="held-out latents (default 8)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    r = tiny_fidelity(args.steps, args.samples, args.seed)
    print(f"{r['what']}, median over {r['samples']} latents: untrained {r['cosine_untrained_median']:.3f}, "
          f"distilled for {r['distill_steps']} steps {r['cosine_distilled_median']:.3f} "
          f"(min {r['cosine_distilled_min']:.3f}); pixel MSE {r['held_out_pixel_mse']:.4f} against a pixel variance "
          f"of {r['held_out_pixel_var']:.4f}.\nCaveat: {r['caveat']}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
