"""What the running x86 CPU offers, read from /proc/cpuinfo at run time.

The CPU backend makes a few choices per CPU kind (an Intel Xeon with AMX tiles and an AMD Zen
with AVX512-BF16 want different things); they are made from this record, never from the
machine a choice was tuned on. Linux's cpuinfo names the ISA extensions in its `flags` line
(`avx512_bf16`, `amx_tile`, ...: arch/x86/include/asm/cpufeatures.h); other systems, or a
file that cannot be read, give an empty flag set, and every choice falls back to plain XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

CPUINFO = pathlib.Path("/proc/cpuinfo")
# The extensions jaxaccel's choices and `bench roofline` look at, in cpuinfo's spelling.
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
            "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


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


@functools.cache
def detect() -> CpuInfo:
    """This machine's CpuInfo (read once per process); empty when /proc/cpuinfo is absent."""
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return CpuInfo()
