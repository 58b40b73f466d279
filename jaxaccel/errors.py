"""Every exception jaxaccel raises on purpose, and the exit code each one means.

This module imports nothing from jaxaccel, so any module can raise these without an import
cycle. Two families, as command-line users and scripts expect:

* `UsageError` (exit code 2): a flag value or an input that cannot be used.
* `JaxaccelError` (exit code 1): a problem with a file, a checkpoint, or the run itself.

Each error's message is one line that names the file, array or flag and what was expected.
Most also derive from ValueError or RuntimeError, as they did before this module existed, so
`except ValueError` in callers keeps working.
"""

from __future__ import annotations

USAGE_EXIT = 2
FAILURE_EXIT = 1


class JaxaccelError(Exception):
    """Base of every error jaxaccel raises on purpose (exit code 1 unless a UsageError)."""


class UsageError(JaxaccelError, ValueError):
    """A flag value that cannot be used (exit code 2)."""


class InputError(UsageError):
    """Input text or ids that cannot be used; the message says which and why."""


class MeshSpecError(UsageError):
    """A --mesh or --rules value that cannot be used; the message says why."""


class KernelUnavailable(UsageError):
    """A backend speed-up (e.g. packed CPU kernels) was insisted on where it cannot run."""


class CheckpointError(JaxaccelError, ValueError):
    """A checkpoint that cannot be read as asked; names the file or array."""


class IntegrityError(CheckpointError):
    """Stored bytes that do not match what the manifest recorded."""


class StorageError(CheckpointError):
    """A bucket, object or web server that cannot be reached or read; names the URL."""


class ChunkError(IntegrityError):
    """A chunk that is missing, short, or fails its checksum; names the array and chunk."""


class ConvertError(JaxaccelError, ValueError):
    """A source checkpoint that cannot be converted; names the file or tensor."""


class UnknownFamilyError(JaxaccelError, ValueError):
    """A model family or Hugging Face model_type that jaxaccel does not implement."""


class PlanError(JaxaccelError, ValueError):
    """The run would not fit in device memory; names the largest arrays and a mesh that fits."""


class PipelineError(JaxaccelError, ValueError):
    """A batch or configuration the pipeline schedule cannot run; the message says why."""


class DistributedError(JaxaccelError, RuntimeError):
    """A process did not arrive in time, or the coordinator was lost; the message names it."""


class KernelBuildError(JaxaccelError, RuntimeError):
    """A backend kernel failed to compile; the message carries the compiler's output."""


def exit_code(err: BaseException) -> int | None:
    """USAGE_EXIT or FAILURE_EXIT for jaxaccel's own errors; None for anything else."""
    if isinstance(err, UsageError):
        return USAGE_EXIT
    if isinstance(err, JaxaccelError):
        return FAILURE_EXIT
    return None
