"""The short table ``bench/gpu_suite.sh`` prints last: headline figures from the JSON files of one suite call.

    python -m bench.suite_summary RESULTS_DIR

Reads whatever the call wrote (``reward*.json``, ``kernels*.json``, ``*/reno_cost.json``); a file that is
missing (its step failed or timed out) is said so, never filled in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import NOT_MEASURED, fmt, table

REWARD_SYSTEMS = ("reference eager", "fastlclip eager", "fastlclip triton", "fastlclip graph",
                  "SDXL VAE decode + CLIP ViT-B-32", "TAESD-XL decode + CLIP ViT-B-32")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(results: Path) -> str:
    lines = []
    body = []
    for path in sorted(results.glob("reward*.json")):
        report = _load(path)
        for r in (report or {}).get("rows", []):
            if r["task"] == "reward" and r["batch"] == 1 and r["system"] in REWARD_SYSTEMS:
                body.append([path.name, r["group"], r["system"], fmt(r["ms"], ".3f"), fmt(r["speedup_vs_reference"], ".2f"),
                             fmt(r["peak_vram_gib"], ".2f"), r["status"]])
    lines += ["Reward step, batch 1 (ms, median)",
              table(["file", "model", "system", "ms", "x vs ref", "VRAM GiB", "status"], body) if body else "  no reward JSON"]
    body = []
    for path in sorted(results.glob("kernels*.json")):
        for r in (_load(path) or {}).get("rows", []):
            if r.get("kernel") == "attention" and r.get("impl") in ("triton", "sdpa-flash_attention",
                                                                       "sdpa-efficient_attention", "sdpa-cudnn_attention"):
                body.append([r["impl"], r.get("L"), r.get("batch"), r.get("pass"), fmt(r.get("ms"), ".4f")])
            if r.get("kernel") == "patch_embed":
                body.append([r.get("impl"), f"patch {r.get('patch')}", r.get("batch"), r.get("pass"), fmt(r.get("ms"), ".4f")])
    lines += ["", "Kernels", table(["impl", "L / patch", "batch", "pass", "ms"], body) if body else "  no kernels JSON"]
    body = []
    for path in sorted(results.glob("**/reno_cost.json")):
        report = _load(path) or {}
        for r in report.get("results", []):
            body.append([r["pipeline"], r["reward_label"], r["backend"], fmt(r.get("seconds_per_image", r.get("error")), ".2f"),
                         fmt(r.get("iteration_ms_median", NOT_MEASURED), ".1f"), fmt(r.get("peak_allocated_gib", NOT_MEASURED), ".2f")])
        heads = [[h["ratio"], fmt(h["value"], ".2f")] for h in report.get("headlines", [])]
        if heads:
            lines += ["", f"ReNO headline ratios ({path.parent.name})", table(["ratio", "x"], heads)]
    lines += ["", "ReNO per image", table(["pipeline", "reward", "backend", "s/image", "ms/iter", "peak GiB"], body)
              if body else "  no reno_cost JSON"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m bench.suite_summary RESULTS_DIR\n")
        return 2
    print(summary(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
