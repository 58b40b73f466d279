"""MiniLM on 8 simulated devices: dp, tp and dp_tp give the single-device embeddings, every
restored array carries the sharding asked for, and the jitted forward traces once."""

import numpy as np
import pytest

from jaxaccel.runtime.embed import Embedder
from jaxaccel.startup.loader import load_model, plan_model
from jaxaccel.parallel.sharding import Layout

# Device checks skip these (`-m "not cpu_only"`): they need meshes of 8 simulated CPU devices
# (XLA_FLAGS in conftest.py).
pytestmark = pytest.mark.cpu_only

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.",
         "The new movie is awesome.", "Compiled inference with JAX runs on many devices.",
         "short", "x " * 40]


@pytest.fixture(scope="module")
def reference(minilm_ckpt) -> np.ndarray:
    embedder = Embedder(load_model(minilm_ckpt), batch_size=8)
    return embedder.embed_texts(TEXTS)[0]


@pytest.mark.parametrize("rules,mesh", [("dp", "data=8"), ("tp", "model=8"),
                                        ("dp_tp", "data=2,model=4")])
def test_sharded_embeddings_equal_single_device(minilm_ckpt, reference, rules, mesh):
    layout = Layout.create(mesh, rules)
    plan = plan_model(minilm_ckpt, layout)
    loaded = load_model(minilm_ckpt, layout)
    for name, leaf in _flat(loaded.state).items():
        target = plan.targets[name]
        assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim), name
    if rules != "dp":  # tensor-parallel layouts really do split weights
        assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
                   for leaf in _flat(loaded.state).values())
    embedder = Embedder(loaded, batch_size=8)
    first = embedder.embed_texts(TEXTS)[0]
    for _ in range(2):  # same bucket again: no retrace
        again = embedder.embed_texts(TEXTS)[0]
    assert embedder.forward.jitted._cache_size() == 1
    np.testing.assert_array_equal(first, again)
    cosine = np.sum(first * reference, axis=1) / (
        np.linalg.norm(first, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.99999, cosine


def _flat(state) -> dict:
    from jaxaccel.parallel.params import flat_arrays

    return flat_arrays(state)
