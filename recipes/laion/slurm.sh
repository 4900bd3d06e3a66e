#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each running `accelerate launch` for its 8 GPUs.
#   sbatch --nodes=8 recipes/laion/slurm.sh experiment=laion_decoder stage.clip=... stage.embeddings.path=...
#SBATCH --job-name=unclip
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --requeue
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# `resume=latest` with a fixed run folder: a requeued or restarted job continues from its last checkpoint.
RUN_DIR=${RUN_DIR:-runs/laion/$SLURM_JOB_NAME-$SLURM_JOB_ID}
srun bash -c "accelerate launch \
  --config_file recipes/laion/accelerate/multinode.yaml \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port 29500 \
  -m unclip.cli.train $* resume=latest hydra.run.dir=$RUN_DIR"
