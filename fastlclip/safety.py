"""Latent-space safety: guidance away from harmful concepts and a safety checker, neither of which decodes.

Both compare a latent's Latent-CLIP image feature with text features of harmful-concept categories and of a
neutral reference set. A category's score is the cosine margin

    score_c = cos(image, concept_c) - cos(image, neutral)

which is > 0 exactly when a two-way zero-shot classifier (concept vs. neutral, equal priors) picks the
concept. Category and neutral features are the normalised mean of their texts' normalised features, as in
zero-shot classification. The default concept texts cover I2P's seven categories; they and the neutral
texts are a starting point, not a calibrated set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import inputs
from .grids import MODEL_DEFAULT
from .model import LatentCLIP
from .inputs import check_count, check_number, check_prompt, prompt_list
from .loss import clip_loss, logit_scale_exp
from .rewards import LatentCLIPReward

# I2P's categories (Schramowski et al., "Safe Latent Diffusion", 2023), each with a few describing texts.
DEFAULT_CONCEPTS: dict[str, tuple[str, ...]] = {
    "hate": ("an image of hate", "an image of hateful symbols", "an image of racist propaganda"),
    "harassment": ("an image of harassment", "an image of bullying", "an image of humiliation"),
    "violence": ("an image of violence", "an image of a violent attack", "an image of blood and gore"),
    "self-harm": ("an image of self-harm", "an image of suicide", "an image of self-inflicted wounds"),
    "sexual": ("an image of sexual content", "an image of nudity", "an image of explicit pornography"),
    "shocking": ("an image of shocking content", "an image of a mutilated body", "an image of grotesque horror"),
    "illegal activity": ("an image of illegal activity", "an image of drug use", "an image of theft and vandalism"),
}
# The reference a concept must beat: ordinary content, worded like the concept texts.
DEFAULT_NEUTRAL: tuple[str, ...] = (
    "an image of something ordinary", "an image of a person", "an image of a landscape", "an image of an animal",
    "an image of an object", "an image of a room", "an image of food", "an image of a city street",
)
# Margin above which a category is flagged: the zero-shot decision boundary, not a calibrated value.
DEFAULT_THRESHOLD = 0.0


def check_latent_size(height, width) -> None:
    """The VAE latent ``height`` / ``width`` a packed space's tokens are unpacked with: both None, or two positive
    integers."""
    if height is None and width is None:
        return
    for what, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be the VAE latent's {what} (a positive integer: the image's / the VAE "
                             f"factor) or None with {'width' if what == 'height' else 'height'} None too (a square "
                             f"latent), got {v!r}")


class _ConceptBank:
    """(K + 1, D) text features (float32 or wider), the K categories then the neutral reference, from a reward's text cache."""

    def __init__(self, reward: LatentCLIPReward, concepts: Mapping[str, Sequence[str] | str] | None,
                 neutral: Sequence[str] | None):
        concepts = DEFAULT_CONCEPTS if concepts is None else concepts
        neutral = DEFAULT_NEUTRAL if neutral is None else neutral
        if not isinstance(concepts, Mapping) or not concepts:
            raise ValueError("concepts must be a non-empty mapping {category: [texts]}, e.g. "
                             "{'violence': ['an image of violence']}; None gives fastlclip.safety.DEFAULT_CONCEPTS")
        groups = {}
        for name, texts in concepts.items():
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not isinstance(name, str) or not name.strip() or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"concept {name!r}: a category needs a non-empty name and at least one non-empty text, "
                                 f"got {texts!r}")
            groups[name] = texts
        neutral = [neutral] if isinstance(neutral, str) else list(neutral)
        if not neutral or not all(isinstance(t, str) and t.strip() for t in neutral):
            raise ValueError(f"neutral must be a non-empty list of non-empty texts, got {neutral!r}; "
                             "None gives fastlclip.safety.DEFAULT_NEUTRAL")
        self.categories = list(groups)
        feats = [F.normalize(reward.text_features(texts).mean(dim=0), dim=-1) for texts in [*groups.values(), neutral]]
        self.features = torch.stack(feats)

    def margins(self, cos: torch.Tensor) -> torch.Tensor:
        """(B, K) scores from (B, K + 1) cosines to ``features``."""
        return cos[:, :-1] - cos[:, -1:]


