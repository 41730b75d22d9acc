"""Zero-shot classification of latents, open_clip style."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .grids import MODEL_DEFAULT
from .model import LatentCLIP


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names as open_clip ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates(simple: bool = False) -> list[Callable[[str], str]]:
    """OpenAI's 80 ImageNet prompt templates (or open_clip's 2 simple ones)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(SIMPLE_IMAGENET_TEMPLATES if simple else OPENAI_IMAGENET_TEMPLATES)


class ZeroShotClassifier:
    """Class weights = mean of each class's normalised template embeddings, renormalised.

    ``templates`` are callables (``lambda c: f"a photo of a {c}."``) or format strings with ``{}``.
    """

    def __init__(self, model: LatentCLIP, classnames: Sequence[str], templates: Sequence, *,
                 batch_size: int = 256, progress: bool | None = None):
        if not classnames:
            raise ValueError("classnames is empty; pass at least two class names")
        if not templates:
            raise ValueError("templates is empty; e.g. pass ['a photo of a {}.']")
        self.model = model
        self.classnames = list(classnames)
        fmt = [t if callable(t) else t.format for t in templates]
        texts = [f(c) for c in self.classnames for f in fmt]
        show = progress if progress is not None else len(texts) > 4 * batch_size
        feats = []
        with torch.no_grad():
            for i in tqdm(range(0, len(texts), batch_size), desc="zero-shot text", disable=not show):
                feats.append(model.encode_text(texts[i:i + batch_size]).float())
        per_class = torch.cat(feats).view(len(self.classnames), len(fmt), -1).mean(dim=1)
        self.weights = F.normalize(per_class, dim=-1)  # (classes, embed_dim), float32

    def logits(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT) -> torch.Tensor:
        """(B, classes) logits; ``resize``: the latent-grid policy (``LatentCLIP.encode_latents``)."""
        feats = self.model.encode_latents(latents, space=space, resize=resize).float()
        return self.model.logit_scale.exp().float() * feats @ self.weights.T

    def probs(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT) -> torch.Tensor:
        """(B, classes) softmax probabilities."""
        return self.logits(latents, space=space, resize=resize).softmax(dim=-1)

    def predict(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT) -> torch.Tensor:
        """(B,) index of the most likely class per latent (names: ``self.classnames[i]``)."""
        return self.logits(latents, space=space, resize=resize).argmax(dim=-1)
