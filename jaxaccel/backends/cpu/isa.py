"""What the running x86 CPU offers, read from /proc/cpuinfo at run time.

The CPU backend makes a few choices per CPU kind (an Intel Xeon with AMX tiles and an AMD Zen
with AVX512-BF16 want different things); they are made from this record, never from the
machine a choice was tuned on. Linux's cpuinfo names the ISA extensions in its `flags` line
(`avx512_bf16`, `amx_tile`, ...: arch/x86/include/asm/cpufeatures.h); other systems, or a
file that cannot be read, give an empty flag set, and every choice falls back to plain XLA.

The C++ kernels come in two builds (`kernel_build`): "avx512" (`-march=native` on a CPU with
AVX-512 F/BW/VL, the build they were tuned with on Zen 4) and "avx2" (`-march=x86-64-v3`:
AVX2 + FMA, e.g. AMD Zen 2/3 and Intel client parts). Other CPUs (aarch64 hosts, x86 without
AVX2) get no kernels. $JAXACCEL_CPU_ISA=avx2 masks the newer flags out of `detect()`'s record,
so one AVX-512 machine can measure the AVX2 build and every choice made for such a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

from jaxaccel.errors import UsageError

CPUINFO = pathlib.Path("/proc/cpuinfo")
# The extensions jaxaccel's choices and `bench roofline` look at, in cpuinfo's spelling.
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
            "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
ENV_ISA = "JAXACCEL_CPU_ISA"
# What each $JAXACCEL_CPU_ISA value keeps of the real record: "native" all of it, "avx2" the
# flags up to x86-64-v3 (no AVX-512, AVX-VNNI or AMX), "none" no ISA flags at all.
_NEWER_THAN_AVX2 = ("avx512", "avx_vnni", "amx")
MASKS = ("native", "avx2", "none")
# Kernel builds, by name: the compiler's -march for each.
KERNEL_BUILDS = {"avx512": "-march=native", "avx2": "-march=x86-64-v3"}
_AVX512_NEEDS = ("avx512f", "avx512bw", "avx512vl")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """One CPU's identity and ISA flags (cpuinfo's spelling, lower case)."""

    vendor: str = "unknown"       # "GenuineIntel", "AuthenticAMD", ...
    model: str = "unknown"        # cpuinfo's `model name`
    family: int | None = None     # cpuinfo's `cpu family` (25 = AMD Zen 3/4, 26 = Zen 5)
    logical_cpus: int = 0         # `processor` entries in the file
    flags: frozenset[str] = frozenset()

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def bf16_dot(self) -> bool:
        """AVX512-BF16 (`vdpbf16ps`): bf16 pairs multiplied and summed into float32."""
        return self.has("avx512_bf16")

    @property
    def amx_bf16(self) -> bool:
        """Intel AMX tiles with bf16 multiply (Sapphire Rapids and later)."""
        return self.has("amx_tile") and self.has("amx_bf16")

    def features(self) -> dict[str, bool]:
        """`FEATURES` -> present, for tables and JSON."""
        return {name: self.has(name) for name in FEATURES}

    def as_json(self) -> dict:
        return {"vendor": self.vendor, "model": self.model, "family": self.family,
                "logical_cpus": self.logical_cpus, "features": self.features()}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's record of a /proc/cpuinfo text (all cores of a machine agree).

    Lines are `key<tabs>: value`; unknown or missing keys leave the defaults.
    """
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value.strip())
    family = fields.get("cpu family", "")
    return CpuInfo(vendor=fields.get("vendor_id", "unknown"),
                   model=fields.get("model name", "unknown"),
                   family=int(family) if family.isdigit() else None,
                   logical_cpus=processors,
                   flags=frozenset(fields.get("flags", "").lower().split()))


def masked(cpu: CpuInfo, mask: str) -> CpuInfo:
    """`cpu` as a CPU with only the flags `mask` (one of MASKS) keeps.

    Raises UsageError naming $JAXACCEL_CPU_ISA for an unknown mask."""
    if mask not in MASKS:
        raise UsageError(f"${ENV_ISA}={mask!r}: expected one of {', '.join(MASKS)}")
    if mask == "native":
        return cpu
    keep = frozenset() if mask == "none" else frozenset(
        f for f in cpu.flags if not f.startswith(_NEWER_THAN_AVX2))
    return dataclasses.replace(cpu, flags=keep)


def kernel_build(cpu: CpuInfo) -> str | None:
    """The build of the C++ kernels for `cpu` (a key of KERNEL_BUILDS), or None: "avx512"
    with AVX-512 F/BW/VL, else "avx2" with AVX2 and FMA, else none (aarch64, old x86)."""
    if all(cpu.has(flag) for flag in _AVX512_NEEDS):
        return "avx512"
    if cpu.has("avx2") and cpu.has("fma"):
        return "avx2"
    return None


def no_kernel_reason(cpu: CpuInfo, machine: str) -> str:
    """Why `kernel_build(cpu)` is None, in one line (`machine`: platform.machine())."""
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the C++ kernels are written for x86 (AVX2 or AVX-512) and this is {machine}"
    return "this CPU has neither AVX2 + FMA nor AVX-512 (cpuinfo flags)"


def running_build(environ=os.environ) -> str | None:
    """The kernel build this process uses (`kernel_build` of `detect()`'s masked record), or
    None when kernels are off here (JAXACCEL_KERNELS=0, or no build for this CPU)."""
    if environ.get("JAXACCEL_KERNELS", "1") == "0":
        return None
    return kernel_build(detect())


def describe_build(environ=os.environ) -> str:
    """One line for benchmark tables: the CPU model, the kernel build and its -march, and the
    ISA mask and PyTorch ISA caps when set (so a table says what ran)."""
    build = running_build(environ)
    kernels = f"{build} build ({KERNEL_BUILDS[build]})" if build else "off (plain XLA)"
    caps = [f"{name}={environ[name]}" for name in (ENV_ISA, "ATEN_CPU_CAPABILITY",
                                                   "ONEDNN_MAX_CPU_ISA") if environ.get(name)]
    return f"CPU {detect().model}; kernels {kernels}" + (f" [{', '.join(caps)}]" if caps else "")


@functools.cache
def detect() -> CpuInfo:
    """This machine's CpuInfo (read once per process), masked by $JAXACCEL_CPU_ISA (default
    "native"); empty when /proc/cpuinfo is absent.

    Raises UsageError for an unknown $JAXACCEL_CPU_ISA."""
    try:
        cpu = parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        cpu = CpuInfo()
    return masked(cpu, os.environ.get(ENV_ISA, "").strip().lower() or "native")