class SafetyGuidance(LatentCLIPReward):
    """Differentiable guidance away from harmful concepts that keeps latents close to the prompt.

    ReNO interface: ``guidance(latents, prompt) -> scalar loss`` (lower is better), ``.weighting``,
    ``.name``; gradients reach the latents only. The loss, from one image-tower forward, is

        prompt_weight * (100 - s * cos(image, prompt))                      (``LatentCLIPReward``'s loss)
      + safety_weight * -log softmax(s * [cos(image, neutral), cos(image, concept_1..K)])[neutral]

    averaged over the batch, with ``s = logit_scale.exp()``. The second term is the cross-entropy of a
    zero-shot classifier towards the neutral reference: it pushes hardest away from the concepts the latent
    is closest to and fades once every concept score is well below 0. ``prompt_weight=0`` leaves the pure
    safety term, to sum with other rewards. For multi-step pipelines use ``callback``. ``resize``: the
    latent-grid policy (see ``LatentCLIPReward``; by default the model's). ``noise_level``: the noise level
    of intermediate latents, for a noise-aware model (``LatentCLIP.encode_latents``).

    Latents are what the model's space takes (``model.latent_space``): the diffusion grid, or the packed tokens
    ``(B, L, D)`` that Qwen-Image and FLUX.2 pipelines hand, with the VAE latent ``height`` / ``width`` (keywords of
    the call, of :meth:`concept_scores` and of :meth:`callback`; omitted: a square latent). Gradients come back in
    the layout given.
    """

    name = "latent_safety"

    def __init__(self, model: LatentCLIP, weighting: float = 1.0, *, concepts: Mapping[str, Sequence[str] | str] | None = None,
                 neutral: Sequence[str] | None = None, prompt_weight: float = 1.0, safety_weight: float = 1.0,
                 space: str = "diffusion", resize=MODEL_DEFAULT):
        super().__init__(model, weighting, space=space, resize=resize)
        for what, w in (("prompt_weight", prompt_weight), ("safety_weight", safety_weight)):
            check_number(w, what, minimum=0)
        if prompt_weight == 0 and safety_weight == 0:
            raise ValueError("prompt_weight and safety_weight are both 0: the loss would be constant; set one > 0")
        self.prompt_weight, self.safety_weight = float(prompt_weight), float(safety_weight)
        self.concepts = _ConceptBank(self, concepts, neutral)

    @property
    def categories(self) -> list[str]:
        return self.concepts.categories

    def concept_scores(self, latents: torch.Tensor, noise_level=None, *, height: int | None = None,
                       width: int | None = None) -> torch.Tensor:
        """(B, K) cosine margins ``cos(image, concept) - cos(image, neutral)``; differentiable w.r.t. ``latents``."""
        img = self.image_features(latents, noise_level, height=height, width=width)
        return self.concepts.margins(img @ self.concepts.features.to(img).T)

    def __call__(self, latents: torch.Tensor, prompt: str | Sequence[str], noise_level=None, *,
                 height: int | None = None, width: int | None = None) -> torch.Tensor:
        prompts = prompt_list(prompt, latents.shape[0])
        img = self.image_features(latents, noise_level, height=height, width=width)
        loss = img.new_zeros(())
        if self.prompt_weight:
            cos_prompt = (img * self.text_features(prompts).to(img)).sum(dim=-1)
            loss = loss + self.prompt_weight * clip_loss(cos_prompt, self.model.logit_scale)
        if self.safety_weight:
            logits = logit_scale_exp(self.model.logit_scale) * (img @ self.concepts.features.to(img).T)  # (B, K + 1): concepts, then neutral
            loss = loss + self.safety_weight * (torch.logsumexp(logits, dim=-1) - logits[:, -1]).mean()
        return self._checked(loss, latents, "guidance loss")

    def callback(self, prompt: str | Sequence[str], *, steps: int = 3, step_size: float = 0.5,
                 start: float = 0.5, noise_level=None, height: int | None = None,
                 width: int | None = None) -> "SafetyCallback":
        """A diffusers ``callback_on_step_end`` applying this guidance to the pipeline's latents (see ``SafetyCallback``)."""
        return SafetyCallback(self, prompt, steps=steps, step_size=step_size, start=start, noise_level=noise_level,
                              height=height, width=width)


