"""Latent-CLIP for any VAE: distil a pixel-space open_clip teacher into a latent student, without captions.

    fastlclip.distill.make_targets(["shards/"], "targets/", vae="flux1", teacher="ViT-B-16",
                                   teacher_pretrained="open_clip_model.safetensors")
    final = fastlclip.distill.train("targets/", "run/", student=cfg, teacher="ViT-B-16", ..., init="teacher")
    fastlclip.distill.evaluate(final, "targets/", classes=["cat", "dog"])
    model = fastlclip.load(None, final)   # a complete Latent-CLIP for that VAE

A teacher set (reward ensembles, docs/ensembles.md): ``make_targets(..., teachers=specs)``, ``train(...,
teachers=specs)`` (a multi-head student, an ensemble file), ``evaluate_ensemble_file(final, "eval_targets/",
specs, weights)`` (per head and weighted total: cosine, Spearman, within-prompt pairwise agreement).

Modules: ``targets`` (decode + teacher embedding per key, on ``fastlclip.corpus``), ``teacher`` (the open_clip
side), ``teachers`` (teacher sets), ``train`` (loss, recipe, exact resume, DDP), ``evaluate``, ``agreement``
(the ensemble's metrics). Command line: ``python -m fastlclip.distill``.
"""

from .evaluate import evaluate, evaluate_ensemble_file
from .targets import make_targets, read_targets
from .train import train

__all__ = ["evaluate", "evaluate_ensemble_file", "make_targets", "read_targets", "train"]
