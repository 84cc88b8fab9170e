#!/usr/bin/env bash
# The container's command (PID 1 of the pod): `torchrun ARGS`, with Kubernetes' stop signal passed on and an exit
# status that restartPolicy: ExitCode retries.
#   bash launch/k8s/entrypoint.sh launch/train.py --data /data/shards --output /runs/exp1 --resume latest
# The training operator's elasticPolicy sets torchrun's --nnodes MIN:MAX, --rdzv-*, --max-restarts and
# --nproc-per-node through PET_* variables.
#
# Kubernetes stops a pod (preemption, node drain, eviction) with SIGTERM to PID 1, then SIGKILL after
# terminationGracePeriodSeconds. torchrun passes the SIGTERM to every process, which finish their step, checkpoint it
# together and exit 143 (facesiam/training/preemption.py); but torchrun itself then exits 1, which ExitCode reads as
# a permanent failure. So this script exits 143 whenever it was stopped by a signal, and torchrun's status otherwise
# (0 done; 1 an error that a restart would not fix, such as a bad flag or a broken file).
set -u
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}  # pytorch/pytorch#135712
stopped=0
torchrun "$@" &
pid=$!
trap 'stopped=1; kill -TERM "$pid" 2>/dev/null' TERM INT
while :; do  # a trapped signal ends `wait` early: wait again until torchrun has ended
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$stopped" = 1 ]; then
  exit 143
fi
exit "$status"
