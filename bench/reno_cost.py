"""End-to-end ReNO cost per image: Latent-CLIP rewards against decode-then-CLIP, paper-style and fast.

    python -m bench.reno_cost [--gpu auto|a100|h100|h200|l4|rtx4090] [--weights DIR] [--iterations 50]
                              [--images N] [--rewards ...] [--pipelines paper fast] [--out DIR]
                              [--resolution 512|1024] [--preset NAME] [--unet-weights F] [--resize interpolate|pool]

On CUDA it measures, after warm-up, with CUDA events (medians): seconds per image, a per-phase
breakdown of the iteration, peak VRAM (allocator and NVML), NVML energy, images per hour, dollars per
1000 images at the profile's price, and the saving against decode-then-CLIP ViT-B/32 in the same
pipeline. Without CUDA it runs the same pipeline on tiny configs as a smoke test and prints the floor
per iteration from FLOP and byte counts. Writes JSON, Markdown and a PNG under ``--out/<gpu>/``.

``--resolution 1024`` runs SDXL's native size (128x128 latents) with a 1024 px one-step model
(``fastlclip.reno.ONE_STEP_PRESETS``), the Latent-CLIP reward under ``--resize``; the floors then count the
UNet and the decode at 1024 px, and the VAE decode's share of the floor is printed at 512 and 1024 px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastlclip import reno

from . import flops, rewards as bench_rewards
from .profiles import PROFILES_DIR, Profile, Selection, load_profiles, results_folder, select
from .provenance import run_record
from .reno_pipelines import DEFAULT_PRESETS, PIPELINES, RESOLUTIONS, optimizer_text, preset_for, run_measured, run_smoke
from .report import NOT_MEASURED, fmt, table, write_json
from .timing import BREAKDOWN

PAPER_SAVING = "the paper reports 21% (Latent-ViT-B/8 9.11 s vs decode + CLIP ViT-B/32 11.59 s per image; GPU not stated)"
TARGETS = {"latent_vs_pixel_b32": 2.0, "fast_vs_paper": 3.0, "vram_saving_pct": 30.0}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reno_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="auto", choices=["auto", *sorted(load_profiles())],
                   help="GPU profile for prices and floors; auto detects it from the device name")
    p.add_argument("--weights", type=Path, help="local diffusers SDXL folder: SDXL-Turbo at 512, SDXL base with --unet-weights "
                   "at 1024 (default: random weights from the shipped configs)")
    p.add_argument("--resolution", type=int, default=512, choices=RESOLUTIONS,
                   help=f"image side in px; the one-step generator per resolution: {DEFAULT_PRESETS}")
    p.add_argument("--preset", choices=sorted(reno.ONE_STEP_PRESETS), help="one-step sampling (default: per --resolution)")
    p.add_argument("--unet-weights", type=Path, help="a one-step UNet's .safetensors loaded into --weights' unet/")
    p.add_argument("--resize", default="interpolate", choices=["interpolate", "pool"],
                   help="Latent-CLIP's policy for latents larger than it was trained on (1024 px)")
    p.add_argument("--iterations", type=int, help="ReNO iterations per image (default 50; 2 in the CPU smoke test)")
    p.add_argument("--images", type=int, help="timed images per configuration (default 3; 1 in the CPU smoke test)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations per configuration (CUDA)")
    p.add_argument("--rewards", nargs="+", choices=list(bench_rewards.REWARDS), default=list(bench_rewards.REWARDS))
    p.add_argument("--pipelines", nargs="+", choices=list(PIPELINES), default=list(PIPELINES))
    p.add_argument("--latent-backend", default="auto",
                   help="fastlclip backend for the fast pipeline: auto (fastest that runs, measured) or a name")
    p.add_argument("--compile-unet", action="store_true", help="fast pipeline: run the UNet through torch.compile (CUDA)")
    p.add_argument("--prompt", default="A red dog and a green cat", help="prompt optimised for (ReNO's default)")
    p.add_argument("--out", type=Path, default=PROFILES_DIR / "results", help="results root; files go to <out>/<gpu>/")
    args = p.parse_args(argv)
    for name in ("iterations", "images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    args.pipelines = [k for k in PIPELINES if k in args.pipelines]  # paper first: compiling is for fast only
    args.rewards = list(dict.fromkeys(args.rewards))
    return args


# -- derived figures ------------------------------------------------------------------------------------
def _price(row: dict[str, Any], profile: Profile | None) -> Any:
    if not isinstance(row.get("seconds_per_image"), float):
        return row.get("usd_per_1000_images", NOT_MEASURED)
    if profile is None:
        return "no profile for this GPU: unpriced"
    if profile.price_per_hour_usd is None:
        return "price: not sourced"
    return profile.price_per_hour_usd * row["seconds_per_image"] / 3.6


def add_savings(rows: list[dict[str, Any]], profile: Profile | None) -> None:
    """Dollars per 1000 images and % saved against decode + CLIP ViT-B/32 in the same pipeline."""
    for row in rows:
        row["usd_per_1000_images"] = _price(row, profile)
        base = next((r for r in rows if r["pipeline"] == row["pipeline"] and r["reward"] == bench_rewards.BASELINE), None)
        s, b = row.get("seconds_per_image"), base and base.get("seconds_per_image")
        if isinstance(s, float) and isinstance(b, float):
            row["saved_vs_pixel_b32_pct"] = 100 * (1 - s / b)
        else:
            row["saved_vs_pixel_b32_pct"] = NOT_MEASURED


def _fastest(rows, pipeline: str, reward: str) -> dict[str, Any] | None:
    cands = [r for r in rows if r["pipeline"] == pipeline and r["reward"] == reward and isinstance(r.get("seconds_per_image"), float)]
    return min(cands, key=lambda r: r["seconds_per_image"]) if cands else None


def evaluate_targets(rows: list[dict[str, Any]], device_name: str | None) -> list[dict[str, Any]]:
    """The issue's targets, from measured rows only (they are stated for an H100/H200)."""
    out = []
    base = bench_rewards.BASELINE
    for pipeline in PIPELINES:
        b = _fastest(rows, pipeline, base)
        for key in (k for k, s in bench_rewards.REWARDS.items() if s.kind == "latent"):
            r = _fastest(rows, pipeline, key)
            if b and r:
                ratio = b["seconds_per_image"] / r["seconds_per_image"]
                out.append({"target": f"{pipeline}: {key} cheaper per image than {base}", "value": f"{ratio:.2f}x",
                            "required": f">= {TARGETS['latent_vs_pixel_b32']:g}x", "met": ratio >= TARGETS["latent_vs_pixel_b32"]})
                saving = 100 * (1 - r["peak_allocated_gib"] / b["peak_allocated_gib"])
                out.append({"target": f"{pipeline}: {key} peak VRAM (allocated) lower than {base}", "value": f"{saving:.1f}%",
                            "required": f">= {TARGETS['vram_saving_pct']:g}%", "met": saving >= TARGETS["vram_saving_pct"]})
    for key in bench_rewards.REWARDS:
        p, f = _fastest(rows, "paper", key), _fastest(rows, "fast", key)
        if p and f:
            ratio = p["seconds_per_image"] / f["seconds_per_image"]
            out.append({"target": f"{key}: fast pipeline cheaper per image than paper-style", "value": f"{ratio:.2f}x",
                        "required": f">= {TARGETS['fast_vs_paper']:g}x", "met": ratio >= TARGETS["fast_vs_paper"]})
    for t in out:
        t["measured_on"] = device_name
    return out


