"""Reference decoders for tests: tiny transformers models saved as safetensors, and the same
weights mapped into jaxaccel models through the family's `weight_rules`.

The mapping here is deliberately naive (read everything, apply rules, stack layers): it checks
the rules themselves, independently of the converter.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from jaxaccel.models import family_spec
from jaxaccel.models.state import abstract_model
from jaxaccel.parallel.params import fill_state


def save_hf(model, directory: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _lookup(tensors: dict, name: str, prefixes) -> np.ndarray:
    for prefix in prefixes:
        if prefix + name in tensors:
            return tensors[prefix + name]
    raise KeyError(name)


def load_jax(family: str, directory: pathlib.Path, dtype=jnp.float32):
    """(model, config) with weights from a transformers `save_pretrained` directory."""
    spec = family_spec(family)
    config = spec.config.from_hf(json.loads((directory / "config.json").read_text()))
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    arrays = {}
    for rule in spec.weight_rules(config):
        if rule.per_layer:
            names = [rule.source.format(i=i) for i in range(config.num_layers)]
            parts = [rule.transform(_lookup(tensors, n, spec.source_prefixes)) for n in names]
            value = np.stack(parts)
        else:
            value = rule.transform(_lookup(tensors, rule.source, spec.source_prefixes))
        arrays[rule.target] = jnp.asarray(value, dtype)
    graphdef, state = abstract_model(family, config, dtype)  # shapes only: no random init
    state = fill_state(state, arrays)
    return nnx.merge(graphdef, state), config


# Tests only: XLA's LLVM optimisation level 0 compiles these tiny models ~2x faster and
# changes no numerics that the tests check (same HLO, same float ops).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def generator(model, config, **kwargs):
    from jaxaccel.runtime.generate import Generator

    return Generator(*nnx.split(model), config, compiler_options=FAST_COMPILE, **kwargs)


def causal_logits(loaded, ids) -> np.ndarray:
    """Float32 logits [t, v] of one causal pass of a loaded decoder over the token ids `ids`
    (no KV cache), under the backend of its mesh: the plain path every test compares with a
    reference's full-sequence logits."""
    import jax  # deferred: the module's other helpers need no jit

    from jaxaccel import backends

    graphdef = loaded.graphdef

    def forward(state, ids_t):
        model = nnx.merge(graphdef, state)
        t = ids_t.shape[0]
        x, _ = model(ids_t[None], jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None])
        return model.logits(x)[0]

    with backends.use(backends.for_mesh(loaded.layout.mesh)):
        return np.asarray(jax.jit(forward)(loaded.state, jnp.asarray(ids, jnp.int32)))
