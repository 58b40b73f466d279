"""Which cluster this process was started in, recognised the way `jax.distributed` does.

Real clusters do not pass `--coordinator/--num-processes/--process-id`: `srun` sets SLURM_*
variables, `mpirun` sets OMPI_*, a TPU pod slice has its workers in metadata (or, on GKE, in
TPU_WORKER_HOSTNAMES), a Kubernetes indexed Job / JobSet sets JOB_COMPLETION_INDEX. JAX's own
`jax._src.clusters` classes read exactly these (checked against jax 0.10.2 and 0.12), and
`jax.distributed.initialize()` called without arguments uses the first one present. This
module only *names* the environment and, where the variables say it, the process count and
index, so that `--distributed auto` can decide whether to join (more than one process) and
say what it joined; the joining itself is left to jax's detection (see distributed.initialize).

The conditions mirror jax's `is_env_present`:
  slurm       SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID
              (inside `srun`; a bare `sbatch` script has no step and is not a cluster)
  open mpi    OMPI_MCA_orte_hnp_uri (Open MPI < 5, under mpirun), or OMPI_COMM_WORLD_SIZE/
              RANK/LOCAL_RANK (Open MPI 5: jax 0.12 joins through mpi4py)
  tpu pod     TPU_PROCESS_ADDRESSES(_PATH) or TPU_WORKER_HOSTNAMES with TPU_WORKER_ID (GKE);
              on a Cloud TPU VM, the `agent-worker-number` metadata (asked through jax)
  kubernetes  KUBERNETES_SERVICE_HOST and JOB_COMPLETION_INDEX (an indexed Job; a JobSet also
              sets JOBSET_NAME); jax's detection needs the `kubernetes` package and pod-read
              rights, so the example manifest sets the JAX_* variables instead
  JAX_*       JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (jaxaccel's launcher)
"""

from __future__ import annotations

import dataclasses
import glob
import os

MODES = ("auto", "off")

_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"
_OMPI5 = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
_TPU_HOSTS = ("TPU_PROCESS_ADDRESSES_PATH", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_JAX = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Environment:
    """A recognised cluster environment. `num_processes`/`process_id` are None where only
    jax's detection can tell (TPU metadata, the Kubernetes API)."""

    name: str
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def joins(self) -> bool:
        """Whether `--distributed auto` joins it: more than one process, or a count that
        only jax can tell."""
        return self.num_processes is None or self.num_processes > 1


def detect(environ=None) -> Environment | None:
    """The cluster environment this process runs in, or None (a plain single-process run).

    Checked in jax's order (Open MPI, SLURM, TPU, Kubernetes), then the JAX_* variables.
    Raises ValueError naming the variable when a count or index is not an integer.
    """
    environ = os.environ if environ is None else environ
    for probe in (_open_mpi, _slurm, _tpu_pod, _kubernetes, _jax_variables):
        found = probe(environ)
        if found is not None:
            return found
    return None


def env_int(environ, name: str) -> int | None:
    """The integer in environment variable `name`, or None when unset; ValueError naming it
    when it is not an integer."""
    value = environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _slurm(environ) -> Environment | None:
    if not all(name in environ for name in _SLURM):
        return None
    return Environment("slurm", env_int(environ, "SLURM_NTASKS"), env_int(environ, "SLURM_PROCID"))


def _open_mpi(environ) -> Environment | None:
    if _OMPI_URI not in environ and not all(name in environ for name in _OMPI5):
        return None
    return Environment("open mpi", env_int(environ, "OMPI_COMM_WORLD_SIZE"),
                       env_int(environ, "OMPI_COMM_WORLD_RANK"))


def _tpu_pod(environ) -> Environment | None:
    if any(environ.get(name) for name in _TPU_HOSTS) and "TPU_WORKER_ID" in environ:
        return Environment("tpu pod (gke)", None, env_int(environ, "TPU_WORKER_ID"))
    if environ is os.environ and _on_tpu_vm() and _gce_tpu_metadata_present():
        return Environment("tpu pod (metadata)")
    return None


def _on_tpu_vm() -> bool:
    """Cheap pre-check before asking jax (which queries the metadata server): TPU chips show
    up as /dev/accel* (v2-v4) or /dev/vfio/* (v5+)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _gce_tpu_metadata_present() -> bool:
    try:
        # deferred: importing jax starts its TPU probing; only on a machine with TPU chips
        from jax._src.clusters import GceTpuCluster
    except ImportError:
        return False
    try:
        return bool(GceTpuCluster.is_env_present())
    except Exception:  # no metadata server: not a pod
        return False


def _kubernetes(environ) -> Environment | None:
    if "KUBERNETES_SERVICE_HOST" not in environ or "JOB_COMPLETION_INDEX" not in environ:
        return None
    name = "kubernetes jobset" if "JOBSET_NAME" in environ else "kubernetes job"
    return Environment(name, env_int(environ, "JAX_NUM_PROCESSES"),
                       env_int(environ, "JOB_COMPLETION_INDEX"))


def _jax_variables(environ) -> Environment | None:
    if not all(name in environ for name in _JAX):
        return None
    return Environment("JAX_* variables", env_int(environ, "JAX_NUM_PROCESSES"),
                       env_int(environ, "JAX_PROCESS_ID"))
