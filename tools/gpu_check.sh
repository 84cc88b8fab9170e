#!/usr/bin/env bash
# One prepared GPU session: the checks that need a device, in one go, most important first.
#   bash tools/gpu_check.sh [--dry-run] [OUT] [PART]   (run from the repository root on the GPU machine)
#   bash tools/gpu_check.sh --dry-run                   (anywhere, before a loan: ~1 minute on 2 CPU cores)
# PART: speed (issue 17 only, ~9 minutes on an H200: fits one 10-minute call), partialfc (issue 31 only: Partial FC
# at 1M identities, a few minutes), rest (the older checks), iresnet50 (issue 38: ms1mv3_r50.yaml's samples/s per GPU,
# DDP, with and without channels-last, ~5 minutes),
# all (default: every part but iresnet50). Every part first
# 1. installs the wheels the GPU machine lacks (../shared/wheels/py312, copied to ./wheels and carried along),
# 2. runs the GPU parts of the test suite (CUDA scoring, bf16 training step, batch augmentation on CUDA vs CPU,
#    device selection); a step that runs no test, or skips a "needs CUDA" test, fails,
# speed (issue 17):
# 3. training throughput at 224 px against the seed article's loop on the same GPU (one baseline, then each
#    setting: images/s, data-wait share, GPU utilisation): bf16 + channels-last + the fused loader with 12
#    workers; the same with --augment-device cuda; the same with torch.compile,
# 4. decode + augmentation per CPU core of that machine (bench_augment),
# 5. the whole evaluator (verification + 1:N + MAP@R) on 1,000,000 x 512 embeddings on the GPU vs the bare
#    blocked matmul there (bench_eval --device cuda),
# partialfc (issue 31): Partial FC at 1M identities on the one GPU, data parallel vs sampled,
# rest (earlier issues):
# 6. the service on the GPU (bench_serve),
# 7. the LFW recipe from random init (lfw_cpu_scratch.yaml; no model hub there) at a full budget with bf16
#    (when ../shared/data/lfw-devtrain is there),
# 8. batched face detection on the GPU and lfw_aligned.yaml at 10x the CPU budget in bf16 (issue 16),
# writing everything under OUT (default $OUT or ./gpu_out).
#
# It cannot pass while doing nothing: a missing path, a pytest step that runs no test, a step that exits non-zero or
# times out each print a "GPU_CHECK FAILED:" line (also in OUT/failures.txt), the other steps still run (device time
# is scarce), and the script exits 1 at the end.
# --dry-run (or GPU_CHECK_DRY_RUN=1) needs no GPU and writes nothing: for the parts PART selects (every part by
# default, the LFW runs included) it checks that every repository path the script names exists, that every pytest
# step collects tests, and that every tool it calls answers --help and knows every --flag passed to it
# (tests/tools/test_gpu_check.py runs it on CPU, so this script cannot rot between GPU loans).
# `source tools/gpu_check.sh` defines the helpers only (the tests call them).
set -uo pipefail

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
FAILURES=0
OUT=${OUT:-gpu_out}
REPO_DIRS='^(facesiam|tools|launch|tests|docs|accelerate_configs)/'
HELP_DIR=$(mktemp -d)
trap 'rm -rf "$HELP_DIR"' EXIT

fail() {  # a problem: one loud line, counted; the script exits 1 at the end
  echo "GPU_CHECK FAILED: $*"
  FAILURES=$((FAILURES + 1))
  if [ "$DRY_RUN" != 1 ] && [ -d "$OUT" ]; then echo "$*" >> "$OUT/failures.txt"; fi
}

need() {  # PATH...: every repository path a step names must exist (returns 1 when one does not)
  local p missing=0
  for p in "$@"; do
    [ -e "$p" ] || { fail "missing path: $p (named in tools/gpu_check.sh)"; missing=1; }
  done
  return $missing
}

