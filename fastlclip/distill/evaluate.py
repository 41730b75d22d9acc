"""``evaluate(checkpoint, targets, classes=None)``: how closely a student follows its teacher on held-out targets;
``evaluate_ensemble_file(ensemble, targets, teachers)``: a multi-head student against its teacher set, as RL would
use its rewards (``fastlclip.distill.agreement``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import read_checkpoint
from .targets import read_targets, registered
from .train import DISTILL_META_KEY, Student, noise_shape

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
    noise, ``seed``) for each ``s`` in ``noise_levels``. A video folder's rows are latent frames (held out by
    clip); its figures add ``video`` (:func:`video_figures`: per frame, per clip, within-clip agreement).

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
        eps_all = (torch.randn(len(rows), *noise_shape(model.latent_space, rows.latents.shape[1:]), generator=g)
                   if noise_aware else None)
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

        video = rows.clips is not None
        prompt_text = _prompt_texts(model, rows) if video else None

        def figures(emb: torch.Tensor) -> dict:
            out = {"cosine": (emb * teacher).sum(-1).mean().item()}
            if text is not None:
                same = (emb @ text.T).argmax(1) == (teacher @ text.T).argmax(1)
                out["zeroshot_agreement"] = same.float().mean().item()
            if video:
                out["video"] = video_figures(emb, teacher, mean, rows, text, prompt_text)
            return out

        result = {"rows": len(rows), **figures(torch.cat(embs[None])),
                  "baseline_cosine": (teacher @ mean).mean().item()}
        if noise_aware:
            result["per_noise_level"] = {str(s): figures(torch.cat(embs[s])) for s in levels[1:]}
        return result


def _prompt_texts(model, rows) -> torch.Tensor | None:
    """The normalised text embedding of each row's kept prompt (zeros where a clip has none), or None when the
    folder kept no prompt."""
    if rows.prompts is None or not any(rows.prompts):
        return None
    unique = sorted({p for p in rows.prompts if p})
    texts = [model.encode_text(unique[i:i + 256]).float().cpu() for i in range(0, len(unique), 256)]
    emb = dict(zip(unique, F.normalize(torch.cat(texts), dim=-1)))
    zero = torch.zeros(next(iter(emb.values())).shape)
    return torch.stack([emb[p] if p else zero for p in rows.prompts])


def video_figures(student: torch.Tensor, teacher: torch.Tensor, mean: torch.Tensor, rows, text, prompt_text) -> dict:
    """A video folder's figures (its rows are latent frames, ``rows.clips`` / ``rows.frames``):

    - ``per_frame``: cosine to the target and the mean-embedding baseline's, over all latent frames and per index
      ``t`` (``by_t``);
    - ``per_clip``: the clip's pooled embeddings (the normalised mean of its frames', student and target) compared,
      and the baseline's cosine to the pooled target;
    - ``within_clip``: ``agreement.pairwise_agreement`` of the student's text cosines with the target's over the
      pairs of latent frames of one clip, per text (each class prompt, and the clip's kept prompt): 1 when every
      pair is ordered as the teacher orders it, 0.5 chance (and the constant baseline's, exactly); None without
      class names or prompts.
    """
    from .agreement import pairwise_agreement

    student, teacher, mean = student.cpu().double(), teacher.cpu().double(), mean.cpu().double()
    ids = {c: i for i, c in enumerate(dict.fromkeys(rows.clips))}
    clip = torch.tensor([ids[c] for c in rows.clips])
    t = rows.frames.cpu()
    n = len(ids)

    def pooled(e: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.zeros(n, e.shape[1], dtype=e.dtype).index_add_(0, clip, e), dim=-1)

    cos, base = (student * teacher).sum(-1), teacher @ mean
    steps = sorted(set(t.tolist()))
    out = {"clips": n, "latent_frames": len(steps),
           "per_frame": {"cosine": cos.mean().item(), "baseline_cosine": base.mean().item(),
                         "by_t": [cos[t == i].mean().item() for i in steps],
                         "baseline_by_t": [base[t == i].mean().item() for i in steps]}}
    target_clip = pooled(teacher)
    out["per_clip"] = {"cosine": (pooled(student) * target_clip).sum(-1).mean().item(),
                       "baseline_cosine": (target_clip @ mean).mean().item()}
    s_rewards, t_rewards, groups = [], [], []
    if text is not None:
        k = len(text)
        text = text.cpu().double()
        s_rewards.append((student @ text.T).flatten())
        t_rewards.append((teacher @ text.T).flatten())
        groups.append((clip[:, None] * k + torch.arange(k)).flatten())
    if prompt_text is not None:
        has = prompt_text.abs().sum(-1) > 0
        p = prompt_text.double()[has]
        s_rewards.append((student[has] * p).sum(-1))
        t_rewards.append((teacher[has] * p).sum(-1))
        groups.append(clip[has] + n * (len(text) if text is not None else 0))
    out["within_clip"] = None
    if s_rewards:
        got = pairwise_agreement(torch.cat(s_rewards), torch.cat(t_rewards), torch.cat(groups))
        out["within_clip"] = {"agreement": got["agreement"], "pairs": got["pairs"], "chance": 0.5}
    return out


def video_table(result: dict) -> str:
    """``evaluate``'s video figures as a table: a row per frame, per clip and within clip (student, baseline)."""
    v = result["video"]
    f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"{'':<13}{'student':>9}{'baseline':>10}",
             f"{'per frame':<13}{f(v['per_frame']['cosine']):>9}{f(v['per_frame']['baseline_cosine']):>10}"]
    for i, (a, b) in enumerate(zip(v["per_frame"]["by_t"], v["per_frame"]["baseline_by_t"])):
        lines.append(f"{'  t=' + str(i):<13}{f(a):>9}{f(b):>10}")
    lines.append(f"{'per clip':<13}{f(v['per_clip']['cosine']):>9}{f(v['per_clip']['baseline_cosine']):>10}")
    w = v["within_clip"]
    lines.append(f"{'within clip':<13}{f(None if w is None else w['agreement']):>9}{f(0.5 if w else None):>10}")
    return "\n".join(lines)


def _vae_key(cfg: dict) -> str:
    """A VAE config as compared: its settings, without diffusers' bookkeeping keys (``_name_or_path``, ...)."""
    return json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True, default=str)


