"""Errors of the Python API (issue 29, kind 9), by property: whatever the arguments of a
public function (`jaxaccel.load/convert/inspect/plan/verify`, `Model.embed/classify/generate/
stream`), it either works or raises one of jaxaccel's own error classes, never a bare
TypeError/ValueError/KeyError/AttributeError from inside. Generation settings are
`jaxaccel.UsageError` (the docstrings' promise)."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxaccel
from conftest import examples
from jaxaccel.errors import JaxaccelError

SETTINGS = settings(max_examples=examples(40), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

# Values a caller may pass by mistake: wrong types, empty, negative, huge, NaN, nested.
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
    st.text(max_size=12), st.binary(max_size=8), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(object()), st.just(math.inf), st.just(-1), st.just(0), st.just(""),
    st.sampled_from(["float32", "bfloat16", "int8", "int4", "auto", "data=2", "dp", "zstd",
                     "10GiB", "-1", "llama", "hf", "read-all", "nonsense=3"]))


def kwargs_of(names: list[str]):
    """A few of `names`, each set to a junk value."""
    return st.dictionaries(st.sampled_from(names), JUNK, min_size=1, max_size=3)


def only_package_errors(call) -> None:
    try:
        call()
    except JaxaccelError:
        pass
    except Exception as err:  # the property: nothing else escapes
        raise AssertionError(f"{type(err).__name__} escaped: {err}") from err


@pytest.fixture(scope="module")
def minilm(minilm_ckpt):
    return jaxaccel.load(minilm_ckpt, progress=False)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    from real_checkpoints import build, save

    root = tmp_path_factory.mktemp("api")
    save(build("llama"), root / "src")
    jaxaccel.convert(root / "src", root / "ckpt", progress=False)
    return jaxaccel.load(root / "ckpt", progress=False)


PATHS = st.one_of(JUNK, st.sampled_from(["/nonexistent/ckpt", "/", ".", "s3://", "gs://b",
                                         "http://127.0.0.1:9/x"]))


@SETTINGS
@given(path=PATHS)
def test_inspect_verify_of_any_path(path):
    only_package_errors(lambda: jaxaccel.inspect(path))
    only_package_errors(lambda: jaxaccel.verify(path, progress=False))


@SETTINGS
@given(kwargs=kwargs_of(["mesh", "rules", "dtype", "host_memory_budget", "microbatches",
                         "restore_mode", "quantize", "group_size", "quantize_head"]))
def test_load_with_bad_settings(kwargs, minilm_ckpt):
    only_package_errors(lambda: jaxaccel.load(minilm_ckpt, progress=False, **kwargs))


@SETTINGS
@given(path=PATHS)
def test_load_of_any_path(path):
    only_package_errors(lambda: jaxaccel.load(path, progress=False))


@SETTINGS
@given(kwargs=kwargs_of(["mesh", "rules", "dtype", "batch", "seq", "max_new_tokens",
                         "device_memory", "quantize", "group_size", "quantize_head"]))
def test_plan_with_bad_settings(kwargs, minilm_ckpt):
    only_package_errors(lambda: jaxaccel.plan(minilm_ckpt, **kwargs))


@SETTINGS
@given(kwargs=kwargs_of(["dtype", "family", "layout", "chunk_bytes", "codec", "quantize",
                         "group_size", "quantize_head", "force_family"]),
       src=st.one_of(st.just("minilm"), PATHS))
def test_convert_with_bad_arguments(kwargs, src, tmp_path_factory):
    dest = tmp_path_factory.mktemp("convert") / "out"
    only_package_errors(lambda: jaxaccel.convert(src, dest, progress=False, **kwargs))


TEXTS = st.one_of(JUNK, st.lists(JUNK, max_size=3), st.lists(st.text(max_size=20), max_size=3))


@SETTINGS
@given(texts=TEXTS, kwargs=st.one_of(st.just({}), kwargs_of(["batch_size", "max_length",
                                                             "prompt_name"])))
def test_embed_with_bad_arguments(texts, kwargs, minilm):
    only_package_errors(lambda: minilm.embed(texts, **kwargs))


@SETTINGS
@given(images=st.one_of(JUNK, st.lists(JUNK, max_size=2)),
       kwargs=st.one_of(st.just({}), kwargs_of(["batch_size", "skip_bad"])))
def test_classify_with_bad_arguments(images, kwargs, minilm, decoder):
    only_package_errors(lambda: minilm.classify(images, **kwargs))
    only_package_errors(lambda: decoder.classify(images, **kwargs))


PROMPTS = st.one_of(JUNK, st.lists(JUNK, max_size=2), st.lists(st.lists(JUNK, max_size=3),
                                                                max_size=2))
SAMPLING = ["greedy", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos"]


@SETTINGS
@given(prompts=PROMPTS, max_new_tokens=JUNK)
def test_generate_and_stream_with_bad_prompts(prompts, max_new_tokens, decoder, minilm):
    only_package_errors(lambda: decoder.generate(prompts, max_new_tokens=max_new_tokens))
    only_package_errors(lambda: list(decoder.stream(prompts, max_new_tokens=max_new_tokens)))
    only_package_errors(lambda: minilm.generate([[1, 2]], max_new_tokens=2))


@SETTINGS
@given(kwargs=kwargs_of(SAMPLING))
def test_generate_with_bad_sampling_settings(kwargs, decoder):
    only_package_errors(lambda: decoder.generate([[1, 2, 3]], max_new_tokens=2, **kwargs))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", None, True])
def test_max_new_tokens_outside_its_range_is_a_usage_error(bad, decoder):
    with pytest.raises(jaxaccel.UsageError):
        decoder.generate([[1, 2, 3]], max_new_tokens=bad)


def test_good_arguments_still_work(minilm, decoder):
    """The property's other half: valid calls return results, checked against numpy."""
    vectors = minilm.embed(["a", "b"], batch_size=1)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len(decoder.generate([[1, 2, 3]], max_new_tokens=2, greedy=True)[0].token_ids) <= 2
    assert isinstance(jaxaccel.inspect(pathlib.Path(minilm.loaded.path)).family, str)
