"""One request validator for both front ends: the same generation settings are accepted or
refused the same way by `Model.generate` and `jaxaccel generate`, with the same
`UsageError` message, and accepted settings give the same tokens.

The table is written here from the documented rules (runtime/requests.py's docstring), not
from the code; the model is a tiny Llama whose greedy continuation the test chooses
(tests/successor_model.py), with 64 positions.
"""

import json

import pytest

import jaxaccel
from cli_runner import one_error_line, run_cli

NEED_TEMPERATURE = "top_k/top_p need a temperature > 0"
NOT_WITH_GREEDY = "greedy cannot be combined with temperature/top_k/top_p"

# (max_new_tokens, settings as Model.generate takes them, None or the refusal's message start)
TABLE = [
    (3, {}, None),
    (3, {"greedy": True}, None),
    (3, {"temperature": 0.0}, None),
    (3, {"temperature": 0.7, "seed": 3}, None),
    (3, {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 1}, None),
    (3, {"top_k": 5}, NEED_TEMPERATURE),
    (3, {"top_p": 0.5}, NEED_TEMPERATURE),
    (3, {"temperature": 0.0, "top_k": 3}, NEED_TEMPERATURE),
    (3, {"greedy": True, "temperature": 0.5}, NOT_WITH_GREEDY),
    (3, {"greedy": True, "top_k": 2}, NOT_WITH_GREEDY),
    (3, {"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    (3, {"temperature": 1.0, "top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    (3, {"temperature": 1.0, "top_k": -1}, "top_k must be >= 0, got -1"),
    (0, {}, "max_new_tokens (--max-new-tokens) must be an integer >= 1, got 0"),
    (-2, {"greedy": True}, "max_new_tokens (--max-new-tokens) must be an integer >= 1, got -2"),
    (70, {}, "prompt + max_new_tokens - 1 = 72 tokens exceeds the model's maximum length 64"),
]
PROMPT = [2, 3, 4]


def cli_flags(settings: dict) -> list[str]:
    flags = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
             "seed": "--seed"}
    out = ["--greedy"] if settings.get("greedy") else []
    for name, value in settings.items():
        if name != "greedy":
            out += [flags[name], str(value)]
    return out


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    pytest.importorskip("transformers")
    import successor_model
    from test_detokenize import metaspace_tokenizer

    tok = metaspace_tokenizer()
    successor = {i: (i + 1) % tok.get_vocab_size() for i in range(tok.get_vocab_size())}
    ckpt = successor_model.build(tmp_path_factory.mktemp("requests"), tok, successor)
    return ckpt, jaxaccel.load(ckpt, progress=False)


@pytest.mark.parametrize("max_new_tokens,settings,refusal", TABLE)
def test_both_front_ends_accept_and_refuse_alike(decoder, capsys, monkeypatch,
                                                 max_new_tokens, settings, refusal):
    ckpt, model = decoder
    args = ["generate", ckpt, "--prompt-ids", ",".join(map(str, PROMPT)),
            "-n", max_new_tokens, "--ignore-eos", "--json", "-q", *cli_flags(settings)]
    code, out, err = run_cli(capsys, monkeypatch, *args)
    if refusal is None:
        (done,) = model.generate([PROMPT], max_new_tokens=max_new_tokens, ignore_eos=True,
                                 **settings)
        assert code == 0, err
        assert json.loads(out)["tokens"] == [PROMPT + done.token_ids]
        assert len(done.token_ids) == max_new_tokens
        return
    with pytest.raises(jaxaccel.UsageError) as raised:
        model.generate([PROMPT], max_new_tokens=max_new_tokens, ignore_eos=True, **settings)
    assert str(raised.value).startswith(refusal)
    assert code == 2, err
    assert one_error_line(err).endswith(str(raised.value))


def test_stream_and_stop_strings_share_the_validator(decoder):
    _, model = decoder
    with pytest.raises(jaxaccel.UsageError, match=NEED_TEMPERATURE):
        next(model.stream(PROMPT, max_new_tokens=2, top_k=4))
    with pytest.raises(jaxaccel.UsageError, match=r"max_new_tokens \(--max-new-tokens\) must be"):
        next(model.stream(PROMPT, max_new_tokens=0))
    for stop in ("", ["x", ""]):
        with pytest.raises(jaxaccel.UsageError, match="stop must be a non-empty string"):
            model.generate([PROMPT], max_new_tokens=2, stop=stop)
    # a non-string stop fails the API's argument-type check first: still a UsageError naming it
    with pytest.raises(jaxaccel.UsageError, match="stop must be"):
        model.generate([PROMPT], max_new_tokens=2, stop=[3])


def test_a_checkpoint_that_samples_by_default_lets_top_k_alone_through(decoder, capsys,
                                                                        monkeypatch):
    """generation_config.json with do_sample and a temperature: top_k alone is then a
    sampling setting on both front ends (the checkpoint's temperature applies)."""
    import dataclasses

    _, model = decoder
    generation = {**model.loaded.manifest.generation, "do_sample": True, "temperature": 0.8}
    sampling = jaxaccel.Model(dataclasses.replace(
        model.loaded, manifest=dataclasses.replace(model.loaded.manifest, generation=generation)))
    (done,) = sampling.generate([PROMPT], max_new_tokens=3, top_k=2, seed=5, ignore_eos=True)
    assert len(done.token_ids) == 3
    with pytest.raises(jaxaccel.UsageError, match=NEED_TEMPERATURE):
        model.generate([PROMPT], max_new_tokens=3, top_k=2)


def test_the_validator_raises_only_usage_errors_for_any_arguments():
    """Property over argument values of every type: a request is a Request or a UsageError,
    never another exception (what both front ends then raise)."""
    from hypothesis import given, settings, strategies as st

    from jaxaccel.runtime import requests

    anything = st.one_of(st.none(), st.booleans(), st.integers(-5, 100),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                         st.lists(st.text(max_size=3), max_size=3), st.just([1, 2]))

    @settings(max_examples=400, deadline=None)
    @given(n=anything, greedy=st.one_of(st.none(), st.booleans()), temperature=anything,
           top_k=anything, top_p=anything, seed=anything, stop=anything,
           defaults=st.fixed_dictionaries({}, optional={
               "do_sample": st.booleans(), "temperature": st.floats(0, 2),
               "top_k": st.integers(0, 50), "top_p": st.floats(0.01, 1)}))
    def check(n, greedy, temperature, top_k, top_p, seed, stop, defaults):
        try:
            request = requests.request(n, greedy=greedy, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, stop=stop, defaults=defaults)
        except jaxaccel.UsageError:
            return
        assert request.max_new_tokens >= 1 and all(request.stop)
        sampling = request.sampling
        assert sampling.greedy == (sampling.temperature == 0.0)
        if sampling.greedy:
            assert (sampling.top_k, sampling.top_p) == (0, 1.0)

    check()


@pytest.mark.parametrize("settings", [{"temperature": float("nan")},
                                      {"temperature": float("inf")},
                                      {"temperature": 1.0, "top_p": float("nan")},
                                      {"temperature": "0.5"}, {"top_k": 2.5}, {"seed": "1"}])
def test_values_of_the_wrong_kind_are_usage_errors(settings):
    from jaxaccel.runtime import requests

    with pytest.raises(jaxaccel.UsageError, match="must be a"):
        requests.request(4, **settings)
