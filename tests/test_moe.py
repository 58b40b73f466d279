"""Mixture-of-experts families against transformers, on one device and on expert meshes:
Mixtral (4 experts, top-2), Qwen2-MoE (6 experts, top-3, a shared expert, a dense layer via
`mlp_only_layers`) and Qwen3-MoE (7 experts, top-1, q/k norms, dense layers via
`decoder_sparse_step`). Odd sizes; expert counts that the meshes divide (4 on expert=4 and
expert=2; 6 on expert=2) and do not (6 on expert=4, 7 anywhere: replicated experts).

Each case is converted once (module fixture) and restored with the loader onto each mesh of
8 simulated devices; the reference is transformers' own eager expert loop.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_reference import FAST_COMPILE, save_hf

from jaxaccel.conversion.hf import convert
from jaxaccel.models import moe
from jaxaccel.parallel.sharding import Layout
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup.loader import load_model

BASE = dict(vocab_size=101, hidden_size=44, head_dim=10, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=160, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
# case -> (config class, model class, family, overrides)
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "mixtral",
                dict(num_hidden_layers=2, intermediate_size=26, num_local_experts=4,
                     num_experts_per_tok=2, sliding_window=7)),  # prompts + 64 steps pass it
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2_moe",
                  dict(num_hidden_layers=3, intermediate_size=37, moe_intermediate_size=19,
                       shared_expert_intermediate_size=23, num_experts=6,
                       num_experts_per_tok=3, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3_moe",
                  dict(num_hidden_layers=3, intermediate_size=37, moe_intermediate_size=19,
                       num_experts=7, num_experts_per_tok=1, decoder_sparse_step=2,
                       norm_topk_prob=True)),
}
MESHES = {"1": (None, None), "expert=4": ("expert=4", "ep"),
          "data=2,expert=4": ("data=2,expert=4", "dp_ep"),
          "model=2,expert=2": ("model=2,expert=2", "tp_ep")}
PROMPTS = [[5, 7, 9, 11, 3], [8], list(range(10, 100, 4))]
STEPS = 64


def build_hf(case: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, _, overrides = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**BASE, **overrides)
    config._experts_implementation = "eager"  # the per-expert loop (grouped_mm wants aligned sizes)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial norms, peaked router distributions
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def reference(hf):
    """Last-position logits and 64 greedy tokens of every prompt, from transformers."""
    import torch

    logits, tokens = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            logits.append(hf(torch.tensor([prompt])).logits[0, -1].numpy())
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            tokens.append(out[0, len(prompt):].tolist())
    return logits, tokens


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, float32 checkpoint, reference logits, reference tokens), built once."""
    hf = build_hf(request.param)
    root = tmp_path_factory.mktemp(request.param)
    convert(save_hf(hf, root / "hf"), root / "ckpt")
    return (request.param, root / "ckpt", *reference(hf))


def generator(ckpt, mesh=None, rules=None, quantize=None):
    layout = Layout.create(mesh, rules) if mesh else None
    loaded = load_model(ckpt, layout, quantize=quantize)
    return Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                     dtype=loaded.dtype, compiler_options=FAST_COMPILE), loaded


# By default: Mixtral on one device, with its experts split 4 ways (`expert=4`) and split 2
# ways with each expert's mlp (26) split over `model` (`tp_ep`: a psum over both axes);
# Qwen2-MoE's 6 experts on `data=2,expert=4` (not divisible: replicated); Qwen3-MoE on one
# device. Every other pairing is opt-in (JAXACCEL_SLOW=1).
FAST = {("mixtral", "1"), ("mixtral", "expert=4"), ("mixtral", "model=2,expert=2"),
        ("qwen2_moe", "data=2,expert=4"), ("qwen3_moe", "1")}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_fp32_logits_and_64_greedy_tokens_match_transformers(case, mesh):
    name, ckpt, ref_logits, ref_tokens = case
    if (name, mesh) not in FAST and not os.environ.get("JAXACCEL_SLOW"):
        pytest.skip("opt-in pairing: JAXACCEL_SLOW=1")
    gen, loaded = generator(ckpt, *MESHES[mesh])
    assert json.loads((ckpt / "jaxaccel.json").read_text())["family"] == CASES[name][2]
    for logits, ref in zip(gen.last_logits(PROMPTS), ref_logits):
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert gen.generate(PROMPTS, STEPS) == ref_tokens


