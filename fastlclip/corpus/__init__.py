"""Corpus scale: score and filter sharded latent corpora, resumable, in process, on processes or on Ray Data.

    report = fastlclip.corpus.score(["shards/00000.tar", ...], "scores/", model="Latent-ViT-B-8-512",
                                    pretrained="epoch_34.pt", prompts=["a photo of a cat"], safety=True)
    keys = fastlclip.corpus.select("scores/", by="clip_cos_0", top_fraction=0.5)

The unit of work is one input shard (``readers``): one Parquet file per shard and one manifest line per
shard (``writer``); shards whose output is complete are skipped, so running the same command again resumes
(into a folder made with the same settings and weights only).
Engines: ``engines``. Columns: ``scoring``. Keep-lists: ``selection``. Command line: ``python -m fastlclip.corpus --help``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..inputs import check_space
from ..rewards import check_pooling
from ..runtime import BACKENDS as _RUNTIME_BACKENDS
from ..zeroshot import check_templates
from .engines import ENGINES, rank_split, run_local, run_ray
from .readers import shard_kind, shard_stem
from .runner import ON_ERROR, ShardOptions, report as _report_line, run_identity
from .scoring import DEFAULT_TEMPLATES, Scorer, ScoreSpec, check_prompts, fingerprint
from .selection import MissingShards, select
from .writer import (INPUTS, MANIFEST, check_run_file, drop_torn_tail, expected_shards, read_manifest,
                     record_inputs)

BACKENDS = (*_RUNTIME_BACKENDS, "auto")

__all__ = ["MissingShards", "ScoreReport", "expand_inputs", "read_manifest", "score", "select"]


@dataclass
class ScoreReport:
    """The manifest records of one ``score`` call (this rank's shards only under RANK/WORLD_SIZE)."""

    records: list[dict]

    def _with(self, status: str) -> list[dict]:
        return [r for r in self.records if r["status"] == status]

    @property
    def ok(self) -> list[dict]:
        return self._with("ok")

    @property
    def failed(self) -> list[dict]:
        return self._with("error")

    @property
    def skipped(self) -> list[dict]:
        return self._with("skipped")

    @property
    def rows(self) -> int:
        return sum(r["rows"] for r in self.records if r["status"] == "ok")

    @property
    def bad_samples(self) -> list[dict]:
        return [{"shard": r["shard"], **b} for r in self.records for b in r.get("bad", [])]


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from files and folders (a folder: its tar and Parquet files, sorted); missing ones are an error.

    Every shard is a regular file (a FIFO or device is refused, never opened); a shard named twice (directly,
    through a folder or a link) is kept once, at its first place.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ValueError("no input shards given")
    if any(not isinstance(i, (str, os.PathLike)) or not str(i).strip() for i in items):
        raise ValueError(f"input shards must be non-empty paths, got {[i for i in items if not str(i).strip()]!r}")
    shards, missing, unknown, irregular = [], [], [], []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if shard_kind(f) and not f.is_dir())
            if not found:
                unknown.append(f"{p}/ (no .tar or .parquet files)")
            irregular += [str(f) for f in found if not f.is_file()]
            shards += [str(f) for f in found if f.is_file()]
        elif not p.exists():
            missing.append(str(p))
        elif shard_kind(p) is None:
            unknown.append(str(p))
        elif not p.is_file():
            irregular.append(str(p))
        else:
            shards.append(str(p))
    if missing:
        raise FileNotFoundError(f"input shards not found: {', '.join(missing[:5])}"
                                + (f" ... ({len(missing)} in all)" if len(missing) > 5 else ""))
    if irregular:
        raise ValueError(f"not regular files (a FIFO, device or socket is never read): {', '.join(irregular[:5])}")
    if unknown:
        raise ValueError(f"not WebDataset tar (.tar, .tar.gz, .tgz) or Parquet (.parquet) shards: {', '.join(unknown[:5])}")
    unique: dict[str, str] = {}
    for s in shards:
        unique.setdefault(os.path.realpath(s), s)
    shards = list(unique.values())
    stems: dict[str, str] = {}
    for s in shards:
        other = stems.setdefault(shard_stem(s), s)
        if other != s:
            raise ValueError(f"{other} and {s} would both write {shard_stem(s)}.parquet; give shards distinct names")
    return shards


