"""Distillation targets: every latent of a corpus decoded by its VAE and embedded by the pixel teacher.

Built on ``fastlclip.corpus``: the same shard readers, one atomic Parquet file per shard, the manifest, the
``run.json`` resume identity and the local / Ray / RANK engines; only the per-batch work differs
(:class:`TargetScorer`: decode, teacher preprocessing, teacher image tower). A target file has the columns

- ``key``: the sample key;
- ``embedding``: the teacher's normalised image embedding (float16, ``embed_dim`` wide);
- ``latent``: the latent in VAE space (``LatentSpace.to_vae`` of diffusion-space input: ``z / scaling + shift``,
  per channel for Qwen-Image / FLUX.2), float16, flattened; its shape is ``latent_shape`` in the folder's
  ``run.json`` (``input_shape`` there when the shards' differs: FLUX.2's patchified grid, packed tokens).

Any VAE of ``vaes.LATENT_CLASSES`` works: latents are decoded and images encoded as the pipelines do
(``vaes.decode`` / ``vaes.encode``); diffusion-space shards hold the pipeline's grid or, for the packed spaces,
its ``(L, D)`` tokens of a square latent. A FLUX.2 VAE's statistics, which live in its weights, are recorded in
``run.json`` as ``vae_stats`` (:func:`vae_stats`) for the student's config.

Shards of images (``jpg`` / ``jpeg`` / ``png`` / ``webp`` members, found when a shard's first sample has no
latent member) are accepted too: each image is resized (shorter side, bicubic) and centre-cropped to
``image_size``, VAE-encoded (``vaes.encode``: the posterior mean; DC-AE's latent) to give the latent, and the
teacher embeds that image itself rather than its decode, the better target.

**Several teachers** (``make_targets(..., teachers=[TeacherSpec, ...])``, see ``fastlclip.distill.teachers`` and
docs/ensembles.md): one decode per sample (or the image itself) for all of them, each teacher's own
preprocessing, and instead of ``embedding`` a column per teacher: ``embedding_<name>`` (its normalised image
embedding, float16) for a CLIP teacher, ``score_<name>`` (float32, the head's value in its own scale) for a head
on another teacher's embedding. ``run.json`` lists every teacher (``teachers``: kind, config, weights SHA-256,
reward form, preprocessing); a folder made with another teacher set is refused (there is no add-a-column run:
make a new folder).

**Video** (a video VAE, ``fastlclip.list_vaes(video=True)``): shards of latent clips ``(C, T, h, w)`` (VAE or
diffusion space; every clip of a run has the first one's ``T``). Each clip is decoded once as its pipeline does
(``vaes.decode``: ``F = LatentSpace.video_frames(T)`` frames), the teacher embeds every decoded frame (its own
preprocessing), and latent frame ``t``'s target is the normalised mean of the teacher's normalised embeddings of
the frames it covers (``LatentSpace.frame_span(t)``). A target file keeps one row per clip (the corpus writes one
row per sample: resume, manifest and bad-sample records stay per clip, and a clip is held out whole):
``embedding`` holds its ``T`` targets (``T * embed_dim`` wide, frame-major) and ``latent`` the VAE-space clip;
``run.json`` records ``latent_shape`` ``[C, T, h, w]`` and ``video`` (``latent_frames``, ``frames``,
``temporal``, ``causal``, ``spans``). ``read_targets`` gives one row per latent frame (``(C, h, w)`` latents,
keys ``<clip>@<t>``, ``Targets.clips`` / ``Targets.frames``), so a student is an ordinary one-frame tower.
Shards of video frames (image members ``<key>.<n>.png`` / ``.jpg``, ``n = 0..F-1``; ``read_shard`` gives a uint8
``(F, 3, H, W)`` clip) are accepted too: every clip of a run has the first one's ``F``, which must fit the space
(``LatentSpace.latent_frames``: ``F = 1 + 4 (T - 1)`` on the causal 4x spaces; another ``F`` is a bad sample
naming the rule); each frame is resized and centre-cropped to ``image_size`` as image shards' images are, the
clip is VAE-encoded (``vaes.encode``: the posterior mean, ``(1, C, T, h, w)``), and the teacher embeds the
original frames rather than a decode. Not supported for video: single-image shards, mp4, LTX-Video's packed
tokens as shards, teacher sets.

**Prompts**: when a shard's samples carry a ``txt`` member (or a ``json`` one with ``prompt`` / ``caption`` /
``txt`` / ``text``; Parquet shards: such a string column), they are kept in ``prompts/<shard>.parquet``
(``key``, ``prompt``) beside the targets, written when the shard's targets are, and read back by
``read_targets`` as ``Targets.prompts``.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import corpus, vaes
from ..corpus.engines import ENGINES, rank_split, run_local, run_ray
from ..corpus.readers import DEFAULT_MEMBERS, IMAGE_MEMBERS, ShardError, read_shard
from ..corpus.runner import ON_ERROR, BadSample, ShardOptions, check_sample, report as report_line
from ..corpus.writer import RUN_FILE, check_run_file
from . import teacher as single
from . import teachers as ensemble

KIND = "fastlclip.distill targets"


def registered(vae) -> bool:
    """Whether ``vae`` is a registered VAE name, image (``fastlclip.list_vaes()``) or video
    (``list_vaes(video=True)``)."""
    return isinstance(vae, str) and (vae in vaes.list_vaes() or vae in vaes.list_vaes(video=True))


def vae_config(vae) -> dict[str, Any]:
    """The diffusers config of ``vae`` (a registered name, a diffusers folder or a module), without building it; a
    module's carries its ``_class_name`` (which its ``.config`` lacks), so the class is known from the config."""
    if isinstance(vae, torch.nn.Module):
        cfg = json.loads(json.dumps(dict(vaes.check_depth(dict(vae.config), "the VAE module's config")), default=list))
        vaes.latent_space(vae)  # its channels and constants (a FLUX.2 VAE's from its batch norm)
        return {"_class_name": type(vae).__name__, **cfg}
    if registered(vae):
        return vaes.get_vae_config(vae)
    path = Path(vae)
    for p in (path / "config.json", path / "vae" / "config.json"):
        if p.is_file():
            cfg = vaes.read_json_file(p, "VAE config")
            if not isinstance(cfg, dict):
                raise ValueError(f"VAE config {str(p)!r}: a diffusers VAE config is a JSON object")
            if cfg.get("_class_name") in vaes.STATS_IN_WEIGHTS:
                vaes.latent_space(p.parent)  # its statistics, read from the folder's weights
            else:
                vaes.latent_space({"latent_channels": 4, **cfg, "_name_or_path": str(p)})  # 4: diffusers' default
            return cfg
    raise ValueError(f"vae {str(vae)!r} is neither a registered VAE ({vaes.list_vaes()}; video: "
                     f"{vaes.list_vaes(video=True)}) nor a diffusers folder "
                     "with a config.json")


