#!/usr/bin/env bash
# Multi-node training on SLURM: one `accelerate launch` per node, each starting 8 GPU processes.
#   sbatch --nodes=2 launch/slurm.sh --data /shared/shards --output runs/lfw --config launch/configs/lfw_cpu.yaml
# Every node must see the same --data and --output paths (a shared filesystem); checkpoints are written by rank 0.
#SBATCH --job-name=facesiam
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file accelerate_configs/multi_node.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port $PORT \
  launch/train.py $*"
