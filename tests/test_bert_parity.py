"""MiniLM through jaxaccel vs. the PyTorch/transformers reference on the same real weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference extra (torch) not installed")
transformers = pytest.importorskip("transformers", reason="reference extra not installed")

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, twice, and then sleeps for a while.",
    "Short.",
    "Embeddings compare sentences by meaning rather than by their exact words; "
    "this one is long enough to land in a larger length bucket than the others do.",
    "ünïcödé and emoji 🙂 tokenise too",
]


def reference_embeddings(src, sentences, max_length=512):
    """sentence-transformers semantics written out in torch: masked mean, then L2 norm."""
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModel.from_pretrained(src, use_safetensors=True).eval()
    batch = tok(sentences, padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


@pytest.fixture(scope="module")
def reference(minilm_src):
    return reference_embeddings(minilm_src, SENTENCES)


def embed(ckpt, dtype, **layout):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    return Embedder(load_model(ckpt, dtype=dtype, **layout), batch_size=4).embed_texts(SENTENCES)[0]


def test_float32_matches_transformers(minilm_ckpt, reference):
    ours = embed(minilm_ckpt, "float32")
    assert ours.shape == reference.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    cosine = (ours * reference).sum(-1)
    assert cosine.min() >= 0.99999


def test_bfloat16_within_stated_tolerance(minilm_ckpt, reference):
    """bf16 weights and activations (fp32 norms/softmax/accumulation): cosine >= 0.999."""
    ours = embed(minilm_ckpt, "bfloat16")
    assert ours.dtype == np.float32
    cosine = (ours * reference).sum(-1)
    assert cosine.min() >= 0.999, cosine


def test_token_ids_match_reference_tokenizer(minilm_src, minilm_ckpt):
    from jaxaccel.inputs.tokenizer import TextTokenizer

    ours = TextTokenizer(minilm_ckpt / "tokenizer.json").encode(SENTENCES, 512).ids
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_src)(SENTENCES)["input_ids"]
    assert ours == theirs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_matches_pytorch(dtype):
    """The exact (erf) GELU BERT-style models use, vs torch.nn.functional.gelu on the same
    values: float32 to float32 rounding, bfloat16 computed in float32 and rounded once (as
    PyTorch does), so at most one bfloat16 step apart. Below x = -5.6 XLA's float32 erf has
    saturated to -1 (GELU exactly 0) where PyTorch still gives up to -7e-7: hence atol."""
    import jax.numpy as jnp

    from jaxaccel.models import layers

    x = np.concatenate([np.linspace(-12, 12, 4001), [-1e4, -50, 0.0, 1e-30, 50, 1e4]])
    x = x.astype(np.float32)
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    expected = torch.nn.functional.gelu(t).float().numpy()
    got = np.asarray(layers.activation("gelu")(jnp.asarray(t.float().numpy(), dtype)),
                     np.float32)
    if dtype == "float32":
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)
    else:
        step = np.abs(expected) * 2.0 ** -7  # one bfloat16 step at the value's size
        assert np.all(np.abs(got - expected) <= step + 1e-6)
