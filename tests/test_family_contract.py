"""The family contract (`jaxaccel.models.family.FamilySpec`).

* Every registered family's spec is complete and well typed: each field holds what its type
  says, its weight rules cover exactly the model's parameters, its quantized weights are
  matmul weights of the model, and its config survives the manifest's JSON.
* A toy family defined here, registered through the public registry, converts from a Hugging
  Face-style directory, plans and restores, although no code outside `jaxaccel/models`
  knows its name: all of that reads the spec.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import types
import typing

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxaccel import models
from jaxaccel.conversion import hf
from jaxaccel.models import layers
from jaxaccel.models.family import ActivationShape, FamilySpec
from jaxaccel.models.state import abstract_model
from jaxaccel.parallel.params import flat_arrays, param_specs
from jaxaccel.models.weights import SourceLayout, WeightRule, transpose_to
from jaxaccel.parallel import sharding as ax

# A small Hugging Face config per registered family: a new family adds one here, and then
# gets every check below.
SMALL_HF = {
    "bert": {"model_type": "bert", "vocab_size": 31, "hidden_size": 12, "num_hidden_layers": 2,
             "num_attention_heads": 3, "intermediate_size": 17},
    "gpt2": {"model_type": "gpt2", "vocab_size": 31, "n_embd": 12, "n_layer": 2, "n_head": 3,
             "n_positions": 19},
    "llama": {"model_type": "qwen2", "vocab_size": 31, "hidden_size": 12,
              "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
              "intermediate_size": 17, "tie_word_embeddings": True},
    "gemma2": {"model_type": "gemma2", "vocab_size": 31, "hidden_size": 12, "head_dim": 5,
               "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
               "intermediate_size": 17, "sliding_window": 4},
    "gemma3": {"model_type": "gemma3_text", "vocab_size": 31, "hidden_size": 12, "head_dim": 5,
               "num_hidden_layers": 7, "num_attention_heads": 6, "num_key_value_heads": 2,
               "intermediate_size": 17, "sliding_window": 4,
               "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 1e4}}},
    "phi3": {"model_type": "phi3", "vocab_size": 31, "hidden_size": 12,
             "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
             "intermediate_size": 17, "partial_rotary_factor": 0.5},
    "qwen3": {"model_type": "qwen3", "vocab_size": 31, "hidden_size": 12, "head_dim": 5,
              "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
              "intermediate_size": 17},
    "mixtral": {"model_type": "mixtral", "vocab_size": 31, "hidden_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
                "intermediate_size": 17, "num_local_experts": 3, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "vocab_size": 31, "hidden_size": 12,
                  "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
                  "intermediate_size": 17, "moe_intermediate_size": 7, "num_experts": 5,
                  "num_experts_per_tok": 3, "shared_expert_intermediate_size": 9,
                  "mlp_only_layers": [1]},
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 31, "hidden_size": 12, "head_dim": 5,
                  "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
                  "intermediate_size": 17, "moe_intermediate_size": 7, "num_experts": 5,
                  "num_experts_per_tok": 1, "decoder_sparse_step": 2},
    "resnet": {"model_type": "resnet", "hidden_sizes": [8, 12], "depths": [1, 2],
               "layer_type": "bottleneck", "embedding_size": 4, "num_labels": 3},
}


def matches(value, hint) -> bool:
    """Whether `value` is of the (simple) type `hint` that a FamilySpec field declares."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (types.UnionType, typing.Union):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is collections.abc.Callable:
        return callable(value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
    if origin is collections.abc.Mapping:
        return isinstance(value, collections.abc.Mapping) and all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def test_the_type_check_catches_wrong_types():
    assert matches(("a", "b"), tuple[str, ...]) and not matches(["a"], tuple[str, ...])
    assert matches({"w": (0, 1)}, collections.abc.Mapping[str, tuple[int, ...]])
    assert not matches({"w": (0, "1")}, collections.abc.Mapping[str, tuple[int, ...]])
    assert matches(None, tuple[str, str] | None) and not matches(("a",), tuple[str, str] | None)


@pytest.mark.parametrize("family", models.known_families())
def test_spec_fields_have_their_declared_types(family):
    spec = models.family_spec(family)
    assert isinstance(spec, FamilySpec) and spec.name == family
    hints = typing.get_type_hints(FamilySpec)
    for field in dataclasses.fields(FamilySpec):
        value = getattr(spec, field.name)
        assert matches(value, hints[field.name]), (family, field.name, value)
    assert spec.task in models.TASKS
    assert all(models.family_for_model_type(t) == family for t in spec.hf_model_types)


def test_every_family_has_a_small_config_here():
    assert set(SMALL_HF) == set(models.known_families())


def _config(family):
    return models.family_spec(family).config.from_hf(SMALL_HF[family])


@pytest.mark.parametrize("family", sorted(SMALL_HF))
def test_config_survives_the_manifest(family):
    config = _config(family)
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    assert models.config_from_dict(family, values) == config
    for name in ("num_layers", "max_length", "default_length"):
        assert isinstance(getattr(config, name), int) and getattr(config, name) > 0, name


@pytest.mark.parametrize("family", sorted(SMALL_HF))
def test_weight_rules_cover_exactly_the_parameters(family):
    spec, config = models.family_spec(family), _config(family)
    params = set(param_specs(abstract_model(family, config)[1]))
    layouts = [spec.weight_rules] + [layout.weight_rules for layout in spec.source_layouts.values()]
    for rules in layouts:
        targets = [rule.target for rule in rules(config)]
        assert len(targets) == len(set(targets)) and set(targets) == params
    for copy, canonical in spec.tied_weights(config):
        assert canonical in {r.source for r in spec.weight_rules(config)}


@pytest.mark.parametrize("family", sorted(SMALL_HF))
def test_quantized_weights_are_matmul_weights_of_the_model(family):
    spec, config = models.family_spec(family), _config(family)
    copy = spec.tied_head is not None
    shapes = param_specs(abstract_model(family, config, head_copy=copy)[1])
    for name, axes in {**spec.quantized_weights, **spec.quantized_head}.items():
        rank = len(shapes[name].shape) - (shapes[name].axes[:1] == (ax.LAYERS,))
        assert rank >= 2 and all(0 <= a < rank for a in axes), (name, axes)
    if copy:
        head, table = spec.tied_head
        assert head in spec.quantized_head and shapes[head].shape == shapes[table].shape


@pytest.mark.parametrize("family", sorted(SMALL_HF))
def test_activation_estimate_grows_with_the_batch_and_shrinks_when_split(family):
    spec, config = models.family_spec(family), _config(family)
    seq = min(16, config.max_length)

    def estimate(batch, shards):
        shape = ActivationShape(batch=batch, seq=seq, itemsize=4,
                                split=lambda logical: shards if logical == ax.BATCH else 1)
        return spec.activation_bytes(config, shape)

    one = estimate(4, 1)
    assert isinstance(one, int) and one > 0
    assert estimate(8, 1) > one and estimate(4, 4) < one


@pytest.mark.parametrize("family", sorted(SMALL_HF))
def test_extra_sources_come_from_the_declared_metadata_files(family, tmp_path):
    """Without its metadata files a source gives no extra config values or weight files,
    whatever else lies beside config.json."""
    spec = models.family_spec(family)
    (tmp_path / "config.json").write_text(json.dumps(SMALL_HF[family]))
    for name in ("preprocessor_config.json", "modules.json", "sentence_bert_config.json"):
        if name not in spec.metadata_files:
            (tmp_path / name).write_text("{}")
    assert spec.read_extra_sources(tmp_path) == ({}, {})


# ------------------------------------------------------------------ a toy family


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_length: int = 8

    @property
    def default_length(self) -> int:
        return self.max_length

    @classmethod
    def from_hf(cls, raw: dict) -> ToyConfig:
        return cls(vocab_size=raw["toy_vocab"], hidden_size=raw["toy_width"],
                   num_layers=raw["toy_depth"])


class ToyBlocks(nnx.Module):
    def __init__(self, cfg: ToyConfig, *, dtype, rngs, num_layers):
        d = cfg.hidden_size
        self.w_dd = layers.make_param(rngs, (d, d), (ax.EMBED, ax.MLP), dtype,
                                      num_layers=num_layers)


class ToyModel(nnx.Module):
    def __init__(self, cfg: ToyConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.token_vd = layers.make_param(rngs, (cfg.vocab_size, cfg.hidden_size),
                                          (ax.VOCAB, ax.EMBED), dtype)
        self.blocks = ToyBlocks(cfg, dtype=dtype, rngs=rngs, num_layers=cfg.num_layers)


def toy_rules(cfg: ToyConfig) -> list[WeightRule]:
    return [WeightRule("token_vd", "emb.weight"),
            WeightRule("blocks.w_dd", "layers.{i}.dense.weight", transpose_to)]


def toy_activations(cfg: ToyConfig, shape: ActivationShape) -> int:
    return math.ceil(shape.batch / shape.split(ax.BATCH)) * shape.seq * cfg.hidden_size * 7


TOY = FamilySpec(
    name="toyfam", task="embed", hf_model_types=("toy-lm",), config=ToyConfig, model=ToyModel,
    weight_rules=toy_rules, activation_bytes=toy_activations, source_prefixes=("", "toy."),
    ignored_source_weights=(r"^unused\.",), preprocessing_files=("toy_vocab.txt",),
    quantized_weights={"blocks.w_dd": (0,)}, conversion_notes={"toy": "made in a test"})


@pytest.fixture
def toy_registered(monkeypatch):
    """The registry with the toy family added (restored afterwards)."""
    monkeypatch.setattr(models, "_FAMILIES", dict(models._FAMILIES))
    models.register_spec(TOY)
    return TOY


@pytest.fixture
def toy_source(tmp_path):
    """A Hugging Face-style directory of the toy: config.json, safetensors with a prefix and
    one ignored tensor, and its preprocessing file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(
        {"model_type": "toy-lm", "toy_vocab": 11, "toy_width": 6, "toy_depth": 3}))
    rng = np.random.default_rng(0)
    tensors = {"toy.emb.weight": rng.standard_normal((11, 6)).astype(np.float32),
               "unused.scale": np.ones(2, np.float32)}
    for i in range(3):
        tensors[f"toy.layers.{i}.dense.weight"] = rng.standard_normal((6, 6)).astype(np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    (src / "toy_vocab.txt").write_text("a\nb\n")
    return src, tensors


def test_the_spec_checks_itself():
    with pytest.raises(ValueError, match="task"):
        dataclasses.replace(TOY, task="dance")
    with pytest.raises(ValueError, match="model_type"):
        dataclasses.replace(TOY, hf_model_types=())


def test_a_toy_family_goes_through_the_registry(toy_registered):
    assert "toyfam" in models.known_families()
    assert models.family_for_model_type("toy-lm") == "toyfam"
    assert models.task("toyfam") == "embed" and "toyfam" in models.families_for("embed")
    config = models.config_from_dict("toyfam", {"vocab_size": 5, "hidden_size": 4,
                                                "num_layers": 2})
    assert config == ToyConfig(5, 4, 2)
    _, state = abstract_model("toyfam", config)
    assert param_specs(state)["blocks.w_dd"].shape == (2, 4, 4)


def test_a_toy_family_converts_plans_and_restores(toy_registered, toy_source, tmp_path):
    from jaxaccel.startup import planner
    from jaxaccel.startup.loader import load_model

    src, tensors = toy_source
    manifest = hf.convert(src, tmp_path / "ckpt")
    assert manifest.family == "toyfam" and manifest.source["toy"] == "made in a test"
    assert manifest.source["ignored_tensors"] == ["unused.scale"]
    assert (tmp_path / "ckpt" / "toy_vocab.txt").read_text() == "a\nb\n"

    plan = planner.plan(tmp_path / "ckpt", batch=2, seq=8, compile_activations=False)
    assert (plan.activation_source, plan.activation_bytes) == ("formula", 2 * 8 * 6 * 7)

    arrays = flat_arrays(load_model(tmp_path / "ckpt").state)
    np.testing.assert_array_equal(np.asarray(arrays["token_vd"]), tensors["toy.emb.weight"])
    expected = np.stack([tensors[f"toy.layers.{i}.dense.weight"].T for i in range(3)])
    np.testing.assert_array_equal(np.asarray(arrays["blocks.w_dd"]), expected)


def test_a_toy_family_quantizes_its_declared_weights(toy_registered):
    from jaxaccel.models import quantization

    _, state = abstract_model("toyfam", ToyConfig(5, 8, 2))
    _, specs = quantization.quantize_abstract(state, TOY, quantization.Scheme.parse("int8"))
    assert set(specs) == {"blocks.w_dd"}


def test_source_layouts_are_read_only():
    spec = models.family_spec(models.known_families()[0])
    with pytest.raises(TypeError):
        spec.quantized_weights["x"] = (0,)
    assert all(isinstance(v, SourceLayout) for f in models.known_families()
               for v in models.family_spec(f).source_layouts.values())


def test_no_code_reads_a_family_module_attribute():
    """The attributes the spec replaced are gone, and outside `jaxaccel/models` nothing
    reaches into a family's module (its `SPEC` comes from the registry)."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    old = (r"\b(family_module|HF_MODEL_TYPES|SOURCE_PREFIXES|SOURCE_ALIASES|SOURCE_LAYOUTS|"
           r"IGNORED_SOURCE_WEIGHTS|QUANTIZED_WEIGHTS|QUANTIZED_HEAD|TIED_HEAD|CONVERSION_NOTES)\b")
    found = subprocess.run(["git", "grep", "-nE", old, "--", "jaxaccel"], cwd=root,
                           capture_output=True, text=True)
    assert found.stdout == "", found.stdout
    found = subprocess.run(["git", "grep", "-nE", r"\.SPEC\b", "--", "jaxaccel",
                            ":!jaxaccel/models"], cwd=root, capture_output=True, text=True)
    assert found.stdout == "", found.stdout
