"""Parallelism: meshes and logical-axis sharding, pipeline stages, and multi-host runs.

Modules:
  sharding     `Mesh` (`data`, `model`, `stage`), logical-axis rule tables, `Layout`
  params       NNX State <-> {dotted.name: array}, each parameter's shape, dtype and axes
  pipeline     GPipe-style stages over the `stage` axis
  distributed  `jax.distributed` start-up, process roles, host gathers
  cluster      which scheduler started this process (SLURM, Open MPI, TPU pod, env vars)
  launcher     N local processes of one command as a cluster (`jaxaccel launch`)
  watchdog     names a peer that died inside a collective
  straggler    the end-of-restore per-process table

Depends only on `jaxaccel.errors` and `jaxaccel.utils`: every layer above may use it.
"""