def check_out(out, inputs: Sequence[str | os.PathLike]) -> Path:
    """The output folder: a non-empty path that is not an input, not inside an input folder, and holds no input."""
    if not isinstance(out, (str, os.PathLike)) or not str(out).strip():
        raise ValueError(f"out must be a non-empty folder path, got {out!r}")
    real = os.path.realpath(out)
    for item in inputs:
        other = os.path.realpath(item)
        if os.path.commonpath([real, other]) in (real, other):
            how = "is" if real == other else ("is inside" if os.path.commonpath([real, other]) == other else "holds")
            raise ValueError(f"the output folder {out} {how} the input {item}: outputs and inputs would mix; "
                             "pass an --out outside the inputs")
    return Path(out)


def check_device(device, engine: str) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); e.g. 'cpu', 'cuda', 'cuda:1'") from None
    if dev.type == "cuda" and engine == "local":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}, but CUDA is not available here; pass device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}, but there are {torch.cuda.device_count()} CUDA devices")


def check_member(member) -> None:
    if member is None:
        return
    if not isinstance(member, str) or not (member.endswith((".pt", ".pth", ".npy")) or member in ("pt", "pth", "npy")):
        raise ValueError(f"member must name a .pt, .pth or .npy tar member such as 'latent.pt', got {member!r}")


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def score(inputs, out, *, model, pretrained=None, prompts=None, classes=None, templates=None, safety=False,
          embeddings=False, space="vae", engine="local", workers=1, batch_size=256, on_error="skip", member=None,
          column="latent", device=None, dtype="float32", backend="eager", frames=None, pooling="mean",
          progress=True) -> ScoreReport:
    """Score every latent of ``inputs`` (shard files or folders) into ``out``; see the module docstring.

    ``model`` / ``pretrained``: as ``fastlclip.load`` (a config name, dict or JSON path; a checkpoint). With
    ``pretrained=None`` the weights are random but seeded, so every worker and resumed run uses the same.
    ``prompts``: texts, one ``clip_cos_<i>`` column each. ``classes`` (+ ``templates``, default
    ``"a photo of a {}."``): zero-shot ``prob_<class>`` columns and ``label``. ``safety``: checker margins and
    ``safety_flag``. ``embeddings``: fp16 ``embedding``. ``space``: ``"vae"`` (raw posterior samples, the
    default) or ``"diffusion"`` (what the pipeline hands: the diffusion grid, or for Qwen-Image and FLUX.2 also the
    packed tokens ``(L, D)`` of the square trained latent, unpacked exactly; a FLUX.2 model needs its ``vae_stats``;
    flat storage of a packed space's latents is a bad sample, its layout unknown). ``engine``: ``"local"`` or
    ``"ray"``; ``workers``: processes or actors.
    ``on_error="skip"`` records a bad sample (shape, NaN, overflow in the model's dtype or inside the model, a
    bad key, an unreadable member) in the manifest and scores the rest of its shard; ``"raise"`` fails the
    shard instead. A shard that fails (unreadable, or no sample has the member) is recorded with status
    ``error``, gets no output (so the next run retries it), and the other shards go on. ``out`` may not be,
    lie inside, or hold an input. Every argument is checked, and the model built, before anything is written.
    ``member``: tar member holding the latent (default ``latent.pt``, then ``latent.npy``); ``column``: the
    Parquet tensor column. ``device`` / ``dtype`` / ``backend``: as ``fastlclip.load``.

    A model on a video space (``fastlclip.list_vaes(video=True)``) scores clips: ``frames`` (required there, refused
    for an image space) is their video frame count F, so every sample is a clip ``(C, T, h, w)`` of
    ``T = model.latent_space.latent_frames(F)`` latent frames at the trained size (LTX-Video in diffusion space: or
    its pipeline's tokens ``(T h w, 128)``); another T or channel count is a bad sample naming the space. Per-clip
    scores pool the per-frame cosines by ``pooling`` (``"mean"``, the default, or ``"min"``); per-frame scores go to
    ``frame_*`` list columns (``scoring``). Safety is refused on clips.
    """
    return _prepare(inputs, out, model=model, pretrained=pretrained, prompts=prompts, classes=classes,
                    templates=templates, safety=safety, embeddings=embeddings, space=space, engine=engine,
                    workers=workers, batch_size=batch_size, on_error=on_error, member=member, column=column,
                    device=device, dtype=dtype, backend=backend, frames=frames, pooling=pooling, progress=progress)()