def vae_stats(vae, cfg: dict) -> dict | None:
    """The latent statistics a VAE keeps in its weights (FLUX.2: ``vaes.weight_stats``), recorded in the targets'
    ``run.json`` as ``vae_stats`` for the student's config; None for the VAEs whose constants are all in their
    config. A registered name of such a VAE has no weights, hence no statistics: an error saying what to pass."""
    cls = cfg.get("_class_name")
    if cls not in vaes.STATS_IN_WEIGHTS:
        return None
    if registered(vae):
        raise ValueError(f"vae {vae!r}: {cls}'s latent statistics ({' / '.join(vaes.STATS_IN_WEIGHTS[cls])}) live in "
                         "its weights, and a registered name has none (its VAE would be random): pass the VAE's "
                         "diffusers folder (config.json + diffusion_pytorch_model.safetensors) or the loaded module")
    return vaes.weight_stats(vae)


def _vae_label(vae) -> str:
    if isinstance(vae, torch.nn.Module):
        return f"<{type(vae).__name__} module>"
    return os.path.abspath(vae) if os.path.exists(str(vae)) else str(vae)


@dataclass
class TargetSpec:
    """What a worker needs to build a :class:`TargetScorer`; plain data (or modules), so it pickles."""

    vae: Any
    teacher: Any
    teacher_pretrained: str | None = None
    teacher_config: dict | None = None
    space: str = "vae"
    shape: tuple[int, int, int] = (16, 64, 64)
    vae_cfg: dict = field(default_factory=dict)
    image_size: int | None = None  # image shards: the side images are cropped to; None: latent shards
    device: str | None = None
    dtype: str = "float32"
    teachers: list | None = None  # several teachers (TeacherSpec); then ``teacher`` is None
    described: list | None = None  # their ``Teacher.describe()``, set once by ``make_targets``
    vae_stats: dict | None = None  # the statistics a FLUX.2 VAE keeps in its weights (``vae_stats``)
    latent_shape: tuple | None = None  # the stored VAE latent's shape where it is not ``shape`` (patchified input)
    video: dict | None = None  # a video space's temporal layout (``video_layout``)

    def build(self, device: str | None = None) -> "TargetScorer":
        return TargetScorer(self, device)

    def identity(self) -> dict:
        pretrained = self.teacher_pretrained
        if pretrained is not None and os.path.exists(pretrained):
            pretrained = os.path.abspath(pretrained)
        teacher = self.teacher if isinstance(self.teacher, str) else f"<{type(self.teacher).__name__} module>"
        d = {"kind": KIND, "vae": _vae_label(self.vae), "vae_cfg": self.vae_cfg, "teacher": teacher,
             "teacher_pretrained": pretrained, "teacher_config": self.teacher_config, "space": self.space,
             "latent_shape": list(self.latent_shape or self.shape), "image_size": self.image_size, "dtype": self.dtype}
        if self.vae_stats is not None:  # other folders keep their identity (no key added)
            d["vae_stats"] = self.vae_stats
        if self.latent_shape is not None and tuple(self.latent_shape) != tuple(self.shape):
            d["input_shape"] = list(self.shape)
        if self.video is not None:
            d["video"] = self.video
        if self.teachers is not None:  # single-teacher folders keep their identity (no key added)
            d.update(teacher=None, teacher_pretrained=None, teacher_config=None, teachers=self.described)
        return json.loads(json.dumps(d, default=str))


