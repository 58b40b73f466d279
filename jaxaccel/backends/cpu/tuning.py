"""Per-CPU choices of the CPU backend, made at run time from the ISA record (`isa.detect`).

Which library runs XLA:CPU's dots is an XLA option (jax 0.10 and 0.12 alike): YNNPACK by
default (`xla_cpu_experimental_ynn_fusion_type`), oneDNN (`..._onednn_fusion_type`, the
library that drives Intel's AMX tiles), XNNPACK (`..._xnn_fusion_type`), or XLA's own Eigen
dots when every list is empty. `LIBRARIES` spells each as compiler options.

Measured on the AMD EPYC (Zen 4, AVX512-BF16, no AMX) development VM with jax 0.10.2,
MiniLM b32x128 end to end, all variants in one process, alternated over 4 rounds
(scripts/bench_cpu_library.py; the 2 cores were shared, load average 6-11, so absolute
figures are ~4x below an idle machine's): bfloat16, sentences/s best/median: YNNPACK (XLA's
default) 35.1/25.4, Eigen 23.4/17.8; the oneDNN and XNNPACK options compile to no library
fusion at all in this jaxlib (Eigen dots; 25.6/24.1 and 26.0/17.6). float32 was not
conclusive under that load (YNNPACK 18.6/11.8, Eigen 16.9/15.8), so no CPU kind gets
another library by default. AMX (Sapphire Rapids) could not be measured here: it is
detectable (`CpuInfo.amx_bf16`) but oneDNN stays off unless asked for with
JAXACCEL_CPU_DOT_LIBRARY=onednn (or ynn, xnn, eigen), so a run on such a machine can measure
it and `dot_library` can then choose per CPU.
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
}


def dot_library(cpu: CpuInfo, environ=os.environ) -> str:
    """The library for this CPU's dots: $JAXACCEL_CPU_DOT_LIBRARY if set, else "default"
    on every CPU kind measured so far (see the module docstring); `cpu` is where a measured
    per-CPU default (e.g. `cpu.amx_bf16` -> "onednn") belongs.

    Raises UsageError for an unknown library name."""
    name = environ.get(ENV_LIBRARY, "").strip().lower() or "default"
    if name not in LIBRARIES:
        raise UsageError(f"${ENV_LIBRARY}={name!r}: expected one of {', '.join(LIBRARIES)}")
    return name


def compiler_options(cpu: CpuInfo, environ=os.environ) -> dict:
    """XLA compiler options for this CPU ({} keeps XLA's defaults)."""
    return dict(LIBRARIES[dot_library(cpu, environ)] or {})