def compute_floors(args, selection: Selection, iterations: int, progress) -> dict[str, Any]:
    """Floor per iteration and per image for each (pipeline, reward) on each profile in the selection."""
    out: dict[str, Any] = {}
    if not selection.floor:
        return out
    keys = [(p, k) for p in args.pipelines for k in args.rewards]
    work = {}
    for pipeline, key in progress(keys, desc="counting FLOPs (meta device)", unit="config"):
        spec = bench_rewards.REWARDS[key]
        work[pipeline, key] = flops.iteration_work(spec.kind, spec.model, checkpointing=pipeline == "paper",
                                                   resolution=getattr(args, "resolution", 512))
    for profile in selection.floor:
        entries = []
        for (pipeline, key), components in work.items():
            f = flops.floor(components, profile, iterations)
            entries.append({"pipeline": pipeline, "reward": key, "floor_ms_per_iteration": 1000 * f.per_iteration_s,
                            "floor_s_per_image": f.per_image_s, "gflop_per_iteration": f.flops_per_iteration / 1e9,
                            "weight_gb_per_iteration": f.weight_bytes_per_iteration / 1e9,
                            "components_gflop": {w.name: w.total_flops / 1e9 for w in components},
                            "decode_share": flops.decode_share(components, profile)})
        out[profile.name] = entries
    return out


