"""`jaxaccel bench quality CKPT`: what weight-only quantization costs in accuracy, per scheme.

Encoders: cosine of each sentence's embedding against the fp32 sentence-transformers
reference (`--reference NPZ`, default the repository's `tests/fixtures/minilm_reference.npz`
of `scripts/make_reference.py`: its sentences and their embeddings).
Decoders, against jaxaccel float32 on the same checkpoint: mean KL(fp32 || quantized) of the
next-token distributions and top-1 agreement over a fixed token stream (`--tokens`, one causal
pass), and greedy-token agreement over `--greedy` new tokens from the stream's first 16.
Quantized weights run with float32 activations, so the numbers are the quantization's alone;
bfloat16 (unquantized) is listed for scale. `--quantize-head` adds each scheme again with
its LM head quantized (`int8+head`; a tied head as a quantized copy of the embedding), and a
contender may be named by its label (`--quantize int4+head=int4`). Accuracy is not timing:
everything runs in this process, one contender after another.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import List, Optional

import numpy as np
import typer

from jaxaccel.bench import runner

SCHEMES = ("int8", "int4")
DEFAULT_REFERENCE = (pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
                     / "minilm_reference.npz")
ENCODER_COLUMNS = ("contender", "cosine min", "cosine mean")
DECODER_COLUMNS = ("contender", "mean KL (nats)", "top-1 agreement", "greedy agreement")


def contender_list(schemes: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(name, compute dtype, scheme): bfloat16 for scale, then each scheme on float32."""
    return [("bfloat16", "bfloat16", None)] + [(s, "float32", s) for s in schemes]


def _load(ckpt, dtype: str, scheme: str | None, group_size: int):
    # deferred: jax and the runtime load only when the benchmark runs
    from jaxaccel.startup.loader import load_model
    from jaxaccel.models.quantization import Scheme

    return load_model(ckpt, dtype=dtype, quantize=Scheme.from_label(scheme, group_size))


def encoder_quality(ckpt, schemes: Sequence[str], reference: pathlib.Path,
                    group_size: int = 128) -> dict[str, dict]:
    """{contender: {"cosine": [per sentence], "cosine_min", "cosine_mean"}}."""
    from jaxaccel.runtime.embed import Embedder  # deferred: as in `_load`

    data = np.load(reference)  # plain arrays; pickles stay refused
    sentences, expected = [str(s) for s in data["sentences"]], data["embeddings"]
    out = {}
    for name, dtype, scheme in contender_list(schemes):
        embedder = Embedder(_load(ckpt, dtype, scheme, group_size), batch_size=32)
        ours = embedder.embed_texts(sentences)[0]
        cosine = (ours * expected).sum(-1) / (np.linalg.norm(ours, axis=-1)
                                              * np.linalg.norm(expected, axis=-1))
        out[name] = {"cosine": cosine.tolist(), "cosine_min": float(cosine.min()),
                     "cosine_mean": float(cosine.mean())}
    return out


def sequence_logits(loaded, ids: Sequence[int]) -> np.ndarray:
    """Float32 logits [t, v] of one causal pass over `ids`, with the mesh's backend."""
    import jax  # deferred: as in `_load`
    import jax.numpy as jnp
    from flax import nnx

    from jaxaccel import backends

    def forward(state, ids_t):
        model = nnx.merge(loaded.graphdef, state)
        t = ids_t.shape[0]
        x, _ = model(ids_t[None], jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None])
        return model.logits(x)[0]

    with backends.use(backends.for_mesh(loaded.layout.mesh)):
        return np.asarray(jax.jit(forward)(loaded.state, jnp.asarray(ids, jnp.int32)))


def greedy_tokens(loaded, prompt: Sequence[int], new_tokens: int) -> list[int]:
    from jaxaccel.runtime.generate import Generator  # deferred: as in `_load`

    generator = Generator(loaded.graphdef, loaded.state, loaded.config,
                          dtype=loaded.dtype, layout=loaded.layout)
    return generator.generate([list(prompt)], new_tokens, loop="device")[0]


