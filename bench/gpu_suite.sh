#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent H100/H200 (device tool) or any CUDA machine.
#
# Here, once:   ../shared/device/wheels.sh            (open_clip, diffusers, xformers wheels into .whl/)
# Device calls: run(command="bash bench/gpu_suite.sh 1", carry=[".whl"], timeout_s=600), then the same with 2
#               (two parts, each under the 10-minute limit of one call; compiling is what takes long)
# Results land under $OUT (JSON, Markdown, PNG, logs, packed as results.tgz); a short table is printed
# last. Copy them into profiles/results/<gpu>/ with the command above and commit.
#
# Steps (each under its own time limit, so one hang can't eat the call):
#   part 1: the kernel and triton-backend tests on CUDA (fp32, fp16, bf16 against float64 / eager)
#           pytest -m gpu (runtime, ReNO and safety checks on CUDA + pytest-benchmark suites, --benchmark-json)
#           python -m bench.kernels   kernels vs SDPA backends, xformers, unfused torch
#           python -m bench.reward    reward step / throughput: eager, triton, graph vs reference and decode+CLIP
#   part 2: python -m bench.reward    the compile backend and torch.compile of the reference (slow to compile)
#           python -m bench.reno_cost end-to-end ReNO cost per image, latent vs decode-then-CLIP
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bash bench/gpu_suite.sh 1|2}
OUT=${OUT:-/tmp/fastlclip-gpu-out}
RES=$OUT/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# The kernels live in kernels/ and import as fastlclip.kernels through the editable install's mapping
# (setuptools comes in .whl; no registry is needed).
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || python3 -m pip install -q --no-index --no-deps --no-build-isolation --break-system-packages -e . || exit 1
unset TRITON_INTERPRET

{
  echo "# fastlclip GPU suite"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
  python3 -c "import diffusers, open_clip; print('diffusers', diffusers.__version__, '| open_clip', open_clip.__version__)" 2>&1
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
} > "$RES/env.txt"
cat "$RES/env.txt"

status=()
step() {  # step NAME SECONDS CMD...: run, log to $RES/NAME.log, keep its exit code
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" | tee -a "$RES/commands.txt"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RES/$name.log"
  status+=("$(printf '%-10s rc=%-4s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$*")")
}

if [ "$PART" = 1 ]; then
  step kernel_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_attention.py \
    tests/test_kernel_patch_embed.py tests/test_backend_triton.py
  step pytest  200 python3 -m pytest -m gpu -q -p no:cacheprovider tests --benchmark-json="$RES/pytest_benchmark.json"
  step kernels  90 python3 -m bench.kernels --out "$RES/kernels.json"
  step reward  180 python3 -m bench.reward --backends eager triton graph --compile-modes --baselines ViT-B-32 ViT-L-14 ViT-H-14 --out "$RES/reward.json"
else
  step reward_compile 300 python3 -m bench.reward --backends compile --baselines reference-compile --out "$RES/reward_compile.json"
  step reno    260 python3 -m bench.reno_cost --images 2 --out "$RES"
fi

tar czf "$OUT/results-part$PART.tgz" -C "$OUT" results
echo
echo "== summary (logs and JSON in results.tgz)"
printf '%s\n' "${status[@]}"
