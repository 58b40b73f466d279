#!/bin/bash
# Open MPI: N processes of one command, joined through jax.distributed's Open MPI detection
# (mpirun sets OMPI_MCA_orte_hnp_uri and OMPI_COMM_WORLD_SIZE/RANK/LOCAL_RANK; with Open MPI
# >= 5, jax 0.12 joins through mpi4py instead: `pip install mpi4py`).
#
#   scripts/cluster/mpirun_embed.sh CKPT                    # 2 processes on this machine
#   HOSTS=node1:4,node2:4 NP=8 scripts/cluster/mpirun_embed.sh CKPT
#
# On a CPU-only machine each process simulates DEVICES devices (XLA_FLAGS), so the whole
# path (gloo collectives, broadcast restore) can be tried locally; tests/test_cluster.py
# runs exactly this with `mpirun -n 2`.
set -euo pipefail
CKPT=${1:?usage: mpirun_embed.sh CKPT}
NP=${NP:-2}
DEVICES=${DEVICES:-2}
HOSTS=${HOSTS:-}
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
exec mpirun -n "$NP" ${HOSTS:+--host "$HOSTS"} --oversubscribe -x XLA_FLAGS -x PATH \
    jaxaccel --restore-mode broadcast embed "$CKPT" --mesh "data=$NP,model=$DEVICES" \
    -t "A man is eating food." -t "Short." --json
