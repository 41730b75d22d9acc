"""Zero-shot classification of latents, open_clip style."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .grids import MODEL_DEFAULT
from .inputs import check_count
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
        for what, seq, example in (("classnames must be a list of strings", classnames, "['cat', 'dog']"),
                                   ("templates must be a list of format strings or callables", templates, "['a photo of a {}.']")):
            if isinstance(seq, (str, bytes)):
                raise TypeError(f"{what}, got the str {seq!r}, which would be split into characters; wrap it in a list, "
                                f"e.g. {example}")
        if not classnames:
            raise ValueError("classnames is empty; pass at least two class names")
        if not templates:
            raise ValueError("templates is empty; e.g. pass ['a photo of a {}.']")
        self.model = model
        self.classnames = list(classnames)
        bad = [type(c).__name__ for c in self.classnames if not isinstance(c, str)]
        if bad:
            raise TypeError(f"classnames must be strings, got {bad[0]}")
        empty = [i for i, c in enumerate(self.classnames) if not c.strip()]
        if empty:
            raise ValueError(f"class name #{empty[0]} is empty ({self.classnames[empty[0]]!r}); every class needs a name "
                             "for the templates to describe")
        check_count(batch_size, "batch_size")
        if len(self.classnames) < 2:
            raise ValueError(f"a zero-shot classifier needs at least two class names, got {len(self.classnames)}: "
                             f"{self.classnames}; add the alternatives to tell it from (e.g. a neutral class)")
        fmt = [t if callable(t) else t.format for t in templates]
        texts = [f(c) for c in self.classnames for f in fmt]
        for j, t in enumerate(templates):
            per_class = texts[j::len(fmt)]
            if not all(isinstance(x, str) for x in per_class):
                raise TypeError(f"template #{j} must give a string, got {type(per_class[0]).__name__}")
            if len(set(per_class)) == 1:
                shown = repr(t) if isinstance(t, str) else f"#{j}"
                raise ValueError(f"template {shown} gives the same text for every class ({per_class[0]!r}), so it can't "
                                 "tell them apart; put {} where the class name goes, e.g. 'a photo of a {}.'")
        show = progress if progress is not None else len(texts) > 4 * batch_size
        feats = []
        with torch.no_grad():
            for i in tqdm(range(0, len(texts), batch_size), desc="zero-shot text", disable=not show):
                feats.append(model.encode_text(texts[i:i + batch_size]).float())
        per_class = torch.cat(feats).view(len(self.classnames), len(fmt), -1).mean(dim=1)
        self.weights = F.normalize(per_class, dim=-1)  # (classes, embed_dim), float32

    def logits(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT) -> torch.Tensor:
        """(B, classes) logits; ``resize``: the latent-grid policy (``LatentCLIP.encode_latents``)."""
        return self.logits_of_features(self.model.encode_latents(latents, space=space, resize=resize))

    def logits_of_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of normalised image features (``encode_latents``'s), for callers that use the
        features for more than this (one tower forward for several scores)."""
        return self.model.logit_scale.exp().float() * feats.float() @ self.weights.to(feats.device).T

    def probs(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT) -> torch.Tensor:
        """(B, classes) softmax probabilities."""
        return self.logits(latents, space=space, resize=resize).softmax(dim=-1)

    def predict(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT) -> torch.Tensor:
        """(B,) index of the most likely class per latent (names: ``self.classnames[i]``).

        Latents whose scores are not finite are a ``ValueError``, never a class."""
        logits = self.logits(latents, space=space, resize=resize)
        bad = ~torch.isfinite(logits).all(dim=-1)
        if bad.any():  # argmax would call a NaN row class 0
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"latents {rows[:10]}{' ...' if len(rows) > 10 else ''} have non-finite class scores (NaN/Inf latents, "
                "or values so large the image tower overflows); no class can be predicted for them. Check the latents "
                "(model.check_finite = True names NaN/Inf input) or use probs(), which keeps the NaN"
            )
        return logits.argmax(dim=-1)