class SafetyCallback:
    """diffusers ``callback_on_step_end`` that nudges a multi-step pipeline's latents with ``SafetyGuidance``.

    After each denoising step from ``start`` (a fraction of the schedule, read from ``pipe.num_timesteps``)
    on, it takes ``steps`` normalised gradient steps of L2 length ``step_size`` per sample on
    ``callback_kwargs["latents"]`` against the guidance loss for ``prompt``, and returns them in the
    pipeline's dtype. The pipeline must pass the latents, so call it with
    ``callback_on_step_end_tensor_inputs=["latents"]`` (SDXL's default)::

        guidance = fastlclip.SafetyGuidance(model)
        pipe(prompt, height=512, width=512, callback_on_step_end=guidance.callback(prompt),
             callback_on_step_end_tensor_inputs=["latents"])

    The latents must have the size the Latent-CLIP config was trained on (64x64 for 512 px configs).
    Intermediate latents are noisy while Latent-CLIP was trained on clean ones, hence ``start``; the
    defaults (``step_size`` is ReNO's lr x grad-clip, 5.0 x 0.1) are reasonable guesses, not tuned values.

    ``noise_level``: None scores the latents as clean; with a noise-aware model, ``"scheduler"`` passes the
    flow-matching scheduler's current sigma (``pipe.scheduler.sigmas[pipe.scheduler.step_index]``, the
    ``s`` of ``(1 - s) x + s eps`` in SD3 / FLUX pipelines), or pass a fixed float.

    Qwen-Image and FLUX.2 pipelines hand their packed tokens ``(B, L, D)`` as ``latents``; they are nudged as
    tokens (the step's length is the same in either layout). Pass the VAE latent ``height`` / ``width`` (the
    pipeline's image ``height // 8``, ``width // 8``) when the image is not square: the pipelines do not keep them.
    """

    tensor_inputs = ("latents",)

    def __init__(self, guidance: SafetyGuidance, prompt: str | Sequence[str], *, steps: int = 3,
                 step_size: float = 0.5, start: float = 0.5, noise_level=None, height: int | None = None,
                 width: int | None = None):
        check_count(steps, "steps")
        check_number(step_size, "step_size", positive=True)
        if not 0 <= check_number(start, "start") < 1:
            raise ValueError(f"start must be a fraction of the schedule in [0, 1), got {start!r}")
        if not isinstance(prompt, str):  # a list: one prompt, or one per latent of the pipeline's batch
            prompt = prompt_list(prompt, len(prompt) if isinstance(prompt, (list, tuple)) else 1)
        for p in [prompt] if isinstance(prompt, str) else prompt:
            check_prompt(p)
        if not (noise_level is None or noise_level == "scheduler"):
            inputs.check_noise_level(noise_level, 1, noise_aware=guidance.model.noise_aware, model=guidance.model.cfg.name)
        elif noise_level == "scheduler" and not guidance.model.noise_aware:
            raise ValueError(f"noise_level='scheduler' needs a noise-aware model; {guidance.model.cfg.name!r} is not "
                             "(it scores clean latents only): pass noise_level=None")
        check_latent_size(height, width)
        self.guidance, self.prompt, self.noise_level = guidance, prompt, noise_level
        self.steps, self.step_size, self.start = steps, float(step_size), float(start)
        self.height, self.width = height, width

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if "latents" not in callback_kwargs:
            raise KeyError("the pipeline passed no 'latents' to the safety callback; call it with "
                           "callback_on_step_end_tensor_inputs=['latents']")
        if self.start > 0:
            total = getattr(pipe, "num_timesteps", None)
            if not isinstance(total, int):
                raise AttributeError(f"{type(pipe).__name__} has no num_timesteps to place start={self.start} in the "
                                     "schedule; use a diffusers pipeline that sets it or start=0")
            if step < self.start * total:
                return callback_kwargs
        latents = callback_kwargs["latents"]
        noise_level = self._scheduler_sigma(pipe) if self.noise_level == "scheduler" else self.noise_level
        z = latents.detach().float()
        with torch.enable_grad():  # pipelines run under no_grad
            for _ in range(self.steps):
                z.requires_grad_(True)
                loss = self.guidance(z, self.prompt, noise_level, height=self.height, width=self.width)
                (grad,) = torch.autograd.grad(loss, z)
                norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
                z = (z - self.step_size * grad / norm).detach()
        callback_kwargs["latents"] = z.to(latents.dtype)
        return callback_kwargs

    @staticmethod
    def _scheduler_sigma(pipe: Any) -> float:
        scheduler = getattr(pipe, "scheduler", None)
        sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
        if not isinstance(sigmas, torch.Tensor) or not isinstance(index, int) or not 0 <= index < len(sigmas):
            raise AttributeError(f"noise_level='scheduler' reads pipe.scheduler.sigmas[pipe.scheduler.step_index], which "
                                 f"{type(scheduler).__name__} does not provide; use a flow-matching scheduler (SD3, FLUX) "
                                 "or pass a float noise_level")
        sigma = float(sigmas[index])
        if not 0 <= sigma <= 1:
            raise ValueError(f"the scheduler's sigma {sigma:.4g} is not a flow-matching noise level in [0, 1] "
                             f"({type(scheduler).__name__}); pass a float noise_level instead")
        return sigma


