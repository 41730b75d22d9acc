"""Command line: ``python -m fastlclip.corpus score ...`` and ``python -m fastlclip.corpus select ...``.

Every argument is checked before any work starts; a bad one is reported in one line on stderr with exit
status 2. ``score`` prints one line per shard on stderr and exits 1 when any shard failed, or when the run
itself failed (a worker killed, Ray failing): one line saying why, finished shards kept. ``select`` exits 1
when shards of the folder have no scores (named on stderr), unless ``--allow-missing``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..cli import Parser, fail
from .engines import ENGINES

SHARD_FAILED = 1


def error_line(e: BaseException, with_type: bool = True) -> str:
    """``e`` in one line, ``Type: message``. Ray wraps a worker's error: its cause (``cause`` / ``__cause__``) when
    that says more, and from a Ray error's many-line text the last ``SomeError: message`` line (the worker's own)."""
    seen = {id(e)}
    inner = getattr(e, "cause", None) or e.__cause__
    while isinstance(inner, BaseException) and id(inner) not in seen and str(inner).strip():
        seen.add(id(inner))
        e, inner = inner, getattr(inner, "cause", None) or inner.__cause__
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if type(e).__module__.startswith("ray.") and len(lines) > 1:
        raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
        if raised:
            return raised[-1]
    first = lines[0] if lines else ""
    return f"{type(e).__name__}: {first}" if with_type else first


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fastlclip.corpus", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    s = sub.add_parser("score", help="score shards into one Parquet file per shard (resumable)")
    s.add_argument("shards", nargs="+", metavar="SHARD", help="WebDataset .tar or .parquet shards, or folders of them")
    s.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    s.add_argument("--model", required=True, help="config name (fastlclip.list_models()) or config JSON")
    s.add_argument("--pretrained", help="checkpoint: .pt, .safetensors, folder or hf-hub:REPO")
    s.add_argument("--prompts", nargs="+", metavar="T", help="texts: one clip_cos_<i> column each")
    s.add_argument("--classes", nargs="+", metavar="C", help="zero-shot classes: prob_<class> columns and label")
    s.add_argument("--templates", nargs="+", metavar="T", help="class templates with {} (default: 'a photo of a {}.')")
    s.add_argument("--safety", action="store_true", help="safety_<category> margins and safety_flag")
    s.add_argument("--embeddings", action="store_true", help="fp16 embedding column")
    s.add_argument("--space", choices=("vae", "diffusion"), default="vae",
                   help="vae: raw posterior samples (default); diffusion: pipeline latents, the grid or (Qwen-Image, "
                        "FLUX.2) the packed tokens (converted as the model VAE's pipeline decodes them)")
    s.add_argument("--frames", type=int, metavar="F",
                   help="a video-space model: the clips' video frame count (each clip has the space's latent frames "
                        "for F, e.g. 1 + (F - 1) / 4 for Wan)")
    s.add_argument("--pooling", choices=("mean", "min"), default="mean",
                   help="a clip's per-frame scores -> its scores: the mean over frames (default) or the worst frame")
    s.add_argument("--engine", choices=ENGINES, default="local", help="local processes, or a Ray cluster")
    s.add_argument("--workers", type=int, default=1, help="processes (local) or actors (ray)")
    s.add_argument("--batch-size", type=int, default=256, help="latents per forward")
    s.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="a bad sample: skip it (recorded in the manifest) or fail its shard")
    s.add_argument("--member", help="tar member with the latent (default: latent.pt, then latent.npy)")
    s.add_argument("--column", default="latent", help="Parquet column with the latent (default: latent)")
    s.add_argument("--device", help="default: cuda if available (LOCAL_RANK's GPU under torchrun), else cpu")
    s.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="the model's dtype")
    s.add_argument("--backend", choices=("eager", "triton", "graph", "compile", "auto"), default="eager",
                   help="fast path for the image tower (fastlclip.runtime)")
    k = sub.add_parser("select", help="write the keys to keep, one per line")
    k.add_argument("folder", metavar="DIR", help="a score output folder")
    k.add_argument("--by", required=True, metavar="COLUMN",
                   help="column to rank by; --by=-COLUMN for lower-is-better (e.g. --by=-safety_flag --threshold 0)")
    g = k.add_mutually_exclusive_group(required=True)
    g.add_argument("--threshold", type=float, help="keep rows with value >= X")
    g.add_argument("--top-fraction", type=float, help="keep the highest fraction F in (0, 1]")
    k.add_argument("--out", required=True, help="keys file to write (outside DIR)")
    k.add_argument("--allow-missing", action="store_true",
                   help="select from the scored shards even when others failed or were never scored")
    return p


def _check_keys_file(out: str, folder: str) -> None:
    if not out.strip():
        raise ValueError("--out must be a file path, got ''")
    real, scores = os.path.realpath(out), os.path.realpath(folder)
    if os.path.commonpath([real, scores]) == scores:
        raise ValueError(f"--out {out} is inside the scores folder {folder}; write the keys file elsewhere")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; pass a file path")


def _select(args) -> int:
    from . import MissingShards, select

    prog = "python -m fastlclip.corpus select: error"
    try:
        _check_keys_file(args.out, args.folder)
        keys = select(args.folder, by=args.by, threshold=args.threshold, top_fraction=args.top_fraction,
                      allow_missing=args.allow_missing)
    except MissingShards as e:
        return fail(f"{prog}: {e}", SHARD_FAILED)
    except (ValueError, OSError) as e:
        return fail(f"{prog}: {e}")
    try:
        Path(args.out).write_text("".join(f"{k}\n" for k in keys))
    except OSError as e:
        return fail(f"{prog}: cannot write {args.out}: {e}", SHARD_FAILED)
    print(f"[fastlclip.corpus] {len(keys)} keys -> {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import _prepare  # after parsing: --help stays fast

    if args.command == "select":
        return _select(args)
    kwargs = dict(model=args.model, pretrained=args.pretrained, prompts=args.prompts, classes=args.classes,
                  templates=args.templates, safety=args.safety, embeddings=args.embeddings, space=args.space,
                  engine=args.engine, workers=args.workers, batch_size=args.batch_size, on_error=args.on_error,
                  member=args.member, column=args.column, device=args.device, dtype=args.dtype, backend=args.backend,
                  frames=args.frames, pooling=args.pooling, progress=True)
    prog = "python -m fastlclip.corpus score: error"
    try:
        run = _prepare(args.shards, args.out, **kwargs)
    except Exception as e:  # every argument check: one line, exit 2
        return fail(f"{prog}: {error_line(e, with_type=False)}")
    try:
        report = run()
    except Exception as e:  # the run itself failed (a worker killed, Ray): finished shards are kept
        return fail(f"{prog}: the run failed ({error_line(e)}); finished shards are kept: rerun the same command "
                    "to resume", SHARD_FAILED)
    failed = report.failed
    print(f"[fastlclip.corpus] {len(report.ok)} shards scored ({report.rows} rows, {len(report.bad_samples)} bad "
          f"samples skipped), {len(report.skipped)} already done, {len(failed)} failed; manifest: "
          f"{Path(args.out) / 'manifest.jsonl'}", file=sys.stderr)
    return SHARD_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
