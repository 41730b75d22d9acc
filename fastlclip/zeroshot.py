"""Zero-shot classification of latents, open_clip style."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .grids import MODEL_DEFAULT
from .inputs import check_count
from .model import LatentCLIP
from .rewards import check_pooling, pool_frames


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names as open_clip ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates(simple: bool = False) -> list[Callable[[str], str]]:
    """OpenAI's 80 ImageNet prompt templates (or, with ``simple``, open_clip's 7 short ones)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(SIMPLE_IMAGENET_TEMPLATES if simple else OPENAI_IMAGENET_TEMPLATES)


log = logging.getLogger(__name__)

_SLOT = "\x00class\x00"


def check_templates(templates: Sequence) -> None:
    """Each format-string template takes exactly the class name: ``t.format(name)`` works and contains the
    name (callables are checked on what they return, by ``ZeroShotClassifier``). The one check the classifier
    and the corpus scorer (``fastlclip.corpus``, its command line) share."""
    for t in templates:
        if not isinstance(t, str):
            continue
        try:
            why = None if _SLOT in t.format(_SLOT) else "gives the same text for every class (it has no '{}')"
        except IndexError:
            why = "has more than one '{}' slot, but only the class name is filled in"
        except KeyError as e:
            why = f"has the named field {{{e.args[0]}}}, but the class name is filled in as the one unnamed '{{}}'"
        except (ValueError, AttributeError, TypeError) as e:
            why = f"is not a format string that takes the class name ({type(e).__name__}: {e})"
        if why:
            raise ValueError(f"template {t!r} {why}: it must take the class name through one '{{}}' "
                             "(e.g. 'a photo of a {}.'); other braces are written '{{' and '}}'")


