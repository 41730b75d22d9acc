"""Teachers of a reward ensemble: the pixel models whose embeddings one latent student learns (issue 32).

Three kinds, one interface (:class:`Teacher`):

- ``open_clip``: an open_clip CLIP with any weights file (HPSv2.1 is open_clip ``ViT-H-14`` with its own
  checkpoint; DFN5B; a config JSON registers a model open_clip does not ship);
- ``hf``: a transformers ``CLIPModel`` with its ``CLIPProcessor`` (PickScore, OpenAI CLIP: ReNO loads both
  this way; the processor may come from another folder, as PickScore's does);
- ``aesthetic``: a head on another teacher's normalised image embedding (the LAION aesthetic MLP
  768-1024-128-64-16-1, read from its state dict), so it adds no embedding of its own.

Every teacher's preprocessing (:class:`Preprocess`: resize, crop, interpolation, mean, std) is read from its
own config or processor, never assumed, and its reward is declared (:class:`RewardForm`): ReNO's loss form
(``reward``: lower is better) and the teacher's own scale (``score``), with an optional score scaling for
frameworks that rescale (flow_grpo divides PickScore by 26). Weights are read without unpickling anything but
tensors (safetensors, or ``torch.load(weights_only=True)``).

A run names its teachers with :class:`TeacherSpec` (plain data: it pickles to workers), from Python or from
the command line's one-line form (:func:`parse_teacher_spec`), checked as a set (:func:`check_teacher_set`)
before any work, and built with :func:`build_teachers`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("open_clip", "hf", "aesthetic")
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

# ReNO's loss forms (ExplainableML/ReNO at bd6f6ac, rewards/*.py): name -> (form, constant).
#   hps.py        HPSLoss.compute_loss         1 - cos
#   pickscore.py  PickScoreLoss.compute_loss   30 - logit_scale.exp() * cos
#   clip.py       CLIPLoss.compute_loss        100 - logit_scale.exp() * cos
#   aesthetic.py  AestheticLoss.__call__       10 - MLP(normalised ViT-L/14 image embedding)
RENO_REWARDS = {"hps": ("cos", 1.0), "pickscore": ("logit", 30.0), "clip": ("logit", 100.0),
                "aesthetic": ("head", 10.0)}
# flow_grpo's score scalings, by reward preset (yifan123/flow_grpo at ac4c86e, flow_grpo/pickscore_scorer.py:
# ``scores = scores/26``). Its aesthetic_score returns the MLP output unscaled in the two snapshots read
# (ac4c86e, 94e23ee), so no aesthetic scaling is listed: pass ``scale=0.1`` yourself where a fork divides by 10.
FLOW_GRPO_SCALE = {"pickscore": 1 / 26}
DEFAULT_REWARD = {"open_clip": "clip", "hf": "clip", "aesthetic": "aesthetic"}
_INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL / transformers resample codes fastlclip mirrors


# -- preprocessing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """A teacher's own image preprocessing, on tensors: RGB in [0, 1] (B, 3, H, W) -> the tower's input.

    ``resize``: the shorter side after resizing (``resize_mode="shortest"``, torchvision's ``Resize(int)``: the
    long side ``int(resize * long / short)``, floored), or both sides (``"squash"``); None: no resize.
    ``crop``: the centre crop's side (offsets rounded as torchvision's ``CenterCrop``); None: no crop.
    ``interpolation``: ``bicubic`` / ``bilinear`` (antialiased, as PIL and torchvision resize down) or
    ``nearest``. ``mean`` / ``std``: per channel."""

    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation {self.interpolation!r}: fastlclip mirrors bicubic, bilinear and nearest")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {self.resize_mode!r}: fastlclip mirrors 'shortest' (resize the shorter "
                             "side, centre crop) and 'squash'; 'longest' (padding) is not supported")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std must have 3 entries, std positive: {self.mean}, {self.std}")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        h, w = x.shape[-2:]
        if self.resize is not None:
            r = self.resize
            size = (r, r) if self.resize_mode == "squash" else (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
            if size != (h, w):
                if self.interpolation == "nearest":
                    x = F.interpolate(x, size=size, mode="nearest")
                else:
                    x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        if self.crop is not None:
            c = self.crop
            h, w = x.shape[-2:]
            if c > min(h, w):
                raise ValueError(f"the centre crop {c} is larger than the resized image {h}x{w}")
            top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
            x = x[..., top:top + c, left:left + c]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def open_clip_preprocess(model: nn.Module, preprocess_cfg: Mapping[str, Any] | None = None) -> Preprocess:
    """An open_clip model's transform (``open_clip.image_transform``'s eval branch): ``preprocess_cfg`` (e.g. an
    ``open_clip_config.json``'s) over the one open_clip set on ``model.visual`` (``create_model`` sets it from
    the model config), over open_clip's own defaults (``open_clip.PreprocessCfg``) for a bare module."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = model.visual
    cfg = {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
           "resize_mode": "shortest", **(getattr(visual, "preprocess_cfg", None) or {}), **(preprocess_cfg or {})}
    size = cfg.get("size") or visual.image_size
    sizes = [size] if isinstance(size, int) else list(size)
    if len(set(sizes)) != 1:
        raise ValueError(f"only square teacher inputs are supported, got image size {size}")
    if cfg["interpolation"] not in ("bicubic", "bilinear"):
        raise ValueError(f"open_clip interpolation {cfg['interpolation']!r}: an eval transform is bicubic or bilinear")
    side = int(sizes[0])
    return Preprocess(resize=side, crop=None if cfg["resize_mode"] == "squash" else side,
                      mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
                      interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])


