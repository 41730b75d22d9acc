"""Training a latent student against the teacher's embeddings: ``train(targets, run_dir, ...)``.

Loss: ``1 - cos(student, teacher)`` on normalised embeddings. On unit vectors this is half the squared
distance, so it is plain feature matching (which CLIP-KD found the best single distillation loss for CLIP,
above relation, contrastive or logit losses), restricted to the direction: everything fastlclip does with an
embedding (rewards, zero-shot, safety, corpus scores) reads only its direction.

Recipe: ``init="teacher"`` copies the teacher's image transformer, ``ln_post`` and ``proj`` (and class token,
``ln_pre``, the positional table resampled to the latent grid) and trains a new patch embedding alone for
``patch_steps`` steps, then everything (the Latent-CLIP authors' start-from-pixel-CLIP recipe); each stage has
its own linear warmup and cosine decay. ``noise_aware=True`` trains on ``x_s = (1 - s) x + s eps`` over
diffusion-space latents, ``s ~ U[0, 1]`` per sample, against the clean image's target.

Determinism: the global batch of step ``t`` is positions ``[t B, (t + 1) B)`` of the concatenated per-epoch
permutations (epoch ``e`` shuffled by a generator seeded with ``(seed, e)``); its noise comes from a generator
seeded with ``(seed, t)``; rank ``r`` of ``W`` takes rows ``[r B / W, (r + 1) B / W)``. So the data order and
noise are functions of the step alone: a resumed run, and a run on any number of processes at the same global
batch, sees the same samples in the same order. ``run_dir/checkpoint.pt`` (model, optimizer, scheduler, RNG,
step) is replaced atomically every ``save_every`` steps; rerunning the same call resumes from it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..model import LatentCLIP
from ..model_configs import ModelConfig, _REGISTRY, read_config_file
from . import teacher as teachers
from . import teacher as _teacher_module
from .targets import Targets, read_targets, registered, row_shape

CHECKPOINT, FINAL, METRICS = "checkpoint.pt", "final.safetensors", "metrics.jsonl"
DISTILL_META_KEY = "fastlclip_distill"
INITS = ("scratch", "teacher")
TRAIN_BACKENDS = ("eager", "triton")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf: training stopped before the step was applied or saved."""


def resolve_student(student) -> dict[str, Any]:
    """A student config dict from a registered name, a JSON file or a dict (a copy; validated by ``student_config``
    once its VAE is known)."""
    if isinstance(student, Mapping):
        cfg = copy.deepcopy(dict(student))
    elif isinstance(student, str) and student in _REGISTRY:
        cfg = copy.deepcopy(_REGISTRY[student])
    elif str(student).endswith(".json"):
        cfg = read_config_file(student)
    else:
        raise ValueError(f"student {student!r} is neither a registered config ({sorted(_REGISTRY)}) nor a JSON file")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("vision_cfg"), Mapping):
        raise ValueError(f"student {student!r}: a fastlclip model config (a JSON object with vision_cfg, embed_dim)")
    return cfg


def with_targets_vae(cfg: dict[str, Any], info: dict) -> dict[str, Any]:
    """``cfg`` naming the VAE the targets were made with (its name when registered, else its embedded config), with
    the statistics a FLUX.2 VAE keeps in its weights (the targets' ``vae_stats``) when they have them."""
    cfg, vae = copy.deepcopy(cfg), info["vae"]
    if registered(vae):
        if cfg.get("vae", vae) != vae:
            raise ValueError(f"the student config names the VAE {cfg['vae']!r}, the targets were made with {vae!r}")
        cfg.pop("vae_cfg", None)
        cfg["vae"] = vae
    else:
        cfg.pop("vae", None)
        cfg["vae_cfg"] = info["vae_cfg"]
    cfg.pop("vae_stats", None)
    if info.get("vae_stats") is not None:
        cfg["vae_stats"] = info["vae_stats"]
    return cfg


def fit_student(student, info: dict, noise_aware: bool = False) -> dict[str, Any]:
    """The student config (a name, file or dict) on the targets' space: their VAE (``with_targets_vae``) and the
    geometry ``_vision_checks`` derives from it; every check a training run makes on the config, without a
    teacher (the command line's up-front check)."""
    return _vision_checks(with_targets_vae(resolve_student(student), info), info, noise_aware)


