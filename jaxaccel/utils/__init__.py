"""Small utilities every layer may use; none imports jax at module level.

Modules:
  units     byte sizes for flags and tables (`2GiB`), rounding helpers
  files     text inputs, atomic writes, JSON metadata, the user cache directory
  progress  progress bars on stderr (terminal and Jupyter)
  platform  process-level JAX set-up before backends initialise
"""