def _own(module: Any, dtype: torch.dtype, device: str) -> Any:
    """``module`` (a VAE or teacher given in memory) as the scorer may cast it: a copy when its dtype or device
    differ, so the caller's module is never cast in place; names and paths as they are."""
    if not isinstance(module, torch.nn.Module):
        return module
    p = next(module.parameters(), None)
    if p is not None and (p.dtype != dtype or p.device != torch.device(device)):
        return copy.deepcopy(module)
    return module


class TargetScorer:
    """The corpus scorer interface (``shape``, ``columns()``, ``embed_dim``, ``spec``, ``scorer(latents)``) for
    targets: VAE decode, then the teacher's embedding of the decoded image."""

    def __init__(self, spec: TargetSpec, device: str | None = None):
        from ..corpus.scoring import default_device

        self.spec = spec
        self.shape = tuple(spec.shape)
        device = device or spec.device or default_device()
        dtype = getattr(torch, spec.dtype)
        vae = _own(spec.vae, dtype, device)
        self.vae = vaes.build_vae(vae, dtype=dtype, device=device).eval().requires_grad_(False)
        self.space = vaes.latent_space(spec.vae_cfg, stats=spec.vae_stats)
        self.teachers = None
        if spec.teachers is not None:
            owned = [ensemble.TeacherSpec(**{**t.__dict__, "model": _own(t.model, dtype, device)}) for t in spec.teachers]
            self.teachers = ensemble.build_teachers(owned, device, dtype)
            self.embed_dim = next(t.embed_dim for t in self.teachers.values())
        else:
            teacher = _own(spec.teacher, dtype, device)
            self.teacher = single.load_teacher(teacher, spec.teacher_pretrained, spec.teacher_config, device)
            self.teacher.to(dtype)
            self.embed_dim = int(self.teacher.visual.output_dim)
        self.device = torch.device(device)
        if self.space.video:  # the writer's embedding column: T targets per clip, frame-major
            self.embed_dim *= self.shape[1]

    def columns(self) -> list[str]:
        if self.teachers is not None:
            return [*teacher_columns(self.teachers.values()), "latent"]
        return ["embedding", "latent"]

    def check(self, sample) -> torch.Tensor:
        """A latent of the shards' shape (a grid, or packed tokens), or an image resized and centre-cropped to
        ``image_size`` (in [0, 1])."""
        size = self.spec.image_size
        if size is None and self.space.video:
            try:
                return check_sample(sample, self.shape)
            except BadSample as e:
                raise BadSample(f"{e}: the video space {self.spec.video['space']} takes clips (C, T, h, w); this run's "
                                f"clips are {self.shape} (T = {self.shape[1]} latent frames); make clips of another T "
                                "their own run (another --out)") from None
        if size is None:
            return check_sample(sample, self.shape)
        if self.space.video:
            return self._check_frames(sample, size)
        if sample.error is not None:
            raise BadSample(sample.error)
        x = sample.latent
        if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
            raise BadSample(f"not an RGB image: {tuple(x.shape)} {x.dtype}")
        return single.resize_crop(x.float()[None] / 255, size)[0]

    def _check_frames(self, sample, size: int) -> torch.Tensor:
        """A video frame sample (uint8 ``(F, 3, H, W)``) of the run's frame count, every frame resized and
        centre-cropped as image shards' images are: ``(3, F, size, size)`` in [0, 1]."""
        if sample.error is not None:
            raise BadSample(sample.error)
        x = sample.latent
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise BadSample(f"not a clip of RGB frames (F, 3, H, W) uint8: {tuple(x.shape)} {x.dtype}")
        f, t = int(x.shape[0]), self.shape[1]
        run = (f"this run's clips are {self.space.video_frames(t)} frames (T = {t} latent frames); make clips of "
               "another length their own run (another --out)")
        try:
            got = self.space.latent_frames(f)
        except ValueError as e:
            raise BadSample(f"a clip of {f} frames: {e}; {run}") from None
        if got != t:
            raise BadSample(f"a clip of {f} frames ({got} latent frames): {run}")
        return single.resize_crop(x.float() / 255, size).transpose(0, 1)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        if self.spec.image_size is not None:
            images = (batch.to(self.device, torch.float32) * 2 - 1).to(self.vae.dtype)
            if self.space.video:  # clips (B, 3, F, H, W), encoded one by one (HunyuanVideo 1.5: no batches)
                raw = torch.cat([vaes.encode(self.vae, c) for c in images.split(1)]).float()
            else:
                raw = vaes.encode(self.vae, images).float()  # as the pipelines encode (DC-AE: no posterior)
        else:
            raw = batch.to(self.device, torch.float32)
            if self.spec.space == "diffusion":
                raw = self.space.to_vae(self.space.grid(raw))  # packed tokens: a square grid
            images = vaes.decode(self.vae, raw)  # the one decode, for every teacher
        latent = raw.half().flatten(1).cpu().numpy()
        if self.space.video:
            return {"embedding": video_targets(self.teacher, images, self.space, raw.shape[2]).half().flatten(1)
                    .cpu().numpy(), "latent": latent}
        if self.teachers is None:
            emb = single.embed_images(self.teacher, images)
            return {"embedding": emb.half().cpu().numpy(), "latent": latent}
        if self.spec.image_size is not None:  # the image itself, in [0, 1]
            pixels = batch.to(self.device, torch.float32)
        else:
            pixels = ((images.float() + 1) / 2).clamp(0, 1)
        return {**embed_columns(self.teachers.values(), pixels), "latent": latent}