def student_config(student, teacher: nn.Module, info: dict, noise_aware: bool) -> dict[str, Any]:
    """The student's full config: its image tower, the teacher's text tower and embed_dim, the targets' VAE."""
    cfg = with_targets_vae(resolve_student(student), info)
    text = teachers.text_config(teacher)
    if cfg.get("embed_dim") != text["embed_dim"]:
        raise ValueError(f"the student's embed_dim is {cfg.get('embed_dim')}, the teacher's {text['embed_dim']}: they "
                         "must match (the student is scored against the teacher's text tower)")
    cfg["text_cfg"] = text["text_cfg"]
    return _vision_checks(cfg, info, noise_aware)


def run_digests(targets, teacher, teacher_pretrained=None) -> dict[str, str]:
    """SHA-256 digests of what decides a run's data and teacher, for its resume identity (as corpus scoring's
    ``run.json`` holds the weights' digests, with the same helpers): the target files (``run.json`` and every
    ``*.parquet``; not the manifest, which a rerun of ``targets`` appends to), the teacher's weights file or
    folder, and an in-memory teacher's tensors. Targets or weights replaced in place, at the same paths and row
    count, change them. (The teacher's config is not digested: a resume may name an already registered teacher
    without ``--teacher-config``; weights of another architecture don't load into it.)"""
    from ..corpus.scoring import _file_digest, fingerprint, state_digest
    from .targets import RUN_FILE

    folder = Path(targets)
    h = hashlib.sha256()
    for f in [folder / RUN_FILE, *sorted(folder.glob("*.parquet"))]:
        h.update(f"{f.name}:{_file_digest(f)};".encode())
    out = {"targets_sha256": h.hexdigest()}
    out.update({f"teacher_{k}": v for k, v in fingerprint(None, teacher_pretrained and str(teacher_pretrained)).items()})
    if isinstance(teacher, nn.Module):
        out["teacher_module_sha256"] = state_digest(teacher)
    return out


def lr_lambda(start: int, warmup: int, end: int):
    """0 before ``start``, linear warmup over ``warmup`` steps, then cosine to 0 at ``end``."""
    def f(step: int) -> float:
        t = step - start
        if t < 0:
            return 0.0
        if t < warmup:
            return (t + 1) / warmup
        span = max(1, end - start - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / span)))
    return f


