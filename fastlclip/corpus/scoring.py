"""What is computed per latent: the run's settings (``ScoreSpec``) and the model side (``Scorer``).

Columns of every output file, after ``key``:

- prompts: ``clip_cos_<i>``, cosine similarity of the latent's Latent-CLIP feature with prompt ``i``
  (float32, in [-1, 1]; the prompts are in the file's metadata);
- classes: ``prob_<class>`` zero-shot probabilities (float32, ``fastlclip.ZeroShotClassifier``'s weights and
  logit scale) and ``label``, the most likely class name;
- safety: ``safety_<category>``, ``fastlclip.LatentSafetyChecker`` margins (float32), and ``safety_flag``:
  any category above its threshold, or any margin NaN (fails closed);
- embeddings: ``embedding``, the normalised image feature as float16 (a fixed-size list column).

A model on a video space reads clips (``frames``: the clips' video frame count, so T latent frames each): the
columns above hold each clip's pooled scores (``clip_cos_<i>``: the per-frame cosines pooled by ``pooling``, as
``fastlclip.LatentCLIPReward`` pools; ``prob_<class>`` / ``label``: ``fastlclip.ZeroShotClassifier``'s, the softmax
of the pooled logits), and per-frame ones are fixed-size list columns of T float32 values: ``frame_clip_cos_<i>``
(each frame's cosine) and ``frame_prob_<class>`` (each frame's own softmax over the classes); ``embedding`` is
``(T, D)`` float16, one feature per frame. Safety is not scored on clips.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..rewards import pool_frames

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass
class ScoreSpec:
    """Everything a worker needs to build the same scorer; plain data, so it pickles to processes and Ray actors."""

    model: Any  # a config name, config dict or JSON path for fastlclip.load, or a loaded LatentCLIP (local engine)
    pretrained: str | None = None
    prompts: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    safety: bool = False
    embeddings: bool = False
    space: str = "vae"
    device: str | None = None  # None: cuda (LOCAL_RANK's GPU under torchrun) if available, else cpu
    dtype: str = "float32"
    backend: str = "eager"
    frames: int | None = None  # a video space's clips: their video frame count F (T latent frames each)
    pooling: str = "mean"  # a clip's per-frame scores -> its score (fastlclip.rewards.POOLINGS)
    weights: dict | None = None  # ``fingerprint(model, pretrained)``, set once by ``score``: which weights exactly

    def build(self, device: str | None = None) -> "Scorer":
        """The scorer the engines run (another spec type, e.g. ``fastlclip.distill``'s, builds its own)."""
        return Scorer(self, device)

    def identity(self) -> dict:
        """What must match for two runs' outputs to share a folder (not where or how they ran)."""
        pretrained = self.pretrained
        if pretrained is not None and os.path.exists(str(pretrained)):
            pretrained = os.path.abspath(pretrained)
        d = {"model": "<LatentCLIP object>" if _is_model(self.model) else self.model, "pretrained": pretrained,
             "weights": self.weights, "prompts": self.prompts, "classes": self.classes,
             "templates": self.templates if self.classes else None, "safety": self.safety,
             "embeddings": self.embeddings, "space": self.space, "dtype": self.dtype}
        if self.frames is not None:  # clips only: image runs keep the identity they always had
            d.update(frames=self.frames, pooling=self.pooling)
        return json.loads(json.dumps(d, default=str))


def fingerprint(model, pretrained: str | None) -> dict:
    """SHA-256 digests of what decides the weights: an in-memory model's tensors, a config file's and a local
    checkpoint's bytes (every file of a checkpoint folder). A checkpoint replaced at the same path, or another
    model object, changes them; names (config names, ``hf-hub:`` ids) are recorded as given."""
    out = {}
    if _is_model(model):
        out["model_sha256"] = state_digest(model)
    elif isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        out["config_sha256"] = _file_digest(model)
    if pretrained is not None and os.path.exists(pretrained):
        if os.path.isdir(pretrained):
            h = hashlib.sha256()
            for root, dirs, files in sorted(os.walk(pretrained)):
                dirs.sort()
                for f in sorted(files):
                    path = os.path.join(root, f)
                    h.update(f"{os.path.relpath(path, pretrained)}:{_file_digest(path)};".encode())
            out["pretrained_sha256"] = h.hexdigest()
        else:
            out["pretrained_sha256"] = _file_digest(pretrained)
    return out


def state_digest(module) -> str:
    """SHA-256 of a module's tensors: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _is_model(obj) -> bool:
    from .. import LatentCLIP

    return isinstance(obj, LatentCLIP)


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


class Scorer:
    """Builds the model and text features once; ``scorer(latents)`` -> {column: numpy array} for one batch."""

    def __init__(self, spec: ScoreSpec, device: str | None = None):
        import fastlclip

        self.spec = spec
        device = device or spec.device or default_device()
        self.dtype = dtype = getattr(torch, spec.dtype)
        if _is_model(spec.model):
            model = spec.model
            if model.device != torch.device(device) or model.dtype != dtype:  # a copy: the caller's model stays as is
                model = copy.deepcopy(model).to(device=device, dtype=dtype)
        else:
            # Seeded, so workers and resumed runs agree even on random weights (pretrained=None).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = fastlclip.load(spec.model, spec.pretrained, device=device, dtype=dtype, backend=spec.backend)
        self.model = model
        self.shape, self.tokens = latent_layout(model, spec.space, spec.frames)
        self.latent_frames = self.shape[1] if model.video else None  # T of every clip; None: images
        self.note = None  # what a bad sample's shape message adds
        if model.video:
            ls = model.latent_space
            self.note = (f"clips (C, T, h, w) of the {ls.name!r} video space, T = {self.latent_frames} latent frames "
                         f"for frames={spec.frames}")
            if spec.safety:
                raise ValueError(f"safety is not scored on clips (model {model.cfg.name!r} reads the {ls.name!r} video "
                                 "space; no pooling of safety margins over frames is defined): drop safety (--safety)")
        elif spec.pooling != "mean":
            raise ValueError(f"pooling={spec.pooling!r} pools a clip's frames; model {model.cfg.name!r} reads the "
                             f"{model.cfg.vae_name!r} image space: drop pooling (--pooling)")
        with torch.no_grad():
            self.text = model.encode_text(spec.prompts).float() if spec.prompts else None
            self.classifier = (fastlclip.ZeroShotClassifier(model, spec.classes, spec.templates, progress=False,
                                                            pooling=spec.pooling) if spec.classes else None)
        self.checker = fastlclip.LatentSafetyChecker(model, space=spec.space) if spec.safety else None

    def columns(self) -> list[str]:
        cols = [f"clip_cos_{i}" for i in range(len(self.spec.prompts))]
        if self.classifier is not None:
            cols += [f"prob_{c}" for c in self.spec.classes] + ["label"]
        if self.latent_frames is not None:
            cols += [f"frame_clip_cos_{i}" for i in range(len(self.spec.prompts))]
            cols += [f"frame_prob_{c}" for c in self.spec.classes]
        if self.checker is not None:
            cols += [f"safety_{c}" for c in self.checker.categories] + ["safety_flag"]
        if self.spec.embeddings:
            cols.append("embedding")
        return cols

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> dict[str, np.ndarray]:
        latents = latents.to(self.model.device)
        out: dict[str, np.ndarray] = {}
        feats = self._features(latents)  # (B, D); clips: (B, T, D)
        clips = feats.ndim == 3
        if self.text is not None:
            cos = feats @ self.text.T
            if clips:
                frame = cos.cpu().numpy()
                for i in range(frame.shape[2]):
                    out[f"frame_clip_cos_{i}"] = frame[:, :, i]
                cos = pool_frames(cos, self.spec.pooling)
            cos = cos.cpu().numpy()
            for i in range(cos.shape[1]):
                out[f"clip_cos_{i}"] = cos[:, i]
        if self.classifier is not None:
            probs = self.classifier.logits_of_features(feats).softmax(dim=-1).cpu().numpy()
            for i, c in enumerate(self.spec.classes):
                out[f"prob_{c}"] = probs[:, i]
            out["label"] = np.asarray(self.spec.classes, dtype=object)[probs.argmax(axis=1)]
            if clips:
                frame = self.classifier.logits_of_features(feats, pool=False).softmax(dim=-1).cpu().numpy()
                for i, c in enumerate(self.spec.classes):
                    out[f"frame_prob_{c}"] = frame[:, :, i]
        if self.checker is not None:  # from the same features: one tower forward per batch
            scores = self.checker.scores_of_features(feats)
            for i, c in enumerate(self.checker.categories):
                out[f"safety_{c}"] = scores[:, i].cpu().numpy()
            out["safety_flag"] = self.checker.flags(scores).any(dim=1).cpu().numpy()  # NaN flags: fail closed
        if self.spec.embeddings:
            out["embedding"] = feats.half().cpu().numpy()
        return out

    def _features(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised features, without the model's NaN check (samples are checked on the host, one by one, before
        batching); the caller's model keeps its own ``check_finite``."""
        model, check = self.model, self.model.check_finite
        model.check_finite = False
        try:
            return model.encode_latents(latents, space=self.spec.space, normalize=True,
                                        frames=self.spec.frames).float()
        finally:
            model.check_finite = check


def latent_layout(model, space: str, frames: int | None = None) -> tuple[tuple[int, ...], tuple | None]:
    """What a shard's latent is for ``model`` in ``space``: ``(shape, tokens)``. ``shape``: the ``(C, h, w)`` grid a
    batch is stacked in (``"vae"``: the VAE latent of the trained size; ``"diffusion"``: the pipeline's diffusion
    grid, FLUX.2's 128 channels at half the side). ``tokens``: for a packed space in diffusion space (Qwen-Image,
    FLUX.2), ``((L, D), unpack)``: a latent stored as the pipeline's tokens of the square trained latent, and
    ``unpack`` taking ``(1, L, D)`` to ``(1, *shape)`` (``LatentSpace.grid``: exact); None otherwise.

    FLUX.2 in diffusion space needs its statistics (the model config's ``vae_stats``): without them this is the
    ``ValueError`` saying they live in the VAE's weights, before any shard is read.

    A video space's model needs ``frames``, the clips' video frame count F: ``shape`` is ``(C, T, h, w)`` with
    ``T = LatentSpace.latent_frames(F)``, and LTX-Video's diffusion latents may be its pipeline's tokens
    ``(T h w, D)``. An image space's model refuses ``frames``."""
    side = model.latent_size
    if model.video:
        return _clip_layout(model, space, frames)
    if frames is not None:
        raise ValueError(f"frames={frames!r} is the video frame count of clips; model {model.cfg.name!r} reads the "
                         f"{model.cfg.vae_name!r} image space: drop frames (--frames)")
    vae_shape = (model.cfg.vision.latent_channels, side, side)
    if space != "diffusion":
        return vae_shape, None
    ls = model.latent_space
    if not (ls.per_channel or ls.pack):
        return vae_shape, None
    step = ls.patch * max(ls.pack, 1)
    if side % step:
        raise ValueError(f"model {model.cfg.name!r}: its {side}x{side} latents are not a whole grid of the "
                         f"{ls.name!r} space's diffusion latents (patch {ls.patch}, packing {ls.pack}); score them "
                         "in VAE space (space='vae')")
    shape = (ls.diffusion_channels, side // ls.patch, side // ls.patch)
    if not ls.pack:
        return shape, None
    tokens = ((side // step) ** 2, ls.diffusion_channels * ls.pack ** 2)
    return shape, (tokens, lambda t: ls.grid(t, side, side))


def _clip_layout(model, space: str, frames: int | None) -> tuple[tuple[int, ...], tuple | None]:
    ls, side = model.latent_space, model.latent_size
    if frames is None:
        rule = f"1 + (F - 1) / {ls.temporal}" if ls.causal else f"F / {ls.temporal}"
        raise ValueError(f"model {model.cfg.name!r} reads clips of the {ls.name!r} video space: pass frames= "
                         f"(--frames), the clips' video frame count F (each clip then has T = {rule} latent frames)")
    t = ls.latent_frames(frames)  # a count that does not fit the space: a ValueError naming it
    shape = (ls.channels, t, side, side)
    if space != "diffusion" or not ls.pack:
        return shape, None
    p = ls.pack
    tokens = (t * (side // p) ** 2, ls.channels * p * p)
    return shape, (tokens, lambda x: ls.grid(x, side, side, latent_frames=t))


def check_prompts(values: Sequence[str] | str | None, what: str) -> list[str]:
    """A list of non-empty strings (a single string is one item); duplicates are an error."""
    if values is None:
        return []
    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{what} must be non-empty strings, got {bad!r}")
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"{what} repeat {dup}; each must be unique (they name output columns)")
    return values