def _stats_key(stats) -> tuple | None:
    """A VAE's statistics from its weights (FLUX.2's, LTX-Video's) as compared: the numbers, not where they were
    read."""
    if not isinstance(stats, dict):
        return None
    return tuple((k, tuple(v)) for k, v in sorted(stats.items()) if isinstance(v, list))


def _describe(cfg: dict, stats) -> str:
    """A VAE config's space in words, for an error message (never raising: FLUX.2 without statistics, or a config
    another version wrote)."""
    from .. import vaes

    cls = cfg.get("_class_name") or "AutoencoderKL"
    try:
        space = vaes.latent_space(cfg, stats=stats)
    except (ValueError, TypeError):
        return f"{cls}, {vaes.vae_channels(cfg)} channels, statistics unknown"
    if space.per_channel:
        text = (f"{space.channels} channels, per-channel statistics from {space.stats_from}, patch {space.patch}, "
                f"pack {space.pack}")
    else:
        text = f"{space.channels} channels, scaling {space.scaling_factor}, shift {space.shift_factor}"
    return text if cls == "AutoencoderKL" else f"{cls}: {text}"


def check_same_vae(model, info: dict, checkpoint, targets) -> None:
    """A ``ValueError`` unless the student reads the latent space the targets were made in: the same VAE config
    (class, channels, scaling, shift, per-channel statistics, layout), the same statistics from the weights
    (FLUX.2's ``vae_stats``) and, when both are registered names, the same name. A student scored on latents of
    another VAE with the same channel count gives figures that mean nothing."""
    theirs = info.get("vae_cfg")
    if not isinstance(theirs, dict):
        raise ValueError(f"{targets}: its run.json records no vae_cfg: remake the targets with this version")
    name, label = model.cfg.vae_name, info.get("vae")
    both_named = registered(name) and registered(label)
    ours = dict(model.cfg.vae)
    if (_vae_key(ours) != _vae_key(theirs) or (both_named and name != label)
            or (ours.get("_class_name") or "AutoencoderKL") != (theirs.get("_class_name") or "AutoencoderKL")
            or _stats_key(model.cfg.vae_stats) != _stats_key(info.get("vae_stats"))):
        raise ValueError(
            f"the student {checkpoint} reads latents of the VAE {name!r} ({_describe(ours, model.cfg.vae_stats)}); "
            f"the targets {targets} were made with {label!r} ({_describe(theirs, info.get('vae_stats'))}; other "
            "settings differ if these agree): evaluate on targets made with the student's VAE")


