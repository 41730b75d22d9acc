"""Zero-shot accuracy of a Latent-CLIP checkpoint per latent grid and resize policy.

    python -m bench.zeroshot_grid --model Latent-ViT-B-8-512 --checkpoint epoch_34.pt \
        --latents val_512px.parquet val_1024px.parquet --classnames imagenet [--templates simple] [--device cuda]

Each ``--latents`` file holds labelled SDXL latents of one grid (e.g. the same ImageNet validation images
resized to 512 px and to 1024 px, then encoded with the SDXL VAE): a Parquet file with a ``latent`` column
(nested lists, Arrow fixed-shape tensors or ``.npy`` bytes; read as ``fastlclip.corpus`` reads shards) and
an integer ``label`` column, or a ``.pt`` / ``.safetensors`` file with ``latents`` (N, 4, H, W) and
``labels`` (N,). ``--space`` says whether they are diffusion-space (pipeline) latents or raw VAE
samples. Every file is scored under every policy that accepts its grid (``None`` only at the trained
grid, ``interpolate`` at grids of whole patches, ``pool`` everywhere) and top-1 / top-5 accuracy are
printed per (grid, policy). Every argument and file is checked before any scoring (one line, exit 2).
Without ``--checkpoint`` the weights are random: a smoke test, and the output says so.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import fastlclip

from .cli import Parser, argument_errors, existing_file, positive_int
from .report import table

POLICIES = (None, "interpolate", "pool")


def read_labelled(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents (N, C, H, W) float32, labels (N,) int64)`` from a Parquet, ``.pt`` or ``.safetensors`` file."""
    suffix = path.name.lower()
    if suffix.endswith(".parquet"):
        import pyarrow.parquet as pq

        from fastlclip.corpus.readers import read_shard

        samples = list(read_shard(path, column="latent"))
        bad = [s for s in samples if s.error]
        if bad:
            raise ValueError(f"{path.name}: {len(bad)} latent(s) unreadable, e.g. {bad[0].key}: {bad[0].error}")
        names = pq.ParquetFile(path).schema_arrow.names
        if "label" not in names:
            raise ValueError(f"{path.name}: no 'label' column (columns: {', '.join(names)})")
        labels = torch.tensor(pq.read_table(path, columns=["label"]).column(0).to_pylist(), dtype=torch.int64)
        latents = torch.stack([s.latent.float() for s in samples])
    elif suffix.endswith((".safetensors", ".pt", ".pth")):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = (load_file(str(path)) if suffix.endswith(".safetensors")
                    else torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{path.name} is not a readable {path.suffix} file of labelled latents "
                             f"({type(e).__name__}); write one with latents (N, C, H, W) and labels (N,)") from None
        if not isinstance(data, dict) or not {"latents", "labels"} <= set(data):
            raise ValueError(f"{path.name} must hold a dict with 'latents' (N, C, H, W) and 'labels' (N,), got "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
        latents, labels = data["latents"], data["labels"]
        if not all(isinstance(t, torch.Tensor) for t in (latents, labels)) or labels.is_floating_point():
            raise ValueError(f"{path.name}: 'latents' must be a float tensor and 'labels' an integer tensor")
        latents, labels = latents.float(), labels.long()
    else:
        raise ValueError(f"{path}: expected a .parquet, .pt or .safetensors file of labelled latents")
    if latents.ndim != 4 or labels.shape != (latents.shape[0],):
        raise ValueError(f"{path.name}: latents must be (N, C, H, W) with one label each, got {tuple(latents.shape)} "
                         f"and {tuple(labels.shape)}")
    return latents, labels


def evaluate(model, classifier, latents: torch.Tensor, labels: torch.Tensor, policy, *, space: str,
             batch_size: int) -> dict[str, float]:
    top1 = top5 = 0
    k = min(5, len(classifier.classnames))
    with torch.no_grad():
        for s in range(0, latents.shape[0], batch_size):
            x = latents[s:s + batch_size].to(device=model.device)
            y = labels[s:s + batch_size].to(model.device)
            logits = classifier.logits(x, space=space, resize=policy)
            best = logits.topk(k, dim=-1).indices
            top1 += (best[:, 0] == y).sum().item()
            top5 += (best == y[:, None]).any(dim=-1).sum().item()
    n = latents.shape[0]
    return {"top1": top1 / n, "top5": top5 / n, "n": n}


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench.zeroshot_grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="config name or JSON config file (default: from the checkpoint)")
    p.add_argument("--checkpoint", default=None, help="the authors' .pt, a .safetensors file or hf-hub:<repo>")
    p.add_argument("--latents", nargs="+", type=existing_file, required=True, help="labelled latent files, one grid each")
    p.add_argument("--classnames", default="imagenet", help="'imagenet' or a text file with one class name a line")
    p.add_argument("--templates", default="openai", choices=["openai", "simple"], help="ImageNet prompt templates")
    p.add_argument("--space", default="vae", choices=["vae", "diffusion"], help="what the latents are")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.model is None and args.checkpoint is None:
        p.error("pass --model, --checkpoint or both")
    args.parser = p
    return args


