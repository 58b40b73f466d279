"""The dense decoder families against transformers: Qwen3 (q/k norms), Gemma 2 (soft caps,
sandwich norms, alternating sliding windows), Gemma 3 text (q/k norms, 5 local : 1 global
with two rotary bases), Phi-3 (fused projections, partial rotary), and real sliding windows
(Mistral, Qwen2), all from tiny random-init models with odd sizes.

Each case is converted once (module fixture) with `jaxaccel.conversion.hf.convert` and
restored with the loader, so the converter's tensor checks and the runtime are exercised
end to end. The prompts are a batch of mixed lengths, the longest beyond the window; greedy
decoding runs 64 steps, well past the window.
"""

import json
import os
import shutil

import numpy as np
import pytest
from decoder_reference import FAST_COMPILE, causal_logits, save_hf

from jaxaccel import models
from jaxaccel.conversion.hf import convert
from jaxaccel.conversion.safetensors_source import ConvertError
from jaxaccel.engine.engine import LLMEngine
from jaxaccel.engine.requests import Request, SamplingParams
from jaxaccel.parallel.sharding import Layout
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup import planner
from jaxaccel.startup.loader import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Odd sizes: hidden 44 with head_dim 10 (not 44 / heads), MLP 67, vocab 101.
BASE = dict(vocab_size=101, hidden_size=44, head_dim=10, intermediate_size=67,
            num_hidden_layers=2, max_position_embeddings=160, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
# case -> (transformers config class name, model class name, family, config overrides)
WINDOW = 7
CASES = {
    # GQA 3 (6 query heads : 2 kv heads), untied head.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3",
              dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=1000.0,
                   tie_word_embeddings=False)),
    # Every layer windowed; GQA 4, untied.
    "mistral_window": ("MistralConfig", "MistralForCausalLM", "llama",
                       dict(num_attention_heads=4, num_key_value_heads=1,
                            sliding_window=WINDOW, tie_word_embeddings=False)),
    # Windows from layer 1 on (max_window_layers); GQA 1, tied, q/k/v biases.
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", "llama",
                     dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                          use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                          tie_word_embeddings=True)),
    # Alternating windowed/global layers (2 periods), both soft caps small enough to bite.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "gemma2",
               dict(num_hidden_layers=4, hidden_size=42, num_attention_heads=6,
                    num_key_value_heads=2,
                    sliding_window=WINDOW, query_pre_attn_scalar=12,
                    attn_logit_softcapping=1.5, final_logit_softcapping=3.0)),
    # 5 windowed : 1 global (7 layers), local rotary base, linear scaling on global; untied.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3",
               dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                    sliding_window=WINDOW, query_pre_attn_scalar=12, rope_theta=5000.0,
                    rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=4.0),
                    tie_word_embeddings=False)),
    # Fused qkv/gate_up, partial rotary (6 of 10 head dims), tied (Phi-4-mini style).
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi3",
             dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.6,
                  tie_word_embeddings=True)),
}
PROMPTS = [[5, 7, 9, 11, 3], [8], list(range(10, 100, 4))]  # lengths 5, 1, 23 (> 3 windows)
STEPS = 64
STREAM = np.random.default_rng(0).integers(3, 101, 96).tolist()  # 96 tokens: > 13 windows


def build_hf(case: str):
    config_cls, model_cls, _, overrides = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**BASE, **overrides})
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, peaked distributions
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def reference_greedy(hf, prompt, steps=STEPS):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def reference_logits(hf, prompt):
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, -1].numpy()


# Opt-in extra runs (JAXACCEL_SLOW=1 pytest -m slow): they repeat a check on more cases.
SLOW = [pytest.mark.slow,
        pytest.mark.skipif(not os.environ.get("JAXACCEL_SLOW"), reason="opt-in: JAXACCEL_SLOW=1")]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, transformers model, float32 jaxaccel checkpoint, transformers' greedy tokens
    per prompt) of one case, built once."""
    hf = build_hf(request.param)
    root = tmp_path_factory.mktemp(request.param)
    convert(save_hf(hf, root / "hf"), root / "ckpt")
    return request.param, hf, root / "ckpt", [reference_greedy(hf, p) for p in PROMPTS]


def chosen(names, everything=CASES):
    """Parameters over `everything`: `names` in the fast set, the rest opt-in (SLOW)."""
    return [pytest.param(n, marks=() if n in names else SLOW) for n in sorted(everything)]


def generator(ckpt, layout=None, dtype=None, quantize=None):
    loaded = load_model(ckpt, layout, dtype, quantize=quantize)
    return Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                     dtype=loaded.dtype, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def fp32(case):
    """The case's float32 Generator on one device, built once (compiles are shared)."""
    return generator(case[2])


