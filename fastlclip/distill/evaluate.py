"""``evaluate(checkpoint, targets, classes=None)``: how closely a student follows its teacher on held-out targets."""

from __future__ import annotations

import json
from typing import Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import read_checkpoint
from .targets import read_targets
from .train import DISTILL_META_KEY, Student

NOISE_LEVELS = (0.25, 0.5, 0.75)


def evaluate(checkpoint, targets, classes: Sequence[str] | None = None, *, templates=("a photo of a {}.",),
             holdout: float | None = None, noise_levels=NOISE_LEVELS, seed: int = 0, batch_size: int = 256,
             device: str = "cpu") -> dict:
    """Student against teacher on the held-out rows of ``targets``.

    Returns ``rows``; ``cosine``, the mean cosine between the student's and the teacher's embeddings;
    ``baseline_cosine``, what the best constant embedding (the rows' normalised mean) scores, the floor a
    student must clear; with ``classes``, ``zeroshot_agreement``: the fraction of rows whose top-1 class over
    ``templates`` prompts (the student's text tower, which is the teacher's) is the same for both embeddings.
    A noise-aware student adds ``per_noise_level``: the same figures on ``x_s = (1 - s) x + s eps`` (fixed
    noise, ``seed``) for each ``s`` in ``noise_levels``.

    ``holdout``: the held-out fraction (default: the one the student was trained with, from the checkpoint's
    metadata; 0 evaluates every row, e.g. a separate targets folder).
    """
    with torch.no_grad():  # a context, not a decorator: mutation testing skips decorated functions
        import fastlclip

        model = fastlclip.load(None, checkpoint, device=device)
        model.check_finite = False
        if holdout is None:
            _, meta = read_checkpoint(checkpoint)
            holdout = json.loads(meta.get(DISTILL_META_KEY, "{}")).get("holdout", 0.0)
        data = read_targets(targets)
        check_same_vae(model, data.info, checkpoint, targets)
        rows = data.split(holdout)[1] if holdout else data
        if len(rows) == 0:
            raise ValueError(f"no held-out rows in {targets} at holdout={holdout}")
        noise_aware = bool(getattr(model, "noise_aware", False))
        student = Student(model, noise_aware)
        text = None
        if classes:
            prompts = [t.format(c) for c in classes for t in templates]
            per_template = model.encode_text(prompts).float().view(len(classes), len(templates), -1)
            text = F.normalize(per_template.mean(1), dim=-1)
        teacher = F.normalize(rows.embeddings.float(), dim=-1).to(device)
        levels = [None, *(noise_levels if noise_aware else ())]
        g = torch.Generator().manual_seed(seed)
        eps_all = torch.randn(len(rows), *rows.latents.shape[1:], generator=g) if noise_aware else None
        embs = {s: [] for s in levels}
        for i in range(0, len(rows), batch_size):
            raw = rows.latents[i:i + batch_size].to(device, torch.float32)
            for s in levels:
                if s is None:
                    embs[s].append(student(raw).float())
                else:
                    eps = eps_all[i:i + batch_size].to(device)
                    embs[s].append(student(raw, torch.full((len(raw),), float(s), device=device), eps).float())
        mean = F.normalize(teacher.mean(0), dim=0)

        def figures(emb: torch.Tensor) -> dict:
            out = {"cosine": (emb * teacher).sum(-1).mean().item()}
            if text is not None:
                same = (emb @ text.T).argmax(1) == (teacher @ text.T).argmax(1)
                out["zeroshot_agreement"] = same.float().mean().item()
            return out

        result = {"rows": len(rows), **figures(torch.cat(embs[None])),
                  "baseline_cosine": (teacher @ mean).mean().item()}
        if noise_aware:
            result["per_noise_level"] = {str(s): figures(torch.cat(embs[s])) for s in levels[1:]}
        return result


def _vae_key(cfg: dict) -> str:
    """A VAE config as compared: its settings, without diffusers' bookkeeping keys (``_name_or_path``, ...)."""
    return json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)


def check_same_vae(model, info: dict, checkpoint, targets) -> None:
    """A ``ValueError`` unless the student reads the latent space the targets were made in: the same VAE config
    (channels, scaling, shift, layout) and, when both are registered names, the same name. A student scored on
    latents of another VAE with the same channel count gives figures that mean nothing."""
    from .. import vaes

    theirs = info.get("vae_cfg")
    if not isinstance(theirs, dict):
        raise ValueError(f"{targets}: its run.json records no vae_cfg: remake the targets with this version")
    name, label = model.cfg.vae_name, info.get("vae")
    both_named = name in vaes.list_vaes() and label in vaes.list_vaes()
    if _vae_key(model.cfg.vae) != _vae_key(theirs) or (both_named and name != label):
        ours, other = model.latent_space, vaes.latent_space(theirs)
        raise ValueError(
            f"the student {checkpoint} reads latents of the VAE {name!r} ({ours.channels} channels, scaling "
            f"{ours.scaling_factor}, shift {ours.shift_factor}); the targets {targets} were made with {label!r} "
            f"({other.channels} channels, scaling {other.scaling_factor}, shift {other.shift_factor}; other settings "
            "differ if these agree): evaluate on targets made with the student's VAE")