tool_help() {  # SCRIPT: its --help text (cached); fails when it does not answer
  local key=${1//\//_}
  if [ ! -s "$HELP_DIR/$key" ]; then
    if ! timeout 120 python3 "$1" --help > "$HELP_DIR/$key" 2>&1; then
      fail "$1 --help did not answer: $(tail -n 1 "$HELP_DIR/$key")"
      rm -f "$HELP_DIR/$key"
      return 1
    fi
  fi
  cat "$HELP_DIR/$key"
}

check_flags() {  # SCRIPT ARG...: each --flag among ARG must be one SCRIPT's --help lists
  local script=$1 help a flag
  shift
  help=$(tool_help "$script") || return 1
  for a in "$@"; do
    [[ $a =~ ^--[a-z0-9][a-z0-9-]*(=.*)?$ ]] || continue
    flag=${a%%=*}
    grep -qE -- "(^|[^a-z0-9-])${flag}([^a-z0-9-]|$)" <<< "$help" \
      || fail "$script has no option $flag (tools/gpu_check.sh passes it)"
  done
}

step() {  # LOG TIMEOUT CMD...: run CMD with its output in OUT/LOG; a non-zero exit or a timeout is a failure.
  # Dry run: only check the repository paths in CMD and, for `python3 SCRIPT ...`, SCRIPT's --help and flags.
  local log=$1 limit=$2 a rc
  shift 2
  for a in "$@"; do
    if [[ $a =~ $REPO_DIRS ]]; then need "$a" || return 1; fi
  done
  if [ "$DRY_RUN" = 1 ]; then
    if [ "$1" = python3 ] && [[ ${2:-} == *.py ]]; then check_flags "$2" "${@:3}"; fi
    return 0
  fi
  timeout "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  if [ $rc = 124 ]; then fail "$log: timed out after $limit s (see $OUT/$log)"
  elif [ $rc != 0 ]; then fail "$log: exit status $rc (see $OUT/$log)"; fi
  return $rc
}

run_tests() {  # LOG TIMEOUT TESTFILE...: pytest on files that must exist, must run tests, and must not skip CUDA ones
  local log=$1 limit=$2 rc
  shift 2
  need "$@" || return 1
  if [ "$DRY_RUN" = 1 ]; then
    timeout "$limit" python3 -m pytest -q --collect-only "$@" > "$HELP_DIR/collect.txt" 2>&1
    rc=$?
    if [ $rc = 5 ]; then fail "$log: no tests collected from $*"
    elif [ $rc != 0 ]; then fail "$log: pytest --collect-only exit status $rc: $(tail -n 1 "$HELP_DIR/collect.txt")"; fi
    return $rc
  fi
  # -rs lists each skip with its reason: a GPU test skipped "needs CUDA" on the GPU machine checked nothing.
  timeout "$limit" python3 -m pytest -q -rs -p no:cacheprovider "$@" > "$OUT/$log" 2>&1
  rc=$?
  if [ $rc = 5 ]; then fail "$log: pytest ran no test (exit status 5; see $OUT/$log)"
  elif [ $rc = 124 ]; then fail "$log: timed out after $limit s (see $OUT/$log)"
  elif [ $rc != 0 ]; then fail "$log: tests failed, exit status $rc (see $OUT/$log)"
  elif ! grep -qE '[0-9]+ passed' "$OUT/$log"; then fail "$log: no test passed (see $OUT/$log)"; rc=1
  fi
  if grep -q 'SKIPPED.*needs CUDA' "$OUT/$log"; then
    fail "$log: CUDA tests were skipped on the GPU machine: $(grep -c 'SKIPPED.*needs CUDA' "$OUT/$log") line(s)"
    rc=1
  fi
  return $rc
}

# ---- the parts ---------------------------------------------------------------------------------------------------
# Every repository path below goes through step/run_tests/need, so the dry run checks it.

part_tests() {  # the GPU parts of the test suite (CUDA-only tests skip with reason "needs CUDA")
  run_tests tests.txt 120 tests/eval/test_metrics.py tests/eval/test_neighbours.py tests/test_model.py \
    tests/augment/test_batch.py tests/test_device.py
}

part_speed() {  # issue 17
  local fast="--channels-last true --mixed-precision bf16 --num-workers 12 --augment-implementation fused"
  # the flags bench_train hands to facesiam's training command (one string each, so step cannot see them);
  # $fast is split into words on purpose
  # shellcheck disable=SC2086
  if [ "$DRY_RUN" = 1 ]; then check_flags launch/train.py $fast --augment-device --compile; fi
  step bench_train_224.txt 270 python3 tools/bench_train.py --size 224 --steps 60 --warmup 15 --facesiam-flags "$fast" \
    --facesiam-flags "$fast --augment-device cuda" --facesiam-flags "$fast --compile true"
  step bench_augment.txt 45 python3 tools/bench_augment.py --images 200 --repeats 1
  step bench_eval_gpu.txt 240 python3 tools/bench_eval.py --only verification --device cuda --verify-n 1000000 \
    --large 0 --no-previous
}

part_partialfc() {  # issue 31: Partial FC at 1M identities on the one GPU, data parallel vs sampled (samples/s, memory)
  step bench_partial_fc_gpu.txt 300 python3 tools/bench_partial_fc.py --device cuda --worlds 1 --classes 1000000 \
    --batch 256 --steps 10
}

part_rest() {  # earlier issues: the service, then the LFW runs when the real data is there
  step bench_serve.txt 240 python3 tools/bench_serve.py --device cuda --clients 32 --requests 640
  if [ "$DRY_RUN" != 1 ] && [ ! -d ../shared/data/lfw-devtrain ]; then
    echo "gpu_check: no ../shared/data/lfw-devtrain: the LFW runs are skipped"
    return 0
  fi
  step lfw_shards.txt 300 python3 tools/make_shards.py ../shared/data/lfw-devtrain /tmp/lfw --val-identities 0.15 \
    --seed 2 --no-progress
  step lfw_pairs.txt 120 python3 tools/make_pairs.py /tmp/lfw --split val --out /tmp/lfw_pairs.txt --pairs-per-fold 100
  step lfw_train.txt 300 python3 launch/train.py --config launch/configs/lfw_cpu_scratch.yaml --data /tmp/lfw \
    --output "$OUT/lfw_run" --mixed-precision bf16 --num-workers 12 --max-steps 3000 --val-every-steps 1000 --wandb off
  step lfw_eval.txt 300 python3 tools/evaluate.py --checkpoint "$OUT/lfw_run/final" --data /tmp/lfw --split val \
    --pairs /tmp/lfw_pairs.txt --out "$OUT/lfw_report"
  [ "$DRY_RUN" = 1 ] || rm -rf "$OUT/lfw_run/checkpoints"
  # issue 16: batched MTCNN on the GPU (faces/s in the summary line), then lfw_aligned.yaml at 10x the CPU budget
  # in bf16 (random init: no model hub on the GPU machine; --pretrained FILE when converted weights are carried)
  step align_gpu.txt 300 python3 tools/make_shards.py ../shared/data/lfw-devtrain /tmp/lfw_aligned --align \
    --device cuda --multi central --on-no-face center --val-identities 0.15 --seed 2 --workers 4
  step aligned_train.txt 300 python3 launch/train.py --config launch/configs/lfw_aligned.yaml --data /tmp/lfw_aligned \
    --output "$OUT/aligned_run" --mixed-precision bf16 --num-workers 12 --max-steps 6250 --cooldown-steps 1500 \
    --val-every-steps 2000 --augment-implementation fused --wandb off
  step aligned_eval.txt 300 python3 tools/evaluate.py --checkpoint "$OUT/aligned_run/final" --data /tmp/lfw_aligned \
    --split val --pairs /tmp/lfw_pairs.txt --out "$OUT/aligned_report"
  [ "$DRY_RUN" = 1 ] || rm -rf "$OUT/aligned_run/checkpoints"
}

# ---- PART iresnet50 (issue 38): training throughput of launch/configs/ms1mv3_r50.yaml (iresnet50, 112 px, face head,
# SGD + poly, Partial FC 1.0, 128 per GPU) in bf16, DDP over every GPU of the machine (accelerate), with and without
# channels-last, on synthetic faces (300 identities x 32): samples/s per GPU from the run's own step log after 30
# warm-up steps, and the share of the step spent waiting for data (high: the loader, not the GPU, is measured).
part_iresnet50() {
  local gpus=1 cl
  [ "$DRY_RUN" = 1 ] || gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  local launch=(python3 -m accelerate.commands.launch --num_processes "${gpus:-1}" --mixed_precision bf16)
  [ "${gpus:-1}" -gt 1 ] && launch+=(--multi_gpu)
  local train=(--config launch/configs/ms1mv3_r50.yaml --data /tmp/ir_shards --val-bin "" --val-split none
               --best-metric tar_at_far_1e-03 --max-steps 150 --log-every-steps 1 --num-workers 12 --wandb off
               --tensorboard false)
  if [ "$DRY_RUN" = 1 ]; then check_flags launch/train.py "${train[@]}" --output --channels-last; fi
  step iresnet_faces.txt 300 python3 tools/make_synthetic_faces.py /tmp/ir_faces --identities 300 \
    --images-per-identity 32 --size 112 --overwrite --no-progress || return 1
  step iresnet_shards.txt 300 python3 tools/make_shards.py /tmp/ir_faces /tmp/ir_shards --no-progress || return 1
  for cl in true false; do
    [ "$DRY_RUN" = 1 ] || rm -rf "/tmp/ir_run_$cl"
    step "iresnet50_train_cl_$cl.txt" 420 "${launch[@]}" launch/train.py "${train[@]}" --output "/tmp/ir_run_$cl" \
      --channels-last "$cl" || continue
    [ "$DRY_RUN" = 1 ] || python3 - "/tmp/ir_run_$cl/metrics.jsonl" "$cl" "${gpus:-1}" <<'PY' | tee -a "$OUT/iresnet50_speed.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if "images_per_s_per_process" in r][30:]
seconds = [1 / r["images_per_s_per_process"] for r in steps]  # per image: the batch size cancels
wait = sum(r["data_wait_fraction"] * t for r, t in zip(steps, seconds)) / sum(seconds)
print(f"iresnet50 bf16 112px channels-last {sys.argv[2]}: {len(steps) / sum(seconds):.0f} samples/s per GPU "
      f"x {sys.argv[3]} GPU(s), {wait:.0%} of the step waiting for data ({len(steps)} steps after 30 warm-up)")
PY
  done
}

# Sourced (the tests): the helpers only.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then return 0; fi

# ---- main ----------------------------------------------------------------------------------------------------------
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
OUT=${1:-$OUT}
PART=${2:-all}
case $PART in
  all | speed | partialfc | rest | iresnet50) ;;
  *) fail "unknown PART '$PART' (all, speed, partialfc, rest, iresnet50)"; exit 2 ;;
