#!/bin/bash
# SLURM: embed on 2 nodes x 4 GPUs, one process per GPU (jax's SLURM detection gives each
# process the GPU of its SLURM_LOCALID), data-parallel across the nodes, tensor-parallel
# within each. Submit with `sbatch scripts/cluster/sbatch_embed.sh CKPT TEXTS_FILE`.
#
# No jaxaccel flags join the processes: `srun` sets SLURM_JOB_ID, SLURM_STEP_NODELIST,
# SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, from which jax.distributed finds the
# coordinator (the first node, port derived from the job id; override with
# JAX_COORDINATOR_PORT) and each process's index. The first status line of every process
# says `slurm detected; connected as process I/8 on host ...`.
#SBATCH --job-name=jaxaccel-embed
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --time=00:30:00
#SBATCH --output=jaxaccel-embed-%j.log
set -euo pipefail
CKPT=${1:?usage: sbatch sbatch_embed.sh CKPT TEXTS_FILE}
TEXTS=${2:?usage: sbatch sbatch_embed.sh CKPT TEXTS_FILE}

# The mesh must span every process (8 devices here), or jaxaccel refuses it with the fix.
# From a bucket (gs://, s3://) add `--restore-mode broadcast` (auto picks it there): each
# weight slice is then read once for the whole job instead of once per node.
srun jaxaccel --distributed-timeout 300 embed "$CKPT" --mesh data=2,model=4 \
    --input "$TEXTS" --out embeddings.npy
