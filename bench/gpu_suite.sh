#!/usr/bin/env bash
# The GPU checks and benchmarks, sized for short visits to a CUDA machine (an H100/H200: at most 10 minutes a
# call) or any CUDA machine.
#
#   bash bench/gpu_suite.sh PART OUT_DIR      PART: quick, full1 .. full5, or full (every part in a row)
#
# OUT_DIR (or $OUT when it is not given) receives exactly two files per part: results-PART.tgz (logs, JSON,
# Markdown, PNG, the commands and the environment) and summary-PART.txt (the step table and the headline
# figures). Both are rewritten after every step, so a call killed from outside still leaves what its finished
# steps measured. Unpack the archive into profiles/results/<gpu>/ and commit it.
#
# Offline GPU machines (no package index): the machine needs CUDA, torch and Triton. Build the wheels it lacks
# on a machine with an index, for its Python version and platform, e.g.
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64 \
#       --dest .whl open_clip_torch diffusers transformers huggingface_hub safetensors ftfy regex \
#       pytest-benchmark nvidia-ml-py matplotlib xformers
# and copy .whl/ next to this repository's pyproject.toml. The suite installs every wheel found in .whl/ with
# `pip install --no-index --no-deps --target <a fresh temporary folder>`, then this project with
# `pip install --no-index --no-deps --no-build-isolation -e .`; nothing is downloaded.
#
# quick: the headline figures in one call of at most 6 minutes from a cold machine: the kernels compiled in
#   parallel first (bench.precompile, one process per core), then the reward step of Latent-ViT-B/8 at batch 1
#   (eager, triton, graph, the open_clip-style eager reference, SDXL VAE decode + CLIP ViT-B/32, TAESD-XL decode
#   + CLIP ViT-B/32), the kernels at sequence 65 and 257, and ReNO per image (reno and fast pipelines,
#   Latent-CLIP B/8, decode + B/32, TAESD-XL + B/32, 5 iterations, per-iteration time).
# full1: kernel and triton-backend tests on CUDA, then every gpu-marked test through the CI gate (bench.ci_gate)
# full2: bench.kernels (all lengths and batches)
# full3: bench.reward: every model, eager/triton/graph, every decode-then-CLIP baseline (VAE and TAESD-XL)
# full4: bench.reward: the compile backend, its modes, torch.compile of the reference (slow to compile)
# full5: bench.reno_cost: reno and fast, every reward, 50 iterations, 2 images
#
# Budgets: nothing here has run on an H100/H200 yet, so each budget is an estimate from counts (see each step);
# each step runs under `timeout`, its log is kept, and bench.kernels and bench.reno_cost write every result as
# it is measured, so a step cut short keeps what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash bench/gpu_suite.sh quick|full1|full2|full3|full4|full5|full OUT_DIR"
PART=${1:-}
case "$PART" in quick|full1|full2|full3|full4|full5|full) ;;
  "") echo "gpu_suite.sh: no part given; $usage" >&2; exit 2;;
  *) echo "gpu_suite.sh: unknown part '$PART'; $usage" >&2; exit 2;;