def _prepare(inputs, out, *, model, pretrained, prompts, classes, templates, safety, embeddings, space, engine,
             workers, batch_size, on_error, member, column, device, dtype, backend, frames, pooling, progress):
    """Check every argument and set up the output folder; the returned callable runs the shards (the command line
    tells the two apart: a bad argument exits 2, a run that fails exits 1)."""
    shards = expand_inputs(inputs)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out = check_out(out, [*items, *shards])
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    _positive_int(workers, "workers")
    _positive_int(batch_size, "batch_size")
    if frames is not None:
        _positive_int(frames, "frames")
    check_pooling(pooling)
    check_space(space)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    check_device(device, engine)
    check_member(member)
    if not isinstance(column, str) or not column.strip():
        raise ValueError(f"column must name the Parquet latent column, got {column!r}")
    if model is None:
        raise ValueError("model is required: a config name such as 'Latent-ViT-B-8-512', a config dict or JSON path")
    prompts = check_prompts(prompts, "prompts")
    classes = check_prompts(classes, "classes")
    templates = check_prompts(templates, "templates") or list(DEFAULT_TEMPLATES)
    if classes:
        check_templates(templates)
    if not (prompts or classes or safety or embeddings):
        raise ValueError("nothing to compute: pass prompts, classes, safety=True or embeddings=True")
    if isinstance(model, str) and not os.path.exists(model):
        from .. import get_model_config

        get_model_config(model)  # an unknown name fails here, before any output
    if pretrained is not None:
        pretrained = str(pretrained)
        if not pretrained.strip():
            raise ValueError("pretrained must be a checkpoint path or hf-hub:REPO, got ''")
        if not pretrained.startswith("hf-hub:"):
            if not os.path.exists(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
            if not (os.path.isfile(pretrained) or os.path.isdir(pretrained)):
                raise ValueError(f"pretrained {pretrained} is not a regular file or folder (a FIFO is never read)")
    if engine == "ray":
        from .engines import _import_ray

        _import_ray()
        mine = shards
    else:
        mine = rank_split(shards)

    spec = ScoreSpec(model=model, pretrained=pretrained, prompts=prompts, classes=classes, templates=templates,
                     safety=bool(safety), embeddings=bool(embeddings), space=space, device=device, dtype=dtype,
                     backend=backend, frames=frames, pooling=pooling, weights=fingerprint(model, pretrained))
    opts = ShardOptions(out=str(out), batch_size=batch_size, on_error=on_error, member=member, column=column,
                        run_id=uuid.uuid4().hex[:12])
    single = engine == "local" and (workers == 1 or len(mine) <= 1)
    # The model is built before anything is written: a checkpoint or config that does not load is a bad argument,
    # not a worker or actor dying later. One local process keeps it; other engines' workers build their own.
    scorer = spec.build(None if single else "cpu") if mine else None
    if not single:
        scorer = None  # that was the check: workers and actors build their own
    out.mkdir(parents=True, exist_ok=True)
    check_run_file(out, run_identity(spec, opts))
    for name in (MANIFEST, INPUTS):  # a run killed mid-line: appending onto that line would corrupt two records
        drop_torn_tail(out / name)
    expected_shards(out)  # reads both: any other bad line is named (file and line) before any work
    record_inputs(out, opts.run_id, shards)
    done = [0]

    def report(record: dict) -> None:
        done[0] += 1
        if progress:
            _report_line(record, done[0], len(mine))

    def run() -> ScoreReport:
        if not mine:
            return ScoreReport([])
        if single:
            return ScoreReport(run_local(mine, spec, opts, workers, report, scorer=scorer))
        return ScoreReport((run_ray if engine == "ray" else run_local)(mine, spec, opts, workers, report))

    return run