class DataOrder:
    """Sample indices of global batch ``t`` (see the module docstring), one cached permutation per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = torch.empty_like(pos)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            m = pos.div(self.n, rounding_mode="floor") == epoch
            out[m] = self._perm(epoch)[pos[m] % self.n]
        return out


def step_noise(seed: int, step: int, batch_size: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels (B,) and noise (B, *shape) of global batch ``step`` (``shape``: ``noise_shape``'s)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
    return torch.rand(batch_size, generator=g), torch.randn(batch_size, *shape, generator=g)


class Student(nn.Module):
    """The trainable forward: raw VAE latents (+ noise) -> normalised student embeddings; with ``heads`` (a
    ``ModuleDict`` of linear projections, a multi-teacher student) a dict head -> normalised embedding, every
    head read from one trunk forward."""

    def __init__(self, model: LatentCLIP, noise_aware: bool, heads: nn.ModuleDict | None = None):
        super().__init__()
        self.model = model
        self.noise_aware = noise_aware
        self.heads = heads

    def forward(self, raw: torch.Tensor, s: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        """``raw``: VAE latents; with ``s`` (B,) and ``eps`` (diffusion-space noise, ``noise_shape``), the noised
        ``(1 - s) z + s eps`` of their diffusion-space ``z`` (per channel for Qwen-Image / FLUX.2), which
        ``encode_latents`` converts back to VAE space. A video space's rows are latent frames ``(C, h, w)``, read as
        one-frame clips."""
        normalize = self.heads is None
        video = self.model.latent_space.video
        if video:
            raw, eps = raw[:, :, None], None if eps is None else eps[:, :, None]
        if s is None:
            feats = self.model.encode_latents(raw, space="vae", normalize=normalize)
        else:
            z = self.model.latent_space.to_diffusion(raw)
            level = s.view(-1, *([1] * (z.dim() - 1)))
            x = (1 - level) * z + level * eps
            feats = self.model.encode_latents(x, space="diffusion", noise_level=s, normalize=normalize)
        if video:
            feats = feats[:, 0]
        if self.heads is None:
            return feats
        return {n: F.normalize(h(feats), dim=-1) for n, h in self.heads.items()}


def distill_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between the rows of two batches of normalised embeddings (computed in float32)."""
    return (1 - (student.float() * F.normalize(target.float(), dim=-1)).sum(-1)).mean()


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _check_loss(loss: torch.Tensor, step: int, world: int, save_every: int) -> None:
    """Raise :class:`TrainingDiverged` when any rank's loss is not finite (every rank agrees, so none waits in a
    collective), before the step touches the weights. Synchronises with the device once a step."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0:
        last = (step - 1) // save_every * save_every
        kept = f"the checkpoint of step {last} is kept" if last > 0 else "no checkpoint was written"
        raise TrainingDiverged(f"the training loss is not finite at step {step} ({loss.item()}): training stopped "
                               f"before that step was applied; {kept}. Lower --lr, or check the targets, and train "
                               "into a new --out")


def resume(path: Path, identity: dict, tower: nn.Module, opt, sched, steps: int) -> int:
    """Load ``checkpoint.pt`` into the tower, optimizer, scheduler and RNG; returns its step. A file that is
    truncated, tampered with or not this trainer's, another run's settings, or tensors of the wrong shape or
    not finite are a ``ValueError`` naming the file and the fix (nothing is loaded then)."""
    fix = "delete it (or the run folder) to start over, or restore it from a copy"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign globals: torch raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} can't be read ({type(e).__name__}: {first[:200]}): it is truncated or not a "
                         f"fastlclip.distill checkpoint; {fix}") from None
    keys = {"identity", "step", "tower", "optimizer", "scheduler", "rng"}
    if not isinstance(state, dict) or not keys <= set(state):
        missing = sorted(keys - set(state)) if isinstance(state, dict) else sorted(keys)
        raise ValueError(f"{path} is not a fastlclip.distill checkpoint (it lacks {', '.join(missing)}); {fix}")
    if not isinstance(state["identity"], dict) or state["identity"] != identity:
        theirs = state["identity"] if isinstance(state["identity"], dict) else {}
        diff = sorted(k for k in {*identity, *theirs} if theirs.get(k) != identity.get(k))
        raise ValueError(f"{path.parent} holds a run with other settings ({', '.join(diff)} differ): pass another "
                         "--out, or delete it to start over")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= steps:
        raise ValueError(f"{path}: its step {step!r} is not in [1, {steps}]; {fix}")
    own = tower.state_dict()
    theirs = state["tower"]
    if not isinstance(theirs, dict) or set(theirs) != set(own):
        raise ValueError(f"{path}: its tower's tensors are not the student's "
                         f"({sorted(set(own) ^ set(theirs if isinstance(theirs, dict) else {}))[:4]} differ); {fix}")
    for k, v in theirs.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{path}: the tower's {k} is {got}, the student's {tuple(own[k].shape)}; {fix}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: the tower's {k} holds NaN or Inf; {fix}")
    rng = state["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise ValueError(f"{path}: its RNG state is not a byte tensor; {fix}")
    try:
        tower.load_state_dict(theirs)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng)
        for group in opt.param_groups:  # load_state_dict does not compare the moments' shapes with the weights'
            for param in group["params"]:
                for name, value in opt.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                        raise ValueError(f"the optimizer's {name} is {tuple(value.shape)} for a weight of "
                                         f"{tuple(param.shape)}")
    except Exception as e:  # optimizer / scheduler state of another shape or kind
        raise ValueError(f"{path}: its optimizer, scheduler or RNG state does not fit this run ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); {fix}") from None
    return step


def replace_durably(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` that survives a power loss: the file's bytes are fsynced before the rename, the
    folder's entry after it (where the platform can open a folder)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # Windows: folders can't be opened; the rename is what it offers
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    replace_durably(tmp, path)


def _positive(value, what: str, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ValueError(f"{what} must be a {'non-negative' if zero_ok else 'positive'} integer, got {value!r}")
    return value


def check_train_args(*, steps, batch_size, lr, warmup_steps, init, save_every, eval_every, patch_steps, holdout,
                     weight_decay, log_every, backend) -> None:
    _positive(steps, "steps")
    _positive(batch_size, "batch_size")
    _positive(warmup_steps, "warmup_steps", zero_ok=True)
    _positive(save_every, "save_every")
    _positive(log_every, "log_every")
    if eval_every is not None:
        _positive(eval_every, "eval_every")
    if patch_steps is not None and (_positive(patch_steps, "patch_steps", zero_ok=True) >= steps):
        raise ValueError(f"patch_steps ({patch_steps}) must be below steps ({steps})")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1 or not math.isfinite(lr):
        raise ValueError(f"lr must be a number in (0, 1), got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < 1:
        raise ValueError(f"weight_decay must be a number in [0, 1), got {weight_decay!r}")
    if not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if backend not in TRAIN_BACKENDS:
        raise ValueError(f"backend must be one of {TRAIN_BACKENDS}, got {backend!r}")


@torch.no_grad()
def held_out_cosine(student: Student, held: Targets, noise_levels=(), seed: int = 0, batch_size: int = 256) -> dict:
    """Mean held-out cosine to the teacher: clean, and per noise level for a noise-aware student (fixed noise).
    A multi-head student: ``{"cosine": mean over heads, "heads": {head: {"cosine", "cosine_at"}}}``."""
    device = student.model.device
    heads = None if student.heads is None else list(student.heads)
    columns = {None: held.embeddings} if heads is None else {h: held.columns[h] for h in heads}
    levels = [None, *noise_levels]
    sums = [dict.fromkeys(columns, 0.0) for _ in levels]
    g = torch.Generator().manual_seed(seed)
    eps_all = (torch.randn(len(held), *noise_shape(student.model.latent_space, held.latents.shape[1:]), generator=g)
               if noise_levels else None)
    for i in range(0, len(held), batch_size):
        raw = held.latents[i:i + batch_size].to(device, torch.float32)
        for j, s in enumerate(levels):
            if s is None:
                emb = student(raw)
            else:
                eps = eps_all[i:i + batch_size].to(device)
                emb = student(raw, torch.full((len(raw),), float(s), device=device), eps)
            embs = {None: emb} if heads is None else emb
            for h, col in columns.items():
                sums[j][h] += (len(raw) * (1 - distill_loss(embs[h], col[i:i + batch_size].to(device)))).item()

    def one(h):
        out = {"cosine": sums[0][h] / max(1, len(held))}
        if noise_levels:
            out["cosine_at"] = {str(s): sums[j + 1][h] / max(1, len(held)) for j, s in enumerate(noise_levels)}
        return out
    if heads is None:
        return one(None)
    per = {h: one(h) for h in heads}
    return {"cosine": sum(v["cosine"] for v in per.values()) / len(per), "heads": per}


def _vision_checks(cfg: dict, info: dict, noise_aware: bool) -> dict:
    """``cfg`` (its VAE already the targets') with the geometry of the targets' space, checked: the tower reads
    their ``C x h x h`` VAE latents, so ``latent_n_channels = C``, ``latent_factor`` = the VAE's downsampling
    ``f`` (``vaes.vae_factor``: 8, or 32 for DC-AE), ``image_size = h * f``. The config must describe that grid
    one way or the other: its ``image_size / latent_factor`` is ``h`` (its patch is kept), or its ``image_size``
    is ``h * f`` (the targets' images; a config written for another factor keeps its patch's pixel footprint,
    ``patch_size * latent_factor / f``: Latent-ViT-B-8-512's patch 8 at 8x, 64 px, is 2 at 32x). The patch must
    divide ``h``. Anything else is refused, naming the space."""
    from .. import vaes

    v = cfg["vision_cfg"] = dict(cfg["vision_cfg"])
    if noise_aware:
        v["noise_aware"] = True
    c, h, w = row_shape(info)
    _, vae_cfg = vaes.model_vae(cfg, "student config")
    factor = vaes.vae_factor(vae_cfg)
    space = f"{info.get('vae')!r} ({vae_cfg.get('_class_name', 'AutoencoderKL')}, {factor}x)"
    if h != w:
        raise ValueError(f"the targets' latents are {c}x{h}x{w}; a student reads square latents: make the targets of "
                         f"square images (space {space})")
    size, old, patch = v.get("image_size"), v.get("latent_factor", 8), v.get("patch_size")
    if all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (size, old, patch)):
        if size % old or size // old != h:  # not written for this grid: for these images, or refused
            if size != h * factor:
                raise ValueError(f"the targets' latents are {c}x{h}x{w} ({h * factor} px images in the space {space}); "
                                 f"the student config describes {size} px images at {old}x ({size // old}x"
                                 f"{size // old} latents): set vision_cfg.image_size to {h * factor}")
            if patch * old % factor:
                raise ValueError(f"the student's patch ({patch} latent pixels at {old}x, {patch * old} px) is no whole "
                                 f"number of latent pixels of the targets' space {space}: set vision_cfg.patch_size "
                                 f"to one of {_divisors(h)} (it must divide the {h}x{h} grid)")
            patch = patch * old // factor
        if h % patch:
            raise ValueError(f"the student's patch_size {patch} does not divide the {h}x{h} latent grid of the "
                             f"targets' space {space}, {h * factor} px images: set vision_cfg.patch_size to one of "
                             f"{_divisors(h)}")
        v.update(image_size=h * factor, latent_factor=factor, patch_size=patch, latent_n_channels=c)
    mc = ModelConfig.from_dict(cfg, name="student")
    if mc.vision.latent_channels != c or mc.vision.latent_size != h:
        raise ValueError(f"the targets' latents are {c}x{h}x{w}; the student takes {mc.vision.latent_channels}x"
                         f"{mc.vision.latent_size}x{mc.vision.latent_size}: set vision_cfg.latent_n_channels={c} and "
                         f"image_size / latent_factor = {h}")
    return cfg


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def noise_shape(space, shape) -> tuple[int, int, int]:
    """The diffusion-space shape of VAE latents of ``shape`` (``C, H, W``): where noise-aware training mixes in
    its noise (FLUX.2: ``4C, H/2, W/2``, the patchified grid; the other spaces: ``shape``)."""
    _, h, w = shape
    return space.diffusion_channels, h // space.patch, w // space.patch


class _Ensemble:
    """What a multi-teacher run adds to the loop: the ensemble (trunk, heads, text towers, head MLPs), its
    targets per head, the weights and the prompts' text features for the reward-matching term."""

    def __init__(self, targets, data: Targets, train_set: Targets, specs, student, noise_aware: bool, init: str,
                 init_teacher, head_weights, reward_weight, device):
        from .. import ensemble
        from . import teachers as tt

        specs = [tt.parse_teacher_spec(x) if isinstance(x, str) else x for x in specs]
        built = tt.build_teachers(specs)
        described = [t.describe() for t in built.values()]
        theirs = data.info.get("teachers")
        if theirs is None:
            raise ValueError(f"{targets} holds one teacher's targets: train it with teacher=, not teachers=")
        mine = [(d["name"], d["kind"], d["weights_sha256"]) for d in described]
        want = [(d["name"], d["kind"], d["weights_sha256"]) for d in theirs]
        if mine != want:
            raise ValueError(f"the teachers passed ({[m[0] for m in mine]}) are not the set {targets} was made with "
                             f"({[w[0] for w in want]}; names, kinds and weights must match)")
        names = list(built)
        weights = {n: 1.0 for n in names}
        for k, v in dict(head_weights or {}).items():
            if k not in built:
                raise ValueError(f"head_weights names {k!r}, not a teacher of the set ({', '.join(names)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"head_weights[{k!r}] must be a non-negative number, got {v!r}")
            weights[k] = float(v)
        if isinstance(reward_weight, bool) or not isinstance(reward_weight, (int, float)) \
                or not 0 <= reward_weight < float("inf"):
            raise ValueError(f"reward_weight must be a non-negative number, got {reward_weight!r}")
        clip = [n for n, t in built.items() if t.base is None]
        if init == "teacher":
            if init_teacher is None:
                init_teacher = next((n for n in clip if built[n].kind == "open_clip"), None)
            if init_teacher not in clip or built[init_teacher].kind != "open_clip":
                raise ValueError(f"init='teacher' copies an open_clip teacher's image tower: init_teacher= must name "
                                 f"one of {[n for n in clip if built[n].kind == 'open_clip']}, got {init_teacher!r}")
        elif init_teacher is not None:
            raise ValueError("init_teacher= goes with init='teacher'")
        self.cfg = fit_student(student, data.info, noise_aware)
        self.names, self.clip, self.weights, self.reward_weight = names, clip, weights, float(reward_weight)
        self.heads = {n: built[n].base for n in names}
        self.identity = {"teachers": described, "head_weights": weights, "reward_weight": float(reward_weight),
                         "init_teacher": init_teacher}
        self.model = ensemble.from_teachers(self.cfg, built, {})
        self.init_teacher, self.built = init_teacher, built
        self.score_scale = {n: built[n].reward_form.scale for n in names if built[n].base is not None}
        self.txt, self.has_prompt = {}, None
        if self.reward_weight > 0 and train_set.prompts is not None:
            self.has_prompt = torch.tensor([p is not None for p in train_set.prompts])
            unique = list(dict.fromkeys(p for p in train_set.prompts if p is not None))
            with torch.no_grad():
                for n in clip:
                    feats = {}
                    for i in range(0, len(unique), 64):
                        chunk = unique[i:i + 64]
                        feats.update(zip(chunk, built[n].embed_texts(chunk).float().cpu()))
                    zero = torch.zeros(built[n].embed_dim)
                    self.txt[n] = torch.stack([feats[p] if p is not None else zero for p in train_set.prompts])

    def init_trunk(self) -> None:
        if self.init_teacher is None:
            return
        teachers.copy_image_tower(self.model.trunk.visual.latent_vit, self.built[self.init_teacher].model)
        w = self.model.proj[self.init_teacher].weight
        if w.shape[0] != w.shape[1]:
            raise ValueError(f"init='teacher': the trunk's embed_dim ({w.shape[1]}) must be {self.init_teacher!r}'s "
                             f"({w.shape[0]})")
        with torch.no_grad():
            w.copy_(torch.eye(w.shape[0]))

    def targets(self, train_set: Targets, idx: torch.Tensor, device) -> dict:
        return {n: train_set.columns[n][idx].to(device, non_blocking=True) for n in self.clip}

    def loss(self, emb: dict, target: dict, train_set: Targets, idx: torch.Tensor, device):
        """(total, per-head distillation losses, per-head reward-matching terms)."""
        per = {n: distill_loss(emb[n], target[n]) for n in self.clip}
        total = sum(self.weights[n] * per[n] for n in self.clip)
        terms = {}
        if self.reward_weight > 0:
            for n, base in self.heads.items():
                if base is None:
                    if not self.txt:
                        continue
                    t = self.txt[n][idx].to(device)
                    m = self.has_prompt[idx].to(device).float()
                    v_s = (emb[n].float() * t).sum(-1)
                    v_t = (F.normalize(target[n].float(), dim=-1) * t).sum(-1)
                    # a mean over the batch, rows without a prompt counting 0: the same on any number of processes
                    terms[n] = ((v_s - v_t) ** 2 * m).mean()
                else:
                    v_s = self.model.value(n, {base: emb[base]})
                    v_t = train_set.scores[n][idx].to(device).float() / self.score_scale[n]
                    terms[n] = ((v_s - v_t) ** 2).mean()
            total = total + self.reward_weight * sum(self.weights[n] * v for n, v in terms.items())
        return total, per, terms


def train(targets, run_dir, *, student, teacher=None, teacher_pretrained=None, teacher_config=None, steps,
          batch_size, lr, warmup_steps, init="scratch", noise_aware=False, seed=0, save_every=100, eval_every=None,
          patch_steps=None, holdout=0.05, weight_decay=0.0, log_every=10, backend="eager", device=None,
          progress=True, teachers=None, init_teacher=None, head_weights=None, reward_weight=0.0) -> Path:
    """Distil ``teacher``'s image embeddings (``make_targets``) into a latent student; returns
    ``run_dir/final.safetensors``, a complete Latent-CLIP (``fastlclip.load(None, path)``).

    ``student``: a fastlclip config (registered name, JSON file or dict) whose ``embed_dim`` is the teacher's;
    its text tower and VAE are set from the teacher and the targets. ``batch_size`` is global (split over
    torchrun's processes). ``patch_steps`` (``init="teacher"``; default ``steps // 5``): steps that train the
    patch embedding alone. ``holdout``: the fraction of keys held out for evaluation (``eval_every`` steps).
    ``backend``: ``"triton"`` runs the fused kernels (``fastlclip.runtime``). See the module docstring.

    A teacher set's targets (``make_targets(..., teachers=...)``): pass ``teachers=`` (the same specs, instead of
    ``teacher=``) to train one trunk (``student``: any config; its ``embed_dim`` is the trunk's) with a linear
    head per CLIP teacher; the loss is ``sum_h head_weights[h] * (1 - cos)`` plus, with ``reward_weight > 0``,
    ``reward_weight * sum_h head_weights[h] * mean (value_student - value_teacher)^2`` where ``value`` is
    ``cos(image, own prompt's text)`` of a CLIP head (the teacher's text tower; a row without a prompt counts 0
    in the batch mean) and the MLP
    value of a head teacher on its base's prediction. ``init="teacher"`` copies ``init_teacher``'s (an
    open_clip teacher; default the first) image tower into the trunk, its head starting as the identity.
    Returns ``run_dir/final.safetensors``, an ensemble (``fastlclip.load(None, path)``, ``fastlclip.ensemble``).
    """
    check_train_args(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, init=init,
                     save_every=save_every, eval_every=eval_every, patch_steps=patch_steps, holdout=holdout,
                     weight_decay=weight_decay, log_every=log_every, backend=backend)
    if patch_steps is None:
        patch_steps = steps // 5 if init == "teacher" else 0
    rank, world = _dist()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (global) must be a multiple of the {world} processes")
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    specs, teachers = teachers, _teacher_module  # the teacher set; the module of one open_clip teacher
    multi = specs is not None
    if multi and (teacher is not None or teacher_pretrained is not None or teacher_config is not None):
        raise ValueError("pass teacher= (one open_clip teacher) or teachers= (a teacher set), not both")
    if not multi and teacher is None:
        raise ValueError("pass teacher= (one open_clip teacher) or teachers= (the teacher set of the targets)")
    if multi:
        described = read_targets_info(targets).get("teachers") or []
        clip_names = [t["name"] for t in described if t.get("base") is None]
        data = read_targets(targets, teacher=clip_names[0] if clip_names else None)
    else:
        data = read_targets(targets)
    train_set, held = data.split(holdout)
    if len(train_set) == 0:
        raise ValueError(f"no training rows in {targets} after holding out {holdout:.0%}")
    run_dir = Path(run_dir)
    ens = None
    if multi:
        ens = _Ensemble(targets, data, train_set, specs, student, noise_aware, init, init_teacher,
                        head_weights, reward_weight, device)
        cfg, teacher_label = ens.cfg, "teacher set"
        who = {"teachers": ens.identity, **run_digests(targets, None)}
    else:
        t_model = teachers.load_teacher(teacher, teacher_pretrained, teacher_config)
        cfg = student_config(student, t_model, data.info, noise_aware)
        teacher_label = teacher if isinstance(teacher, str) else f"<{type(teacher).__name__} module>"
        who = {"teacher": teacher_label,
               "teacher_pretrained": None if teacher_pretrained is None else str(Path(teacher_pretrained).resolve()),
               **run_digests(targets, teacher, teacher_pretrained)}
    identity = json.loads(json.dumps({
        "targets": str(Path(targets).resolve()), "target_rows": len(data), "student": cfg, **who,
        "steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "init": init,
        "noise_aware": noise_aware, "seed": seed, "patch_steps": patch_steps, "holdout": holdout,
        "weight_decay": weight_decay}, default=str))

    torch.manual_seed(seed)
    if multi:
        ens.model = _fresh_ensemble(ens)
        ens.init_trunk()
        ens.built = None
        model, heads = ens.model.trunk, ens.model.proj
    else:
        heads = None
        model = LatentCLIP(ModelConfig.from_dict(cfg, name="student"))
        text = teachers.text_state(t_model)
        own = model.state_dict()
        with torch.no_grad():
            for k, v in text.items():
                own[k].copy_(v)
        if init == "teacher":
            teachers.copy_image_tower(model.visual.latent_vit, t_model)
        del t_model
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual.latent_vit."))
    if multi:
        heads.requires_grad_(True)
        ens.model = ens.model.to(device)
    model = model.to(device)
    model.check_finite = False
    if backend == "triton":
        from ..runtime import activate

        activate(model, "triton")
    net = Student(model, noise_aware, heads)
    tower = model.visual.latent_vit if heads is None else nn.ModuleDict({"trunk": model.visual.latent_vit,
                                                                         "heads": heads})
    patch = [p for n, p in model.visual.latent_vit.named_parameters() if not n.startswith(teachers.COPIED)]
    rest = [p for n, p in model.visual.latent_vit.named_parameters() if n.startswith(teachers.COPIED)]
    if heads is not None:
        rest += list(heads.parameters())
    opt = torch.optim.AdamW([{"params": patch}, {"params": rest}], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(0, warmup_steps, steps),
                                                    lr_lambda(patch_steps, warmup_steps, steps)])
    wrapped = net
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    start = 0
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.is_file():
        start = resume(ckpt_path, identity, tower, opt, sched, steps)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(run_dir / METRICS, start)
    _barrier(world)

    order = DataOrder(len(train_set), batch_size, seed)
    local = batch_size // world
    rows = slice(rank * local, (rank + 1) * local)
    shape = noise_shape(model.latent_space, train_set.latents.shape[1:]) if noise_aware else None
    levels = (0.25, 0.5, 0.75) if noise_aware else ()
    use_bf16 = device.type == "cuda"
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="distill", unit="step")
    for step in range(start, steps):
        idx = order.batch(step)[rows]
        raw = train_set.latents[idx].to(device, torch.float32, non_blocking=True)
        target = (train_set.embeddings[idx].to(device, non_blocking=True) if ens is None
                  else ens.targets(train_set, idx, device))
        s = eps = None
        if noise_aware:
            s, eps = step_noise(seed, step, batch_size, shape)
            s, eps = s[rows].to(device), eps[rows].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            emb = wrapped(raw, s, eps)
        per = terms = None
        if ens is None:
            loss = distill_loss(emb, target)
        else:
            loss, per, terms = ens.loss(emb, target, train_set, idx, device)
        try:
            _check_loss(loss, step + 1, world, save_every)
        except TrainingDiverged:
            if bar is not None:
                bar.close()  # the error then prints on its own line
            raise
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step < patch_steps:
            for p in rest:
                p.grad = None  # stage 1: the patch embedding alone (no Adam state for the rest either)
        opt.step()
        sched.step()
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % log_every == 0 or done == steps:
            parts = [loss] + ([*per.values(), *terms.values()] if per is not None else [])
            logged = torch.stack([p.detach().float() for p in parts])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(logged)
                logged /= world
            if rank == 0:
                line = {"step": done, "loss": logged[0].item(), "lr": sched.get_last_lr()[1 if done > patch_steps else 0]}
                if per is not None:
                    values = logged[1:].tolist()
                    line["heads"] = dict(zip(per, values[:len(per)]))
                    if terms:
                        line["reward"] = dict(zip(terms, values[len(per):]))
                if bar is not None:
                    bar.set_postfix(loss=f"{line['loss']:.4f}")
                _append(run_dir / METRICS, line)
        if rank == 0 and eval_every and len(held) and (done % eval_every == 0 or done == steps):
            _append(run_dir / METRICS, {"step": done, "eval": held_out_cosine(net, held, levels, seed)})
        if done % save_every == 0 or done == steps:
            if rank == 0:
                save_atomic({"identity": identity, "step": done, "tower": tower.state_dict(),
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "rng": torch.get_rng_state()}, ckpt_path)
            _barrier(world)
    if bar is not None:
        bar.close()
    final = run_dir / FINAL
    if rank == 0 and ens is not None:
        from ..ensemble import save_ensemble

        ens.model.info = {"teachers": [t["name"] for t in ens.identity["teachers"]], "holdout": holdout,
                          "targets": identity["targets"], "targets_vae": data.info.get("vae"),
                          "noise_aware": noise_aware, "steps": steps}
        save_ensemble(ens.model, final)
    elif rank == 0:
        save_student(model, cfg, final, {"teacher": teacher_label, "holdout": holdout, "targets": identity["targets"],
                                         "targets_vae": data.info.get("vae"), "noise_aware": noise_aware,
                                         "steps": steps})
    _barrier(world)
    return final


def read_targets_info(folder) -> dict:
    """A targets folder's ``run.json`` (an error when it is not one)."""
    from .. import vaes
    from .targets import RUN_FILE

    run = Path(folder) / RUN_FILE
    if not run.is_file():
        raise ValueError(f"{folder} is not a targets folder (no {RUN_FILE}): make it with "
                         "python -m fastlclip.distill targets")
    return vaes.read_json_file(run, "targets run file")


def _fresh_ensemble(ens: "_Ensemble"):
    """The ensemble rebuilt after ``torch.manual_seed(seed)`` (its trunk and heads drawn from the run's seed),
    with the teachers' text towers, logit scales and MLPs of the one built at setup."""
    from ..ensemble import LatentEnsemble

    fresh = LatentEnsemble(ens.cfg, ens.model.heads, {})
    with torch.no_grad():
        for n in ens.model.text:
            fresh.text[n].load_state_dict(ens.model.text[n].state_dict())
            fresh.logit_scale[n].copy_(ens.model.logit_scale[n])
        for n in ens.model.mlp:
            fresh.mlp[n].load_state_dict(ens.model.mlp[n].state_dict())
    return fresh


def save_student(model: LatentCLIP, cfg: dict, path: Path, info: dict) -> None:
    """The whole model (image tower, teacher's text tower and logit scale) with its config in the metadata."""
    from safetensors.torch import save_file

    from ..checkpoint import SAFETENSORS_CONFIG_KEY

    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={SAFETENSORS_CONFIG_KEY: json.dumps(cfg), DISTILL_META_KEY: json.dumps(info)})
    replace_durably(tmp, path)


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the lines a killed run logged after its last checkpoint."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    replace_durably(tmp, path)