def test_family_recorded_and_plan_reports_the_window(case):
    name, hf, ckpt, _ = case
    manifest = json.loads((ckpt / "jaxaccel.json").read_text())
    assert manifest["family"] == CASES[name][2]
    report = planner.plan(ckpt, max_new_tokens=STEPS, compile_activations=False).to_json()
    layers = hf.config.num_hidden_layers
    types = getattr(hf.config, "layer_types", None) or ["sliding_attention"] * layers
    windowed = [t == "sliding_attention" for t in types]  # Mistral: every layer
    if getattr(hf.config, "sliding_window", None) and any(windowed):
        expected = {"window": WINDOW, "windowed_layers": sum(windowed), "layers": len(windowed),
                    "kv_cache_bounded": all(windowed), "note": report["sliding_window"]["note"]}
        if all(windowed):  # pages of 16 tokens: the window's 7 and the query fit in 1 + 1
            kv = hf.config.num_key_value_heads * hf.config.head_dim
            expected.update(pages_per_sequence=2,
                            bytes_per_sequence=2 * 16 * 2 * layers * kv * 4)  # float32 k, v
        assert report["sliding_window"] == expected
    else:
        assert "sliding_window" not in report


def test_fp32_logits_and_64_greedy_tokens_match_transformers(case, fp32):
    """A mixed-length batch (left-padded together): last-position logits within 1e-4 of
    their range, and 64 greedy tokens each (decode far past the window) identical."""
    _, hf, _, expected = case
    for prompt, logits in zip(PROMPTS, fp32.last_logits(PROMPTS)):
        ref = reference_logits(hf, prompt)
        np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert fp32.generate(PROMPTS, STEPS) == expected


def test_engine_pages_and_chunked_prefill_match_transformers(case, fp32):
    """The paged engine (plain-XLA path: pages gathered per layer) with prefill chunks that
    end inside the prompts: windows and soft caps hold there too."""
    name, _, _, expected = case
    if name != "gemma2":
        pytest.skip("one windowed, soft-capped case is enough for the engine's masks")
    engine = LLMEngine(fp32, page_size=32, num_pages=16, max_num_batched_tokens=16,
                       enable_prefix_caching=False)
    requests = [Request(i, p, SamplingParams(max_tokens=STEPS, ignore_eos=True))
                for i, p in enumerate(PROMPTS)]
    assert [out.token_ids for out in engine.generate(requests)] == expected


def test_engine_frees_pages_behind_the_window(case, fp32):
    """Every layer windowed (Mistral, window 7): pages of 4 tokens in a pool of 9 (36 slots,
    fewer than the 87 tokens of the long request alone) run prompts of 23 and 5 tokens 64
    steps past the window with transformers' greedy tokens. Between decode steps a sequence
    holds at most ceil(7 / 4) + 1 = 3 pages; the pool peaks at 6 (the long prompt's last
    chunk, positions 16..22 reading from 10: pages 2..5, beside the short prompt's 2)."""
    name, _, _, expected = case
    if name != "mistral_window":
        pytest.skip("the bound needs every layer windowed")
    engine = LLMEngine(fp32, page_size=4, num_pages=10, max_num_seqs=2,
                       max_num_batched_tokens=16)
    for i, prompt in enumerate((PROMPTS[2], PROMPTS[0])):
        engine.add_request(Request(i, prompt, SamplingParams(max_tokens=STEPS,
                                                             ignore_eos=True)))
    outputs, held = {}, []
    while engine.has_unfinished:
        outputs.update((out.request_id, out.token_ids) for out in engine.step() if out.finished)
        running = engine.scheduler.running
        if running and all(len(seq.tokens) > seq.prompt_len for seq in running):
            held.append(engine.pool.used_count / len(running))
    assert [outputs[0], outputs[1]] == [expected[2], expected[0]]
    assert held and max(held) <= 3
    assert engine.stats()["peak_pages_used"] == 6
    assert engine.pool.used_count == 0 and engine.pool.free_count == 9


@pytest.mark.parametrize("name", chosen({"gemma3"}))
def test_data2_model4_mesh_greedy_matches_transformers(name, tmp_path):
    """8 simulated devices, batch over data=2 and heads over model=4, which divides neither
    gemma3's 1 kv head nor qwen3's 6 query heads."""
    hf = build_hf(name)
    convert(save_hf(hf, tmp_path / "hf"), tmp_path / "ckpt")
    gen = generator(tmp_path / "ckpt", Layout.create("data=2,model=4", "dp_tp"))
    assert gen.generate(PROMPTS, STEPS) == [reference_greedy(hf, p) for p in PROMPTS]


def test_pipeline_stages_keep_the_window_pattern(case):
    """stage=2: each stage scans its own layers' window flags (the pattern is scanned data,
    split with the layer stack): greedy tokens still match."""
    name, _, ckpt, expected = case
    if name != "gemma2":
        pytest.skip("one alternating-window case is enough for the stage split")
    gen = generator(ckpt, Layout.create("stage=2", "pp"))
    assert gen.generate(PROMPTS, 16) == [tokens[:16] for tokens in expected]


