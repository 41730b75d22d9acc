"""Output for every benchmark: number formatting, one table printer (plain text or Markdown) and JSON files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

NOT_MEASURED = "not measured"


def fmt(value: Any, spec: str = ".2f") -> str:
    """A number formatted with ``spec``; ``-`` for None; any other value (a reason, "not measured") as text."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """Columns aligned to their widest cell: a Markdown pipe table, or plain text with a dashed rule."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    if markdown:
        def line(row):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        def line(row):
            return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *map(line, cells)])


def cpu_device(threads: int | None = None) -> dict[str, Any]:
    """The CPU a measurement ran on: its model (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``),
    the logical CPUs this process may use, torch's thread count (``threads``, or torch's current one), the load
    average when called, and a ``name`` for tables, e.g. ``CPU (AMD EPYC, 2 cores)``."""
    import platform

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    try:
        load = list(os.getloadavg())  # other processes on the machine share its cores: said, not hidden
    except OSError:
        load = None
    return {"name": f"CPU ({model}, {usable} cores)", "cpu_model": model, "cores_usable": usable,
            "os_cpu_count": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
            "load_average_1_5_15_min_at_start": load}


def save_results(report: dict, path: Path | None, device: str, name: str, measured: bool) -> Path | None:
    """A bench's ``report``: at ``path`` (``--json``), or when ``measured`` (on CUDA) under
    ``profiles/results/<device>/<name>``; a CPU smoke run without ``--json`` keeps no file. Says where."""
    from bench.profiles import PROFILES_DIR, results_folder

    out = path or (PROFILES_DIR / "results" / results_folder(None, device) / name if measured else None)
    if out:
        print(f"results: {write_json(out, report)}")
    else:
        print("(CPU smoke run: no results file written; pass --json PATH to keep one)")
    return out


def write_json(path: Path, report: dict) -> Path:
    """``report`` as indented JSON at ``path`` (folders made; replaced atomically, so a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def result_stem(name: str, resolution: int | str) -> str:
    """A result file's name without extension: ``name`` at 512 px, ``name_<R>px`` at another resolution, so a
    run at 1024 px never overwrites the 512 px files (``resolution``: 1024 or ``"1024x1024"``)."""
    side = int(str(resolution).split("x")[0])
    return name if side == 512 else f"{name}_{side}px"


def reno_cost_figure(report: dict[str, Any]):
    """``bench.reno_cost``'s bar charts: per-image cost per reward, one bar per backend (measured) or per GPU
    profile (the FLOP/byte lower bound of a CPU run). Log-scale time axes, so a slow GPU (L4) does not flatten the
    fast ones; every panel titled; resolution and iteration count in the figure title."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, settings = report["results"], report["settings"]
    measured = any(isinstance(r.get("seconds_per_image"), float) for r in rows)
    labels = list(dict.fromkeys(r["reward_label"] for r in rows))
    if measured:
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        panels = [("seconds per image, median (log scale)", "seconds_per_image", True, "ReNO: time per image"),
                  ("peak VRAM allocated (GiB)", "peak_allocated_gib", False, "ReNO: peak memory")]
        series = {v: {r["reward_label"]: r for r in rows if r["variant"] == v} for v in variants}
        title = (f"ReNO cost per image, measured on {report['device']}: {settings['resolution']} px, "
                 f"{settings['iterations']} iterations, random weights")

        def value(v, key, lab):
            return series[v].get(lab, {}).get(key)
    else:
        variants = list(report["floors"])
        panels = [("lower bound, s per image (log scale)", p, True, f"pipeline '{p}'") for p in settings["pipelines"]]
        label_of = {r["reward"]: r["reward_label"] for r in rows}
        series = {v: {(e["pipeline"], label_of.get(e["reward"], e["reward"])): e for e in report["floors"][v]}
                  for v in variants}
        title = (f"ReNO per image, LOWER BOUND from FLOP/byte counts, NOT a measurement: {settings['floor_resolution']} "
                 f"px, {report['floor_iterations']} iterations, one bar per GPU profile")

        def value(v, key, lab):
            return series[v].get((key, lab), {}).get("floor_s_per_image")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    width = 0.8 / max(len(variants), 1)
    for ax, (ylabel, key, log, panel_title) in zip(axes[0], panels):
        shown = []
        for i, v in enumerate(variants):
            ys = [value(v, key, lab) for lab in labels]
            ys = [y if isinstance(y, (int, float)) and y > 0 and math.isfinite(y) else float("nan") for y in ys]
            shown += [y for y in ys if math.isfinite(y)]
            bars = ax.bar([x + i * width for x in range(len(labels))], ys, width, label=v)
            ax.bar_label(bars, labels=[fmt(y, ".3g") if math.isfinite(y) else "" for y in ys], fontsize=6, rotation=90,
                         padding=2)
        if log:
            ax.set_yscale("log")
            if shown:  # half a decade below the shortest bar, so it stands clear of the axis; room for labels above
                ax.set_ylim(min(shown) / 3, max(shown) * 3)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(labels))], labels, rotation=20,
                      ha="right", fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_reno_cost(report: dict[str, Any], path: Path) -> Path:
    """:func:`reno_cost_figure` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = reno_cost_figure(report)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
