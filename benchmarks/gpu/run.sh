#!/usr/bin/env bash
# Every GPU benchmark and check in one go, about 8 minutes (459 s on an H200): JSON under $OUT, table last.
#
#   PYTHONPATH=src bash benchmarks/gpu/run.sh                  # on a CUDA machine (H100 / H200)
#   PYTHONPATH=src bash benchmarks/gpu/run.sh --cpu-dry-run    # tiny settings on a CPU: every path
#   PYTHONPATH=src bash benchmarks/gpu/run.sh --tiny           # the dry run without torch.compile rows and
#                                                              # with the trainer check's --tiny size (the tests)
#
# Stages, most wanted first: training step SiT-XL/2 at 256 px (4x32x32 synthetic latents, bf16,
# largest batch that fits, all toggles, MFU against a bf16 matmul timed in the same process); the
# real trainer end to end on CUDA (benchmarks/gpu/trainer_check.py: train with compile, resume,
# sample; needs the Fashion-MNIST files, $SELFALIGN_FASHION_MNIST); sampling SiT-XL/2 (Euler-50 /
# SDE-250, CFG with an interval); training step SiT-B/2; VAE encode (benchmarks/gpu/vae_encode.py,
# only when diffusers is importable); then the table. No network installs: torch with CUDA, numpy
# and safetensors are enough. Each stage has a soft budget (it starts no new work after it) and a
# hard `timeout` 30 s above it, so one stuck stage cannot take the others' time.
set -u -o pipefail
cd "$(dirname "$0")/../.."

DRY=0
TINY=0
STAGES="xl2,trainer_check,sampling,b2,vae"
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --tiny) DRY=1; TINY=1 ;;
    --stages=*) STAGES="${arg#--stages=}" ;;
    *) echo "usage: $0 [--cpu-dry-run | --tiny] [--stages=xl2,trainer_check,sampling,b2,vae]" >&2; exit 2 ;;
  esac
done
wanted() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# The XL/2 rows and the two longest stages' budgets can be changed for a follow-up call, e.g. only
# the fp8 and compiled rows (benchmarks/README.md, "GPU"):
XL2_TOGGLES=${BENCH_XL2_TOGGLES:-all}
XL2_BUDGET_S=${BENCH_XL2_BUDGET_S:-240}
CHECK_BUDGET_S=${BENCH_CHECK_BUDGET_S:-140}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/gpu-run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
# $OUT holds only the result JSON files and one log (run.log), a handful of files to copy back.
# Each stage's log is written apart, then appended to run.log when the stage ends.
LOG="$OUT/run.log"
STAGE_LOGS=$(mktemp -d)
START=$(date +%s)
TOTAL_S=${BENCH_TOTAL_S:-500}     # no stage starts after this many seconds
STATUS=0

elapsed() { echo $(( $(date +%s) - START )); }

stage() {  # stage NAME SOFT_BUDGET_S command...
  local name=$1 budget=$2; shift 2
  if [ "$(elapsed)" -ge "$TOTAL_S" ]; then
    echo "== $name: skipped, ${TOTAL_S}s total budget spent" | tee -a "$LOG"
    return
  fi
  echo "== $name (soft budget ${budget}s; $(elapsed)s elapsed)"
  local stage_log="$STAGE_LOGS/$name.log"
  timeout --kill-after=5 $(( budget + 30 )) "$@" --budget-s "$budget" --out "$OUT" > "$stage_log" 2>&1
  local rc=$?
  { echo "===== $name: $* (exit $rc, $(elapsed)s elapsed)"; cat "$stage_log"; } >> "$LOG"
  tail -n 6 "$stage_log"
  if [ "$rc" -ne 0 ]; then
    echo "!! $name exited with code $rc; last lines of its log (all of it in $LOG):"
    tail -n 15 "$stage_log"
    STATUS=1
  fi
}

if [ "$DRY" -eq 1 ]; then
  echo "cpu dry run: tiny settings, every code path, numbers meaningless"
  NO_COMPILE=""
  CHECK_SIZE=--cpu-dry-run
  if [ "$TINY" -eq 1 ]; then
    NO_COMPILE=--no-compile
    CHECK_SIZE=--tiny
  fi
  wanted xl2 && stage train_step_dry 600 python benchmarks/train_step.py --preset dry --device cpu \
    --compile-reserve-s 0 --toggles "$XL2_TOGGLES" $NO_COMPILE
  wanted trainer_check && stage trainer_check_dry 300 python benchmarks/gpu/trainer_check.py $CHECK_SIZE
  wanted sampling && stage sampling_dry 120 python benchmarks/sampling.py --preset dry
else
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: run on a GPU machine, or pass --cpu-dry-run" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>&1 \
    | tee -a "$LOG" || true
  # most wanted first: the XL/2 targets, then the trainer's first real CUDA run
  wanted xl2 && stage train_step_xl2 "$XL2_BUDGET_S" python benchmarks/train_step.py --preset gpu-xl2 \
    --max-batch 128 --compile-reserve-s 100 --toggles "$XL2_TOGGLES"
  wanted trainer_check && stage trainer_check "$CHECK_BUDGET_S" python benchmarks/gpu/trainer_check.py
  wanted sampling && stage sampling_xl2 40 python benchmarks/sampling.py --preset gpu-xl2
  wanted b2 && stage train_step_b2 60 python benchmarks/train_step.py --preset gpu-b2 --compile-reserve-s 30
fi

# Cached latents vs online VAE encoding: another script, run only where it can run.
if ! wanted vae; then
  :
elif [ ! -f benchmarks/gpu/vae_encode.py ]; then
  echo "== vae_encode: skipped, benchmarks/gpu/vae_encode.py is not in this checkout" | tee -a "$LOG"
elif ! python -c "import diffusers" > /dev/null 2>&1; then
  echo "== vae_encode: skipped, diffusers is not importable here (install it, e.g. from a carried wheel, to measure it)" | tee -a "$LOG"
elif [ "$DRY" -eq 1 ]; then
  stage vae_encode 120 python benchmarks/gpu/vae_encode.py --cpu-dry-run
else
  stage vae_encode 30 python benchmarks/gpu/vae_encode.py
fi

echo
echo "== results ($(elapsed)s in all) in $OUT"
python benchmarks/report.py "$OUT" || STATUS=1
exit "$STATUS"