def test_bf16_greedy_matches_transformers_up_to_ties(case):
    """bf16 weights and activations: the 64 greedy tokens equal transformers' float32 ones,
    or first differ where float32's two best logits are within bf16's error (a tie)."""
    name, hf, ckpt, expected = case
    if name not in ("gemma2", "qwen3") and not os.environ.get("JAXACCEL_SLOW"):
        pytest.skip("bf16 on the other cases is opt-in: JAXACCEL_SLOW=1")
    gen = generator(ckpt, dtype="bfloat16")
    for prompt, tokens, ref in zip(PROMPTS, gen.generate(PROMPTS, STEPS), expected):
        if tokens == ref:
            continue
        i = next(i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b)
        logits = reference_logits(hf, prompt + ref[:i])
        assert logits[ref[i]] - logits[tokens[i]] <= 0.02 * np.abs(logits).max(), (i, tokens, ref)


def test_int8_quantize_on_load_top1_agrees_with_fp32(case):
    """int8 weights (quantized while restoring): top-1 of a 96-token causal pass agrees with
    transformers' float32 at >= 95% of positions."""
    _, hf, ckpt, _ = case
    loaded = load_model(ckpt, quantize="int8")
    with torch.no_grad():
        reference = hf(torch.tensor([STREAM])).logits[0].numpy()
    int8 = causal_logits(loaded, STREAM)
    assert (int8.argmax(-1) == reference.argmax(-1)).mean() >= 0.95


# ------------------------------------------------------------------ converters


def transformers4_keys(v5: dict) -> dict:
    """A transformers-5 config.json rewritten the way 4.x wrote it: no `layer_types`,
    `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`) instead of
    `rope_parameters`, a top-level `partial_rotary_factor`, `torch_dtype` for `dtype`."""
    old = {k: v for k, v in v5.items() if k not in ("layer_types", "rope_parameters", "dtype")}
    old["torch_dtype"] = v5.get("dtype")
    params = v5["rope_parameters"]
    if "full_attention" in params:
        old["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    params = dict(params)
    old["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        old["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    if params.get("rope_type", "default") != "default":
        old["rope_scaling"] = params
    return old


@pytest.mark.parametrize("name", ["qwen2_window", "gemma2", "gemma3", "phi3"])
def test_transformers4_config_keys_read_as_transformers5(name):
    config_cls, _, family, overrides = CASES[name]
    v5 = getattr(transformers, config_cls)(**{**BASE, **overrides}).to_dict()
    spec = models.family_spec(family)
    new, old = spec.config.from_hf(v5), spec.config.from_hf(transformers4_keys(v5))
    assert old == new
    assert any(new.windowed_layers) == (name != "phi3")
    if name == "gemma3":  # 5 local : 1 global, two rotary bases, linear scaling on global
        assert new.windowed_layers == (True,) * 5 + (False, True)
        assert (new.local_rope_theta, new.rope_theta, new.rope_type) == (100.0, 5000.0, "linear")


@pytest.fixture(scope="module")
def phi3_source(tmp_path_factory):
    return save_hf(build_hf("phi3"), tmp_path_factory.mktemp("phi3_source"))


def _edited_source(src, tmp_path, **changes):
    """A copy of `src` with config.json's keys changed (None removes one)."""
    dest = tmp_path / "src"
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                  if v is not None}))
    return dest


@pytest.mark.parametrize("changes, named", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                           "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}), "'longrope'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "'yarn'"),
    (dict(model_type="gemma3", vision_config={"model_type": "siglip_vision_model"}),
     "vision tower"),
    (dict(num_key_value_heads=1), "qkv_proj"),  # the fused tensor no longer fits the config
    (dict(layer_types=["sliding_attention", "chunked_attention"], sliding_window=4),
     "chunked_attention"),
])
def test_unsupported_variants_are_refused_in_one_line(phi3_source, tmp_path, changes, named):
    src = _edited_source(phi3_source, tmp_path, **changes)
    with pytest.raises(ConvertError) as err:
        convert(src, tmp_path / "ckpt")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_chat_template_and_generation_config_are_kept(phi3_source, tmp_path):
    src = _edited_source(phi3_source, tmp_path)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7],
                                                            "temperature": 0.6}))
    convert(src, tmp_path / "ckpt")
    assert ((tmp_path / "ckpt" / "chat_template.jinja").read_text()
            == (src / "chat_template.jinja").read_text())
    generation = json.loads((tmp_path / "ckpt" / "jaxaccel.json").read_text())["generation"]
    assert generation["eos_token_ids"] == [2, 7] and generation["temperature"] == 0.6
