"""jaxaccel: compiled, sharded, streaming-restore inference for Flax models on JAX/XLA.

Import order matters for one thing only: `jaxaccel.platform.configure_host_devices` must run
before jax initialises its backends, so this package imports nothing from jax at import time.
"""

__version__ = "0.1.0"