def hf_preprocess(processor, model: nn.Module | None = None) -> Preprocess:
    """A transformers ``CLIPImageProcessor``'s (or a ``CLIPProcessor``'s) settings: ``do_resize`` / ``size``
    (shortest edge), ``do_center_crop`` / ``crop_size``, ``resample``, ``do_normalize`` / ``image_mean`` /
    ``image_std``, with ``rescale_factor`` folded in (fastlclip's pixels are already in [0, 1])."""
    from ..rewards import _side

    images = getattr(processor, "image_processor", processor)
    if images is None:
        raise ValueError("a transformers CLIP teacher needs its processor (CLIPProcessor / CLIPImageProcessor)")
    resize = _side(getattr(images, "size", None)) if getattr(images, "do_resize", True) else None
    crop = _side(getattr(images, "crop_size", None)) if getattr(images, "do_center_crop", True) else None
    if resize is None and crop is None and model is not None:
        crop = int(model.config.vision_config.image_size)
    resample = getattr(images, "resample", 3)
    value = getattr(resample, "value", resample)
    interpolation = value if isinstance(value, str) else _INTERPOLATION.get(int(value))
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise ValueError(f"the processor's resample {resample!r} is not one fastlclip mirrors (bicubic, bilinear, nearest)")
    if getattr(images, "do_normalize", True):
        mean, std = tuple(images.image_mean), tuple(images.image_std)
    else:
        mean, std = (0.0,) * 3, (1.0,) * 3
    if getattr(images, "do_rescale", True):  # pixel = uint8 * rescale_factor; ours = uint8 / 255
        k = float(getattr(images, "rescale_factor", 1 / 255)) * 255
        mean, std = tuple(m / k for m in mean), tuple(s / k for s in std)
    return Preprocess(resize=resize, crop=crop, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                      interpolation=interpolation)


# -- rewards -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RewardForm:
    """What a teacher's reward is, on normalised embeddings.

    ``form``: ``"cos"`` (value ``cos(img, txt)``), ``"logit"`` (``logit_scale.exp() * cos``) or ``"head"``
    (``head(img)``, no text). ``reward = constant - value`` (ReNO's loss form, lower is better);
    ``score = scale * value`` (the teacher's own scale, times ``scale``, e.g. flow_grpo's ``1/26`` for PickScore).
    ``preset``: the ReNO name it came from, if any."""

    form: str
    constant: float
    scale: float = 1.0
    preset: str | None = None

    def __post_init__(self):
        if self.form not in ("cos", "logit", "head"):
            raise ValueError(f"reward form {self.form!r}: one of cos, logit, head")

    def as_dict(self) -> dict:
        return asdict(self)


