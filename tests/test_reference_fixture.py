"""Parity with sentence-transformers itself, via the committed fixture of
scripts/make_reference.py: empty, truncated, non-ASCII sentences, an odd batch of 11."""

import pathlib

import numpy as np
import pytest

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURE)  # plain arrays only; pickles stay disallowed
    return [str(s) for s in data["sentences"]], data["embeddings"], int(data["max_seq_length"])


@pytest.mark.parametrize("dtype,threshold", [("float32", 0.99999), ("bfloat16", 0.999)])
@pytest.mark.parametrize("batch_size", [4, 32])
def test_embeddings_match_sentence_transformers(minilm_ckpt, reference, dtype, threshold,
                                                batch_size):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    sentences, expected, max_seq_length = reference
    embedder = Embedder(load_model(minilm_ckpt, dtype=dtype), batch_size=batch_size)
    assert embedder.max_length == max_seq_length == 256  # taken from sentence_bert_config.json
    ours, truncated = embedder.embed_texts(sentences)
    assert truncated == [sentences.index(max(sentences, key=len))]
    cosine = (ours * expected).sum(-1) / np.linalg.norm(ours, axis=-1)
    assert cosine.min() >= threshold, dict(zip(sentences, cosine.round(6)))
