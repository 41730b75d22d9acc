"""The GPU CI gate: ``pytest -m gpu`` with pytest-benchmark, compared against the baseline committed for this GPU.

    python -m bench.ci_gate [--json FILE] [--threshold 10] [--baseline FILE] [--refresh] [-- PYTEST_ARGS...]

The comparison is pytest-benchmark's own: ``--benchmark-compare=<baseline> --benchmark-compare-fail=median:10%``
fails the run (non-zero exit) when any benchmark's median is more than 10% slower than the baseline's.
The baseline lives at ``profiles/results/<gpu>/pytest_benchmark_baseline.json`` (``<gpu>``: the profile
detected from the device name, as every other result; see ``bench.profiles``). Benchmarks are matched by
their full name, so run from the repository root.

Refresh the baseline on the GPU it is for (after a deliberate change, or when none is committed yet), then
commit the file with the command, date and commit that made it (pytest-benchmark records the commit and
machine in the JSON):

    python -m bench.ci_gate --refresh
    git add profiles/results/<gpu>/pytest_benchmark_baseline.json && git commit -m "GPU CI baseline for <gpu>"

Without a committed baseline the suite still runs (correctness checks and timings, JSON written) and the
gate says there is nothing to compare against; exit status is pytest's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .cli import Parser, finite_float, writable_file
from .profiles import PROFILES_DIR, load_profiles, results_folder, detect

BASELINE_NAME = "pytest_benchmark_baseline.json"
ROOT = Path(__file__).resolve().parent.parent


def default_baseline() -> Path:
    """``profiles/results/<gpu>/pytest_benchmark_baseline.json`` for the visible CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("python -m bench.ci_gate: error: no CUDA device: the GPU gate needs one "
                         "(or pass --baseline FILE)")
    name = torch.cuda.get_device_name()
    return PROFILES_DIR / "results" / results_folder(detect(name, load_profiles()), name) / BASELINE_NAME


def pytest_command(*, tests: list[str], marker: str, json_out: Path, baseline: Path | None, threshold: float,
                   extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, f"--benchmark-json={json_out}"]
    if marker:
        cmd += ["-m", marker]
    if baseline is not None:
        cmd += [f"--benchmark-compare={baseline}", f"--benchmark-compare-fail=median:{threshold:g}%"]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(prog="python -m bench.ci_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "pytest_benchmark.json",
                   help="this run's pytest-benchmark JSON (default $OUT/pytest_benchmark.json)")
    p.add_argument("--threshold", type=finite_float, default=10.0, help="fail on a median regression over this %%")
    p.add_argument("--baseline", type=Path, help=f"baseline JSON (default profiles/results/<gpu>/{BASELINE_NAME})")
    p.add_argument("--refresh", action="store_true", help="write the baseline from this run instead of comparing")
    p.add_argument("--tests", nargs="+", default=["tests/gpu"], help="test paths (default tests/gpu)")
    p.add_argument("--marker", default="gpu", help="pytest -m expression (default gpu; '' for none)")
    args = p.parse_args(argv)
    if args.threshold <= 0:
        p.error("--threshold must be positive")
    baseline = args.baseline or default_baseline()
    out = baseline if args.refresh else args.json
    if why := writable_file(out):
        p.error(f"{'--baseline' if args.refresh else '--json'}: {why}")
    out.parent.mkdir(parents=True, exist_ok=True)
    compare = None
    if not args.refresh:
        if baseline.is_file():
            compare = baseline
        else:
            print(f"bench.ci_gate: no baseline at {baseline}: running without a comparison. Refresh it on this GPU with "
                  "`python -m bench.ci_gate --refresh` and commit the file.", flush=True)
    cmd = pytest_command(tests=args.tests, marker=args.marker, json_out=out, baseline=compare,
                         threshold=args.threshold, extra=extra)
    print("bench.ci_gate: " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if compare is not None:
        print(f"bench.ci_gate: {'PASSED' if rc == 0 else 'FAILED'} against {compare} "
              f"(median regression limit {args.threshold:g}%; exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
