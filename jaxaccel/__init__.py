"""jaxaccel: compiled, sharded, streaming-restore inference for Flax models on JAX/XLA.

    import jaxaccel
    model = jaxaccel.load("checkpoints/minilm", mesh="data=2,model=4")
    vectors = model.embed(["A man is eating food.", "A man is eating bread."])

The API (`load`, `convert`, `inspect`, `plan`, `verify`, `Model`, `Completion`) is imported
on first use, so `import jaxaccel` stays light and the CLI can set XLA's flags
(`--host-devices`) before jax starts. The errors are importable from here directly.
"""

from jaxaccel.errors import (
    CheckpointError,
    ConvertError,
    DistributedError,
    InputError,
    IntegrityError,
    JaxaccelError,
    KernelUnavailable,
    MeshSpecError,
    PlanError,
    UnknownFamilyError,
    UsageError,
)

__version__ = "0.1.0"

_LAZY = {"load": "jaxaccel.api", "convert": "jaxaccel.api", "inspect": "jaxaccel.api",
         "plan": "jaxaccel.api", "verify": "jaxaccel.api", "Model": "jaxaccel.model",
         "Completion": "jaxaccel.model"}

__all__ = ["CheckpointError", "ConvertError", "DistributedError", "InputError",
           "IntegrityError", "JaxaccelError", "KernelUnavailable", "MeshSpecError", "PlanError",
           "UnknownFamilyError", "UsageError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'jaxaccel' has no attribute {name!r}")
    import importlib  # deferred: only when the API is first used

    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