def decode_shares(selection: Selection, reward: str = bench_rewards.BASELINE) -> list[dict[str, Any]]:
    """The VAE decode's share of the decode-then-CLIP iteration floor (fast pipeline, no checkpointing)
    at each resolution, per floor profile: the part of the iteration a latent reward removes."""
    spec = bench_rewards.REWARDS[reward]
    rows = []
    for profile in selection.floor:
        for resolution in RESOLUTIONS:
            work = flops.iteration_work(spec.kind, spec.model, checkpointing=False, resolution=resolution)
            decode = next(w for w in work if w.name == "VAE decode")
            rows.append({"profile": profile.name, "resolution": resolution, "reward": reward,
                         "decode_tflop_per_iteration": decode.total_flops / 1e12,
                         "decode_floor_ms": 1000 * decode.seconds(profile),
                         "iteration_floor_ms": 1000 * sum(w.seconds(profile) for w in work),
                         "decode_share": flops.decode_share(work, profile)})
    return rows


def decode_share_table(rows: list[dict[str, Any]]) -> str:
    headers = ["profile", "px", "decode TFLOP/iter", "decode FLOOR ms", "iteration FLOOR ms", "decode share"]
    body = [[r["profile"], r["resolution"], f"{r['decode_tflop_per_iteration']:.1f}", f"{r['decode_floor_ms']:.2f}",
             f"{r['iteration_floor_ms']:.2f}", f"{100 * r['decode_share']:.0f}%"] for r in rows]
    return table(headers, body, markdown=True)


# -- output -------------------------------------------------------------------------------------------
def _backend(r: dict[str, Any]) -> str:
    return r["backend"] + (" +ckpt" if r["gradient_checkpointing"] and r["pipeline"] == "fast" else "")


def cost_table(rows: list[dict[str, Any]]) -> str:
    headers = ["pipeline", "reward", "backend", "s/image", "ms/iter", "peak alloc GiB", "NVML peak GiB", "J/image",
               "images/h", "$/1000 img", "saved vs B/32"]
    body = []
    for r in rows:
        get = lambda k, spec=".2f": fmt(r.get(k, r.get("error", NOT_MEASURED)), spec)  # noqa: E731
        saved = r.get("saved_vs_pixel_b32_pct", NOT_MEASURED)
        body.append([r["pipeline"], r["reward_label"], _backend(r), get("seconds_per_image"), get("iteration_ms_median", ".1f"),
                     get("peak_allocated_gib"), get("nvml_peak_used_gib"), get("energy_j_per_image", ".0f"),
                     get("images_per_hour", ".0f"), get("usd_per_1000_images", ".3f"),
                     f"{saved:.1f}%" if isinstance(saved, float) else saved])
    return table(headers, body, markdown=True)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    headers = ["pipeline", "reward", "backend", *BREAKDOWN]  # "-": the phase does not occur (no VAE in a latent reward)
    def cell(r, phase):
        if not isinstance(r.get("breakdown_ms"), dict):
            return r.get("error", NOT_MEASURED)
        return fmt(r["breakdown_ms"][phase], ".2f") if phase in r["breakdown_ms"] else "-"

    body = [[r["pipeline"], r["reward_label"], _backend(r), *(cell(r, p) for p in BREAKDOWN)] for r in rows]
    return table(headers, body, markdown=True)


def smoke_table(rows: list[dict[str, Any]]) -> str:
    body = [[r["pipeline"], r["reward_label"], r["smoke"]] for r in rows]
    return table(["pipeline", "reward", "smoke test result"], body, markdown=True)


def floor_table(floors: dict[str, Any]) -> str:
    headers, body = ["profile", "pipeline", "reward", "GFLOP/iter", "weight GB/iter", "FLOOR ms/iter", "FLOOR s/image",
                     "decode share"], []
    for name, entries in floors.items():
        for e in entries:
            share = e.get("decode_share", 0.0)
            body.append([name, e["pipeline"], bench_rewards.REWARDS[e["reward"]].label, f"{e['gflop_per_iteration']:.0f}",
                         f"{e['weight_gb_per_iteration']:.2f}", f"{e['floor_ms_per_iteration']:.2f}", f"{e['floor_s_per_image']:.3f}",
                         f"{100 * share:.0f}%" if share else "-"])
    return table(headers, body, markdown=True)


