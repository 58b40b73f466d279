"""Which build of the CPU kernels runs where (`isa.kernel_build`, `$JAXACCEL_CPU_ISA`), and that
the sources build for aarch64.

The kernels' numbers in each build are checked against numpy in test_attention_kernel.py,
test_kernels.py and test_quantized_kernel.py (their "avx2" builds). Here: /proc/cpuinfo samples
of an AVX2-only AMD Zen 3 (EPYC Milan), a Zen 4 (AVX-512, AVX512-BF16), an Intel Sapphire
Rapids (AVX-512, AMX) and an ARM Neoverse V2 (Grace, aarch64: `Features`, no `flags`).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import pytest

from cli_runner import run_cli
from jaxaccel.backends.cpu import attention, build, isa, packed, quantized, tuning
from jaxaccel.errors import UsageError

SAMPLES = pathlib.Path(__file__).parent / "fixtures" / "cpuinfo"
CPUS = {"zen3": "amd_epyc_zen3_milan_kvm.txt", "zen4": "amd_epyc_zen4_kvm.txt",
        "sapphire_rapids": "intel_xeon_sapphire_rapids.txt",
        "grace": "arm_neoverse_v2_grace.txt"}
EXPECTED_BUILD = {"zen3": "avx2", "zen4": "avx512", "sapphire_rapids": "avx512", "grace": None}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def sample(name: str) -> isa.CpuInfo:
    return isa.parse_cpuinfo((SAMPLES / CPUS[name]).read_text())


@pytest.mark.parametrize("name", CPUS)
def test_each_cpu_gets_its_kernel_build(name):
    cpu = sample(name)
    assert isa.kernel_build(cpu) == EXPECTED_BUILD[name]
    assert attention.cpu_supported(cpu) == (EXPECTED_BUILD[name] is not None)


def test_build_flags_name_the_isa_level():
    assert isa.KERNEL_BUILDS == {"avx512": "-march=native", "avx2": "-march=x86-64-v3"}


def test_zen3_sample_is_avx2_only():
    cpu = sample("zen3")
    assert cpu.model == "AMD EPYC 7B13" and cpu.family == 25 and cpu.logical_cpus == 2
    assert cpu.has("avx2") and cpu.has("fma") and not cpu.has("avx512f")
    # Its per-CPU choices: XLA's default dot library, no dequantized bf16 panels.
    assert tuning.dot_library(cpu, environ={}) == "default"
    assert quantized.panel_rows(cpu) is None


def test_aarch64_sample_has_no_x86_flags_and_names_the_reason():
    cpu = sample("grace")
    assert cpu.logical_cpus == 2 and not any(cpu.features().values())
    reason = isa.no_kernel_reason(cpu, "aarch64")
    assert "aarch64" in reason and "x86" in reason
    assert "AVX2" in isa.no_kernel_reason(isa.CpuInfo(), "x86_64")


@pytest.mark.parametrize("name", ["zen4", "sapphire_rapids"])
def test_avx2_mask_makes_an_avx512_cpu_look_like_zen3(name):
    cpu = isa.masked(sample(name), "avx2")
    assert isa.kernel_build(cpu) == "avx2"
    assert not any(f.startswith(("avx512", "amx", "avx_vnni")) for f in cpu.flags)
    assert cpu.has("avx2") and cpu.has("fma") and cpu.model == sample(name).model
    assert not cpu.bf16_dot and not cpu.amx_bf16 and quantized.panel_rows(cpu) is None
    assert tuning.dot_library(cpu, environ={}) == "default"


def test_native_and_none_masks():
    zen4 = sample("zen4")
    assert isa.masked(zen4, "native") == zen4
    assert isa.kernel_build(isa.masked(zen4, "none")) is None
    with pytest.raises(UsageError, match="JAXACCEL_CPU_ISA.*avx3"):
        isa.masked(zen4, "avx3")


def test_detect_applies_the_mask_from_the_environment(monkeypatch):
    monkeypatch.setattr(isa, "CPUINFO", SAMPLES / CPUS["zen4"])
    try:
        for mask, expected in (("avx2", "avx2"), ("", "avx512"), ("NONE", None)):
            monkeypatch.setenv(isa.ENV_ISA, mask)
            isa.detect.cache_clear()
            assert isa.kernel_build(isa.detect()) == expected
        assert isa.running_build({"JAXACCEL_KERNELS": "0"}) is None
    finally:
        isa.detect.cache_clear()


def test_describe_build_names_cpu_build_and_caps(monkeypatch):
    monkeypatch.setattr(isa, "CPUINFO", SAMPLES / CPUS["zen4"])
    try:
        isa.detect.cache_clear()
        env = {isa.ENV_ISA: "avx2", "ATEN_CPU_CAPABILITY": "avx2"}
        monkeypatch.setenv(isa.ENV_ISA, "avx2")
        line = isa.describe_build(env)
        assert line == ("CPU AMD EPYC; kernels avx2 build (-march=x86-64-v3) "
                        "[JAXACCEL_CPU_ISA=avx2, ATEN_CPU_CAPABILITY=avx2]")
    finally:
        isa.detect.cache_clear()


def test_no_kernel_build_is_one_warning_line_and_plain_xla(monkeypatch):
    """An aarch64 host: every kernel target is None, and one warning line says why."""
    monkeypatch.setattr(isa, "detect", lambda: sample("grace"))
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    build.target.cache_clear()
    build._warn_no_build.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert build.target(packed.KERNEL_SOURCE, packed.KERNEL_SYMBOL) is None
            assert build.target(quantized.KERNEL_SOURCE, quantized.KERNEL_SYMBOL) is None
            assert attention.kernel(jax.numpy.float32) is None
        lines = [str(w.message) for w in caught]
        assert len(lines) == 1 and "\n" not in lines[0]
        assert "aarch64" in lines[0] and "XLA's dots" in lines[0]
    finally:
        build.target.cache_clear()
        build._warn_no_build.cache_clear()


def test_forced_avx2_is_the_build_the_backend_registers():
    """With $JAXACCEL_CPU_ISA=avx2 a process's default kernel targets are the avx2 builds."""
    if isa.kernel_build(isa.masked(isa.detect(), "avx2")) != "avx2":
        pytest.fail("this test needs an x86 CPU with AVX2 + FMA")
    expected = [build.target(attention.KERNEL_SOURCE, attention.SYMBOLS[jax.numpy.dtype("float32")],
                             (), "avx2"),
                build.target(packed.KERNEL_SOURCE, packed.KERNEL_SYMBOL, (), "avx2")]
    code = ("import jax.numpy as jnp\n"
            "from jaxaccel.backends.cpu import attention, build, packed\n"
            "print(attention.kernel(jnp.float32))\n"
            "print(build.target(packed.KERNEL_SOURCE, packed.KERNEL_SYMBOL))\n")
    env = {**os.environ, isa.ENV_ISA: "avx2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    assert done.stdout.split() == expected


@pytest.mark.parametrize("source", ["attention.cc", "bf16_matmul.cc", "quantized_matmul.cc"])
def test_sources_cross_compile_for_aarch64(source, tmp_path):
    """The C++ sources have no unguarded x86 intrinsics (apt-get install g++-aarch64-linux-gnu
    to run this; the runtime on aarch64 uses no kernel, see the warning test above)."""
    compiler = shutil.which("aarch64-linux-gnu-g++")
    if compiler is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed")
    done = subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
                           f"-I{jax.ffi.include_dir()}", str(build.SOURCE_DIR / source),
                           "-o", str(tmp_path / "kernel.so")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("command", ["embed", "generate"])
def test_bench_help_says_how_to_pick_the_kernel_build(capsys, monkeypatch, command):
    code, out, _ = run_cli(capsys, monkeypatch, "bench", command, "--help")
    text = " ".join(out.replace("│", " ").split())  # rich wraps and boxes the help
    assert code == 0
    assert "JAXACCEL_CPU_ISA=avx2" in text and "ONEDNN_MAX_CPU_ISA=AVX2" in text, text
