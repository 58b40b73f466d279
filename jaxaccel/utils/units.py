"""Human byte sizes for flags (`2GiB`, `512MiB`, `64MB`, `1000`) and integer rounding."""

from __future__ import annotations

import re

from jaxaccel.errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
          "tb": 1000**4, "tib": 1 << 40}


def parse_bytes(text: str, flag: str = "size") -> int:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"{flag}: expected a size such as 2GiB, 512MiB or 1000000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` (> 0) that is >= `n` (ints; 0 stays 0)."""
    return -(-n // multiple) * multiple
