"""`--restore-mode`: how a multi-host restore gets replicated slices (no jax imported here).

read-all   every process reads from storage every slice its devices hold (N replicas across
           processes: N x the storage traffic).
broadcast  each slice that devices of several processes hold is read by exactly one of them
           and sent to the others over the devices (checkpoint.broadcast): 1 x the traffic.
auto       broadcast when some slice is replicated across processes *and* the checkpoint is
           remote (an object store, where traffic costs and is the bottleneck); read-all from
           a local or shared file system, where every host reading its own copy is cheaper
           than a collective.
"""

from __future__ import annotations

from jaxaccel.checkpoint import storage
from jaxaccel.errors import UsageError

MODES = ("auto", "read-all", "broadcast")

_default = {"mode": "auto"}


def check(mode: str) -> str:
    """`mode` itself, or UsageError (a ValueError) naming the flag and the choices."""
    if mode not in MODES:
        raise UsageError(f"--restore-mode must be one of {MODES}, got {mode!r}")
    return mode


def set_default(mode: str) -> None:
    """The mode restores use when the caller gives none (set by the CLI's --restore-mode)."""
    _default["mode"] = check(mode)


def default() -> str:
    return _default["mode"]


def resolve(mode: str | None, source, replicated_across_processes: bool) -> str:
    """The mode a restore runs: `read-all` or `broadcast` (see the module docstring)."""
    mode = check(mode or default())
    if mode == "auto":
        return "broadcast" if replicated_across_processes and storage.is_remote(source) else "read-all"
    return mode