esac

if [ "$DRY_RUN" = 1 ]; then
  # The paths and tools of the parts PART selects (all by default), the LFW runs included; no CUDA, nothing written.
  export PYTHONPATH=$PWD
  command -v python3 > /dev/null || fail "no python3 on PATH"
else
  mkdir -p "$OUT"
  rm -f "$OUT/failures.txt"
  if [ -d wheels ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || fail "nvidia-smi failed (see $OUT/nvidia-smi.txt)"
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch sees no CUDA device: every GPU number below would be a CPU number"
  date -u > "$OUT/date.txt"
fi

part_tests
case $PART in
  speed) part_speed ;;
  partialfc) part_partialfc ;;
  rest) part_rest ;;
  iresnet50) part_iresnet50 ;;
  all) part_speed; part_partialfc; part_rest ;;
esac

if [ "$DRY_RUN" = 1 ]; then
  if [ $FAILURES -gt 0 ]; then echo "GPU_CHECK FAILED: dry run: $FAILURES problem(s), listed above"; exit 1; fi
  echo "gpu_check dry run ($PART): every path, test file and tool flag it names is there"
  exit 0
fi
if [ $FAILURES -gt 0 ]; then
  echo "GPU_CHECK FAILED: $FAILURES problem(s), listed above and in $OUT/failures.txt; the rest: see $OUT"
  exit 1
fi
echo "done: see $OUT"
