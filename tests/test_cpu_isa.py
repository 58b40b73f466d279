"""ISA detection of the CPU backend (`jaxaccel.backends.cpu.isa`) against /proc/cpuinfo
samples of both CPU kinds these machines have: an AMD Zen 4 (EPYC, KVM guest: AVX512-BF16
and VNNI, no AMX) and an Intel Sapphire Rapids Xeon (AVX512-BF16 and AMX tiles)."""

import pathlib

from jaxaccel.backends.cpu import isa

SAMPLES = pathlib.Path(__file__).parent / "fixtures" / "cpuinfo"


def test_amd_zen_sample():
    cpu = isa.parse_cpuinfo((SAMPLES / "amd_epyc_zen4_kvm.txt").read_text())
    assert (cpu.vendor, cpu.model, cpu.family, cpu.logical_cpus) == (
        "AuthenticAMD", "AMD EPYC", 25, 2)
    assert cpu.bf16_dot and not cpu.amx_bf16
    features = cpu.features()
    assert features["avx512f"] and features["avx512_vnni"] and features["avx2"]
    assert not (features["amx_tile"] or features["amx_int8"] or features["avx_vnni"])


def test_intel_sapphire_rapids_sample():
    cpu = isa.parse_cpuinfo((SAMPLES / "intel_xeon_sapphire_rapids.txt").read_text())
    assert cpu.vendor == "GenuineIntel" and cpu.family == 6 and cpu.logical_cpus == 2
    assert cpu.model.startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert cpu.bf16_dot and cpu.amx_bf16
    assert all(cpu.features()[f] for f in ("amx_tile", "amx_bf16", "amx_int8", "avx_vnni"))


def test_flag_is_a_whole_word():
    # "avx512_bf16" must not be found inside another flag's name, nor a flag of a later line.
    cpu = isa.parse_cpuinfo("vendor_id\t: X\nflags\t\t: avx512_bf16x fma\nbugs\t: amx_tile\n")
    assert not cpu.bf16_dot and not cpu.has("amx_tile") and cpu.has("fma")


def test_empty_or_foreign_text_gives_no_features():
    for text in ("", "garbage without colons\n", "Features\t: fp asimd\n"):
        cpu = isa.parse_cpuinfo(text)
        assert not any(cpu.features().values()) and cpu.family is None


def test_json_names_every_feature():
    cpu = isa.parse_cpuinfo((SAMPLES / "amd_epyc_zen4_kvm.txt").read_text())
    assert set(cpu.as_json()["features"]) == set(isa.FEATURES)
