"""Per-CPU choices of the CPU backend, made at run time from the ISA record (`isa.detect`).

Which library runs XLA:CPU's dots is an XLA option (jax 0.10 and 0.12 alike): YNNPACK by
default (`xla_cpu_experimental_ynn_fusion_type`), oneDNN (`..._onednn_fusion_type`, the
library that drives Intel's AMX tiles), XNNPACK (`..._xnn_fusion_type`), or XLA's own Eigen
dots when every list is empty. `LIBRARIES` spells each as compiler options.

YNNPACK stays the default dot library on every CPU kind; `ynn_dots` (YNNPACK, one dot per
fusion: LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT) is the default on Zen 4 (AMD family 25 with
AVX512-BF16), where it measured faster; AMX (oneDNN) is opt-in with
JAXACCEL_CPU_DOT_LIBRARY=onednn (or ynn, xnn, eigen) until measured. The measurements:
docs/performance.md, "The CPU backend's choices".
"""

from __future__ import annotations

import os

from jaxaccel.backends.cpu.isa import CpuInfo
from jaxaccel.errors import UsageError

ENV_LIBRARY = "JAXACCEL_CPU_DOT_LIBRARY"
_YNN, _ONEDNN, _XNN = (f"xla_cpu_experimental_{lib}_fusion_type" for lib in ("ynn", "onednn", "xnn"))
_DOT = "LIBRARY_FUSION_TYPE_DOT"
# Compiler options that make one library run the dots (None: XLA's own default, YNNPACK).
LIBRARIES: dict[str, dict | None] = {
    "default": None,
    "ynn": None,
    "onednn": {_YNN: "", _ONEDNN: _DOT},
    "xnn": {_YNN: "", _XNN: _DOT},
    "eigen": {_YNN: ""},
    "ynn_dots": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def dot_library(cpu: CpuInfo, environ=os.environ) -> str:
    """The library for this CPU's dots: $JAXACCEL_CPU_DOT_LIBRARY if set, else "ynn_dots"
    on Zen 4 and "default" on every other CPU kind (see the module docstring, which has the
    measurements).

    Raises UsageError for an unknown library name."""
    name = environ.get(ENV_LIBRARY, "").strip().lower() or _measured_default(cpu)
    if name not in LIBRARIES:
        raise UsageError(f"${ENV_LIBRARY}={name!r}: expected one of {', '.join(LIBRARIES)}")
    return name


def _measured_default(cpu: CpuInfo) -> str:
    zen4 = cpu.vendor == "AuthenticAMD" and cpu.family == 25 and cpu.bf16_dot
    return "ynn_dots" if zen4 else "default"


def compiler_options(cpu: CpuInfo, environ=os.environ) -> dict:
    """XLA compiler options for this CPU ({} keeps XLA's defaults)."""
    return dict(LIBRARIES[dot_library(cpu, environ)] or {})
