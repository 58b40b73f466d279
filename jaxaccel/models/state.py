"""A family's model as an abstract NNX State: shapes, dtypes and logical axes, no memory.

The family-independent translation between States and flat {dotted.path: array} mappings
(`param_specs`, `fill_state`, `flat_arrays`) lives in `jaxaccel.parallel.params`, below the
backends that also need it; this module adds what needs the family registry.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from jaxaccel.models import config_from_dict, family_spec


def abstract_model(family: str, config, dtype=jnp.float32, head_copy: bool = False):
    """(graphdef, abstract State) of a family's model: shapes and metadata, no memory.
    `head_copy`: a tied decoder also holds its head as a parameter of its own (to hold it
    quantized: `jaxaccel.models.quantization.tied_head`)."""
    if isinstance(config, Mapping):
        config = config_from_dict(family, dict(config))
    model_cls = family_spec(family).model
    extra = {"head_copy": True} if head_copy else {}  # only families with a tied_head take it
    model = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0), **extra))
    return nnx.split(model)
