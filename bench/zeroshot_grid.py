"""Zero-shot accuracy of a Latent-CLIP checkpoint per latent grid and resize policy.

    python -m bench.zeroshot_grid --model Latent-ViT-B-8-512 --checkpoint epoch_34.pt \
        --latents val_512px.parquet val_1024px.parquet --classnames imagenet [--templates simple] [--device cuda]

Each ``--latents`` file holds labelled SDXL latents of one grid (e.g. the same ImageNet validation images
resized to 512 px and to 1024 px, then encoded with the SDXL VAE): a Parquet file with a ``latent`` column
(nested lists, Arrow fixed-shape tensors or ``.npy`` bytes; read as ``fastlclip.corpus`` reads shards) and
an integer ``label`` column, or a ``.pt`` / ``.safetensors`` file with ``latents`` (N, 4, H, W) and
``labels`` (N,). ``--space`` says whether they are diffusion-space (pipeline) latents or raw VAE
samples. Every file is scored under every policy that accepts its grid (``None`` only at the trained
grid, ``interpolate`` and ``pool`` everywhere) and top-1 / top-5 accuracy are printed per (grid, policy).
Without ``--checkpoint`` the weights are random: a smoke test, and the output says so.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import fastlclip

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
    elif suffix.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(str(path))
        latents, labels = data["latents"].float(), data["labels"].long()
    elif suffix.endswith((".pt", ".pth")):
        data = torch.load(path, map_location="cpu", weights_only=True)
        latents, labels = data["latents"].float(), data["labels"].long()
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.zeroshot_grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="config name (default: from the checkpoint)")
    p.add_argument("--checkpoint", default=None, help="the authors' .pt, a .safetensors file or hf-hub:<repo>")
    p.add_argument("--latents", nargs="+", type=Path, required=True, help="labelled latent files, one grid each")
    p.add_argument("--classnames", default="imagenet", help="'imagenet' or a text file with one class name a line")
    p.add_argument("--templates", default="openai", choices=["openai", "simple"], help="ImageNet prompt templates")
    p.add_argument("--space", default="vae", choices=["vae", "diffusion"], help="what the latents are")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.model is None and args.checkpoint is None:
        raise SystemExit("pass --model, --checkpoint or both")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        model = fastlclip.load(args.model, args.checkpoint, device=args.device)
    if args.classnames == "imagenet":
        classnames = fastlclip.imagenet_classnames()
    else:
        classnames = [c.strip() for c in Path(args.classnames).read_text().splitlines() if c.strip()]
    classifier = fastlclip.ZeroShotClassifier(model, classnames,
                                              fastlclip.imagenet_templates(simple=args.templates == "simple"))
    trained = model.latent_size
    rows = []
    for path in args.latents:
        latents, labels = read_labelled(path)
        h, w = latents.shape[-2:]
        for policy in POLICIES:
            if policy is None and (h, w) != (trained, trained):
                continue
            r = evaluate(model, classifier, latents, labels, policy, space=args.space, batch_size=args.batch_size)
            rows.append({"file": path.name, "grid": f"{h}x{w}", "policy": str(policy), **r})
    random = args.checkpoint is None
    print(f"{model.cfg.name}, trained on {trained}x{trained} latents"
          + (" -- RANDOM WEIGHTS: a smoke test, the accuracies mean nothing" if random else ""))
    print(table(["file", "grid", "resize", "N", "top-1", "top-5"],
                [[r["file"], r["grid"], r["policy"], r["n"], f"{100 * r['top1']:.2f}%", f"{100 * r['top5']:.2f}%"]
                 for r in rows], markdown=True))
    return rows


if __name__ == "__main__":
    main()