def error_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per configuration that failed: which, what, and why."""
    return [f"{r['pipeline']} {r['reward_label']} {_backend(r)}: {r['error']}"
            + (f" ({r['error_detail']})" if r.get("error_detail") else "") for r in rows if r.get("error")]


def _nvml_notes(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["nvml_note"] for r in rows if r.get("nvml_note")))


def _statements(report: dict[str, Any]) -> list[str]:
    s = [report["mode_text"], f"Generator: {report['weights']['generator']}.", f"Rewards: {report['weights']['rewards']}.",
         report["profile_selection"], "No quality figure is reported: the rewards carry random weights."]
    s += [f"{k}: {v}" for k, v in PIPELINES.items() if k in report["settings"]["pipelines"]]
    return s


def write_outputs(report: dict[str, Any], directory: Path) -> dict[str, Path]:
    paths = {ext: directory / f"reno_cost.{ext}" for ext in ("json", "md", "png")}
    write_json(paths["json"], report)
    md = [f"# ReNO cost per image: {report['device'] or 'no CUDA device (CPU smoke test)'}", "",
          f"`{report['command']}` on {report['date']}; torch {report['versions']['torch']}, diffusers "
          f"{report['versions']['diffusers']}, open_clip {report['versions']['open_clip']}.", ""]
    md += [f"- {line}" for line in _statements(report)] + [""]
    if report["mode"] == "measured":
        md += ["## Cost", "", cost_table(report["results"]), "", f"Saving vs decode + CLIP ViT-B/32: {PAPER_SAVING}.",
               *(f"Failed: {n}." for n in error_notes(report["results"])),
               *(f"NVML: {n}." for n in _nvml_notes(report["results"])), ""]
        md += ["## Per-iteration breakdown (ms, median over iterations with a backward pass; CUDA events)", "",
               breakdown_table(report["results"]), ""]
    else:
        md += ["## Smoke test (tiny configs, nothing timed)", "", smoke_table(report["results"]), "",
               f"Cost, breakdown, VRAM, energy: {NOT_MEASURED} (no CUDA device).", ""]
    if report["floors"]:
        md += ["## FLOOR from FLOP and weight-byte counts (a lower bound, NOT a measurement)", "", floor_table(report["floors"]), ""]
    if report.get("decode_shares"):
        md += ["## VAE decode's share of the decode + CLIP ViT-B/32 iteration FLOOR by resolution", "",
               decode_share_table(report["decode_shares"]), ""]
    md += ["## Targets (stated for an H100/H200)", ""]
    md += [f"- {t['target']}: {t['value']} (needs {t['required']}): {'met' if t['met'] else 'NOT met'}" for t in report["targets"]] \
        if isinstance(report["targets"], list) and report["targets"] else [f"- {NOT_MEASURED}"]
    paths["md"].write_text("\n".join(md) + "\n")
    _plot(report, paths["png"])
    return paths


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    measured = any(isinstance(r.get("seconds_per_image"), float) for r in rows)
    if measured:
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        panels = [("seconds per image (median)", "seconds_per_image"), ("peak VRAM allocated (GiB)", "peak_allocated_gib")]
        series = {v: {r["reward_label"]: r for r in rows if r["variant"] == v} for v in variants}
        title = f"ReNO cost, {report['settings']['iterations']} iterations: {report['device']}"
    else:
        variants = list(report["floors"])
        panels = [(f"{p}: FLOOR s/image", p) for p in report["settings"]["pipelines"]]
        series = {v: {(e["pipeline"], bench_rewards.REWARDS[e["reward"]].label): e for e in report["floors"][v]} for v in variants}
        title = "FLOOR from FLOP/byte counts, NOT a measurement (CPU smoke run)"
    labels = list(dict.fromkeys(r["reward_label"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    width = 0.8 / max(len(variants), 1)
    for ax, (ylabel, key) in zip(axes[0], panels):
        for i, v in enumerate(variants):
            if measured:
                ys = [series[v].get(lab, {}).get(key) for lab in labels]
            else:
                ys = [series[v].get((key, lab), {}).get("floor_s_per_image") for lab in labels]
            ys = [y if isinstance(y, float) else 0.0 for y in ys]
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=v)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(labels))], labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title + (" (random weights)" if measured else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tiny_side(args) -> int:
    from . import tiny

    return tiny.IMAGE_SIZE * args.resolution // 512


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    profiles = load_profiles()
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else None
    selection = select(args.gpu, device_name, profiles)
    print(selection.message)
    if cuda:
        mode = "Measured with CUDA events after warm-up (medians)."
    else:
        mode = ("CPU SMOKE TEST on tiny configs: checks the pipeline runs; nothing is timed. The floors below come from "
                "FLOP and byte counts of the full-size models: lower bounds, NOT measurements.")
        if args.weights:
            mode += f" --weights {args.weights} is not used: the smoke test runs tiny configs."

    floor_iterations = args.iterations or 50  # the floor is for the full-size models, whatever the smoke test runs
    rows, info = (run_measured if cuda else run_smoke)(args, tqdm)
    add_savings(rows, selection.measured)
    floors = compute_floors(args, selection, floor_iterations, tqdm)
    shares = decode_shares(selection) if selection.floor else []
    random_generator = not (cuda and args.weights)
    report = {
        **run_record("bench.reno_cost", argv),
        "python": sys.executable,
        "device": device_name,
        "mode": "measured" if cuda else "cpu-smoke",
        "mode_text": mode,
        "weights": {"random": True, "generator": info["generator"],
                    "rewards": "random weights (Latent-CLIP and open_clip models built without checkpoints)",
                    "statement": "random weights" + ("" if random_generator else " (rewards only)")},
        "profile_selection": selection.message,
        "profile": vars(selection.measured) if selection.measured else None,
        "settings": {"iterations": args.iterations, "images": args.images, "warmup_iterations": args.warmup if cuda else 0,
                     "prompt": args.prompt, "pipelines": args.pipelines, "rewards": args.rewards, "dtype": info["dtype"],
                     "latent_backend_requested": args.latent_backend, "latent_backend": info["latent_backend"],
                     "compile_unet": bool(args.compile_unet and cuda),
                     "resolution": (f"{args.resolution}x{args.resolution}" if cuda else
                                    f"{tiny_side(args)}x{tiny_side(args)} (tiny; --resolution {args.resolution})"),
                     "floor_resolution": f"{args.resolution}x{args.resolution}", "one_step_preset": preset_for(args),
                     "latent_resize": args.resize,
                     "optimizer": optimizer_text()},
        "results": rows,
        "floors": floors,
        "decode_shares": shares,
        "floor_iterations": floor_iterations,
        "floor_note": "FLOOR: lower bound max(FLOPs/peak bf16, weight bytes/bandwidth) per component, summed; NOT a measurement",
        "paper_saving": PAPER_SAVING,
        "targets": evaluate_targets(rows, device_name) if cuda else NOT_MEASURED,
    }
    folder = results_folder(selection.measured, device_name) if cuda else "cpu-smoke"
    paths = write_outputs(report, args.out / folder)

    print()
    for line in _statements(report):
        print(line)
    if cuda:
        print("\nCost")
        print(cost_table(rows))
        print(f"Saving vs decode + CLIP ViT-B/32: {PAPER_SAVING}.")
        for note in error_notes(rows):
            print(f"Failed: {note}.")
        for note in _nvml_notes(rows):
            print(f"NVML: {note}.")
        print("\nPer-iteration breakdown, ms (median over iterations with a backward pass, CUDA events)")
        print(breakdown_table(rows))
    else:
        print("\nSmoke test (tiny configs, nothing timed)")
        print(smoke_table(rows))
        print(f"Cost, breakdown, VRAM, energy: {NOT_MEASURED} (no CUDA device).")
    if floors:
        print(f"\nFLOOR per iteration and per image ({floor_iterations} iterations) from FLOP and weight-byte counts: "
              "a lower bound, NOT a measurement")
        print(floor_table(floors))
    if shares:
        print(f"\nVAE decode's share of the decode + CLIP ViT-B/32 iteration FLOOR (fast pipeline) by resolution: "
              "what a latent reward removes")
        print(decode_share_table(shares))
    if isinstance(report["targets"], list):
        print("\nTargets (stated for an H100/H200):")
        for t in report["targets"]:
            print(f"  {t['target']}: {t['value']} (needs {t['required']}): {'met' if t['met'] else 'NOT met'}")
    print("\nWrote " + ", ".join(str(p) for p in paths.values()))
    return report


if __name__ == "__main__":
    main()