def test_grouped_experts_equal_a_dense_all_experts_reference():
    """`moe.local_experts` (sorted pairs, ragged_dot) against every expert run on every token
    in numpy, masked to the chosen ones; also a device's share (first_expert, 3 of 7)."""
    rng = np.random.default_rng(0)
    m, d, f, e, k = 13, 6, 5, 7, 3
    y = rng.normal(size=(m, d)).astype(np.float32)
    w = [rng.normal(size=s).astype(np.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    experts = np.stack([rng.permutation(e)[:k] for _ in range(m)]).astype(np.int32)
    weights = rng.uniform(size=(m, k)).astype(np.float32)
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    every = np.einsum("mef,efd->med", silu(np.einsum("md,edf->mef", y, w[0]))
                      * np.einsum("md,edf->mef", y, w[1]), w[2])  # [m, e, d]
    for first, held in ((0, e), (2, 3)):
        mine = (experts >= first) & (experts < first + held)
        ref = np.einsum("mk,mkd->md", np.where(mine, weights, 0),
                        np.take_along_axis(every, experts[..., None], axis=1))
        ours = moe.local_experts(jnp.asarray(y), jnp.asarray(weights), jnp.asarray(experts),
                                 tuple(jnp.asarray(a[first:first + held]) for a in w), "silu",
                                 first)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh", ["data=2,expert=4", "model=2,expert=2"])
def test_both_dispatches_equal_a_dense_all_experts_reference(mesh):
    """`moe.dispatch` on an expert mesh, replicated tokens + psum and the all-to-all of
    (token, slot) pairs (10 tokens per data shard: not a multiple of the 4 expert devices'
    slices; on model=2,expert=2 each expert's mlp is split too), against
    every expert run on every token in numpy, masked to the chosen ones."""
    from jaxaccel.parallel import sharding as ax

    rng = np.random.default_rng(1)
    b, t, d, f, e, k = 4, 5, 16, 12, 8, 3
    y = rng.normal(size=(b, t, d)).astype(np.float32)
    w = [rng.normal(size=s).astype(np.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    experts = np.stack([rng.permutation(e)[:k] for _ in range(b * t)]).reshape(b, t, k)
    weights = rng.uniform(size=(b, t, k)).astype(np.float32)
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    every = np.einsum("btef,efd->bted", silu(np.einsum("btd,edf->btef", y, w[0]))
                      * np.einsum("btd,edf->btef", y, w[1]), w[2])
    ref = np.einsum("btk,btkd->btd", weights,
                    np.take_along_axis(every, experts[..., None], axis=2))
    layout = Layout.create(mesh, MESHES[mesh][1])
    args = (jnp.asarray(y), jnp.asarray(weights), jnp.asarray(experts, jnp.int32),
            tuple(map(jnp.asarray, w)))
    for strategy in ("psum", "all_to_all"):
        moe.dispatch_strategy(strategy)
        try:
            with ax.use_layout(layout):
                out = jax.jit(lambda *a: moe.dispatch(*a, "silu")).lower(*args).compile(
                    FAST_COMPILE)(*args)
        finally:
            moe.dispatch_strategy(None)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=strategy)


def test_int8_quantize_on_load_scales_each_expert_per_channel(case):
    """Weight-only int8 of the experts: one scale per expert and output channel; the logits
    stay close to the float32 reference, on one device and on `expert=4`."""
    name, ckpt, ref_logits, _ = case
    if name != "mixtral":
        pytest.skip("one family suffices")
    for mesh in ("1", "expert=4"):
        gen, loaded = generator(ckpt, *MESHES[mesh], quantize="int8")
        wg = loaded.state["blocks"]["moe"]["wg_edf"].get_value()
        layers, e, d, f = wg.qvalue.shape
        assert wg.qvalue.dtype == jnp.int8 and wg.scale.shape == (layers, e, 1, f)
        for logits, ref in zip(gen.last_logits(PROMPTS), ref_logits):
            assert np.abs(logits - ref).max() <= 0.03 * np.abs(ref).max()


def test_bf16_logits_close_to_the_fp32_reference(case):
    """bfloat16 on one CPU device (the packed-weight decode path for the attention, the CPU
    grouped matmul for the experts): logits within 3% of their range."""
    name, ckpt, ref_logits, _ = case
    if name != "qwen3_moe":
        pytest.skip("one family suffices")
    loaded = load_model(ckpt, None, "bfloat16")
    gen = Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                    dtype=loaded.dtype, compiler_options=FAST_COMPILE)
    for logits, ref in zip(gen.last_logits(PROMPTS), ref_logits):
        assert np.abs(logits - ref).max() <= 0.03 * np.abs(ref).max()


def test_engine_serves_a_moe_model(case):
    """One greedy request through the continuous-batching engine (paged KV cache)."""
    from jaxaccel.engine.engine import LLMEngine
    from jaxaccel.engine.requests import Request, SamplingParams

    name, ckpt, _, ref_tokens = case
    if name != "qwen2_moe":
        pytest.skip("one family suffices")
    gen, _ = generator(ckpt)
    out = LLMEngine(gen, page_size=4).generate(
        [Request(0, PROMPTS[2], SamplingParams(max_tokens=16, ignore_eos=True))])
    assert out[0].token_ids == ref_tokens[2][:16]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_decode_step_for_gpu_and_tpu_runs_grouped_experts(platform):
    """The decode step lowered for GPU/TPU on `data=2,expert=4`: the experts run as a ragged
    (grouped) dot inside the expert shard_map, and no dot has the all-experts shape."""
    from test_export import exported_text, sharded_abstract_state

    from jaxaccel import models
    from jaxaccel.runtime.sampling import GREEDY

    config = models.family_spec("mixtral").config(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
        intermediate_size=96, head_dim=8, max_position_embeddings=128, eos_token_id=3,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96)
    layout = Layout.create("data=2,expert=4", "dp_ep")
    graphdef, state = sharded_abstract_state("mixtral", config, layout)
    gen = Generator(graphdef, state, config, layout, dtype=jnp.bfloat16, platform=platform)
    b, t, slots = gen.shapes([5, 9, 3, 7], 16)
    jitted = gen.decode_program(GREEDY, "device", b, t, slots).jitted
    text = exported_text(jitted, gen.abstract_decode_args(GREEDY, "device", b, t, slots),
                         platform)
    assert "custom_call" not in text
    assert 'stablehlo.composite "chlo.ragged_dot"' in text, "no grouped matmul"
    assert '"expert"' in text
    # A decode step's 2 tokens per data shard go by all-to-all (`moe.choose_dispatch`): each
    # of the 4 expert devices sends its slice's (token, slot) pairs (1 token x top-2) to the
    # devices of their experts, so each grouped matmul takes the 4 x 2 rows it may receive
    # against its own 2 of the 8 experts, grouped by 2 sizes: what XLA's TPU and GPU
    # compilers get as a ragged dot (`chlo.ragged_dot`), not a dense all-experts dot.
    assert text.count("stablehlo.all_to_all") == 3  # rows and expert ids there, outputs back
    assert "stablehlo.all_reduce" not in text  # no psum of replicated partial outputs
    operands = re.findall(r'stablehlo.composite "chlo.ragged_dot".*: \((tensor<[^)]*)\)', text)
    assert len(operands) == 3, operands  # gate, up and down, in the scanned layer body
    for types in operands:
        assert re.fullmatch(r"tensor<8x(64|96)xbf16>, tensor<2x(64x96|96x64)xbf16>, "
                            r"tensor<2xi32>", types), types
    # A dense all-experts MLP would contract an [.., 8, 64, 96] or [8, 96, 64] weight (or a
    # per-device [2, ...] one) in a plain dot_general. The composite's own decomposition
    # (`@chlo.ragged_dot.impl*`, for a compiler that does not know the op) is not looked at.
    for function in text.split("func.func")[1:]:
        if function.lstrip().startswith("private @chlo.ragged_dot.impl"):
            continue
        for line in function.splitlines():
            if "dot_general" in line:
                assert not re.search(r"tensor<(\d+x)?[28]x(64x96|96x64)x", line), line


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_transformers_5_fused_experts_convert_to_the_same_arrays(name, tmp_path):
    """transformers 5's own layout (one [e, 2f, d] gate_up tensor per layer, Mixtral's router
    under `mlp.`) converts to exactly the arrays of the published per-expert layout."""
    from safetensors.numpy import load_file

    from jaxaccel.parallel.params import flat_arrays

    hf = build_hf(name)
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert any(k.endswith("experts.gate_up_proj")
               for k in load_file(tmp_path / "fused" / "model.safetensors"))
    arrays = []
    for layout in ("fused", "published"):
        if layout == "published":
            save_hf(hf, tmp_path / layout)
        convert(tmp_path / layout, tmp_path / f"{layout}.ckpt")
        arrays.append(flat_arrays(load_model(tmp_path / f"{layout}.ckpt").state))
    assert arrays[0].keys() == arrays[1].keys()
    for key in arrays[0]:
        np.testing.assert_array_equal(arrays[0][key], arrays[1][key], err_msg=key)


def test_plan_counts_each_devices_experts_and_its_dispatch_buffers():
    """The planner's per-device bytes: a quarter of every expert weight on `expert=4` (the
    router and attention whole), and activation estimates that grow with top-k."""
    import dataclasses

    from jaxaccel import models
    from jaxaccel.models.family import ActivationShape
    from jaxaccel.models.state import abstract_model
    from jaxaccel.parallel import sharding as ax
    from jaxaccel.parallel.params import param_specs
    from jaxaccel.startup.planner import param_bytes

    spec = models.family_spec("mixtral")
    config = spec.config.from_hf({**BASE, "model_type": "mixtral", "num_hidden_layers": 2,
                                  "intermediate_size": 27, "num_local_experts": 8,
                                  "num_experts_per_tok": 2})
    specs = param_specs(abstract_model("mixtral", config)[1])
    sizes = {**{a: 1 for a in ax.MESH_AXES}, "expert": 4}
    held = param_bytes(specs, sizes, ax.resolve_rules("ep"))
    for name, s in specs.items():
        whole = int(np.prod(s.shape)) * 4
        assert held[name] == (whole // 4 if ".moe.w" in name else whole), name
    shape = ActivationShape(batch=8, seq=64, itemsize=2, split=lambda axis: 1)
    top3 = dataclasses.replace(config, num_experts_per_tok=3)
    assert spec.activation_bytes(top3, shape) > spec.activation_bytes(config, shape)


@pytest.mark.parametrize("m,groups", [(3, 8), (13, 5), (300, 6)])
def test_cpu_grouped_matmul_equals_ragged_dot(m, groups):
    """The CPU backend's grouped matmul (gathered rows for decode, tiles for prefill) against
    XLA's ragged_dot, with an empty group and rows past the last group."""
    from jaxaccel.backends.cpu import CpuBackend

    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.normal(size=(m, 9)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(groups, 9, 5)), jnp.float32)
    sizes = rng.multinomial(m - 2, [1 / groups] * groups).astype(np.int32)
    sizes[0], sizes[1] = sizes[0] + sizes[1], 0
    ref = jax.lax.ragged_dot(x, w, jnp.asarray(sizes), preferred_element_type=jnp.float32)
    ours = CpuBackend().grouped_matmul(x, w, jnp.asarray(sizes))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [3, 8])
def test_gpu_grouped_matmul_gathers_the_chosen_experts_of_a_small_step(m):
    """The GPU backend's grouped matmul (plain jax: runs here) against XLA's ragged_dot: with
    fewer rows than groups it indexes the weights by row (no ragged dot, no product with all
    8 groups), with as many it is the ragged dot."""
    from jaxaccel.backends.gpu import GpuBackend

    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.normal(size=(m, 9)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 9, 5)), jnp.float32)
    sizes = jnp.asarray([1, 0, 0, m - 2, 0, 0, 0, 0], jnp.int32)  # the last row: no group
    ref = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    ours = GpuBackend().grouped_matmul(x, w, sizes)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(GpuBackend().grouped_matmul)(x, w, sizes))
    assert ("ragged_dot" in jaxpr) == (m >= 8)
    if m < 8:  # the m rows' weights gathered, nothing shaped by all groups and rows
        assert f"f32[{m},9,5] = gather" in jaxpr, jaxpr
        assert not re.search(rf"f32\[(8,{m}|{m},8),", jaxpr), jaxpr


def test_expert_weights_are_stored_one_chunk_per_expert(tmp_path):
    """Chunks never span two experts, so a device (a process) reading its experts' slices
    reads only their chunks: each device of `expert=4` requests, and is handed, exactly one
    quarter of every expert weight, made of whole chunks."""
    import dataclasses

    from jaxaccel import models
    from jaxaccel.bench import synthetic
    from jaxaccel.checkpoint.manifest import Manifest

    config = models.family_spec("mixtral").config.from_hf({
        **BASE, "model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2})
    synthetic.write(tmp_path / "ckpt", dataclasses.asdict(config), family="mixtral")
    arrays = Manifest.load(tmp_path / "ckpt").arrays
    _, loaded = generator(tmp_path / "ckpt", "expert=4", "ep")
    for weight in ("blocks.moe.wg_edf", "blocks.moe.wu_edf", "blocks.moe.wm_efd"):
        entry = arrays[weight].to_json()
        assert entry["axes"][1] == "experts" and entry["chunk_shape"][1] == 1, entry
        per_device = [n for (array, _), n in loaded.stats.bytes_per_array_device.items()
                      if array == weight]
        assert sorted(per_device) == [entry["nbytes"] // 4] * 4