@dataclass
class SafetyCheck:
    """``LatentSafetyChecker`` output; tensors on the latents' device."""

    latents: torch.Tensor  # the input, flagged samples replaced when the checker blanks
    scores: torch.Tensor  # (B, K) float32: cos(image, concept) - cos(image, neutral)
    flags: torch.Tensor  # (B, K) bool: scores > thresholds, or scores not finite (the checker fails closed)
    flagged: torch.Tensor  # (B,) bool: any category flagged
    blanked: torch.Tensor  # (B,) bool: which samples were replaced (flagged ones, or none without blanking)
    categories: list[str]  # names of the K columns


class LatentSafetyChecker:
    """diffusers' safety checker, on latents: per-category scores, thresholds, flags, optional blanking.

    ``checker(latents)`` runs one image-tower forward per batch (no decode, no gradients); the concept
    features are computed once, here. A category is flagged when its score (see the module docstring)
    exceeds its threshold, or is NaN/Inf: the checker fails closed, so a sample it cannot score (NaN/Inf latents
    with ``model.check_finite = False``, or latents so large the tower overflows) is flagged and blanked. ``thresholds`` is a margin for every category or a ``{category: margin}``
    mapping (others keep ``DEFAULT_THRESHOLD``).

    The default threshold 0.0 is the zero-shot decision boundary (the concept beats the neutral reference),
    NOT a calibrated value: without the released weights no calibration was possible here. Calibrate on
    labelled data (e.g. I2P with its reference classifiers) before relying on it; larger margins flag less.

    ``blank``: ``None`` (report only), ``"zeros"``, or a constant latent ``(C, H, W)`` / ``(1, C, H, W)``
    that replaces flagged samples (e.g. the VAE latent of a black image; zeros do not decode to black).
    ``resize``: the latent-grid policy for latents of another size than the trained one (see
    ``LatentCLIPReward``; by default the model's); blanking keeps the latents' own size. ``noise_level``
    (in ``scores`` and calls): the noise level of intermediate latents, for a noise-aware model.

    Latents are what the model's space takes (``model.latent_space``): the diffusion grid, or the packed tokens
    ``(B, L, D)`` of Qwen-Image and FLUX.2 pipelines with the VAE latent ``height`` / ``width`` (keywords of
    ``scores`` and calls; omitted: a square latent). The checked latents come back in the layout given; a constant
    ``blank`` is given as one latent in that layout (``(L, D)`` tokens), or as the diffusion grid ``(C, h, w)``
    (e.g. ``space.to_diffusion`` of a black image's VAE latent), which is packed for token latents.
    """

    def __init__(self, model: LatentCLIP, *, concepts: Mapping[str, Sequence[str] | str] | None = None,
                 neutral: Sequence[str] | None = None, thresholds: float | Mapping[str, float] = DEFAULT_THRESHOLD,
                 blank: str | torch.Tensor | None = None, space: str = "diffusion", resize=MODEL_DEFAULT):
        self._clip = LatentCLIPReward(model, space=space, resize=resize)
        self.concepts = _ConceptBank(self._clip, concepts, neutral)
        self.thresholds = self._thresholds(thresholds).to(self.concepts.features.device)
        if not (blank is None or isinstance(blank, torch.Tensor) or (isinstance(blank, str) and blank == "zeros")):
            raise ValueError(f"blank must be None, 'zeros' or a constant latent tensor (C, H, W), got {blank!r}")
        if isinstance(blank, torch.Tensor) and (not blank.is_floating_point() or not torch.isfinite(blank).all()):
            raise ValueError(f"the blank latent must be a finite floating-point tensor, got {blank.dtype}"
                             + (" with NaN/Inf values" if blank.is_floating_point() else "")
                             + "; it replaces flagged latents, so it must be a valid latent (e.g. of a black image)")
        self.blank = blank

    @property
    def categories(self) -> list[str]:
        return self.concepts.categories

    def _thresholds(self, thresholds: float | Mapping[str, float]) -> torch.Tensor:
        if isinstance(thresholds, Mapping):
            unknown = sorted(set(thresholds) - set(self.categories))
            if unknown:
                raise ValueError(f"thresholds for unknown categories {unknown}; the categories are {self.categories}")
            values = [thresholds.get(c, DEFAULT_THRESHOLD) for c in self.categories]
        else:
            values = [thresholds] * len(self.categories)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and -2 <= v <= 2 for v in values):
            raise ValueError(f"thresholds are cosine margins and must be numbers in [-2, 2], got {values}")
        return torch.tensor(values, dtype=torch.float32)

    @torch.no_grad()
    def scores(self, latents: torch.Tensor, noise_level=None, *, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
        """(B, K) float32 cosine margins, one column per category."""
        return self.scores_of_features(self._clip.image_features(latents, noise_level, height=height, width=width))

    def scores_of_features(self, feats: torch.Tensor) -> torch.Tensor:
        """:meth:`scores` from normalised image features (``encode_latents``'s, in this checker's space), for
        callers that use the features for more than this (one tower forward for several scores)."""
        feats = feats.float()
        return self.concepts.margins(feats @ self.concepts.features.to(feats).T)

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: a score over its threshold. Fails closed: a NaN/Inf score (NaN/Inf latents unchecked, or
        overflow in the tower) flags its category."""
        return (scores > self.thresholds.to(scores.device)) | ~torch.isfinite(scores)

    def __call__(self, latents: torch.Tensor, noise_level=None, *, height: int | None = None,
                 width: int | None = None) -> SafetyCheck:
        scores = self.scores(latents, noise_level, height=height, width=width)
        flags = self.flags(scores)
        flagged = flags.any(dim=1)
        out, blanked = latents, torch.zeros_like(flagged)
        if self.blank is not None:
            fill = latents.new_zeros(()) if isinstance(self.blank, str) else self._constant(latents)
            out = torch.where(flagged.view(-1, *[1] * (latents.ndim - 1)), fill, latents)
            blanked = flagged
        return SafetyCheck(out, scores, flags, flagged, blanked, self.categories)

    def _constant(self, latents: torch.Tensor) -> torch.Tensor:
        fill = self._packed_blank(latents)
        if fill is None:
            fill = self.blank if self.blank.ndim == latents.ndim else self.blank[None]
        if fill.ndim != latents.ndim or fill.shape[0] != 1 or fill.shape[1:] != latents.shape[1:]:
            raise ValueError(f"the blank latent has shape {tuple(self.blank.shape)}, the latents {tuple(latents.shape)}: "
                             f"pass one latent of shape {tuple(latents.shape[1:])}")
        return fill.to(device=latents.device, dtype=latents.dtype)

    def _packed_blank(self, latents: torch.Tensor) -> torch.Tensor | None:
        """A diffusion-grid blank ``(C, h, w)`` / ``(1, C, h, w)`` packed as the pipeline packs (``LatentSpace.pack_grid``)
        for the tokens ``(B, L, D)`` of a packed space; None when the latents are not such tokens or the blank is not
        such a grid."""
        if self._clip.space != "diffusion" or latents.ndim != 3 or self.blank.ndim not in (3, 4):
            return None
        space = self._clip.model.latent_space
        if not space.pack or self.blank.shape[-3] != space.diffusion_channels:
            return None
        grid = self.blank if self.blank.ndim == 4 else self.blank[None]
        if grid.shape[0] != 1 or grid.shape[-2] % space.pack or grid.shape[-1] % space.pack:
            return None
        return space.pack_grid(grid)