FRAME_CHUNK = 256  # decoded frames per teacher forward


def video_targets(teacher, frames: torch.Tensor, space, latent_frames: int) -> torch.Tensor:
    """Per-latent-frame targets ``(B, T, D)`` (float32) of decoded clips ``frames`` ``(B, 3, F, H, W)`` in [-1, 1]:
    the teacher's normalised embedding of every frame, and for latent frame ``t`` the normalised mean of those of
    the frames ``space.frame_span(t)`` covers. A decode of another frame count than ``space.video_frames(T)`` is
    an error naming the space."""
    b, _, f, h, w = frames.shape
    want = space.video_frames(latent_frames)
    if f != want:
        raise ValueError(f"the video space {space.name!r} decodes {latent_frames} latent frames to {want} frames, this "
                         f"VAE gave {f}: its config does not describe the space's temporal layout")
    flat = frames.transpose(1, 2).reshape(b * f, 3, h, w)
    emb = torch.cat([single.embed_images(teacher, c) for c in flat.split(FRAME_CHUNK)]).view(b, f, -1)
    spans = [space.frame_span(t) for t in range(latent_frames)]
    return F.normalize(torch.stack([emb[:, a:z].mean(1) for a, z in spans], 1), dim=-1)


def teacher_columns(teachers) -> list[str]:
    """The target columns of a teacher set, in its order: ``embedding_<name>`` per CLIP teacher,
    ``score_<name>`` per head."""
    return [f"score_{t.name}" if t.base is not None else f"embedding_{t.name}" for t in teachers]


def embed_columns(teachers, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Every teacher's column for one batch of images in [0, 1]: each CLIP teacher embeds them once (its own
    preprocessing), each head reads its base's embedding."""
    teachers = list(teachers)
    embs = {t.name: t.embed_images(pixels) for t in teachers if t.base is None}
    out = {}
    for t in teachers:
        if t.base is None:
            out[f"embedding_{t.name}"] = embs[t.name].half().cpu().numpy()
        else:
            out[f"score_{t.name}"] = t.score(embs[t.base]).float().cpu().numpy()
    return out


def _vae_shape(shape: tuple, space, label: str) -> tuple[int, ...]:
    """The VAE-space shape of diffusion-space samples of ``shape`` (a grid, or square packed tokens): the stored
    latent's; a shape the space can't hold is an error naming it."""
    if len(shape) == 3 and shape[0] != space.diffusion_channels:
        raise ValueError(f"the shards' latents have {shape[0]} channels, the VAE {space.diffusion_channels} in "
                         f"diffusion space ({label!r}): wrong --vae or --space for them")
    try:
        return tuple(space.to_vae(space.grid(torch.zeros(1, *shape))).shape[1:])
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"the shards' diffusion-space latents are {shape}, which the VAE {label!r}'s space does not "
                         f"hold ({e}): wrong --vae or --space for them") from None


def _first_sample(shards: list[str], member, column, video: bool = False) -> torch.Tensor:
    """The first readable latent (a grid, or packed ``(L, D)`` tokens; ``video``: a clip ``(C, T, h, w)`` too) or
    image of the shards (latent members first, then images)."""
    wanted = member or (*DEFAULT_MEMBERS, *IMAGE_MEMBERS)
    ranks = (2, 3, 4) if video else (2, 3)
    for shard in shards:
        try:
            for sample in read_shard(shard, member=wanted, column=column):
                x = sample.latent
                if x is not None and x.ndim == max(ranks) + 1 and x.shape[0] == 1:
                    x = x[0]
                if x is not None and x.ndim in ranks:
                    return x
        except ShardError:
            continue
    raise ValueError("no readable (C, H, W) latent, (L, D) packed tokens or image in the input shards: can't tell "
                     "their shape")


def space_words(vae, cfg: dict, space) -> str:
    """A video space in words for messages: its registered name, or its class; channels, factors, causality."""
    name = repr(vae) if registered(vae) else cfg.get("_class_name", "a VAE")
    return (f"{name} ({space.channels} channels, {vaes.vae_factor(cfg)}x spatial, {space.temporal}x temporal"
            + (", causal)" if space.causal else ")"))