def check_ensemble_eval(checkpoint, targets, teachers, weights: Mapping[str, float] | None = None):
    """What an ensemble evaluation needs, checked from the files' headers alone (no weights loaded, no teacher
    built): the teacher set (specs or ``--teacher-spec`` strings, ``check_teacher_set``), ``checkpoint`` an ensemble
    file whose heads are the set's, ``targets`` a folder made with that set, ``weights`` naming heads of the set
    (default: 1 each). Returns ``(specs, ensemble metadata, targets run.json, weights)``; a ``ValueError`` naming
    both sides otherwise."""
    from ..ensemble import ensemble_metadata
    from ..vaes import read_json_file
    from .targets import KIND, RUN_FILE
    from .teachers import check_teacher_set, parse_teacher_spec

    specs = check_teacher_set([parse_teacher_spec(t) if isinstance(t, str) else t for t in teachers])
    names = [s.name for s in specs]
    if not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    meta = ensemble_metadata(checkpoint)
    if meta is None:
        raise ValueError(f"{checkpoint} is not an ensemble file (a single Latent-CLIP student): evaluate it without "
                         "teachers (eval without --teacher-spec)")
    heads = [h.get("name") for h in meta["heads"] if isinstance(h, dict)]
    if sorted(heads) != sorted(names):
        raise ValueError(f"the ensemble {checkpoint} has the heads {heads}; the teacher set given is {names}: evaluate "
                         "an ensemble with the teacher set it was trained on")
    run = Path(targets) / RUN_FILE
    info = read_json_file(run, "targets run file") if run.is_file() else {}
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise ValueError(f"{targets} is not a targets folder (no targets run.json)")
    if info.get("teachers") is None:
        raise ValueError(f"{targets} holds one teacher's targets, not a teacher set's: make targets with the set "
                         f"{names} (make_targets(..., teachers=...))")
    theirs = [t.get("name") for t in info["teachers"]]
    if theirs != names:
        raise ValueError(f"the targets {targets} were made with the teacher set {theirs}; the set given is {names}")
    weights = {n: 1.0 for n in names} if not weights else dict(weights)
    unknown = [h for h in weights if h not in names]
    if unknown:
        raise ValueError(f"head weights name {unknown}, not heads of the ensemble ({', '.join(names)})")
    import math

    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights.values()) \
            or not any(weights.values()):
        raise ValueError(f"head weights must be finite numbers, not all zero, got {weights}")
    return specs, meta, info, weights


def evaluate_ensemble_file(checkpoint, targets, teachers, weights: Mapping[str, float] | None = None, *,
                           holdout: float | None = None, train_targets=None, use: str = "reward", out=None,
                           batch_size: int = 256, device: str = "cpu", file="stdout") -> dict:
    """The ensemble file ``checkpoint`` (``fastlclip.load(None, path)``, a ``LatentEnsemble``) against its teacher
    set on the held-out rows of ``targets``: ``agreement.evaluate_ensemble`` with the ensemble's
    ``encode_latents`` (VAE space, as the targets hold latents) as ``predict``. Per head: cosine to the teacher,
    Spearman of rewards and within-prompt pairwise agreement, beside the mean-embedding baseline and chance; the
    same for the ``weights``-weighted total (default: every head 1). Prints the table to ``file`` and writes the
    report as JSON to ``out`` when given (``file``: a text stream, ``"stdout"``: the current ``sys.stdout``,
None: no table).

    ``teachers``: the set the targets were made with (``TeacherSpec`` objects or ``--teacher-spec`` strings); its
    names must be the ensemble's heads, and its kinds and weights digests the targets' (checked). ``holdout``:
    default the fraction the ensemble was trained with (its metadata), 0: every row (a folder kept apart for
    evaluation; ``train_targets`` then gives the baseline's mean). ``use``: ``"reward"`` (ReNO's losses) or
    ``"score"`` (the teachers' scales)."""
    from ..ensemble import load_ensemble
    from . import agreement
    from .teachers import build_teachers

    specs, meta, info, weights = check_ensemble_eval(checkpoint, targets, teachers, weights)
    if holdout is None:
        holdout = float((meta.get("info") or {}).get("holdout", 0.0))
    with torch.no_grad():
        model = load_ensemble(checkpoint, device=device)
        check_same_vae(model.trunk, info, checkpoint, targets)
        built = build_teachers(specs)
        mine = [(t.name, t.kind, t.describe()["weights_sha256"]) for t in built.values()]
        want = [(t["name"], t["kind"], t["weights_sha256"]) for t in info["teachers"]]
        if mine != want:
            raise ValueError(f"the teachers given ({[m[0] for m in mine]}) are not the set {targets} was made with "
                             f"({[w[0] for w in want]}; names, kinds and weights must match)")

        def predict(latents: torch.Tensor) -> dict:
            return model.encode_latents(latents, space="vae")

        return agreement.evaluate_ensemble(predict, targets, built, weights, holdout=holdout,
                                           train_targets=train_targets, use=use, out=out, batch_size=batch_size,
                                           device=device, file=sys.stdout if file == "stdout" else file)
