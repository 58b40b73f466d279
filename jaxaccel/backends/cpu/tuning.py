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

`ynn_dots` keeps YNNPACK for the dots but one dot per fusion (LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT),
the elementwise work around them left to XLA's own loops. Measured on the same Zen 4 VM, idle,
after the float32 erf GELU (`layers.gelu`), MiniLM b32x128 in-process, 3 alternated rounds,
best of 12 batches (ms): bfloat16 304 / 309 / 306 against 342 / 323 / 313 with XLA's default
(which fused the GELU and both MLP dots into one YNNPACK subgraph); float32 587 / 587 / 532
against 564 / 616 / 580; GPT-2 124M prefill and decode (b1, b8) within noise of the default
in both dtypes. So Zen 4 (AMD family 25 with AVX512-BF16) gets it by default; other CPU kinds
keep XLA's default until measured.
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
