"""GPT-2 parity with transformers: logits (fp32, bf16) and greedy generation."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from decoder_reference import generator, load_jax, save_hf
from safetensors.numpy import load_file

from jaxaccel.models import gpt2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Odd sizes so shape bugs show: 2 heads of 23, MLP 184, vocab 101 (not a multiple of 8).
HF_CONFIG = dict(vocab_size=101, n_positions=96, n_embd=46, n_layer=3, n_head=2,
                 bos_token_id=1, eos_token_id=2)
PROMPTS = [[5, 7, 9, 11, 3], [8], [10, 20, 30, 40, 50, 60, 70, 80, 90] + list(range(15, 95, 10))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG)).eval()
    directory = save_hf(hf, tmp_path_factory.mktemp("gpt2"))
    return hf, directory


def hf_last_logits(hf, prompt):
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, -1].numpy()


def jax_last_logits(model, cfg, prompts):
    """One batched, left-padded prefill: also checks masks and positions of padded rows."""
    return generator(model, cfg).last_logits(prompts)


def test_config_from_hf_reads_gpt2_fields(reference):
    _, directory = reference
    cfg = gpt2.Config.from_hf(json.loads((directory / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size) == (46, 2, 23, 184)
    assert cfg.eos_token_id == 2 and cfg.max_length == 96
    with pytest.raises(ValueError, match="inverse_layer_idx"):
        gpt2.Config.from_hf({**json.loads((directory / "config.json").read_text()),
                             "scale_attn_by_inverse_layer_idx": True})


def test_weight_rules_cover_every_source_tensor(reference):
    _, directory = reference
    cfg = gpt2.Config.from_hf(json.loads((directory / "config.json").read_text()))
    sources = {rule.source.format(i=i) for rule in gpt2.weight_rules(cfg)
               for i in range(cfg.num_layers)}
    import re
    for name in load_file(directory / "model.safetensors"):
        bare = name.removeprefix("transformer.")
        ignored = gpt2.SPEC.ignored_source_weights
        assert bare in sources or any(re.search(p, name) for p in ignored), name


def test_last_position_logits_match_transformers_fp32(reference):
    hf, directory = reference
    ours = jax_last_logits(*load_jax("gpt2", directory), PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        np.testing.assert_allclose(logits, hf_last_logits(hf, prompt), atol=1e-4, rtol=0)


def test_bf16_logits_close_to_fp32_reference(reference):
    """bf16 weights and activations (fp32 accumulation): logits within 2% of their range."""
    hf, directory = reference
    ours = jax_last_logits(*load_jax("gpt2", directory, dtype=jnp.bfloat16), PROMPTS)
    for prompt, logits in zip(PROMPTS, ours):
        ref = hf_last_logits(hf, prompt)
        err = np.abs(logits - ref).max()
        assert err <= 0.02 * np.abs(ref).max(), err


def test_greedy_32_tokens_match_transformers(reference):
    hf, directory = reference
    model, cfg = load_jax("gpt2", directory)
    ours = generator(model, cfg).generate(PROMPTS, 32)
    for prompt, tokens in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()


def test_cli_generate_json_matches_transformers(reference, tmp_path, capsys, monkeypatch):
    """convert (bfloat16 storage) -> `jaxaccel generate --json`, float32 compute."""
    from cli_runner import run_cli

    from jaxaccel.conversion.hf import convert

    hf, directory = reference
    convert(directory, tmp_path / "ckpt", dtype="bfloat16")
    prompts = PROMPTS[:2]
    code, out, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "ckpt", "--prompt-ids",
                             ";".join(",".join(map(str, p)) for p in prompts), "-n", "6",
                             "--dtype", "float32", "--ignore-eos", "--json", "-q")
    assert code == 0, err
    tokens = json.loads(out)["tokens"]
    assert [row[:len(p)] for row, p in zip(tokens, prompts)] == prompts
    assert "text" not in json.loads(out)  # no tokenizer.json in this checkpoint
    # bf16-stored weights: compare with transformers on the same rounded weights.
    rounded = copy.deepcopy(hf).to(torch.bfloat16).to(torch.float32)
    for prompt, row in zip(prompts, tokens):
        with torch.no_grad():
            ref = rounded.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        assert row == ref[0].tolist()


def test_bf16_greedy_agreement_is_reported(reference, record_property):
    """bf16 greedy vs fp32 transformers: the agreeing prefix per prompt, reported, not gated
    (random tiny models have near-tied logits, where bf16 rounding may flip an argmax)."""
    hf, directory = reference
    ours = generator(*load_jax("gpt2", directory, dtype=jnp.bfloat16)).generate(PROMPTS, 32)
    agree = []
    for prompt, tokens in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        agree.append(next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), 32))
    record_property("bf16_greedy_agreeing_prefix", agree)
    print(f"bf16 greedy agrees with fp32 transformers for the first {agree} of 32 tokens")
    assert len(ours) == len(PROMPTS) and all(len(t) == 32 for t in ours)


def test_bf16_packed_kernel_matches_xla_dots(reference):
    """GPT-2's packed path (tied head packed transposed, token rows gathered from it, learned
    positions) against XLA's own bf16 dots on the same weights."""
    _, directory = reference
    model, cfg = load_jax("gpt2", directory, dtype=jnp.bfloat16)
    packed_gen = generator(model, cfg, packed_weights=True)
    plain_gen = generator(model, cfg, packed_weights=False)
    for ours, ref in zip(packed_gen.last_logits(PROMPTS), plain_gen.last_logits(PROMPTS)):
        assert np.abs(ours - ref).max() <= 0.01 * np.abs(ref).max()
    assert packed_gen.generate(PROMPTS, 16) == plain_gen.generate(PROMPTS, 16)


def test_cli_generate_kernels_flag(reference, tmp_path, capsys, monkeypatch):
    """bf16 `generate --json`: the default (packed kernel) and --no-kernels give the same
    tokens, and so do float32 --kernels (the float32 kernel) and --no-kernels; --kernels where
    it cannot apply (a mesh of several devices) is a usage error naming the reason."""
    from cli_runner import one_error_line, run_cli

    from jaxaccel.conversion.hf import convert

    _, directory = reference
    convert(directory, tmp_path / "ckpt", dtype="bfloat16")
    args = ["generate", tmp_path / "ckpt", "--prompt-ids", "5,7,9;8", "-n", "8", "--json", "-q"]
    runs = [run_cli(capsys, monkeypatch, *args, *extra) for extra in ([], ["--no-kernels"])]
    assert [code for code, _, _ in runs] == [0, 0], runs
    assert json.loads(runs[0][1])["tokens"] == json.loads(runs[1][1])["tokens"]
    f32 = [run_cli(capsys, monkeypatch, *args, "--dtype", "float32", flag)
           for flag in ("--kernels", "--no-kernels")]
    assert [code for code, _, _ in f32] == [0, 0], f32
    assert json.loads(f32[0][1])["tokens"] == json.loads(f32[1][1])["tokens"]
    code, _, err = run_cli(capsys, monkeypatch, *args, "--mesh", "data=2", "--kernels")
    assert code == 2
    assert "--kernels" in one_error_line(err) and "more than one device" in err
