"""Latent-CLIP for any VAE: distil a pixel-space open_clip teacher into a latent student, without captions.

    fastlclip.distill.make_targets(["shards/"], "targets/", vae="flux1", teacher="ViT-B-16",
                                   teacher_pretrained="open_clip_model.safetensors")
    final = fastlclip.distill.train("targets/", "run/", student=cfg, teacher="ViT-B-16", ..., init="teacher")
    fastlclip.distill.evaluate(final, "targets/", classes=["cat", "dog"])
    model = fastlclip.load(None, final)   # a complete Latent-CLIP for that VAE

Modules: ``targets`` (decode + teacher embedding per key, on ``fastlclip.corpus``), ``teacher`` (the open_clip
side), ``train`` (loss, recipe, exact resume, DDP), ``evaluate``. Command line: ``python -m fastlclip.distill``.
"""

from .evaluate import evaluate
from .targets import make_targets, read_targets
from .train import train

__all__ = ["evaluate", "make_targets", "read_targets", "train"]
