"""Process-level JAX set-up that must happen before jax initialises its backends."""

from __future__ import annotations

import os
import re
import sys

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def configure_host_devices(count: int | None) -> None:
    """Simulate `count` CPU devices by setting the XLA flag (a no-op for None).

    XLA reads XLA_FLAGS once, when the CPU backend starts, so this must run before any jax
    computation; calling it later raises instead of silently doing nothing.
    """
    if count is None:
        return
    if count < 1:
        raise ValueError(f"--host-devices must be >= 1, got {count}")
    if _backends_initialised():
        import jax  # deferred: importing it here must not start it early

        if jax.device_count() == count or jax.default_backend() != "cpu":
            return
        raise RuntimeError(
            f"--host-devices {count}: jax already started with {jax.device_count()} devices; "
            "set it before the first jax computation"
        )
    flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()


def _backends_initialised() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # deferred: private; only once jax is imported

    return bool(getattr(xla_bridge, "_backends", None))