def reward_form(reward: str | RewardForm, scale: float | str | None = None) -> RewardForm:
    """``reward``: a ReNO preset (``hps``, ``pickscore``, ``clip``, ``aesthetic``) or ``FORM:CONSTANT``
    (``cos:1``, ``logit:30``, ``head:10``); ``scale``: a number, or ``"flow_grpo"`` (that framework's scaling of
    the preset, where one is documented in ``FLOW_GRPO_SCALE``)."""
    if isinstance(reward, RewardForm):
        form = reward
    elif reward in RENO_REWARDS:
        form = RewardForm(*RENO_REWARDS[reward], preset=reward)
    else:
        kind, _, constant = str(reward).partition(":")
        try:
            form = RewardForm(kind, float(constant))
        except ValueError:
            raise ValueError(f"reward {reward!r}: a ReNO preset ({', '.join(RENO_REWARDS)}) or FORM:CONSTANT with "
                             "FORM cos, logit or head (e.g. logit:100)") from None
    if scale is None:
        scale = form.scale
    if scale == "flow_grpo":
        if form.preset not in FLOW_GRPO_SCALE:
            raise ValueError(f"scale=flow_grpo: flow_grpo's scaling is documented here for "
                             f"{', '.join(FLOW_GRPO_SCALE)} only, not for reward {reward!r}; pass a number")
        scale = FLOW_GRPO_SCALE[form.preset]
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale {scale!r}: a number or 'flow_grpo'") from None
    if not scale == scale or scale in (float("inf"), float("-inf")) or scale == 0:
        raise ValueError(f"scale must be a finite non-zero number, got {scale}")
    return RewardForm(form.form, form.constant, scale, form.preset)


# -- the interface -----------------------------------------------------------------------------------
@runtime_checkable
class Teacher(Protocol):
    """What a target run, a multi-head student and an ensemble need from a teacher.

    ``name`` (the column suffix), ``kind``, ``embed_dim``, ``preprocess`` (its own), ``reward_form``,
    ``base`` (a head's teacher name, else None), ``has_text``; ``embed_images(pixels in [0, 1]) ->`` normalised
    float32 (B, D); ``embed_texts(list[str]) ->`` normalised (N, D) where it has a text tower;
    ``reward(img_emb, txt_emb=None) ->`` (B,) ReNO loss; ``score(...) ->`` (B,) in the teacher's own scale
    times ``reward_form.scale``; ``weights_digest()`` SHA-256 of its weights; ``describe()`` its run identity."""

    name: str
    kind: str
    embed_dim: int
    preprocess: Preprocess
    reward_form: RewardForm
    base: str | None
    has_text: bool

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...
    def reward(self, img_emb: torch.Tensor, txt_emb: torch.Tensor | None = None) -> torch.Tensor: ...
    def score(self, img_emb: torch.Tensor, txt_emb: torch.Tensor | None = None) -> torch.Tensor: ...
    def weights_digest(self) -> str: ...
    def describe(self) -> dict: ...


class _ClipTeacher:
    """Shared by the two CLIP kinds: the value a reward is made of, and the identity. Every kind's ``digest=`` is
    the weights' SHA-256, or a function computing it on first use (``build_teacher`` passes one, so a worker that
    never describes its teachers never hashes their files); None: the digest of the module's tensors."""

    base = None
    has_text = True

    def __init__(self, name: str, model: nn.Module, preprocess: Preprocess, reward: RewardForm, digest,
                 config: dict):
        if reward.form == "head":
            raise ValueError(f"teacher {name!r}: a CLIP teacher's reward is cos or logit, not head")
        self.name, self.model, self.preprocess, self.reward_form = name, model, preprocess, reward
        self._digest, self.config = digest, config

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    def _value(self, img_emb: torch.Tensor, txt_emb: torch.Tensor | None) -> torch.Tensor:
        if txt_emb is None:
            raise ValueError(f"teacher {self.name!r} ({self.reward_form.form}) scores an image against a text: pass "
                             "txt_emb")
        cos = (img_emb.float() * txt_emb.float().to(img_emb.device)).sum(-1)
        if self.reward_form.form == "logit":
            return self.model.logit_scale.float().exp().to(cos.device) * cos
        return cos

    def reward(self, img_emb, txt_emb=None):
        return self.reward_form.constant - self._value(img_emb, txt_emb)

    def score(self, img_emb, txt_emb=None):
        return self.reward_form.scale * self._value(img_emb, txt_emb)

    def weights_digest(self) -> str:
        return _resolve_digest(self)

    def describe(self) -> dict:
        return _describe(self)


def _resolve_digest(t) -> str:
    """The digest, computed on first use when it was given as a function (a worker never reads a large weights
    file a second time just to digest it)."""
    if callable(t._digest):
        t._digest = t._digest()
    return t._digest


