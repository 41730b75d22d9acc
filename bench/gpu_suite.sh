#!/usr/bin/env bash
# The GPU checks and benchmarks, sized for a lent H100/H200 (device tool: at most 10 minutes a call, 15 minutes
# of device time a visit, machine start included) or any CUDA machine.
#
# Here, once:   ../shared/device/wheels.sh            (open_clip, diffusers, xformers wheels into .whl/)
# Device call:  run(command="bash bench/gpu_suite.sh quick", carry=[".whl"], timeout_s=420)
#               then, on later visits, full1 .. full5 (one or two per visit; each at most 8 minutes)
# Anywhere:     bash bench/gpu_suite.sh full      (every part in a row, no per-call limit)
#
# quick: the headline figures in one call of at most 6 minutes from a cold machine, installs and compiles
#   included: the reward step of Latent-ViT-B/8 at batch 1 (eager, triton, graph, the open_clip-style eager
#   reference, SDXL VAE decode + CLIP ViT-B/32, TAESD-XL decode + CLIP ViT-B/32), the kernels at sequence 65
#   and 257, and ReNO per image (reno and fast pipelines, Latent-CLIP B/8, decode + B/32, TAESD-XL + B/32,
#   5 iterations, per-iteration time).
# full1: kernel and triton-backend tests on CUDA, then pytest -m gpu through the CI gate (bench.ci_gate)
# full2: bench.kernels (all lengths and batches)
# full3: bench.reward: every model, eager/triton/graph, every decode-then-CLIP baseline (VAE and TAESD-XL)
# full4: bench.reward: the compile backend, its modes, torch.compile of the reference (slow to compile)
# full5: bench.reno_cost: reno and fast, every reward, 50 iterations, 2 images
#
# Every time budget below is an ESTIMATE (nothing here has run on an H100/H200 yet); each step runs under
# `timeout` with its budget, so one hang cannot eat the call, and its log is kept. Results land under
# $OUT (JSON, Markdown, PNG, logs, packed as results-<part>.tgz); a short table is printed last. Copy them
# into profiles/results/<gpu>/ with the command above and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bash bench/gpu_suite.sh quick|full1|full2|full3|full4|full5|full}
case "$PART" in quick|full1|full2|full3|full4|full5|full) ;; *) echo "gpu_suite.sh: unknown part '$PART'" >&2; exit 2;; esac
OUT=${OUT:-/tmp/fastlclip-gpu-out}
RES=$OUT/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
T0=$SECONDS

# Install (estimate: 30 s): wheels the GPU machine lacks, then the project editable (kernels/ -> fastlclip.kernels).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || python3 -m pip install -q --no-index --no-deps --no-build-isolation --break-system-packages -e . || exit 1
unset TRITON_INTERPRET

{
  echo "# fastlclip GPU suite, part $PART"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "command: bash bench/gpu_suite.sh $PART"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
  python3 -c "import diffusers, open_clip, transformers; print('diffusers', diffusers.__version__, '| open_clip', open_clip.__version__, '| transformers', transformers.__version__)" 2>&1
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
} > "$RES/env-$PART.txt"
cat "$RES/env-$PART.txt"

status=()
step() {  # step NAME SECONDS CMD...: run under timeout, log to $RES/NAME.log, keep its exit code
  local name=$1 secs=$2; shift 2
  echo "== $name (budget ${secs}s, an estimate): $*" | tee -a "$RES/commands.txt"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$RES/$name.log"
  status+=("$(printf '%-16s rc=%-4s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$*")")
}

run_part() {
  case "$1" in
  quick)  # total budget 330 s + 30 s install = 6 minutes (estimates)
    step quick_reward  100 python3 -m bench.reward --quick --models Latent-ViT-B-8-512 --backends eager triton graph \
      --baselines ViT-B-32 taesd-ViT-B-32 --compile-modes --reward-batches 1 --forward-batches --fidelity-steps 0 \
      --out "$RES/reward_quick.json"
    step quick_kernels  70 python3 -m bench.kernels --batch 8 --lengths 65 257 --out "$RES/kernels_quick.json"
    step quick_reno    160 python3 -m bench.reno_cost --pipelines reno fast --rewards latent-b8 pixel-b32 taesd-b32 \
      --iterations 5 --images 1 --warmup 2 --latent-backend triton --out "$RES/reno_quick"
    ;;
  full1)  # 450 s
    step kernel_tests  100 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_attention.py \
      tests/test_kernel_patch_embed.py tests/test_backend_triton.py
    step pytest_gate   350 python3 -m bench.ci_gate --json "$RES/pytest_benchmark.json"
    ;;
  full2)  # 300 s
    step kernels 300 python3 -m bench.kernels --out "$RES/kernels.json"
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

tar czf "$OUT/results-$PART.tgz" -C "$OUT" results
echo
echo "== steps (logs and JSON in results-$PART.tgz; $((SECONDS - T0)) s in all)"
printf '%s\n' "${status[@]}"
echo
python3 -m bench.suite_summary "$RES" 2>&1 | tail -n 60
