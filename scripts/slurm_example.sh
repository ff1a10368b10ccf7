#!/bin/bash
# The tiny pipeline (or any recipe) on 2 nodes x 8 GPUs under SLURM, sharded with FSDP2.
# One SLURM task per node; each task runs the same `rlhf run` with its own --machine-rank,
# and `accelerate launch` starts one process per GPU on its node. Only global rank 0 writes
# artifacts and registers them: RUN_DIR and RLHF_HOME must be on a shared filesystem (same
# path on every node), and the SQLite registry must not be on NFS.
# Submit:   sbatch scripts/slurm_example.sh [RECIPE] [key=value ...]
#SBATCH --job-name=rlhf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

RECIPE=${1:-pipelines/tiny.yaml}
shift || true
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-pipelines/accelerate/fsdp2.yaml}
RUN_DIR=${RUN_DIR:-$PWD/runs/$(basename "$RECIPE" .yaml)}   # on the shared filesystem
export RLHF_HOME=${RLHF_HOME:-$PWD/.rlhf}                     # on the shared filesystem

# machine 0 of the allocation hosts the rendezvous
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/rlhf run '$RECIPE' --output-dir '$RUN_DIR' \
    --launcher accelerate --accelerate-config '$ACCELERATE_CONFIG' \
    --num-processes $NUM_PROCESSES --num-machines $SLURM_NNODES --machine-rank \$SLURM_NODEID \
    --main-process-ip $MAIN_IP --main-process-port $MAIN_PORT $*
"
