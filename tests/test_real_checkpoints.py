"""Issue #11: checkpoints shaped the way real Hugging Face repositories ship them. Every
expected value comes from transformers on the same files."""

import json

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli
from real_checkpoints import build, edit_json, edit_tensors, greedy, reshard, save

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [5, 9, 17, 33]


def generate_cli(capsys, monkeypatch, ckpt, prompts, n, *extra):
    ids = ";".join(",".join(map(str, p)) for p in prompts)
    code, out, err = run_cli(capsys, monkeypatch, "generate", ckpt, "--prompt-ids", ids, "-n",
                             n, "--json", "-q", *extra)
    assert code == 0, err
    return [row[len(p):] for row, p in zip(json.loads(out)["tokens"], prompts)]


def convert_cli(capsys, monkeypatch, src, dest, *extra):
    return run_cli(capsys, monkeypatch, "convert", src, dest, "-q", *extra)


def model_with_eos_at_step3(kind):
    """A tiny model, and the id its greedy run emits at step 3 (new to that run)."""
    for seed in range(50):
        model = build(kind, seed=seed, eos_token_id=None)
        run = greedy(model, PROMPT, 20)
        if run[2] not in run[:2] and 3 not in run[:3]:
            return model, run[2]
    raise AssertionError("no seed gives a fresh third token")


# 1. EOS as a list, or only in generation_config.json ----------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("where", ["config", "generation_config"])
def test_eos_list_stops_like_transformers(kind, where, tmp_path, capsys, monkeypatch):
    model, stop = model_with_eos_at_step3(kind)
    src = save(model, tmp_path / "src")
    if where == "config":
        edit_json(src / "config.json", eos_token_id=[3, stop])
        edit_json(src / "generation_config.json", eos_token_id=[3, stop])
    else:
        edit_json(src / "config.json", eos_token_id=3)
        edit_json(src / "generation_config.json", eos_token_id=[3, stop])
    reference = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    expected = greedy(reference, PROMPT, 20, eos=reference.generation_config.eos_token_id)
    assert len(expected) == 3
    assert convert_cli(capsys, monkeypatch, src, tmp_path / "ckpt")[0] == 0
    for batch in (1, 2, 3):  # GPT-2 used to crash for some batch sizes
        prompts = [PROMPT] + [[7, 8]] * (batch - 1)
        assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt", prompts, 20)[0] == expected
    assert len(generate_cli(capsys, monkeypatch, tmp_path / "ckpt", [PROMPT], 20,
                            "--ignore-eos")[0]) == 20
    code, out, _ = run_cli(capsys, monkeypatch, "inspect", tmp_path / "ckpt", "--json")
    assert json.loads(out)["generation"]["eos_token_ids"] == [3, stop]
    _, out, _ = run_cli(capsys, monkeypatch, "inspect", tmp_path / "ckpt")
    assert f"eos_token_ids=[3, {stop}]" in out


