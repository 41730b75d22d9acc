"""The GPU CI gate: every gpu-marked test with pytest-benchmark, compared against the baseline committed for this GPU.

    python -m bench.ci_gate [--json FILE] [--threshold 10] [--baseline FILE] [--refresh] [-- PYTEST_ARGS...]

It runs ``pytest -m gpu`` over the whole of ``tests/`` (tests/gpu and the gpu-marked tests of the other test
files). The comparison is pytest-benchmark's own: ``--benchmark-compare=<baseline>
--benchmark-compare-fail=median:10%`` fails the run (non-zero exit) when any benchmark's median is more than 10%
slower than the baseline's. The baseline lives at ``profiles/results/<gpu>/pytest_benchmark_baseline.json``
(``<gpu>``: the profile detected from the device name, as every other result; see ``bench.profiles``).
Benchmarks are matched by their full name, so run from the repository root.

A gate that compared nothing fails and says so (exit 1): no test ran (every GPU test skipped or deselected),
no benchmark ran, no baseline, or no benchmark of this run is in the baseline. The baseline is validated first
(JSON from pytest-benchmark with at least one benchmark, each with a positive finite median); a bad one is one
line on stderr and exit 2, before anything runs.

Refresh the baseline on the GPU it is for (after a deliberate change, or when none is committed yet), then
commit the file with the command, date and commit that made it (pytest-benchmark records the commit and
machine in the JSON); a refresh that measured no benchmark fails and leaves the old baseline in place:

    python -m bench.ci_gate --refresh
    git add profiles/results/<gpu>/pytest_benchmark_baseline.json && git commit -m "GPU CI baseline for <gpu>"
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from xml.etree import ElementTree

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


def check_baseline(path: Path) -> str | None:
    """Why ``path`` is not a usable pytest-benchmark baseline, or None when it is."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, list) or not benchmarks:
        return "no benchmarks in it (not a pytest-benchmark JSON with at least one benchmark)"
    for i, b in enumerate(benchmarks):
        median = b.get("stats", {}).get("median") if isinstance(b, dict) and isinstance(b.get("stats"), dict) else None
        if not isinstance(b, dict) or not isinstance(b.get("fullname"), str):
            return f"benchmark {i} has no fullname"
        if isinstance(median, bool) or not isinstance(median, (int, float)) or not math.isfinite(median) or median <= 0:
            return f"benchmark {b['fullname']!r} has no positive finite median"
    return None


def tests_run(junit: Path) -> tuple[int, int]:
    """(tests that ran, tests skipped) from pytest's JUnit XML; (0, 0) when it is missing or unreadable."""
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return 0, 0
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - skipped, skipped


def benchmark_names(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_bytes())
        return [b["fullname"] for b in data.get("benchmarks", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def pytest_command(*, tests: list[str], marker: str, json_out: Path, junit: Path, baseline: Path | None,
                   threshold: float, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, f"--benchmark-json={json_out}",
           f"--junitxml={junit}"]
    if marker:
        cmd += ["-m", marker]
    if baseline is not None:
        cmd += [f"--benchmark-compare={baseline}", f"--benchmark-compare-fail=median:{threshold:g}%"]
    return cmd + extra


def _fail(text: str) -> int:
    print(f"bench.ci_gate: FAILED: {text}", flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = Parser(prog="python -m bench.ci_gate", description=__doc__.split("\n\n")[0])
    default_json = Path(os.environ.get("OUT") or tempfile.gettempdir()) / "pytest_benchmark.json"
    p.add_argument("--json", type=Path, default=default_json,
                   help="this run's pytest-benchmark JSON (default $OUT/pytest_benchmark.json, else the temp folder)")
    p.add_argument("--threshold", type=finite_float, default=10.0, help="fail on a median regression over this %%")
    p.add_argument("--baseline", type=Path, help=f"baseline JSON (default profiles/results/<gpu>/{BASELINE_NAME})")
    p.add_argument("--refresh", action="store_true", help="write the baseline from this run instead of comparing")
    p.add_argument("--tests", nargs="+", default=["tests"], help="test paths (default tests: every test file)")
    p.add_argument("--marker", default="gpu", help="pytest -m expression (default gpu; '' for none)")
    args = p.parse_args(argv)
    if args.threshold <= 0:
        p.error("--threshold must be positive")
    baseline = args.baseline or default_baseline()
    out = baseline if args.refresh else args.json
    if why := writable_file(out):
        p.error(f"{'--baseline' if args.refresh else '--json'}: {why}")
    compare = None
    if not args.refresh and baseline.exists():
        if why := check_baseline(baseline):
            p.error(f"baseline {baseline}: {why}: refresh it on this GPU with `python -m bench.ci_gate --refresh`")
        compare = baseline
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_json = Path(tmp) / "benchmark.json" if args.refresh else out
        junit = Path(tmp) / "junit.xml"
        cmd = pytest_command(tests=args.tests, marker=args.marker, json_out=run_json, junit=junit, baseline=compare,
                             threshold=args.threshold, extra=extra)
        print("bench.ci_gate: " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT)
        ran, skipped = tests_run(junit)
        names = benchmark_names(run_json)
        if ran == 0:
            return _fail(f"no test ran ({skipped} skipped): nothing was compared (no CUDA device, or every test "
                         "deselected?)")
        if not names:
            return _fail(f"{ran} test(s) ran but no benchmark did: nothing was compared")
        if args.refresh:
            if rc != 0:
                return _fail(f"pytest exit {rc}: the baseline {baseline} was not refreshed")
            shutil.copyfile(run_json, out)
            print(f"bench.ci_gate: wrote the baseline {out} ({len(names)} benchmarks); commit it")
            return 0
    if compare is None:
        return _fail(f"no baseline at {baseline}: nothing was compared. Refresh it on this GPU with "
                     "`python -m bench.ci_gate --refresh` and commit the file (this run's JSON: "
                     f"{out}, {len(names)} benchmarks)")
    known = set(benchmark_names(compare))
    matched = [n for n in names if n in known]
    if not matched:
        return _fail(f"none of this run's {len(names)} benchmarks is in the baseline {compare}: nothing was compared")
    missing = sorted(known - set(names))
    if missing:
        print(f"bench.ci_gate: {len(missing)} baseline benchmark(s) did not run: {', '.join(missing[:5])}"
              + (" ..." if len(missing) > 5 else ""))
    print(f"bench.ci_gate: {'PASSED' if rc == 0 else 'FAILED'} against {compare}: {len(matched)} benchmark(s) "
          f"compared (median regression limit {args.threshold:g}%; exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
