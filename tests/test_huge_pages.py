"""Packed decode weights live in huge-page host buffers that jax adopts without a copy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.backends.cpu import huge_pages

# Device checks skip these (`-m "not cpu_only"`): they need huge-page host buffers that the CPU
# backend adopts without a copy.
pytestmark = pytest.mark.cpu_only


def test_copy_is_exact_aligned_and_adopted_in_place():
    x = jnp.arange(3 * 1000 * 7, dtype=jnp.uint16).reshape(3, 1000, 7)
    y = huge_pages.copy_to_huge_pages(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    # jax adopted our 2 MiB-aligned mapping (a copy would sit at an arbitrary address).
    assert y.unsafe_buffer_pointer() % huge_pages.HUGE_PAGE == 0


def test_host_buffer_is_private_and_advised():
    buf = huge_pages.host_buffer(5 * huge_pages.HUGE_PAGE + 123)
    assert buf.nbytes == 5 * huge_pages.HUGE_PAGE + 123
    assert buf.ctypes.data % huge_pages.HUGE_PAGE == 0
    buf[:] = 7  # writable, private memory
    assert int(buf[-1]) == 7


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


def test_the_kernel_may_back_the_buffer_with_huge_pages():
    """The mapping is eligible for THP (the kernel's own verdict, /proc/self/smaps)."""
    import pytest

    if _thp_mode() in ("never", "absent"):
        pytest.skip(f"this kernel has transparent huge pages {_thp_mode()}")
    buf = huge_pages.host_buffer(4 * huge_pages.HUGE_PAGE)
    address = buf.ctypes.data
    eligible = None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "THPeligible:":
            eligible = fields[1]
            break
    assert eligible == "1"
