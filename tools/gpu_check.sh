#!/usr/bin/env bash
# One prepared GPU session: the checks that need a device, in one go, most important first.
#   bash tools/gpu_check.sh [OUT] [PART]   (run from the repository root on the GPU machine)
# PART: speed (issue 17 only, ~9 minutes on an H200: fits one 10-minute call), partialfc (issue 31 only: Partial FC
# at 1M identities, a few minutes), rest (the older checks), all (default). It
# 1. installs the wheels the GPU machine lacks (../shared/wheels/py312, copied to ./wheels and carried along),
# 2. runs the GPU parts of the test suite (CUDA scoring, bf16 training step, batch augmentation on CUDA vs CPU),
# speed (issue 17):
# 3. training throughput at 224 px against the seed article's loop on the same GPU (one baseline, then each
#    setting: images/s, data-wait share, GPU utilisation): bf16 + channels-last + the fused loader with 12
#    workers; the same with --augment-device cuda; the same with torch.compile,
# 4. decode + augmentation per CPU core of that machine (bench_augment),
# 5. the whole evaluator (verification + 1:N + MAP@R) on 1,000,000 x 512 embeddings on the GPU vs the bare
#    blocked matmul there (bench_eval --device cuda),
# rest (earlier issues):
# 6. the LFW recipe from random init (lfw_cpu_scratch.yaml; no model hub there) at a full budget with bf16
#    (when ../shared/data/lfw-devtrain is there),
# 7. batched face detection on the GPU and lfw_aligned.yaml at 10x the CPU budget in bf16 (issue 16),
# 8. the service on the GPU (bench_serve),
# writing everything under OUT (default $OUT or ./gpu_out).
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
if [ -d wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
date -u > "$OUT/date.txt"
PART=${2:-all}
timeout 60 python3 -m pytest -q tests/eval/test_metrics.py tests/eval/test_neighbours.py tests/test_model.py \
  tests/data/test_batch_augment.py > "$OUT/tests.txt" 2>&1
if [ "$PART" = all ] || [ "$PART" = speed ]; then
  FAST="--channels-last true --mixed-precision bf16 --num-workers 12 --augment-implementation fused"
  timeout 270 python3 tools/bench_train.py --size 224 --steps 60 --warmup 15 --facesiam-flags "$FAST" \
    --facesiam-flags "$FAST --augment-device cuda" --facesiam-flags "$FAST --compile true" \
    > "$OUT/bench_train_224.txt" 2>&1
  timeout 45 python3 tools/bench_augment.py --images 200 --repeats 1 > "$OUT/bench_augment.txt" 2>&1
  timeout 240 python3 tools/bench_eval.py --only verification --device cuda --verify-n 1000000 --large 0 \
    --no-previous > "$OUT/bench_eval_gpu.txt" 2>&1
fi
[ "$PART" = speed ] && { echo "done: see $OUT"; exit 0; }
# issue 31: Partial FC at 1M identities on the one GPU, data parallel vs sampled (samples/s, peak CUDA memory)
[ "$PART" = rest ] || timeout 300 python3 tools/bench_partial_fc.py --device cuda --worlds 1 --classes 1000000 --batch 256 --steps 10 \
  > "$OUT/bench_partial_fc_gpu.txt" 2>&1
[ "$PART" = partialfc ] && { echo "done: see $OUT"; exit 0; }
timeout 240 python3 tools/bench_serve.py --device cuda --clients 32 --requests 640 > "$OUT/bench_serve.txt" 2>&1
if [ -d ../shared/data/lfw-devtrain ]; then
  python3 tools/make_shards.py ../shared/data/lfw-devtrain /tmp/lfw --val-identities 0.15 --seed 2 --no-progress
  python3 tools/make_pairs.py /tmp/lfw --split val --out /tmp/lfw_pairs.txt --pairs-per-fold 100
  timeout 300 python3 launch/train.py --config launch/configs/lfw_cpu_scratch.yaml --data /tmp/lfw --output "$OUT/lfw_run" \
    --mixed-precision bf16 --num-workers 12 --max-steps 3000 --val-every-steps 1000 --wandb off > "$OUT/lfw_train.txt" 2>&1
  python3 tools/evaluate.py --checkpoint "$OUT/lfw_run/final" --data /tmp/lfw --split val --pairs /tmp/lfw_pairs.txt \
    --out "$OUT/lfw_report" > "$OUT/lfw_eval.txt" 2>&1
  rm -rf "$OUT/lfw_run/checkpoints"
  # issue 16: batched MTCNN on the GPU (faces/s in the summary line), then lfw_aligned.yaml at 10x the CPU budget
  # in bf16 (random init: no model hub on the GPU machine; --pretrained FILE when converted weights are carried)
  timeout 300 python3 tools/make_shards.py ../shared/data/lfw-devtrain /tmp/lfw_aligned --align \
    --device cuda --multi central --on-no-face center --val-identities 0.15 --seed 2 --workers 4 \
    > "$OUT/align_gpu.txt" 2>&1
  timeout 300 python3 launch/train.py --config launch/configs/lfw_aligned.yaml --data /tmp/lfw_aligned \
    --output "$OUT/aligned_run" --mixed-precision bf16 --num-workers 12 --max-steps 6250 --cooldown-steps 1500 \
    --val-every-steps 2000 --augment-implementation fused --wandb off > "$OUT/aligned_train.txt" 2>&1
  python3 tools/evaluate.py --checkpoint "$OUT/aligned_run/final" --data /tmp/lfw_aligned --split val \
    --pairs /tmp/lfw_pairs.txt --out "$OUT/aligned_report" > "$OUT/aligned_eval.txt" 2>&1
  rm -rf "$OUT/aligned_run/checkpoints"
fi
echo "done: see $OUT"
