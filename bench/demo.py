"""``python -m bench.demo``: load a Latent-CLIP model and score latents against prompts (CPU-friendly)."""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import fastlclip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    p.add_argument("--model", default="Latent-ViT-B-8-512", choices=fastlclip.list_models())
    p.add_argument("--pretrained", default=None, help="checkpoint (default: random weights)")
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if a.pretrained is None else "default")
        model = fastlclip.load(a.model, a.pretrained, device=device)
    print(f"{a.model} on {device}, " + ("RANDOM weights: scores are meaningless, timings are not" if a.pretrained is None else f"weights {a.pretrained}"))
    torch.manual_seed(0)
    latents = torch.randn(a.batch, 4, model.latent_size, model.latent_size, device=device) * fastlclip.SDXL_SCALING_FACTOR
    prompts = ["a photo of a cat", "a red sports car", "an astronaut riding a horse", "a bowl of fruit"]
    reward = fastlclip.LatentCLIPReward(model)
    with torch.no_grad():
        cos = reward.score(latents, prompts[:1] * a.batch)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            reward.score(latents, prompts[:1] * a.batch)
            times.append(time.perf_counter() - t0)
    print(f"cosine to {prompts[0]!r}: {[round(c, 4) for c in cos.tolist()]}")
    print(f"image-tower forward, batch {a.batch}: median {sorted(times)[2] * 1e3:.1f} ms on {device} (wall clock, 5 runs)")


if __name__ == "__main__":
    main()
