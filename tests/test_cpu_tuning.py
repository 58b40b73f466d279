"""Per-CPU choices of the CPU backend (`jaxaccel.backends.cpu.tuning`): which library runs
XLA:CPU's dots, chosen from the ISA record and $JAXACCEL_CPU_DOT_LIBRARY; every library's
options compile on this jax and compute the matmul numpy computes."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.backends.cpu import isa, tuning
from jaxaccel.errors import UsageError

SAMPLES = pathlib.Path(__file__).parent / "fixtures" / "cpuinfo"
ZEN = isa.parse_cpuinfo((SAMPLES / "amd_epyc_zen4_kvm.txt").read_text())
SAPPHIRE_RAPIDS = isa.parse_cpuinfo((SAMPLES / "intel_xeon_sapphire_rapids.txt").read_text())


@pytest.mark.parametrize("cpu,library", [(ZEN, "ynn_dots"), (SAPPHIRE_RAPIDS, "default")],
                         ids=["zen4", "sapphire-rapids"])
def test_measured_choice_unless_asked(cpu, library):
    # Zen 4: YNNPACK one dot per fusion, as measured; AMX is detected but not used by
    # default: it has not been measured (module docstring).
    assert tuning.dot_library(cpu, environ={}) == library
    assert tuning.compiler_options(cpu, environ={}) == dict(tuning.LIBRARIES[library] or {})
    assert tuning.compiler_options(cpu, environ={tuning.ENV_LIBRARY: "oneDNN"}) == {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def test_unknown_library_is_a_usage_error():
    with pytest.raises(UsageError, match=tuning.ENV_LIBRARY):
        tuning.dot_library(ZEN, environ={tuning.ENV_LIBRARY: "mkl"})


@pytest.mark.cpu_only
@pytest.mark.parametrize("library", sorted(tuning.LIBRARIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_library_computes_the_matmul(library, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 37, 64), np.float32)
    w = rng.standard_normal((64, 48), np.float32)
    xd, wd = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

    def f(x, w):
        return jnp.einsum("btk,kn->btn", x, w, preferred_element_type=jnp.float32)

    got = jax.jit(f).lower(xd, wd).compile(tuning.LIBRARIES[library])(xd, wd)
    # numpy on the same (rounded) inputs, float64 accumulation.
    want = np.asarray(xd, np.float64) @ np.asarray(wd, np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)


@pytest.mark.cpu_only
@pytest.mark.parametrize("library,dtype,threshold",
                         [("eigen", "float32", 0.99999), ("onednn", "bfloat16", 0.999)])
def test_runtime_applies_the_chosen_library(minilm_ckpt, monkeypatch, library, dtype, threshold):
    """$JAXACCEL_CPU_DOT_LIBRARY reaches the embed program (no YNNPACK fusion left), and its
    embeddings still match sentence-transformers' (the committed fixture of
    scripts/make_reference.py; thresholds as tests/test_reference_fixture.py)."""
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    data = np.load(SAMPLES.parent / "minilm_reference.npz")
    sentences, expected = [str(s) for s in data["sentences"]], data["embeddings"]
    monkeypatch.setenv(tuning.ENV_LIBRARY, library)
    embedder = Embedder(load_model(minilm_ckpt, dtype=dtype), batch_size=16)
    ours = embedder.embed_texts(sentences)[0]
    cosine = (ours * expected).sum(-1) / np.linalg.norm(ours, axis=-1)
    assert cosine.min() >= threshold
    text = embedder.forward.lower(*embedder.abstract_args((16, 32))).compile().as_text()
    assert " dot(" in text and "ynn_fusion" not in text
