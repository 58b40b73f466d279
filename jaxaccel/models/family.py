"""The family contract: everything the rest of jaxaccel may know about a model family.

A family is one module (one file) that builds one `FamilySpec` (as `SPEC`) and one
`register` line in `jaxaccel.models`. Converters, the loader, the planner, quantization and
the runtime read the spec's fields, never the module's attributes and never the family's
name: whatever differs between families is a field here, and each field's comment is its
documentation.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
from collections.abc import Callable, Mapping
from typing import Any

from jaxaccel.models.weights import SourceLayout, WeightRule

TASKS = ("embed", "generate", "classify")
# What the text families' preprocessing reads: copied into the checkpoint when the source has it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# A chat model's template, kept beside its tokenizer: transformers 5 writes it as its own file
# (older checkpoints keep it inside tokenizer_config.json).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
DECODER_FILES = TOKENIZER_FILES + CHAT_TEMPLATE_FILES


@dataclasses.dataclass(frozen=True)
class ActivationShape:
    """What an activation-memory estimate is asked about: the run's rows and tokens.

    `split(logical_axis)` is how many shards the layout cuts that logical axis into (1 when
    it is not sharded), so a family can divide exactly the dimensions the rules divide.
    """

    batch: int  # rows (global; divide by split("batch") for one device's share)
    seq: int  # tokens per row; an image classifier: the image side, in pixels
    itemsize: int  # bytes per activation element in the compute dtype
    split: Callable[[str], int]


def no_tied_weights(config) -> list[tuple[str, str]]:
    """A family without tied source tensors."""
    return []


def no_extra_sources(src: pathlib.Path) -> tuple[dict, dict]:
    """A family that reads nothing beyond config.json and the model's safetensors."""
    return {}, {}


def _frozen(mapping: Mapping) -> Mapping:
    return types.MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity
class FamilySpec:
    """One model family, as the registry hands it out (`jaxaccel.models.family_spec`)."""

    # The registry key, recorded as a checkpoint manifest's "family".
    name: str
    # What its checkpoints run for: "embed" (encoders), "generate" (decoders), "classify".
    task: str
    # Hugging Face config.json `model_type`s this family converts (`--family auto`).
    hf_model_types: tuple[str, ...]
    # Frozen dataclass: `from_hf(dict)` parses config.json (ValueError/KeyError/TypeError for
    # what it cannot hold); `num_layers`, `max_length` (the hard input limit: tokens, or an
    # image's side) and `default_length` (where inputs are truncated unless asked otherwise).
    # The manifest stores `dataclasses.asdict(config)`; `jaxaccel.models.config_from_dict`
    # rebuilds it. Per task the runtime reads more: generate: vocab_size, num_kv_heads,
    # head_dim, eos_token_id; embed: pad_token_id, embedding_dim; classify: labels,
    # num_labels, num_channels, image_size and the image fields `inputs.images` reads.
    config: type
    # Model(config, dtype=, rngs=[, head_copy=True]): a Flax NNX module whose parameters carry
    # logical axes (`layers.make_param`); `head_copy` only for a family with a `tied_head`.
    model: Callable[..., Any]
    # config -> the WeightRules mapping Hugging Face tensor names onto the parameters.
    weight_rules: Callable[[Any], list[WeightRule]]
    # (config, ActivationShape) -> rough peak activation bytes on one device of the forward
    # the runtime compiles (prefill for decoders), for when XLA cannot be asked.
    activation_bytes: Callable[[Any, ActivationShape], int]
    # Prefixes a source may put before every tensor name ("" for none), tried in order,
    # e.g. BertFor* heads' "bert.".
    source_prefixes: tuple[str, ...] = ("",)
    # (new suffix, legacy suffix) spellings of tensor names, e.g. TF-era LayerNorm.gamma.
    source_aliases: tuple[tuple[str, str], ...] = ()
    # Regexes (searched after a prefix is removed) of source tensors the model does not use;
    # any other unused tensor is a convert error.
    ignored_source_weights: tuple[str, ...] = ()
    # config -> [(redundant source tensor, canonical source tensor)]: a tied head the source
    # still ships, which must equal the tensor it is tied to.
    tied_weights: Callable[[Any], list[tuple[str, str]]] = no_tied_weights
    # Foreign checkpoint layouts besides Hugging Face's, by `--layout` name.
    source_layouts: Mapping[str, SourceLayout] = dataclasses.field(default_factory=dict)
    # Files beside config.json that `read_extra_sources` reads (image processor,
    # sentence-transformers pipeline), and the preprocessing files the runtime reads from the
    # checkpoint, copied there by the converter when the source has them (tokenizer).
    metadata_files: tuple[str, ...] = ()
    preprocessing_files: tuple[str, ...] = ()
    # src directory -> (config values merged over config.json, {extra safetensors file:
    # name prefix}); ConvertError naming the file for what the family cannot use.
    read_extra_sources: Callable[[pathlib.Path], tuple[dict, dict]] = no_extra_sources
    # Weight-only quantization (`jaxaccel.models.quantization`): matmul weight (dotted
    # parameter name) -> its contraction axes in the unstacked shape.
    quantized_weights: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # The LM head [v, d] the same way, quantized only with a "+head" scheme.
    quantized_head: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # (head, embedding table): with `tie_word_embeddings` the table is the head; quantized,
    # the head becomes a copy of the table (Model(..., head_copy=True)) and the lookup keeps
    # the table in the compute dtype.
    tied_head: tuple[str, str] | None = None
    # Facts the converter records in the manifest's "source" (e.g. folded batch norms).
    conversion_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"family {self.name!r}: task {self.task!r} is not one of {TASKS}")
        if not self.hf_model_types:
            raise ValueError(f"family {self.name!r}: no Hugging Face model_type")
        if not dataclasses.is_dataclass(self.config) or not hasattr(self.config, "from_hf"):
            raise ValueError(f"family {self.name!r}: config must be a dataclass with from_hf")
        # Mappings are stored read-only: a spec is shared by every caller.
        for name in ("source_layouts", "quantized_weights", "quantized_head",
                     "conversion_notes"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