def _describe(t) -> dict:
    return json.loads(json.dumps({"name": t.name, "kind": t.kind, "config": t.config, "base": t.base,
                                  "embed_dim": t.embed_dim, "weights_sha256": t.weights_digest(),
                                  "reward": t.reward_form.as_dict(), "preprocess": t.preprocess.as_dict()},
                                 default=str))


class OpenCLIPTeacher(_ClipTeacher):
    """An open_clip CLIP: ``encode_image`` / ``encode_text``, its tokenizer (open_clip's for the model name,
    else fastlclip's CLIP tokenisation at the model's context length)."""

    kind = "open_clip"

    def __init__(self, name: str, model: nn.Module, *, preprocess: Preprocess | None = None, reward=None,
                 tokenizer=None, digest=None, config: dict | None = None):
        from .teacher import check_teacher

        check_teacher(model)
        model = model.eval().requires_grad_(False)
        super().__init__(name, model, preprocess or open_clip_preprocess(model),
                         reward_form(reward or DEFAULT_REWARD[self.kind]), digest or (lambda: module_digest(model)),
                         config or {"module": type(model).__name__})
        self.tokenizer = tokenizer
        self.embed_dim = int(model.visual.output_dim)

    def embed_images(self, pixels):
        x = self.preprocess(pixels.to(self.device)).to(self.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def embed_texts(self, texts):
        from .. import inputs

        texts = list(texts)
        tokens = self.tokenizer(texts) if self.tokenizer is not None else inputs.tokenize(
            texts, getattr(self.model, "context_length", 77))
        return F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)


