#!/usr/bin/env bash
# Multi-node training on SLURM: one elastic `torchrun` per node, each starting GPUS_PER_NODE processes.
#   sbatch --nodes=2 launch/slurm.sh --data /shared/shards --output runs/lfw --config launch/configs/lfw_cpu.yaml
# Every node must see the same --data and --output paths (a shared filesystem); checkpoints are written by rank 0.
# The script always adds --resume latest: a first start begins from scratch, every later one from the newest checkpoint.
#
# Failures and preemption (facesiam/training/preemption.py, README "Preemption and elastic restarts"):
#  * a process that dies (kill -9, a crash, a GPU error) makes torchrun restart every process of every node from the
#    newest checkpoint, up to MAX_RESTARTS times;
#  * 120 s before the time limit SLURM sends USR1 to this script (--signal=B:USR1@120; so does
#    `scancel --batch --signal=USR1 JOBID`): the script passes it to every process, which finish their step,
#    checkpoint it together and exit with status 143, and then requeues the job, which resumes from that checkpoint.
#    The 120 s must cover one step, a validation when one is due, and a checkpoint (TORCH_ELASTIC_SHUTDOWN_TIMEOUT:
#    how long torchrun waits for them before SIGKILL; also how long a restart after a crash may wait for processes
#    stuck in a collective with the dead one);
#  * a preemption or `scancel` sends TERM (then KILL after GraceTime / KillWait): the processes checkpoint and stop
#    the same way, the script exits 143 without requeueing (SLURM requeues a preempted job itself: --requeue);
#  * a lost node ends the job; SLURM requeues it (--requeue) and it resumes from the newest checkpoint.
#SBATCH --job-name=facesiam
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
set -uo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_RESTARTS=${MAX_RESTARTS:-3}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  # torchrun passes USR1 on instead of dying of it
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
# Restarted processes must not read the addresses of those they replace (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

stopping=""  # the first signal received: USR1 requeues, TERM does not
SRUN_PID=""
stop() {
  stopping=${stopping:-$1}
  echo "facesiam: $1 received: every process checkpoints its current step and stops"
  [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null  # srun passes it to torchrun, which passes it on
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MAIN_IP:$PORT" --rdzv-id="$SLURM_JOB_ID" \
  launch/train.py "$@" --resume latest &
SRUN_PID=$!
# A trapped signal ends `wait` early: wait again until srun itself has ended.
while :; do
  wait "$SRUN_PID"
  status=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ "$stopping" = USR1 ]; then  # the time limit is near: come back with a fresh one
  echo "facesiam: requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in the run folder"
  scontrol requeue "$SLURM_JOB_ID"
fi
if [ -n "$stopping" ]; then
  exit 143
fi
exit "$status"