def video_layout(space, shape: tuple, words: str, layout: str) -> dict:
    """The temporal layout of a video run whose shards hold ``shape`` (``layout``: ``"vae"`` or ``"diffusion"``),
    checked: clips ``(C, T, h, w)`` of the space's channels. Single frames, packed tokens, other channel counts
    are errors naming the space (``words``: :func:`space_words`) and the fix."""
    c = space.diffusion_channels if layout == "diffusion" else space.channels
    label = f"the video space {words}"
    if len(shape) == 3:
        raise ValueError(f"the shards' latents are {shape}, single frames; {label} takes clips ({c}, T, h, w): store "
                         "each clip whole (one frame: shape (C, 1, h, w))")
    if len(shape) == 2:
        raise ValueError(f"the shards' latents are {shape}, packed tokens; {label} takes the grid ({c}, T, h, w) in "
                         "targets: unpack them (the pipeline's _unpack_latents) before writing the shards")
    if len(shape) != 4 or shape[0] != c:
        raise ValueError(f"the shards' latents are {shape}; {label} takes clips ({c}, T, h, w) in {layout} space: "
                         "wrong --vae or --space for them")
    t = shape[1]
    return {"space": words, "latent_frames": t, "frames": space.video_frames(t), "temporal": space.temporal,
            "causal": space.causal, "spans": [list(space.frame_span(i)) for i in range(t)]}


def row_shape(info: dict) -> tuple[int, int, int]:
    """The shape of one training row's latent in a targets folder (its ``run.json``): the VAE latent ``(C, h, w)``,
    a video run's latent frame (``latent_shape`` ``[C, T, h, w]`` without ``T``)."""
    shape = list(info["latent_shape"])
    return tuple(shape[:1] + shape[2:]) if info.get("video") else tuple(shape)


def _downsampling(cfg: dict) -> int:
    """Image pixels per latent pixel: ``vaes.vae_factor`` of a config naming its class; a config without one (an
    AutoencoderKL or AutoencoderTiny config) by its blocks, 4 of them when it lists none."""
    if "_class_name" in cfg:
        return vaes.vae_factor(cfg)
    blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels") or (0,) * 4
    return 2 ** (len(blocks) - 1)