esac
OUT=${2:-${OUT:-}}
if [ -z "$OUT" ]; then echo "gpu_suite.sh: no output folder given (second argument or \$OUT); $usage" >&2; exit 2; fi
mkdir -p "$OUT" 2>/dev/null && [ -w "$OUT" ] || { echo "gpu_suite.sh: output folder '$OUT' is not writable" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_suite.sh: no CUDA device (nvidia-smi finds no GPU): the GPU suite needs one; nothing was run" >&2
  exit 1
fi
export PYTHONUNBUFFERED=1
T0=$SECONDS
RES=$(mktemp -d)/results  # staging; only the archive and the summary go to $OUT (few files, none nested)
mkdir -p "$RES"
SITE=$(dirname "$RES")/site

# Install: wheels the machine lacks (from .whl/, no index), then the project editable (kernels/ -> fastlclip.kernels).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || python3 -m pip install -q --no-index --no-deps --no-build-isolation --break-system-packages -e . || exit 1
unset TRITON_INTERPRET
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite.sh: no CUDA device (torch.cuda.is_available() is False): the GPU suite needs one; nothing was run" >&2
  exit 1
fi

{
  echo "# fastlclip GPU suite, part $PART"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "command: bash bench/gpu_suite.sh $PART OUT_DIR"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  echo "cpus: $(nproc)"
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
  python3 -c "import diffusers, open_clip, transformers; print('diffusers', diffusers.__version__, '| open_clip', open_clip.__version__, '| transformers', transformers.__version__)" 2>&1
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
} > "$RES/env-$PART.txt"
cat "$RES/env-$PART.txt"

status=()
pack() {  # the archive and the summary in $OUT, rewritten after every step (atomic renames)
  tar czf "$OUT/.results-$PART.tgz.tmp" -C "$(dirname "$RES")" results && mv "$OUT/.results-$PART.tgz.tmp" "$OUT/results-$PART.tgz"
  {
    echo "fastlclip GPU suite, part $PART: $((SECONDS - T0)) s so far; logs and JSON in results-$PART.tgz"
    head -n 8 "$RES/env-$PART.txt"
    echo
    printf '%s\n' "${status[@]}"
    echo
    python3 -m bench.suite_summary "$RES" 2>&1 | tail -n 60
  } > "$OUT/.summary-$PART.txt.tmp" && mv "$OUT/.summary-$PART.txt.tmp" "$OUT/summary-$PART.txt"
}
step() {  # step NAME SECONDS CMD...: run under timeout, log to $RES/NAME.log, keep its exit code, pack
  local name=$1 secs=$2; shift 2
  echo "== $name (budget ${secs}s, an estimate): $*" | tee -a "$RES/commands.txt"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$RES/$name.log"
  status+=("$(printf '%-16s rc=%-4s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$*")")
  pack
}

JOBS=$(nproc)
run_part() {
  case "$1" in
  quick)  # 30 s install + 50 + 90 + 60 + 120 = 350 s (estimates)
    # 42 jobs (bench.precompile --list) of about 81 kernel compiles in all (attention: 20 configs at each of 3
    # lengths; patch embedding: 5 forward + 2 backward at each of 3 shapes), 4-30 s of CPU each by Triton's compiler
    # for sm_90 on a CPU: over 16 processes about 5 rounds of 10 s, plus 15 s of imports: about 65 s.
    step quick_compile  90 python3 -m bench.precompile --jobs "$JOBS" --batch 8 --lengths 65 257 77
    # compiled already: model builds, warm-up, timing of 3 backends and 2 baselines at batch 1: 60 s
    step quick_reward   90 python3 -m bench.reward --quick --models Latent-ViT-B-8-512 --backends eager triton graph \
      --baselines ViT-B-32 taesd-ViT-B-32 --compile-modes --reward-batches 1 --forward-batches --fidelity-steps 0 \
      --out "$RES/reward_quick.json"
    # compiled already: 16 timed rows at batch 8 (do_bench: 25 ms warm-up + 100 ms each, a few launches) ~ 30 s
    step quick_kernels  60 python3 -m bench.kernels --batch 8 --lengths 65 257 --out "$RES/kernels_quick.json"
    # 2 pipelines x 3 rewards x (2 warm-up + 5 timed iterations) + model builds ~ 100 s
    step quick_reno    120 python3 -m bench.reno_cost --pipelines reno fast --rewards latent-b8 pixel-b32 taesd-b32 \
      --iterations 5 --images 1 --warmup 2 --latent-backend triton --out "$RES/reno_quick"
    ;;
  full1)  # 450 s; the kernel tests autotune only configs whose estimated shared memory fits the device
    step kernel_tests  100 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_attention.py \
      tests/test_kernel_patch_embed.py tests/test_backend_triton.py
    step pytest_gate   350 python3 -m bench.ci_gate --json "$RES/pytest_benchmark.json"
    ;;
  full2)  # 300 s
    step compile       120 python3 -m bench.precompile --jobs "$JOBS"
    step kernels       300 python3 -m bench.kernels --out "$RES/kernels.json"
    ;;
  full3)  # 420 s
    step reward 420 python3 -m bench.reward --backends eager triton graph --compile-modes \
      --baselines ViT-B-32 ViT-L-14 ViT-H-14 taesd-ViT-B-32 taesd-ViT-H-14 --out "$RES/reward.json"
    ;;
  full4)  # 450 s
    step reward_compile 450 python3 -m bench.reward --backends compile --baselines reference-compile --fidelity-steps 0 \
      --out "$RES/reward_compile.json"
    ;;
  full5)  # 450 s
    step reno 450 python3 -m bench.reno_cost --images 2 --rewards latent-b8 pixel-b32 pixel-h14 taesd-b32 taesd-h14 \
      --latent-backend triton --out "$RES/reno"
    ;;
  esac
}

if [ "$PART" = full ]; then
  for p in quick full1 full2 full3 full4 full5; do run_part "$p"; done
else
  run_part "$PART"
fi
pack
rm -rf "$(dirname "$RES")"
echo
cat "$OUT/summary-$PART.txt"
echo "(in $OUT: results-$PART.tgz, summary-$PART.txt)"