def _classnames(spec: str) -> list[str]:
    if spec == "imagenet":
        return fastlclip.imagenet_classnames()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--classnames: no such file: {spec} (pass 'imagenet' or a text file, one class name a line)")
    return [c.strip() for c in path.read_text(encoding="utf-8").splitlines() if c.strip()]


def _check_labelled(path: Path, latents: torch.Tensor, labels: torch.Tensor, model, classes: int) -> None:
    """What scoring needs of one file, checked before any work: latents, their channels, finite values, and
    labels that name a class."""
    v = model.cfg.vision
    if latents.shape[0] == 0:
        raise ValueError(f"{path.name}: holds no latents")
    if latents.shape[1] != v.latent_channels:
        raise ValueError(f"{path.name}: latents have {latents.shape[1]} channels, the model reads {v.latent_channels}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{path.name}: latents contain NaN or Inf")
    bad = ((labels < 0) | (labels >= classes)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{path.name}: label {labels[bad[0]].item()} (row {bad[0].item()}) is not a class index in "
                         f"[0, {classes}); {len(bad)} such label(s)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    with argument_errors(args.parser):  # every file is read and checked before any scoring
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights are random")
            model = fastlclip.load(args.model, args.checkpoint, device=args.device)
        classnames = _classnames(args.classnames)
        classifier = fastlclip.ZeroShotClassifier(model, classnames,
                                                  fastlclip.imagenet_templates(simple=args.templates == "simple"))
        files = []
        for path in args.latents:
            latents, labels = read_labelled(path)
            _check_labelled(path, latents, labels, model, len(classnames))
            files.append((path, latents, labels))
    trained, patch = model.latent_size, model.cfg.vision.patch_size
    rows, skipped = [], []
    for path, latents, labels in files:
        h, w = latents.shape[-2:]
        for policy in POLICIES:
            if policy is None and (h, w) != (trained, trained):
                continue
            if policy == "interpolate" and (h % patch or w % patch):
                skipped.append(f"{path.name} ({h}x{w}): interpolate needs whole {patch}x{patch} patches")
                continue
            r = evaluate(model, classifier, latents, labels, policy, space=args.space, batch_size=args.batch_size)
            rows.append({"file": path.name, "grid": f"{h}x{w}", "policy": str(policy), **r})
    random = args.checkpoint is None
    print(f"{model.cfg.name}, trained on {trained}x{trained} latents"
          + (" -- RANDOM WEIGHTS: a smoke test, the accuracies mean nothing" if random else ""))
    print(table(["file", "grid", "resize", "N", "top-1", "top-5"],
                [[r["file"], r["grid"], r["policy"], r["n"], f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%"]
                 for r in rows], markdown=True))
    for note in skipped:
        print(f"not scored: {note}")
    return rows

if __name__ == "__main__":
    main()