def make_targets(shards, out, *, vae, teacher=None, teacher_pretrained=None, teacher_config=None, space="vae",
                 batch_size=64, engine="local", workers=1, on_error="skip", member=None, column="latent",
                 image_size=None, device=None, dtype="float32", progress=True, teachers=None,
                 prompts=True) -> corpus.ScoreReport:
    """Decode every latent of ``shards`` with ``vae`` and store the teacher's normalised embedding per key.

    ``vae``: a registered name (``fastlclip.list_vaes()``; not FLUX.2's, whose statistics live in its weights), a
    diffusers folder, or a module (one of ``vaes.DECODER_CLASSES``; local engine). ``teacher``: an open_clip
    model name (weights ``teacher_pretrained``; ``teacher_config``, a dict or JSON file, registers the name first)
    or an open_clip ``CLIP`` module. ``space``: the shards' latents, ``"vae"`` (raw posterior samples) or
    ``"diffusion"`` (the pipeline's grid, or its packed ``(L, D)`` tokens).
    ``engine`` / ``workers`` / ``on_error`` / ``member`` / ``column`` / ``device``: as
    ``fastlclip.corpus.score``; rerunning the same call resumes, skipping finished shards. Image shards (see
    the module docstring): ``image_size`` (default: the first image's shorter side, down to a multiple of the
    VAE's downsampling).

    ``teachers`` (instead of ``teacher``): several teachers, ``fastlclip.distill.teachers.TeacherSpec`` objects or
    their one-line strings (``parse_teacher_spec``), checked as a set and built once here (a bad file fails
    before any work); one decode per sample for all of them, a column per teacher (see the module docstring).
    ``prompts``: keep the shards' ``txt`` / ``json`` prompts in ``prompts/`` (a second, header-only pass over an
    uncompressed tar; False skips it).
    """
    shard_list = corpus.expand_inputs(shards)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    for value, what in ((batch_size, "batch_size"), (workers, "workers")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if space not in ("vae", "diffusion"):
        raise ValueError(f"space must be 'vae' or 'diffusion', got {space!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    if (teacher is None) == (teachers is None):
        raise ValueError("pass either teacher= (one open_clip teacher) or teachers= (a teacher set), not both or neither")
    if teacher_config is not None and not isinstance(teacher_config, dict):
        teacher_config = vaes.read_json_file(teacher_config, "teacher config")
    cfg = vae_config(vae)
    stats = vae_stats(vae, cfg)
    lspace = vaes.latent_space(cfg, stats=stats) if cfg.get("_class_name") in vaes.VIDEO_CLASSES else None
    if lspace is not None and teachers is not None:
        raise ValueError(f"vae {_vae_label(vae)!r} is the video space {space_words(vae, cfg, lspace)}: a teacher "
                         "set's targets are not supported on video; pass teacher= (one teacher)")
    described = None
    if teachers is not None:
        teachers = [t if isinstance(t, ensemble.TeacherSpec) else ensemble.parse_teacher_spec(t) for t in teachers]
        ensemble.check_teacher_set(teachers)
        built = ensemble.build_teachers(teachers)  # every file read, every shape checked, before any work
        described = [t.describe() for t in built.values()]
        del built
    elif not isinstance(teacher, torch.nn.Module):
        single.load_teacher(teacher, teacher_pretrained, teacher_config)  # a bad name or file fails before work
    first = _first_sample(shard_list, member, column, video=lspace is not None)
    channels, factor = vaes.vae_channels(cfg), _downsampling(cfg)
    latent_shape = video = None
    if lspace is not None and first.dtype == torch.uint8:  # video frame shards: <key>.<n>.png members
        words = space_words(vae, cfg, lspace)
        if first.ndim != 4 or first.shape[1] != 3:
            raise ValueError(f"the shards hold images; the video space {words} makes targets from latent clips "
                             f"(C, T, h, w) or clips of frames: encode the videos first (vaes.encode), or store each "
                             f"clip's frames as image members <key>.<n>.png (n = 0..F-1; got {tuple(first.shape)})")
        if image_size is None:
            image_size = min(first.shape[-2:]) // factor * factor
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < factor or image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of the VAE's downsampling {factor}, got {image_size!r}")
        shape = (lspace.channels, lspace.latent_frames(int(first.shape[0])), image_size // factor, image_size // factor)
        video = video_layout(lspace, shape, words, "vae")
        member = member or IMAGE_MEMBERS
    elif lspace is not None:
        shape = tuple(int(s) for s in first.shape)
        video = video_layout(lspace, shape, space_words(vae, cfg, lspace), space)
        image_size = None
    elif first.dtype == torch.uint8:  # image shards
        if image_size is None:
            image_size = min(first.shape[-2:]) // factor * factor
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < factor or image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of the VAE's downsampling {factor}, got {image_size!r}")
        shape = (channels, image_size // factor, image_size // factor)
        member = member or IMAGE_MEMBERS
    else:
        image_size = None
        shape = tuple(int(s) for s in first.shape)
        if space == "diffusion":
            latent_shape = _vae_shape(shape, vaes.latent_space(cfg, stats=stats), _vae_label(vae))
        elif len(shape) != 3:
            raise ValueError(f"the shards' latents are {shape}: packed tokens are diffusion space (pass --space "
                             f"diffusion); VAE-space latents are ({channels}, H, W) grids")
        elif shape[0] != channels:
            raise ValueError(f"the shards' latents have {shape[0]} channels, the VAE {channels}: wrong --vae for them")

    spec = TargetSpec(vae=vae, teacher=teacher, teacher_pretrained=None if teacher_pretrained is None
                      else str(teacher_pretrained), teacher_config=teacher_config, space=space, shape=shape,
                      vae_cfg=cfg, image_size=image_size, device=device, dtype=dtype, teachers=teachers,
                      described=described, vae_stats=stats, latent_shape=latent_shape, video=video)
    mine = shard_list if engine == "ray" else rank_split(shard_list)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_teacher_set_of(out, spec.identity())
    check_run_file(out, spec.identity())
    opts = ShardOptions(out=str(out), batch_size=batch_size, on_error=on_error, member=member, column=column,
                        run_id=uuid.uuid4().hex[:12])
    done = [0]

    def report(record: dict) -> None:
        done[0] += 1
        if prompts and record["status"] in ("ok", "skipped"):
            keep_prompts(record["shard"], out)
        if progress:
            report_line(record, done[0], len(mine))

    run = run_ray if engine == "ray" else run_local
    return corpus.ScoreReport(run(mine, spec, opts, workers, report) if mine else [])


def _teacher_set(identity: dict) -> list[tuple]:
    if identity.get("teachers") is None:
        return [(identity.get("teacher"), "open_clip", (identity.get("teacher_pretrained")))]
    return [(t["name"], t["kind"], t["weights_sha256"]) for t in identity["teachers"]]


def check_teacher_set_of(out: Path, identity: dict) -> None:
    """A folder holding targets of another teacher set (a teacher added, removed or renamed, other weights) is
    refused here, naming both sets: targets of two sets in one folder would train a student on a mix. (Other
    settings are ``check_run_file``'s.)"""
    from ..corpus.writer import readable_output

    path = out / RUN_FILE
    if not path.is_file() or not any(readable_output(p) for p in out.glob("*.parquet")):
        return
    old = vaes.read_json_file(path, "targets run file")
    if not isinstance(old, dict) or old.get("kind") != KIND:
        return  # check_run_file refuses it
    mine, theirs = _teacher_set(identity), _teacher_set(old)
    if mine != theirs:
        show = lambda s: ", ".join(f"{n} ({k}, weights {str(d)[:12]})" for n, k, d in s)  # noqa: E731
        raise ValueError(f"{out} holds targets of the teacher set [{show(theirs)}]; this run names [{show(mine)}]. "
                         "A target folder holds one teacher set: adding a teacher to it is not supported (it would "
                         "mix rows with and without its column). Make the new set's targets in another --out")


# -- prompts -----------------------------------------------------------------------------------------
PROMPTS_DIR = "prompts"
PROMPT_MEMBERS = ("txt", "json")  # tar members, the first one present per sample wins
PROMPT_KEYS = ("prompt", "caption", "txt", "text")  # in a json member, or Parquet column names


def _prompt_of(data: bytes, ext: str) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if ext == "txt":
        return text.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        return next((obj[k] for k in PROMPT_KEYS if isinstance(obj.get(k), str)), None)
    return None


def shard_prompts(shard) -> dict[str, str]:
    """key -> prompt of one shard (see the module docstring); empty when it holds none or can't be read (its
    targets then say why)."""
    import tarfile

    from ..corpus.readers import KEY_COLUMNS, key_problem, shard_kind, shard_stem, split_key

    found: dict[str, tuple[int, str]] = {}
    kind = shard_kind(shard)
    try:
        if kind == "tar":
            with tarfile.open(shard, mode="r:*") as tf:  # uncompressed: seeks over member data, reads headers
                for info in tf:
                    key, ext = split_key(info.name)
                    if not info.isfile() or ext not in PROMPT_MEMBERS or key_problem(key) is not None:
                        continue
                    rank = PROMPT_MEMBERS.index(ext)
                    if key in found and found[key][0] <= rank:
                        continue
                    text = _prompt_of(tf.extractfile(info).read(), ext)
                    if text is not None:
                        found[key] = (rank, text)
        elif kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(shard)
            names = pf.schema_arrow.names
            col = next((c for c in PROMPT_KEYS if c in names and pa.types.is_string(pf.schema_arrow.field(c).type)), None)
            if col is None:
                return {}
            key_col = next((k for k in KEY_COLUMNS if k in names), None)
            t = pq.read_table(shard, columns=[col] + ([key_col] if key_col else []))
            keys = ([k.decode() if isinstance(k, bytes) else str(k) for k in t.column(key_col).to_pylist()]
                    if key_col else [f"{shard_stem(shard)}/{i}" for i in range(len(t))])
            for k, p in zip(keys, t.column(col).to_pylist()):
                if p is not None and key_problem(k) is None:
                    found[k] = (0, p)
    except Exception:  # an unreadable shard: its targets record the error
        return {}
    return {k: v[1] for k, v in found.items()}


def prompts_path(out, shard) -> Path:
    from ..corpus.writer import output_path

    return Path(out) / PROMPTS_DIR / output_path(out, shard).name


def keep_prompts(shard, out) -> None:
    """Write ``prompts/<shard>.parquet`` (``key``, ``prompt``; atomic) unless it exists: the shard's prompts, for
    the keys its target file holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..corpus.writer import output_path, write_atomic

    path = prompts_path(out, shard)
    target = output_path(out, shard)
    if path.exists() or not target.is_file():
        return
    found = shard_prompts(shard)
    keys = [k for k in pq.read_table(target, columns=["key"]).column("key").to_pylist() if k in found]
    path.parent.mkdir(exist_ok=True)
    table = pa.table({"key": pa.array(keys, pa.string()), "prompt": pa.array([found[k] for k in keys], pa.string())})
    write_atomic(table, path)


def read_prompts(folder) -> dict[str, str]:
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for f in sorted((Path(folder) / PROMPTS_DIR).glob("*.parquet")):
        t = pq.read_table(f, columns=["key", "prompt"])
        out.update(zip(t.column("key").to_pylist(), t.column("prompt").to_pylist()))
    return out


def is_holdout(key: str, fraction: float) -> bool:
    """The held-out split: a fixed function of the key (CRC32), so every rank, run and resume agrees on it."""
    return zlib.crc32(key.encode()) % 100_000 < fraction * 100_000


@dataclass
class Targets:
    """A target folder in memory: ``keys``, ``latents`` (N, C, H, W) float16 in VAE space, ``embeddings``
    (N, D) float16 (a teacher set's folder: the chosen teacher's), and the folder's ``info`` (its ``run.json``).
    A teacher set's folder also fills ``columns`` (teacher name -> (N, D) float16 embeddings, every CLIP
    teacher) and ``scores`` (head name -> (N,) float32); ``prompts``: the kept prompts, one per row (None where
    a sample had none), or None when the folder kept none. A video folder has a row per latent frame: ``clips``
    (each row's clip key) and ``frames`` ((N,) its latent frame index ``t``); None for image folders."""

    keys: list[str]
    latents: torch.Tensor
    embeddings: torch.Tensor
    info: dict
    columns: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    prompts: list | None = None
    clips: list | None = None
    frames: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def split(self, holdout: float) -> tuple["Targets", "Targets"]:
        """(training rows, held-out rows); a video folder's clips are held out whole (the split is by clip key)."""
        held = torch.tensor([is_holdout(k, holdout) for k in (self.clips or self.keys)], dtype=torch.bool)
        return self.subset(~held), self.subset(held)

    def subset(self, mask: torch.Tensor) -> "Targets":
        idx = mask.nonzero().flatten()
        rows = idx.tolist()
        return Targets([self.keys[i] for i in rows], self.latents[idx], self.embeddings[idx], self.info,
                       {k: v[idx] for k, v in self.columns.items()}, {k: v[idx] for k, v in self.scores.items()},
                       None if self.prompts is None else [self.prompts[i] for i in rows],
                       None if self.clips is None else [self.clips[i] for i in rows],
                       None if self.frames is None else self.frames[idx])


def read_targets(folder, teacher: str | None = None) -> Targets:
    """All rows of a ``make_targets`` folder, files in sorted order (the data order is defined on this).

    A teacher set's folder: ``teacher`` names the CLIP teacher whose column becomes ``embeddings`` (default: the
    set's only CLIP teacher; an error when it has several); every column is in ``columns`` / ``scores``."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    run = folder / RUN_FILE
    if not run.is_file():
        raise ValueError(f"{folder} is not a targets folder (no {RUN_FILE}): make it with "
                         "python -m fastlclip.distill targets")
    info = vaes.read_json_file(run, "targets run file")
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise ValueError(f"{folder} holds fastlclip.corpus scores, not distillation targets")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ValueError(f"{folder} has no finished target files (*.parquet)")
    shape = tuple(info["latent_shape"])
    described = info.get("teachers")
    if described is None:
        emb_cols, score_cols, chosen = ["embedding"], [], "embedding"
    else:
        clip = [t["name"] for t in described if t.get("base") is None]
        emb_cols = [f"embedding_{n}" for n in clip]
        score_cols = [f"score_{t['name']}" for t in described if t.get("base") is not None]
        if teacher is None and len(clip) != 1:
            raise ValueError(f"{folder} holds targets of several teachers ({', '.join(clip)}): pass teacher=NAME to "
                             "pick the one a single-head student learns")
        name = clip[0] if teacher is None else teacher
        if name not in clip:
            raise ValueError(f"teacher {name!r} has no embedding column in {folder} (its CLIP teachers: {', '.join(clip)})")
        chosen = f"embedding_{name}"
    if described is None and teacher is not None:
        raise ValueError(f"{folder} holds one teacher's targets (column embedding); teacher= is for teacher sets")
    keys, lat = [], []
    cols: dict[str, list] = {c: [] for c in emb_cols + score_cols}
    for f in files:
        t = pq.read_table(f, columns=["key", *emb_cols, *score_cols, "latent"])
        if len(t) == 0:  # a shard whose every sample was bad
            continue
        file_keys = t.column("key").to_pylist()
        x = np.asarray(t.column("latent").combine_chunks().flatten()).reshape(len(t), *shape)
        for c in emb_cols:
            e = np.asarray(t.column(c).combine_chunks().flatten()).reshape(len(t), -1)
            _check_finite(f, file_keys, e, x, what=c)
            cols[c].append(e)
        for c in score_cols:
            v = t.column(c).to_numpy()
            _check_finite(f, file_keys, v.reshape(-1, 1), x, what=c)
            cols[c].append(v)
        keys += file_keys
        lat.append(x)
    if not keys:
        raise ValueError(f"{folder} holds no target rows (every sample was bad: see its manifest.jsonl)")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{folder}: a key appears in more than one row; keys must be unique across shards")
    tensors = {c: torch.from_numpy(np.concatenate(v)) for c, v in cols.items()}
    kept = read_prompts(folder)
    prompts = [kept.get(k) for k in keys] if kept else None
    columns = {c[len("embedding_"):]: tensors[c] for c in emb_cols} if described is not None else {}
    scores = {c[len("score_"):]: tensors[c] for c in score_cols}
    latents = torch.from_numpy(np.concatenate(lat))
    if info.get("video"):  # a row per latent frame, clip-major
        n, c, t = latents.shape[:3]
        return Targets([f"{k}@{i}" for k in keys for i in range(t)],
                       latents.transpose(1, 2).reshape(n * t, c, *latents.shape[3:]),
                       tensors[chosen].reshape(n * t, -1), info,
                       prompts=None if prompts is None else [p for p in prompts for _ in range(t)],
                       clips=[k for k in keys for _ in range(t)], frames=torch.arange(t).repeat(n))
    return Targets(keys, latents, tensors[chosen], info, columns, scores, prompts)


def _check_finite(path: Path, keys: list[str], embeddings: np.ndarray, latents: np.ndarray,
                  what: str = "embedding") -> None:
    """A ``ValueError`` naming the file, row and key of the first NaN / Inf embedding or latent: one such row
    trains a NaN model."""
    for what, values in ((what, embeddings), ("latent", latents)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(1)
        if bad.any():
            row = int(bad.argmax())
            raise ValueError(f"{path}: row {row} (key {keys[row]!r}) has a non-finite {what} (NaN or Inf; "
                             f"{int(bad.sum())} such rows in this file): drop the sample from its input shard, delete "
                             f"{path.name} and rerun python -m fastlclip.distill targets with the same arguments to "
                             "remake it")