def test_generator_takes_eos_lists_without_retracing(tmp_path):
    from jaxaccel.conversion.hf import convert
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.startup.loader import load_model

    model, stop = model_with_eos_at_step3("llama")
    convert(save(model, tmp_path / "src"), tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    gen = Generator(loaded.graphdef, loaded.state, loaded.config)
    assert len(gen.generate([PROMPT], 20, eos_id=[3, stop])[0]) == 3
    assert len(gen.generate([PROMPT], 20, eos_id=stop)[0]) == 3
    assert len(gen.generate([PROMPT], 20, eos_id=None)[0]) == 20
    assert len(gen.generate([PROMPT], 20, eos_id=[3, stop], loop="host")[0]) == 3
    assert gen.traces["prefill"] == 1


# 3. The index decides which shard holds a tensor ---------------------------------------------

def three_shards(src, stale=True, index=True):
    from safetensors.numpy import load_file

    names = sorted(load_file(src / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    rest = [n for n in names if n != q]
    files = reshard(src, [rest[:3] + [q], rest[3:6], rest[6:] + ([q] if stale else [])], index)
    if stale:  # a zeroed copy in the last shard: the last file in sort order
        from safetensors.numpy import load_file, save_file

        tensors = dict(load_file(src / files[2]))
        tensors[q] = np.zeros_like(tensors[q])
        save_file(tensors, src / files[2], metadata={"format": "pt"})
    return files, q


def test_index_names_the_shard(tmp_path, capsys, monkeypatch):
    model = build("llama", layers=2)
    src = save(model, tmp_path / "src")
    three_shards(src)
    assert convert_cli(capsys, monkeypatch, src, tmp_path / "ckpt")[0] == 0
    assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt", [PROMPT], 8,
                        "--ignore-eos")[0] == greedy(model, PROMPT, 8)


def test_index_naming_missing_tensor_or_file_is_refused(tmp_path, capsys, monkeypatch):
    src = save(build("llama"), tmp_path / "src")
    files, q = three_shards(src, stale=False)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for wrong, needle in ((files[1], q), ("model-00009-of-00003.safetensors", "do not exist")):
        index["weight_map"][q] = wrong
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        code, _, err = convert_cli(capsys, monkeypatch, src, tmp_path / "out")
        assert code == 1 and needle in one_error_line(err)
        assert not (tmp_path / "out").exists()


def test_duplicate_tensor_without_index_is_refused(tmp_path, capsys, monkeypatch):
    src = save(build("llama"), tmp_path / "src")
    files, q = three_shards(src, index=False)
    code, _, err = convert_cli(capsys, monkeypatch, src, tmp_path / "out")
    line = one_error_line(err)
    assert code == 1 and q in line and files[0] in line and files[2] in line


# 4. Untied heads and redundant tied heads ----------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_untied_head_is_used(kind, tmp_path, capsys, monkeypatch):
    model = build(kind, tie_word_embeddings=False)
    src = save(model, tmp_path / "src")
    assert convert_cli(capsys, monkeypatch, src, tmp_path / "ckpt")[0] == 0
    assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt", [PROMPT], 8,
                        "--ignore-eos")[0] == greedy(model, PROMPT, 8)


def _embedding_name(tensors):
    return next(n for n in tensors if n.endswith(("wte.weight", "embed_tokens.weight")))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_redundant_tied_head_is_accepted_and_a_different_one_refused(kind, tmp_path, capsys,
                                                                      monkeypatch):
    model = build(kind, tie_word_embeddings=True)
    src = save(model, tmp_path / "src")
    edit_tensors(src, lambda t: t.__setitem__("lm_head.weight", t[_embedding_name(t)].copy()))
    code, out, err = convert_cli(capsys, monkeypatch, src, tmp_path / "ckpt", "--json")
    assert code == 0, err
    assert "lm_head.weight" in json.loads(out)["ignored_tensors"]
    assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt", [PROMPT], 8,
                        "--ignore-eos")[0] == greedy(model, PROMPT, 8)
    edit_tensors(src, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"] + 1))
    code, _, err = convert_cli(capsys, monkeypatch, src, tmp_path / "out")
    line = one_error_line(err)
    assert code == 1 and "lm_head.weight" in line and "tie_word_embeddings" in line
    assert ("wte.weight" in line) or ("embed_tokens.weight" in line)


# 6. Values that do not fit the stored dtype ---------------------------------------------------

def test_float16_overflow_and_source_nan_are_refused(tmp_path, capsys, monkeypatch):
    src = save(build("llama"), tmp_path / "src")
    norm = "model.layers.0.input_layernorm.weight"
    edit_tensors(src, lambda t: t[norm].__setitem__(0, 7e4))
    code, _, err = convert_cli(capsys, monkeypatch, src, tmp_path / "out", "--dtype", "float16")
    line = one_error_line(err)
    assert code == 1 and norm in line and "70000" in line and not (tmp_path / "out").exists()
    code, _, err = convert_cli(capsys, monkeypatch, src, tmp_path / "f16", "--dtype", "float16",
                               "--allow-overflow")
    assert code == 0, err
    assert convert_cli(capsys, monkeypatch, src, tmp_path / "bf16", "--dtype", "bfloat16")[0] == 0
    edit_tensors(src, lambda t: t[norm].__setitem__(1, np.nan))
    code, _, err = convert_cli(capsys, monkeypatch, src, tmp_path / "out", "--dtype", "bfloat16")
    assert code == 1 and norm in one_error_line(err) and "NaN" in err


# 7. The position limit -------------------------------------------------------------------------

def test_position_limit_is_prompt_plus_new_minus_one(tmp_path, capsys, monkeypatch):
    model = build("gpt2", positions=32)
    assert convert_cli(capsys, monkeypatch, save(model, tmp_path / "src"), tmp_path / "ckpt")[0] == 0
    for length, new in ((31, 2), (32, 1)):
        prompt = [(7 * i) % 120 + 3 for i in range(length)]
        assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt", [prompt], new,
                            "--ignore-eos")[0] == greedy(model, prompt, new)
    code, _, err = run_cli(capsys, monkeypatch, "generate", tmp_path / "ckpt", "--prompt-ids",
                           ",".join(["5"] * 32), "-n", "2")
    assert code == 2 and "- 1" in one_error_line(err)
    _, out, _ = run_cli(capsys, monkeypatch, "generate", "--help")
    assert "N - 1" in out


# 8. Every failure is one line -------------------------------------------------------------------

def test_unexpected_exception_is_one_line_and_debug_shows_traceback(tmp_path, capsys,
                                                                     monkeypatch):
    from jaxaccel.cli import inspect as inspect_command

    def broken(path):
        raise TypeError("something\nbroke")

    monkeypatch.setattr(inspect_command.Manifest, "load", broken)
    code, _, err = run_cli(capsys, monkeypatch, "inspect", tmp_path)
    assert code == 1 and "inspect: TypeError: something broke" in one_error_line(err)
    code, _, err = run_cli(capsys, monkeypatch, "--debug", "inspect", tmp_path)
    assert code == 1 and "Traceback" in err


def test_empty_prompt_ids_says_empty(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "generate", tmp_path, "--prompt-ids", "")
    assert code == 2 and "empty" in one_error_line(err) and "not both" not in err