def token_stream(vocab: int, length: int, seed: int = 0) -> list[int]:
    """A fixed stream of in-vocabulary ids (the same for every contender)."""
    return np.random.default_rng(seed).integers(3, vocab, length).tolist()


def decoder_metrics(reference_logits: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || other) in nats, top-1 agreement) over positions."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference_logits), log_softmax(logits)
    kl = (np.exp(p) * (p - q)).sum(-1).mean()
    return float(kl), float((reference_logits.argmax(-1) == logits.argmax(-1)).mean())


def decoder_quality(ckpt, schemes: Sequence[str], tokens: int = 256, greedy: int = 64,
                    group_size: int = 128) -> dict[str, dict]:
    """{contender: {"mean_kl", "top1_agreement", "greedy_agreement"}} against fp32."""
    fp32 = _load(ckpt, "float32", None, group_size)
    stream = token_stream(fp32.config.vocab_size, min(tokens, fp32.config.max_length))
    reference, prompt = sequence_logits(fp32, stream), stream[:16]
    reference_greedy = greedy_tokens(fp32, prompt, greedy)
    out = {}
    for name, dtype, scheme in contender_list(schemes):
        loaded = _load(ckpt, dtype, scheme, group_size)
        kl, top1 = decoder_metrics(reference, sequence_logits(loaded, stream))
        tokens_ = greedy_tokens(loaded, prompt, greedy)
        same = sum(a == b for a, b in zip(tokens_, reference_greedy))
        out[name] = {"mean_kl": kl, "top1_agreement": top1,
                     "greedy_agreement": same / max(len(reference_greedy), 1)}
    return out


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("quality")
    def bench_quality(
        ckpt: pathlib.Path = typer.Argument(..., help="A full-precision checkpoint (encoder: "
                                            "MiniLM with real weights; or a decoder)."),
        quantize: Optional[List[str]] = typer.Option(None, "--quantize", help="Schemes to "
                                                     "measure (repeatable; default int8 and "
                                                     "int4; fp8 needs a GPU/TPU; also a label "
                                                     "such as int4+head=int4)."),
        group_size: int = typer.Option(128, "--group-size", help="int4 group size."),
        quantize_head: bool = typer.Option(False, "--quantize-head", help="Also each scheme "
                                           "with its LM head quantized."),
        reference: pathlib.Path = typer.Option(DEFAULT_REFERENCE, "--reference", help="Encoders: "
                                               ".npz with `sentences` and their fp32 "
                                               "sentence-transformers `embeddings`."),
        tokens: int = typer.Option(256, "--tokens", help="Decoders: token stream length."),
        greedy: int = typer.Option(64, "--greedy", help="Decoders: greedy tokens compared."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Accuracy of weight-only quantization per scheme: encoder cosine against the fp32
        sentence-transformers reference; decoder KL, top-1 and greedy agreement against fp32."""
        from jaxaccel import models  # deferred: as in `_load`
        from jaxaccel.checkpoint.manifest import Manifest

        schemes = runner.quantized_labels(quantize or SCHEMES, quantize_head)
        task = models.task(Manifest.load(ckpt).family)
        if task == "embed":
            results = encoder_quality(ckpt, schemes, reference, group_size)
            rows = [(n, r["cosine_min"], r["cosine_mean"]) for n, r in results.items()]
            runner.print_table(f"cosine vs fp32 sentence-transformers ({reference.name})",
                               ENCODER_COLUMNS, rows)
        else:
            results = decoder_quality(ckpt, schemes, tokens, greedy, group_size)
            rows = [(n, r["mean_kl"], r["top1_agreement"], r["greedy_agreement"])
                    for n, r in results.items()]
            runner.print_table(f"vs jaxaccel float32: {tokens}-token stream, {greedy} greedy "
                               "tokens", DECODER_COLUMNS, rows)
        runner.write_json(json_out, {"benchmark": "quality", "ckpt": str(ckpt),
                                     "group_size": group_size, "results": results})