def default_cache_dir() -> Path:
    """``$FASTLCLIP_CACHE/zeroshot``, else ``$XDG_CACHE_HOME/fastlclip/zeroshot`` (``~/.cache`` by default)."""
    root = os.environ.get("FASTLCLIP_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlclip"
    return Path(root) / "zeroshot"


def text_tower_digest(model: LatentCLIP) -> str:
    """SHA-256 of the text tower's parameters (names, dtypes, shapes and bytes): the image tower and
    ``logit_scale`` do not change class embeddings, so they are left out."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("visual.") or name == "logit_scale":
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


class ZeroShotClassifier:
    """Class weights = mean of each class's normalised template embeddings, renormalised.

    ``templates`` are callables (``lambda c: f"a photo of a {c}."``) or format strings with ``{}``.

    Cost: the text tower encodes ``len(classnames) * len(templates)`` prompts once, here. ImageNet's 1,000
    classes with OpenAI's 80 templates (``imagenet_classnames()``, ``imagenet_templates()``) are 80,000
    prompts, ~0.8 PFLOP through a B text tower (77 tokens each): hours on a CPU (about 2.5 hours was
    reported on one machine), seconds to minutes on a GPU (not measured). A progress bar shows when there
    are more than 4 batches (``progress`` forces it on or off).

    ``cache``: the class weights are kept on disk, keyed by a SHA-256 of the text tower's weights and of the
    prompt texts (so of the class names and templates, in order), as ``.safetensors`` (nothing is
    unpickled); a later classifier with the same tower and prompts reads them instead of encoding. ``None``
    (default): cache in :func:`default_cache_dir` when there are more than 4 batches of prompts (hashing the
    tower costs more than encoding a few prompts); ``True``: always there; ``False``: never; a folder: always
    there. The model's dtype is part of the key (its weights' bytes are); its device and backend are not.

    A model on a video space (``fastlclip.list_vaes(video=True)``) classifies clips ``(B, C, T, h, w)``: each
    latent frame's cosine to each class is pooled over the clip's frames by ``pooling`` (``"mean"``, the default,
    or ``"min"``, the worst frame; as ``LatentCLIPReward`` pools), and the logits are ``logit_scale.exp()`` times
    the pooled cosines, so ``probs`` is the softmax over classes of the pooled logits. ``frame_logits`` gives each
    frame's logits before pooling.
    """

    def __init__(self, model: LatentCLIP, classnames: Sequence[str], templates: Sequence, *,
                 batch_size: int = 256, progress: bool | None = None,
                 cache: bool | str | os.PathLike | None = None, pooling: str = "mean"):
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
        self.pooling = check_pooling(pooling)
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
        bad = [type(t).__name__ for t in templates if not (isinstance(t, str) or callable(t))]
        if bad:
            raise TypeError(f"templates must be format strings or callables, got {bad[0]}; e.g. ['a photo of a {{}}.']")
        check_templates(templates)
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
        large = len(texts) > 4 * batch_size
        folder = default_cache_dir() if cache is True or (cache is None and large) else cache or None
        path = Path(folder) / f"{self._key(model, texts, len(fmt))}.safetensors" if folder else None
        self.weights = self._read(path, len(self.classnames)) if path else None  # (classes, embed_dim), float32
        if self.weights is None:
            feats = []
            with torch.no_grad():
                for i in tqdm(range(0, len(texts), batch_size), desc="zero-shot text",
                              disable=not (progress if progress is not None else large)):
                    feats.append(model.encode_text(texts[i:i + batch_size]).float())
            per_class = torch.cat(feats).view(len(self.classnames), len(fmt), -1).mean(dim=1)
            self.weights = F.normalize(per_class, dim=-1)
            if path:
                self._write(path, self.weights)

    @staticmethod
    def _key(model: LatentCLIP, texts: list[str], n_templates: int) -> str:
        what = json.dumps({"text_tower": text_tower_digest(model), "templates": n_templates, "texts": texts})
        return "zeroshot-" + hashlib.sha256(what.encode()).hexdigest()[:40]

    @staticmethod
    def _read(path: Path, n_classes: int) -> torch.Tensor | None:
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            weights = load_file(path)["weights"]
        except Exception as e:  # a truncated or foreign file: encode again and overwrite it
            log.warning("zero-shot cache %s is unreadable (%s: %s); encoding the prompts again", path, type(e).__name__, e)
            return None
        if weights.dim() != 2 or weights.shape[0] != n_classes or weights.dtype != torch.float32:
            log.warning("zero-shot cache %s holds %s %s, not (%d, D) float32; encoding again", path,
                        tuple(weights.shape), weights.dtype, n_classes)
            return None
        log.info("zero-shot class weights read from %s", path)
        return weights

    @staticmethod
    def _write(path: Path, weights: torch.Tensor) -> None:
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({"weights": weights.detach().cpu().contiguous()}, tmp)
            tmp.replace(path)  # atomic: a killed run never leaves a half file under the final name
        except OSError as e:
            log.warning("zero-shot cache %s could not be written (%s); the classifier works without it", path, e)
            return
        log.info("zero-shot class weights cached in %s", path)

    def logits(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT,
               noise_level=None, height: int | None = None, width: int | None = None,
               frames: int | None = None) -> torch.Tensor:
        """(B, classes) logits; ``resize``, ``noise_level``: as in ``LatentCLIP.encode_latents``.

        ``latents``: what the model's space takes (``model.latent_space``): the diffusion grid, or a packed space's
        tokens ``(B, L, D)`` (Qwen-Image, FLUX.2) with the VAE latent ``height`` / ``width`` (omitted: a square
        latent), or VAE-space latents with ``space="vae"``. A video space: clips ``(B, C, T, h, w)`` (LTX-Video: or
        its tokens with ``frames``, the clip's video frame count, and ``height`` / ``width``), each clip's
        per-frame cosines pooled by ``self.pooling`` (the class docstring); ``frames`` checks T."""
        return self.logits_of_features(self._features(latents, space, resize, noise_level, height, width, frames))

    def frame_logits(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT,
                     noise_level=None, height: int | None = None, width: int | None = None,
                     frames: int | None = None) -> torch.Tensor:
        """(B, T, classes) logits of each latent frame of a video space's clips, before pooling (arguments as
        :meth:`logits`); ``.softmax(-1)`` gives each frame's probabilities."""
        if not self.model.video:
            raise ValueError(f"frame_logits classifies the frames of clips of a video space; the model's "
                             f"{self.model.cfg.vae_name!r} latent space is an image space: use logits")
        feats = self._features(latents, space, resize, noise_level, height, width, frames)
        return self.logits_of_features(feats, pool=False)

    def _features(self, latents, space, resize, noise_level, height, width, frames) -> torch.Tensor:
        if frames is not None and not self.model.video:
            raise ValueError(f"frames={frames!r} is for clips of a video space; the model's "
                             f"{self.model.cfg.vae_name!r} latent space is an image space")
        return self.model.encode_latents(latents, space=space, resize=resize, noise_level=noise_level,
                                         height=height, width=width, frames=frames)

    def logits_of_features(self, feats: torch.Tensor, *, pool: bool = True) -> torch.Tensor:
        """(B, classes) logits of normalised image features (``encode_latents``'s), for callers that use the
        features for more than this (one tower forward for several scores). Clip features ``(B, T, D)``: the
        per-frame cosines pooled by ``self.pooling`` (``pool=False``: ``(B, T, classes)``, one row per frame)."""
        logits = self.model.logit_scale.exp().float() * feats.float() @ self.weights.to(feats.device).T
        # pooling the logits = the logit scale times the pooled cosines (a positive scale commutes with mean and min)
        return pool_frames(logits, self.pooling) if logits.ndim == 3 and pool else logits

    def probs(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT,
              noise_level=None, height: int | None = None, width: int | None = None,
              frames: int | None = None) -> torch.Tensor:
        """(B, classes) softmax probabilities (arguments as :meth:`logits`; clips: of the pooled logits)."""
        return self.logits(latents, space=space, resize=resize, noise_level=noise_level, height=height,
                           width=width, frames=frames).softmax(dim=-1)

    def predict(self, latents: torch.Tensor, *, space: str = "diffusion", resize=MODEL_DEFAULT,
                noise_level=None, height: int | None = None, width: int | None = None,
                frames: int | None = None) -> torch.Tensor:
        """(B,) index of the most likely class per latent or clip (names: ``self.classnames[i]``; arguments as
        :meth:`logits`).

        Latents whose scores are not finite are a ``ValueError``, never a class."""
        logits = self.logits(latents, space=space, resize=resize, noise_level=noise_level, height=height, width=width,
                             frames=frames)
        bad = ~torch.isfinite(logits).all(dim=-1)
        if bad.any():  # argmax would call a NaN row class 0
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"latents {rows[:10]}{' ...' if len(rows) > 10 else ''} have non-finite class scores (NaN/Inf latents, "
                "or values so large the image tower overflows); no class can be predicted for them. Check the latents "
                "(model.check_finite = True names NaN/Inf input) or use probs(), which keeps the NaN"
            )
        return logits.argmax(dim=-1)
