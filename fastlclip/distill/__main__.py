"""Command line: ``python -m fastlclip.distill targets | train | eval``.

Every argument is checked before any work starts; a bad one is reported in one line on stderr with exit
status 2. Under ``python -m torch.distributed.run --nproc_per_node N -m fastlclip.distill train ...`` every
process runs the same command (``--batch-size`` is the global batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cli import Parser, fail, head_weight, int_at_least


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


_float.what = "a number"


def _teacher_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--teacher", required=required, help="open_clip model name (open_clip.list_models())")
    p.add_argument("--teacher-config", metavar="JSON", help="open_clip config JSON, registered under --teacher's name")
    p.add_argument("--teacher-pretrained", metavar="FILE", help="the teacher's weights (open_clip checkpoint)")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fastlclip.distill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser("targets", help="decode latents and embed them with the teacher (resumable)")
    t.add_argument("shards", nargs="+", metavar="SHARD", help="WebDataset .tar or .parquet shards, or folders of them")
    t.add_argument("--out", required=True, help="targets folder (rerun the same command to resume)")
    t.add_argument("--vae", required=True, help="registered VAE (fastlclip.list_vaes()) or a diffusers folder")
    _teacher_args(t, required=False)
    t.add_argument("--teacher-spec", action="append", metavar="SPEC",
                   help="a teacher of a set, instead of --teacher (repeat it): comma-separated key=value, e.g. "
                        "name=hps,kind=open_clip,model=ViT-H-14,weights=FILE,reward=hps (docs/ensembles.md)")
    t.add_argument("--no-prompts", action="store_true", help="don't keep the shards' txt/json prompts")
    t.add_argument("--space", choices=("vae", "diffusion"), default="vae", help="the shards' latents (default: vae)")
    t.add_argument("--image-size", type=int_at_least(8),
                   help="image shards: crop side in px (default: the first image's)")
    t.add_argument("--batch-size", type=int_at_least(1), default=64, help="latents per VAE decode and teacher forward")
    t.add_argument("--engine", choices=("local", "ray"), default="local", help="local processes, or a Ray cluster")
    t.add_argument("--workers", type=int_at_least(1), default=1, help="processes (local) or actors (ray)")
    t.add_argument("--device", help="default: cuda if available (LOCAL_RANK's GPU under torchrun), else cpu")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="the VAE's and the teacher's dtype")

    r = sub.add_parser("train", help="train a latent student on targets (resumable; torchrun for DDP)")
    r.add_argument("targets", metavar="TARGETS", help="a targets folder")
    r.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, final.safetensors")
    r.add_argument("--student", required=True, metavar="CONFIG", help="registered fastlclip config name or JSON file")
    _teacher_args(r, required=False)
    r.add_argument("--teacher-spec", action="append", metavar="SPEC",
                   help="the targets' teacher set, instead of --teacher (repeat it, as for targets): trains one trunk "
                        "with a head per CLIP teacher; writes an ensemble (docs/ensembles.md)")
    r.add_argument("--head-weight", type=head_weight, action="append", metavar="NAME=W",
                   dest="ens_head_weights",
                   help="--teacher-spec: a head's loss weight (repeat it; default 1 each)")
    r.add_argument("--reward-weight", type=_float, dest="ens_reward_weight",
                   help="--teacher-spec: weight of the reward-matching term (default 0: none)")
    r.add_argument("--init-teacher", metavar="NAME", dest="ens_init_teacher",
                   help="--teacher-spec with --init teacher: the open_clip teacher whose image tower starts the trunk")
    r.add_argument("--steps", type=int_at_least(1), required=True, help="optimizer steps in all")
    r.add_argument("--batch-size", type=int_at_least(1), required=True, help="the global batch")
    r.add_argument("--lr", type=_float, required=True, help="peak AdamW learning rate, in (0, 1)")
    r.add_argument("--warmup-steps", type=int_at_least(0), required=True,
                   help="linear warmup of each stage, then cosine decay to 0")
    r.add_argument("--save-every", type=int_at_least(1), required=True, help="steps between resumable checkpoints")
    r.add_argument("--seed", type=int_at_least(0), required=True,
                   help="initial weights, data order and noise (the same on any number of processes)")
    r.add_argument("--init", choices=("scratch", "teacher"), default="scratch",
                   help="teacher: start from the teacher's image transformer, a new patch embedding trained first")
    r.add_argument("--noise-aware", action="store_true",
                   help="train on x_s = (1 - s) x + s eps, s ~ U[0, 1] (diffusion space): scores noised latents")
    r.add_argument("--patch-steps", type=int_at_least(0),
                   help="--init teacher: steps training the patch embedding alone (default: steps / 5)")
    r.add_argument("--eval-every", type=int_at_least(1), help="steps between held-out evaluations (default: none)")
    r.add_argument("--holdout", type=_float, default=0.05, help="fraction of keys held out (default 0.05)")
    r.add_argument("--weight-decay", type=_float, default=0.0, help="AdamW weight decay, in [0, 1)")
    r.add_argument("--log-every", type=int_at_least(1), default=10, help="steps between metrics.jsonl lines")
    r.add_argument("--backend", choices=("eager", "triton"), default="eager", help="triton: the fused kernels")
    r.add_argument("--device", help="default: cuda (LOCAL_RANK's GPU) if available, else cpu")

    e = sub.add_parser("eval", help="held-out cosine and zero-shot agreement with the teacher (JSON on stdout; video "
                                    "targets: per frame, per clip, within clip, also as a table on stderr); with "
                                    "--teacher-spec, an ensemble's per-head table against its teacher set")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="a student's final.safetensors (an ensemble file with "
                                                            "--teacher-spec)")
    e.add_argument("targets", metavar="TARGETS", help="a targets folder")
    e.add_argument("--classes", nargs="+", metavar="C", help="class names for zero-shot agreement (one teacher)")
    e.add_argument("--holdout", type=_float, help="held-out fraction (default: the one trained with; 0: all rows)")
    e.add_argument("--device", default="cpu", help="where the student and the text tower run")
    e.add_argument("--teacher-spec", action="append", metavar="SPEC",
                   help="the targets' teacher set (repeat it, as for targets): evaluates an ensemble per head "
                        "(cosine, Spearman, within-prompt pairwise agreement; docs/ensembles.md), a table on stdout")
    e.add_argument("--head-weight", type=head_weight, action="append", metavar="NAME=W",
                   dest="ens_head_weights",
                   help="--teacher-spec: a head's weight in the total (repeat it; default 1 each)")
    e.add_argument("--use", choices=("reward", "score"), dest="ens_use",
                   help="--teacher-spec: rewards as ReNO's losses (default) or the teachers' scores")
    e.add_argument("--train-targets", metavar="TARGETS", dest="ens_train_targets",
                   help="--teacher-spec with --holdout 0: the training targets, whose mean embedding is the baseline")
    e.add_argument("--out", metavar="FILE.json", dest="ens_out", help="--teacher-spec: write the report as JSON")
    return p


def _check_teacher(args) -> None:
    from .teacher import register_teacher_config

    if args.teacher_config is not None:
        if not os.path.isfile(args.teacher_config):
            raise ValueError(f"--teacher-config {args.teacher_config} does not exist")
        register_teacher_config(args.teacher, args.teacher_config)
    import open_clip

    if args.teacher not in open_clip.list_models():
        raise ValueError(f"--teacher {args.teacher!r} is not an open_clip model; pass --teacher-config JSON to register it")
    if args.teacher_pretrained is not None and not os.path.isfile(args.teacher_pretrained):
        raise ValueError(f"--teacher-pretrained {args.teacher_pretrained} does not exist")


def _check_targets_folder(path: str) -> dict:
    """The folder's ``run.json``; an error unless it is a targets folder."""
    from ..vaes import read_json_file
    from .targets import KIND

    run = Path(path) / "run.json"
    info = read_json_file(run, "targets run file") if run.is_file() else {}
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise ValueError(f"{path} is not a targets folder (no targets run.json); make one with "
                         "python -m fastlclip.distill targets")
    return info


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import evaluate, make_targets, train
    from .targets import vae_config, vae_stats
    from .train import TrainingDiverged, check_train_args, fit_student

    prog = f"python -m fastlclip.distill {args.command}"
    try:  # every argument, before any work
        if args.command == "targets":
            from .. import corpus

            if args.teacher is None and args.teacher_spec is None:
                raise ValueError("one of the arguments --teacher (one open_clip teacher) or --teacher-spec (repeated: "
                                 "a teacher set) is required")
            if args.teacher is not None and args.teacher_spec is not None:
                raise ValueError("pass --teacher (one open_clip teacher) or --teacher-spec (a teacher set), not both")
            corpus.expand_inputs(args.shards)
            vae_stats(args.vae, vae_config(args.vae))  # a FLUX.2 VAE's statistics: from its folder's weights
            if args.teacher_spec is not None:
                if args.teacher_config is not None or args.teacher_pretrained is not None:
                    raise ValueError("--teacher-config and --teacher-pretrained go with --teacher; a --teacher-spec "
                                     "names its own config= and weights=")
                from .teachers import check_teacher_set, parse_teacher_spec

                check_teacher_set([parse_teacher_spec(s) for s in args.teacher_spec])
            else:
                _check_teacher(args)
        elif args.command == "train":
            check_train_args(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                             init=args.init, save_every=args.save_every, eval_every=args.eval_every,
                             patch_steps=args.patch_steps, holdout=args.holdout, weight_decay=args.weight_decay,
                             log_every=args.log_every, backend=args.backend)
            if args.teacher is None and args.teacher_spec is None:
                raise ValueError("one of the arguments --teacher (one open_clip teacher) or --teacher-spec (repeated: "
                                 "the targets' teacher set) is required")
            if args.teacher is not None and args.teacher_spec is not None:
                raise ValueError("pass --teacher (one open_clip teacher) or --teacher-spec (a teacher set), not both")
            info = _check_targets_folder(args.targets)
            fit_student(args.student, info, args.noise_aware)  # the student on the targets' space
            ens = {"--head-weight": args.ens_head_weights, "--reward-weight": args.ens_reward_weight,
                   "--init-teacher": args.ens_init_teacher}
            if args.teacher_spec is not None:
                if args.teacher_config is not None or args.teacher_pretrained is not None:
                    raise ValueError("--teacher-config and --teacher-pretrained go with --teacher; a --teacher-spec "
                                     "names its own config= and weights=")
                from .teachers import check_teacher_set, parse_teacher_spec

                check_teacher_set([parse_teacher_spec(x) for x in args.teacher_spec])
                args.ens_head_weights = dict(args.ens_head_weights or [])
                if args.ens_reward_weight is not None and not 0 <= args.ens_reward_weight < float("inf"):
                    raise ValueError(f"--reward-weight must be a non-negative number, got {args.ens_reward_weight}")
            else:
                given = [k for k, v in ens.items() if v is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} go with --teacher-spec (a teacher set)")
                _check_teacher(args)
        else:
            if not os.path.isfile(args.checkpoint):
                raise ValueError(f"checkpoint {args.checkpoint} does not exist")
            _check_targets_folder(args.targets)
            if args.holdout is not None and not 0 <= args.holdout < 1:
                raise ValueError(f"--holdout must be a fraction in [0, 1), got {args.holdout}")
            ens = {"--head-weight": args.ens_head_weights, "--use": args.ens_use,
                   "--train-targets": args.ens_train_targets, "--out": args.ens_out}
            if args.teacher_spec is not None:
                from .evaluate import check_ensemble_eval

                if args.classes is not None:
                    raise ValueError("--classes (zero-shot agreement) is for one teacher's student, not with "
                                     "--teacher-spec")
                if args.ens_train_targets is not None:
                    _check_targets_folder(args.ens_train_targets)
                if args.ens_out is not None and (os.path.isdir(args.ens_out) or not args.ens_out.endswith(".json")):
                    raise ValueError(f"--out {args.ens_out}: a .json file to write")
                args.ens_head_weights = dict(args.ens_head_weights or [])
                check_ensemble_eval(args.checkpoint, args.targets, args.teacher_spec, args.ens_head_weights)
            else:
                given = [k for k, v in ens.items() if v is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} go with --teacher-spec (an ensemble and its teacher set)")
                from ..ensemble import ensemble_metadata

                if ensemble_metadata(args.checkpoint) is not None:
                    raise ValueError(f"{args.checkpoint} is an ensemble file: evaluate it with its teacher set "
                                     "(--teacher-spec, repeated)")
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(f"{prog}: error: {e}")

    teacher = dict(teacher=getattr(args, "teacher", None), teacher_pretrained=getattr(args, "teacher_pretrained", None),
                   teacher_config=getattr(args, "teacher_config", None))
    try:
        if args.command == "targets":
            if args.teacher_spec is not None:
                teacher = dict(teachers=args.teacher_spec)
            report = make_targets(args.shards, args.out, vae=args.vae, space=args.space, image_size=args.image_size,
                                  batch_size=args.batch_size, engine=args.engine, workers=args.workers,
                                  device=args.device, dtype=args.dtype, prompts=not args.no_prompts, **teacher)
            print(f"[fastlclip.distill] {len(report.ok)} shards ({report.rows} targets), {len(report.skipped)} already "
                  f"done, {len(report.failed)} failed -> {args.out}", file=sys.stderr)
            return 1 if report.failed else 0
        if args.command == "train" and args.teacher_spec is not None:
            extra = {"head_weights": args.ens_head_weights}
            if args.ens_reward_weight is not None:
                extra["reward_weight"] = args.ens_reward_weight
            if args.ens_init_teacher is not None:
                extra["init_teacher"] = args.ens_init_teacher
            teacher = dict(teachers=args.teacher_spec, **extra)
        if args.command == "train":
            final = train(args.targets, args.out, student=args.student, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, warmup_steps=args.warmup_steps, init=args.init, noise_aware=args.noise_aware,
                          seed=args.seed, save_every=args.save_every, eval_every=args.eval_every,
                          patch_steps=args.patch_steps, holdout=args.holdout, weight_decay=args.weight_decay,
                          log_every=args.log_every, backend=args.backend, device=args.device, **teacher)
            if int(os.environ.get("RANK", "0")) == 0:
                print(final)
            return 0
        if args.teacher_spec is not None:
            from .evaluate import evaluate_ensemble_file

            evaluate_ensemble_file(args.checkpoint, args.targets, args.teacher_spec, args.ens_head_weights,
                                   holdout=args.holdout, train_targets=args.ens_train_targets,
                                   use=args.ens_use or "reward", out=args.ens_out, device=args.device)
            if args.ens_out is not None:
                print(f"[fastlclip.distill] report -> {args.ens_out}", file=sys.stderr)
            return 0
        result = evaluate(args.checkpoint, args.targets, args.classes, holdout=args.holdout, device=args.device)
        if "video" in result:  # the table on stderr: stdout stays JSON
            from .evaluate import video_table

            print(video_table(result), file=sys.stderr)
        print(json.dumps(result, indent=2))
        return 0
    except ValueError as e:  # settings that only the data can refute (shapes, VAE, embed_dim)
        return fail(f"{prog}: error: {e}")
    except TrainingDiverged as e:  # not an argument error: exit 1
        return fail(f"{prog}: error: {e}", 1)


if __name__ == "__main__":
    sys.exit(main())
