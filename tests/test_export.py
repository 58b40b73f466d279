"""The programs jaxaccel runs on GPUs and TPUs are plain XLA, with the shardings asked for.

There is no GPU or TPU here, but `jax.export` lowers a jitted function for another platform on
a CPU-only machine. Each program is built as the runtime builds it for that platform (the
backend chosen by platform, `jaxaccel.backends.for_platform`), on a `data=2,model=4` mesh of
simulated devices, and its StableHLO is checked for what only the CPU backend may add: custom
calls (the packed-weight kernel), bf16 weights or caches reinterpreted as uint16, and
`optimization_barrier`s. The CPU program of the same model is checked to have them, so the
test can tell the two apart.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from jaxaccel import models
from jaxaccel.runtime.embed import Embedder
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup.loader import plan_model
from jaxaccel.models.state import abstract_model
from jaxaccel.parallel.params import fill_state, param_specs
from jaxaccel.runtime.programs import place_param
from jaxaccel.runtime.sampling import GREEDY
from jaxaccel.parallel.sharding import Layout

MESH = "data=2,model=4"
PLATFORMS = ("cuda", "tpu")
CPU_ONLY = ("custom_call", "ui16", "optimization_barrier")

GPT2 = models.family_spec("gpt2").config(
    vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
    max_position_embeddings=128, eos_token_id=3)
LLAMA = models.family_spec("llama").config(
    vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
    intermediate_size=128, head_dim=8, max_position_embeddings=128, eos_token_id=3)


def exported_text(jitted, args, platform: str) -> str:
    return jax.export.export(jitted, platforms=[platform])(*args).mlir_module()


def assert_plain_and_sharded(text: str):
    for op in CPU_ONLY:
        assert op not in text, f"{op} in a GPU/TPU program"
    arg_shardings = re.findall(r'sdy\.sharding<@\w+, \[([^\]]*)\]>', text)
    assert any('"model"' in s for s in arg_shardings), "no tensor-parallel sharding"
    assert any('"data"' in s for s in arg_shardings), "no batch sharding"


def sharded_abstract_state(family, config, layout, dtype=jnp.bfloat16):
    graphdef, abstract = abstract_model(family, config, dtype)
    structs = {}
    for name, spec in param_specs(abstract).items():
        shape, sharding = place_param(spec.axes, spec.shape, layout)
        structs[name] = jax.ShapeDtypeStruct(shape, spec.dtype, sharding=sharding)
    return graphdef, fill_state(abstract, structs)


def decoder_programs(family, config, platform, layout):
    graphdef, state = sharded_abstract_state(family, config, layout)
    gen = Generator(graphdef, state, config, layout, dtype=jnp.bfloat16, platform=platform)
    b, t, slots = gen.shapes([5, 9, 3, 7], 16)
    prefill = gen.prefill_program(GREEDY, b, t, slots)
    yield "prefill", prefill.jitted, gen.abstract_prefill_args(b, t)
    for loop in ("device", "host"):
        decode = gen.decode_program(GREEDY, loop, b, t, slots)
        yield f"decode ({loop} loop)", decode.jitted, gen.abstract_decode_args(
            GREEDY, loop, b, t, slots)


@pytest.fixture(scope="module")
def layout():
    return Layout.create(MESH, "dp_tp")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bert_embed_is_plain_xla(minilm_ckpt, layout, platform):
    plan = plan_model(minilm_ckpt, layout, "bfloat16")
    embedder = Embedder(plan, batch_size=8, platform=platform)
    text = exported_text(embedder.forward.jitted, embedder.abstract_args((8, 32)), platform)
    assert_plain_and_sharded(text)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("family,config", [("gpt2", GPT2), ("llama", LLAMA)], ids=["gpt2", "llama"])
def test_decoder_prefill_and_decode_are_plain_xla(layout, family, config, platform):
    for name, jitted, args in decoder_programs(family, config, platform, layout):
        try:
            assert_plain_and_sharded(exported_text(jitted, args, platform))
        except AssertionError as err:
            raise AssertionError(f"{family} {name} for {platform}: {err}") from None


def test_the_cpu_programs_do_carry_the_cpu_workarounds():
    """The same decode step built for the CPU (one device, bf16: the packed kernel, and uint16
    carriers where the jax version needs them): the checks above would catch them."""
    from jaxaccel.backends import cpu

    one = Layout.create("data=1,model=1", "replicated")
    config = dataclasses.replace(LLAMA, num_kv_heads=8)
    graphdef, state = sharded_abstract_state("llama", config, one)
    gen = Generator(graphdef, state, config, one, dtype=jnp.bfloat16, platform="cpu")
    b, t, slots = gen.shapes([5], 8)
    jitted = gen.decode_program(GREEDY, "host", b, t, slots).jitted
    args = gen.abstract_decode_args(GREEDY, "host", b, t, slots)
    text = jitted.lower(*args).as_text()
    assert gen.packed_weights and "custom_call" in text and "ui16" in text  # packed lines
    assert (args[1].k_lbksh.dtype == jnp.uint16) == cpu.CARRIERS  # the cache's storage


def quantized_abstract_state(family, config, layout, scheme="int8"):
    """The sharded abstract state of a quantize-on-load run (`jaxaccel.models.quantization`);
    `scheme` a label ("int8+head": a tied head as its own quantized copy of the table)."""
    from jaxaccel.models import quantization
    from jaxaccel.runtime.programs import quantized_param_spec

    family_spec, scheme = models.family_spec(family), quantization.Scheme.from_label(scheme)
    copies = quantization.tied_head(family_spec, config, scheme)
    graphdef, abstract = abstract_model(family, config, jnp.bfloat16, head_copy=bool(copies))
    abstract, specs = quantization.quantize_abstract(abstract, family_spec, scheme)
    structs = {}
    for name, spec in param_specs(abstract).items():
        weight, _, part = name.rpartition(".")
        if weight not in specs:
            shape, sharding = place_param(spec.axes, spec.shape, layout)
        else:  # values and scales: the scales' shape is the values' divided by the tiles
            tiles = specs[weight].tiles
            values_shape = tuple(d * (t if part == "scales" else 1) for d, t in zip(spec.shape, tiles))
            held, values, scales = quantized_param_spec(spec.axes, values_shape, tiles, layout)
            shape = held if part == "values" else specs[weight].scale_shape(held)
            sharding = jax.sharding.NamedSharding(layout.mesh, values if part == "values" else scales)
        structs[name] = jax.ShapeDtypeStruct(shape, spec.dtype, sharding=sharding)
    return graphdef, fill_state(abstract, structs)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("family,config", [("gpt2", GPT2), ("llama", LLAMA)], ids=["gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["int8", "int8+head"])
def test_int8_decode_step_is_plain_xla(layout, family, config, platform, scheme):
    """Weight-only int8 (qwix QArray weights, `Backend.quantized_matmul`): the decode step for
    GPU/TPU reads int8 weights, with no CPU-only op, and keeps its shardings. With the head
    (tied, Llama too): the logits read an int8 [vocab, d] copy of the table."""
    if scheme.endswith("+head"):
        config = dataclasses.replace(config, tie_word_embeddings=True)
    graphdef, state = quantized_abstract_state(family, config, layout, scheme)
    gen = Generator(graphdef, state, config, layout, dtype=jnp.bfloat16, platform=platform)
    b, t, slots = gen.shapes([5, 9, 3, 7], 16)
    jitted = gen.decode_program(GREEDY, "device", b, t, slots).jitted
    text = exported_text(jitted, gen.abstract_decode_args(GREEDY, "device", b, t, slots), platform)
    assert_plain_and_sharded(text)
    assert re.search(r"%arg\d+: tensor<2x64x\d+x\d+xi8>", text), "no int8 weights among the inputs"
    head = re.search(rf"%arg\d+: tensor<{config.vocab_size}x64xi8> [^%]*lm_head_vd[^%]*", text)
    assert (head is not None) == scheme.endswith("+head"), "the int8 head copy"
    if head is not None:  # split over `model` along the vocabulary, like the table
        assert '[{"model"}, {}]' in head.group(0), head.group(0)


def test_fp8_decode_step_lowers_for_cuda(layout):
    """fp8 (e4m3) weights: refused on the CPU, lowered here for `cuda` as plain XLA."""
    graphdef, state = quantized_abstract_state("llama", LLAMA, layout, "fp8")
    gen = Generator(graphdef, state, LLAMA, layout, dtype=jnp.bfloat16, platform="cuda")
    b, t, slots = gen.shapes([5, 9], 16)
    jitted = gen.decode_program(GREEDY, "device", b, t, slots).jitted
    text = exported_text(jitted, gen.abstract_decode_args(GREEDY, "device", b, t, slots), "cuda")
    assert_plain_and_sharded(text)
    assert re.search(r"%arg\d+: tensor<2x64x\d+x\d+xf8E4M3FN>", text)