class HFCLIPTeacher(_ClipTeacher):
    """A transformers ``CLIPModel`` with its ``CLIPProcessor``: ``get_image_features`` on the processor's
    preprocessing, ``get_text_features`` on its tokenizer as ReNO calls it (``padding=True, max_length=77,
    truncation=True``)."""

    kind = "hf"

    def __init__(self, name: str, model: nn.Module, processor, *, preprocess: Preprocess | None = None, reward=None,
                 digest=None, config: dict | None = None):
        from ..rewards import _is_transformers_clip

        if not _is_transformers_clip(model):
            raise ValueError(f"teacher {name!r}: an hf teacher is a transformers CLIPModel, got {type(model).__name__}")
        model = model.eval().requires_grad_(False)
        super().__init__(name, model, preprocess or hf_preprocess(processor, model),
                         reward_form(reward or DEFAULT_REWARD[self.kind]), digest or (lambda: module_digest(model)),
                         config or {"module": type(model).__name__})
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.embed_dim = int(model.config.projection_dim)

    def embed_images(self, pixels):
        from ..rewards import _features

        x = self.preprocess(pixels.to(self.device)).to(self.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1)

    def embed_texts(self, texts):
        from ..rewards import _features

        if self.tokenizer is None:
            raise ValueError(f"teacher {self.name!r} has no tokenizer: pass a CLIPProcessor, not an image processor")
        tokens = self.tokenizer(list(texts), return_tensors="pt", padding=True, max_length=77, truncation=True)
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return F.normalize(_features(out).float(), dim=-1)


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor's MLP (improved-aesthetic-predictor; ReNO rewards/aesthetic.py ``MLP``,
    flow_grpo aesthetic_scorer.py): Linear layers at ``layers.0 / 2 / 4 / 6 / 7`` with dropouts between and no
    activation, 768-1024-128-64-16-1 for the published weights."""

    def __init__(self, sizes: Sequence[int] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        if len(sizes) != 6 or sizes[-1] != 1:
            raise ValueError(f"the aesthetic MLP has 5 linear layers ending in 1 output, got sizes {list(sizes)}")
        d = list(sizes)
        self.layers = nn.Sequential(nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
                                    nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]))

    def forward(self, x):
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], where: str = "aesthetic weights") -> "AestheticMLP":
        """The MLP of a state dict's shapes (``layers.{0,2,4,6,7}.weight`` / ``.bias``), loaded strictly."""
        try:
            sizes = [sd[f"layers.{i}.weight"].shape[1] for i in (0, 2, 4, 6, 7)] + [sd["layers.7.weight"].shape[0]]
        except (KeyError, IndexError, AttributeError):
            raise ValueError(f"{where}: not an aesthetic MLP state dict (layers.0/2/4/6/7 .weight and .bias; has "
                             f"{sorted(sd)[:6]})") from None
        mlp = cls(sizes)
        try:
            mlp.load_state_dict(dict(sd), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None
        return mlp.eval().requires_grad_(False)


class AestheticTeacher:
    """A head on another teacher's normalised image embedding: ``value = head(img_emb)``; its ``embed_images``
    is its base's (a target run stores the base's embedding once, and this head's score beside it)."""

    kind = "aesthetic"
    has_text = False

    def __init__(self, name: str, base: Teacher, head: nn.Module, *, reward=None, digest=None,
                 config: dict | None = None):
        if getattr(base, "base", None) is not None:
            raise ValueError(f"teacher {name!r}: a head sits on a CLIP teacher, not on another head ({base.name!r})")
        self.name, self.base_teacher, self.base = name, base, base.name
        self.head = head.eval().requires_grad_(False)
        self.reward_form = reward_form(reward or DEFAULT_REWARD[self.kind])
        if self.reward_form.form != "head":
            raise ValueError(f"teacher {name!r}: an aesthetic teacher's reward is head:CONSTANT, got {self.reward_form.form}")
        first = next(p for p in self.head.parameters())
        if first.ndim != 2 or first.shape[1] != base.embed_dim:
            raise ValueError(f"teacher {name!r}: its head reads {first.shape[-1]}-wide embeddings, its base "
                             f"{base.name!r} gives {base.embed_dim}")
        self.embed_dim = base.embed_dim
        self.preprocess = base.preprocess
        self._digest, self.config = digest or (lambda: module_digest(self.head)), config or {"module": type(head).__name__}

    def embed_images(self, pixels):
        return self.base_teacher.embed_images(pixels)

    def embed_texts(self, texts):
        raise ValueError(f"teacher {self.name!r} ({self.kind}) has no text tower")

    def value(self, img_emb: torch.Tensor) -> torch.Tensor:
        p = next(self.head.parameters())
        return self.head(F.normalize(img_emb.float(), dim=-1).to(p.device, p.dtype)).float().squeeze(-1)

    def reward(self, img_emb, txt_emb=None):
        return self.reward_form.constant - self.value(img_emb)

    def score(self, img_emb, txt_emb=None):
        return self.reward_form.scale * self.value(img_emb)

    def weights_digest(self) -> str:
        return _resolve_digest(self)

    def describe(self) -> dict:
        return _describe(self)


# -- weights -----------------------------------------------------------------------------------------
def module_digest(module: nn.Module) -> str:
    from ..corpus.scoring import state_digest

    return state_digest(module)


def path_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file's bytes, or of every file of a folder (``fastlclip.corpus.scoring.fingerprint``)."""
    from ..corpus.scoring import fingerprint

    return fingerprint(None, str(path))["pretrained_sha256"]


def read_state_dict(path: str | os.PathLike, where: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True`` (``fastlclip.checkpoint``'s
    readers: nothing but tensors is unpickled); a ``state_dict`` entry and DDP ``module.`` prefixes unwrapped."""
    from pathlib import Path

    from ..checkpoint import CheckpointError, _check_tensors, _load_pickle, _load_safetensors

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{where}: {path} is not a file")
    try:
        obj = _load_safetensors(p)[0] if p.suffix == ".safetensors" else _load_pickle(p)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} holds no state dict of tensors")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
        _check_tensors(p, sd)
    except CheckpointError as e:
        raise ValueError(f"{where}: {e}") from None
    return sd


# -- specs -------------------------------------------------------------------------------------------
@dataclass
class TeacherSpec:
    """One teacher of a run, as plain data (or in-memory modules, local engine only).

    ``open_clip``: ``model`` an open_clip name (``config``: a model config JSON, or an ``open_clip_config.json``
    with ``model_cfg`` and ``preprocess_cfg``, registered under that name) or a CLIP module; ``weights`` its
    weights file (None: random init, a warning). ``hf``: ``model`` a local transformers folder (read with
    ``use_safetensors=True``) or a ``CLIPModel``; ``processor`` a folder or a ``CLIPProcessor`` (default: the
    model's folder). ``aesthetic``: ``base`` the name of a CLIP teacher of the same set, ``weights`` the MLP's
    state dict (``model`` may be an MLP module instead). ``reward`` / ``scale``: see :func:`reward_form`."""

    name: str
    kind: str
    model: Any = None
    weights: str | None = None
    config: Any = None
    processor: Any = None
    base: str | None = None
    reward: str | None = None
    scale: Any = 1.0
    extra: dict = field(default_factory=dict)

    def label(self) -> dict:
        """Where the teacher comes from, for the run identity (paths made absolute, modules by type)."""
        def show(v):
            if v is None or isinstance(v, (int, float)):
                return v
            if isinstance(v, (str, os.PathLike)):
                return os.path.abspath(v) if os.path.exists(str(v)) else str(v)
            if isinstance(v, Mapping):
                return json.loads(json.dumps(v, default=str))
            return f"<{type(v).__name__}>"
        return {k: show(getattr(self, k)) for k in ("model", "weights", "config", "processor") if getattr(self, k) is not None}


_SPEC_KEYS = {"name", "kind", "model", "weights", "config", "processor", "base", "reward", "scale"}


def parse_teacher_spec(text: str) -> TeacherSpec:
    """The command line's form: comma-separated ``key=value`` pairs, e.g.
    ``name=hps,kind=open_clip,model=ViT-H-14,weights=HPS_v2.1.safetensors,reward=hps``. Keys: name, kind,
    model, weights, config, processor, base, reward, scale (values hold no commas)."""
    fields: dict[str, str] = {}
    for part in str(text).split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ValueError(f"teacher spec {text!r}: {part!r} is not key=value (keys: {', '.join(sorted(_SPEC_KEYS))})")
        if key not in _SPEC_KEYS:
            raise ValueError(f"teacher spec {text!r}: unknown key {key!r} (keys: {', '.join(sorted(_SPEC_KEYS))})")
        if key in fields:
            raise ValueError(f"teacher spec {text!r}: {key} given twice")
        fields[key] = value.strip()
    for key in ("name", "kind"):
        if key not in fields:
            raise ValueError(f"teacher spec {text!r}: {key}= is required")
    return TeacherSpec(**fields)


def check_teacher_set(specs: Sequence[TeacherSpec]) -> list[TeacherSpec]:
    """The set checked before any work: names (lowercase identifiers, unique), kinds, what each kind needs, files
    that exist, heads whose base is a CLIP teacher of the set, and reward forms; the specs in build order
    (every base before its heads, otherwise as given)."""
    if not specs:
        raise ValueError("a teacher set names at least one teacher")
    names = [s.name for s in specs]
    for s in specs:
        where = f"teacher {s.name!r}"
        if not isinstance(s.name, str) or not NAME_RE.fullmatch(s.name):
            raise ValueError(f"teacher name {s.name!r}: a lowercase identifier (a-z, 0-9, _; at most 32 characters), "
                             "as it names the target column")
        if s.kind not in KINDS:
            raise ValueError(f"{where}: kind {s.kind!r} is not one of {', '.join(KINDS)}")
        form = reward_form(s.reward or DEFAULT_REWARD[s.kind], s.scale)
        if (form.form == "head") != (s.kind == "aesthetic"):
            raise ValueError(f"{where}: reward {form.form} does not fit a {s.kind} teacher (head rewards are the "
                             "aesthetic kind's, cos and logit the CLIP kinds')")
        if s.kind == "aesthetic":
            if s.base not in names or s.base == s.name:
                raise ValueError(f"{where}: base= must name another teacher of the set ({', '.join(names)}), got {s.base!r}")
            if next(b for b in specs if b.name == s.base).kind == "aesthetic":
                raise ValueError(f"{where}: its base {s.base!r} is a head itself; a head sits on a CLIP teacher")
            if s.model is None and s.weights is None:
                raise ValueError(f"{where}: weights= (the MLP's state dict) is required")
        elif s.base is not None:
            raise ValueError(f"{where}: base= is for aesthetic teachers only")
        if s.model is None:
            if s.kind != "aesthetic":
                raise ValueError(f"{where}: model= is required")
        for key in ("weights", "config"):
            v = getattr(s, key)
            if isinstance(v, (str, os.PathLike)) and not os.path.isfile(v):
                raise ValueError(f"{where}: {key} {v} is not a file")
        if s.kind == "hf":
            for key in ("model", "processor"):
                v = getattr(s, key)
                if isinstance(v, (str, os.PathLike)) and not os.path.isdir(v):
                    raise ValueError(f"{where}: {key} {v} is not a local folder (download it first, e.g. with "
                                     "huggingface-cli download, and pass the folder)")
        if s.kind == "open_clip" and isinstance(s.model, str) and s.config is None:
            import open_clip

            if s.model not in open_clip.list_models():
                raise ValueError(f"{where}: unknown open_clip model {s.model!r}; pass config= to register it")
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    return sorted(specs, key=lambda s: s.kind == "aesthetic")


def _split_open_clip_config(config) -> tuple[dict | None, dict | None]:
    """(model config, preprocess_cfg) of a model config or an ``open_clip_config.json``."""
    from ..vaes import read_json_file

    if config is None:
        return None, None
    if not isinstance(config, Mapping):
        config = read_json_file(config, "teacher config")
    if isinstance(config, Mapping) and "model_cfg" in config:
        return dict(config["model_cfg"]), dict(config.get("preprocess_cfg") or {})
    return dict(config), None


def build_teacher(spec: TeacherSpec, built: Mapping[str, Teacher], device=None, dtype=torch.float32) -> Teacher:
    """One teacher, on ``device`` in ``dtype`` (``built``: the set's teachers so far, for a head's base)."""
    where = f"teacher {spec.name!r}"
    reward = reward_form(spec.reward or DEFAULT_REWARD[spec.kind], spec.scale)
    config = spec.label()
    if spec.kind == "open_clip":
        from .teacher import load_teacher

        model_cfg, pre_cfg = _split_open_clip_config(spec.config)
        if isinstance(spec.model, nn.Module):
            model, tokenizer = spec.model, None
        else:
            model = load_teacher(spec.model, spec.weights, model_cfg)
            import open_clip

            tokenizer = open_clip.get_tokenizer(spec.model)
        weights = spec.weights
        digest = (lambda: path_digest(weights)) if weights is not None else module_digest(model)
        model = model.to(device=device, dtype=dtype) if device is not None else model.to(dtype)
        return OpenCLIPTeacher(spec.name, model, preprocess=open_clip_preprocess(model, pre_cfg), reward=reward,
                               tokenizer=tokenizer, digest=digest, config=config)
    if spec.kind == "hf":
        if isinstance(spec.model, nn.Module):
            model, digest = spec.model, module_digest(spec.model)
        else:
            from transformers import CLIPModel

            try:
                model = CLIPModel.from_pretrained(str(spec.model), use_safetensors=True, local_files_only=True)
            except (OSError, ValueError, EnvironmentError) as e:
                raise ValueError(f"{where}: can't load a CLIPModel from {spec.model} with safetensors weights "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); fastlclip never unpickles "
                                 "transformers weights: convert pytorch_model.bin to model.safetensors") from None
            folder = spec.model
            digest = lambda: path_digest(folder)  # noqa: E731
        processor = spec.processor if spec.processor is not None else spec.model
        if isinstance(processor, (str, os.PathLike)):
            from transformers import CLIPProcessor

            processor = CLIPProcessor.from_pretrained(str(processor), local_files_only=True)
        model = model.to(device=device, dtype=dtype) if device is not None else model.to(dtype)
        return HFCLIPTeacher(spec.name, model, processor, reward=reward, digest=digest, config=config)
    base = built.get(spec.base)
    if base is None:
        raise ValueError(f"{where}: its base {spec.base!r} is not built yet (build the set with build_teachers)")
    if isinstance(spec.model, nn.Module):
        head, digest = spec.model, module_digest(spec.model)
    else:
        head = AestheticMLP.from_state_dict(read_state_dict(spec.weights, f"{where} weights"), f"{where} weights")
        weights = spec.weights
        digest = lambda: path_digest(weights)  # noqa: E731
    head = head.to(device=device, dtype=torch.float32) if device is not None else head.float()
    return AestheticTeacher(spec.name, base, head, reward=reward, digest=digest, config=config)


def build_teachers(specs: Sequence[TeacherSpec], device=None, dtype=torch.float32) -> dict[str, Teacher]:
    """Every teacher of a checked set, by name, in the set's order (bases before their heads)."""
    built: dict[str, Teacher] = {}
    for spec in check_teacher_set(specs):
        built[spec.name] = build_teacher(spec, built, device, dtype)
    return {s.name: built[s.name] for s in specs}


def set_digest(described: Sequence[dict]) -> str:
    """One SHA-256 for a described teacher set (names, kinds, weights, rewards, preprocessing)."""
    return hashlib.sha256(json.dumps(list(described), sort_keys=True).encode()).hexdigest()
