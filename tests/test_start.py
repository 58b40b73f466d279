"""The one start path (`jaxaccel.startup.start.start`): `jaxaccel.load` and the commands plan
once, refuse from that plan before reading a byte, and compile while restoring.

References: the weights restored plainly (`load_model`) for the outputs; counts of manifest
reads and restores for "once" and "before reading a byte"."""

import numpy as np
import pytest

import jaxaccel
from jaxaccel.checkpoint import manifest as manifest_module
from jaxaccel.startup import loader, start as start_module

TEXTS = ["A man is eating food.", "short"]


def counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_an_overflow_is_refused_from_the_one_plan_before_any_restore(minilm_ckpt, monkeypatch):
    reads = counting(monkeypatch, manifest_module.Manifest, "load")
    restores = counting(monkeypatch, start_module, "restore_plan")
    with pytest.raises(jaxaccel.PlanError, match="each device would need"):
        start_module.start(minilm_ckpt, task="embed", device_memory=1 << 20)
    assert len(reads) == 1 and restores == []


def test_a_checkpoint_of_another_task_is_refused_before_any_restore(minilm_ckpt, monkeypatch):
    restores = counting(monkeypatch, start_module, "restore_plan")
    with pytest.raises(jaxaccel.UsageError, match="holds a 'bert' model; generate needs"):
        start_module.start(minilm_ckpt, task="generate")
    assert restores == []


def test_load_goes_through_start_and_its_first_small_call_needs_no_trace(minilm_ckpt,
                                                                          monkeypatch):
    starts = counting(monkeypatch, start_module, "plan_model")
    model = jaxaccel.load(minilm_ckpt, progress=False)
    assert len(starts) == 1
    embedder = model._embedders[(32, None)]  # the runner start compiled, weights attached
    got = model.embed(TEXTS[1])
    assert embedder.forward.jitted._cache_size() == 0, "traced instead of the AOT executable"
    from jaxaccel.runtime.embed import Embedder

    want = Embedder(loader.load_model(minilm_ckpt)).embed_texts([TEXTS[1]])[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.embed(TEXTS),
                               Embedder(loader.load_model(minilm_ckpt)).embed_texts(TEXTS)[0],
                               rtol=1e-6, atol=1e-6)
