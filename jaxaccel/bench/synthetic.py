"""Transformer-shaped checkpoints of random weights, for restore benchmarks and tests.

    python -m jaxaccel.bench.synthetic /tmp/ref               # 2.68 GB float32, 2048 wide
    python -m jaxaccel.bench.synthetic /tmp/small --width 256 --layers 4 --vocab 4096
    python -m jaxaccel.bench.synthetic /tmp/ref --orbax-default /tmp/ref-orbax

The default is the issue's reference tree, 2.68 GB float32: vocab 32000 x width 2048, 12
layers with q, k, v, o 2048x2048, an MLP 2048 -> 8192 -> 2048 and two norms per layer. It is
written as a BERT-family checkpoint (the loader restores it and `embed` runs it), so the
few extra small arrays (biases, position embeddings) add ~0.3% to the bytes.
`--orbax-default DIR` also saves the same arrays with orbax's StandardCheckpointer defaults,
the baseline `jaxaccel bench restore --orbax-default` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import numpy as np

REFERENCE = {"vocab": 32000, "width": 2048, "layers": 12, "heads": 16}

# Hugging Face config fields of the decoder shapes the generate benchmark uses (GPT-2 small:
# 124M parameters; a ~150M Llama-shaped model with GQA; ~0.5B Qwen3 and Gemma 2 shapes;
# a ~1.0B Mixtral of 8 experts, top-2).
# `decoder_config` sets the layers.
DECODER_HF_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12, bos_token_id=50256, eos_token_id=50256),
    "llama": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  max_position_embeddings=2048),
    # Qwen3-0.6B's shape (0.6B parameters, tied): q/k norms, head_dim 128 != 1024 / 16.
    "qwen3": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=1000000.0),
    # A ~0.45B Gemma 2 (Gemma 2 2B's vocabulary, head_dim and caps, 12 narrower layers):
    # alternating windowed/global layers, soft caps, sandwich norms.
    "gemma2": dict(model_type="gemma2", vocab_size=256000, hidden_size=1024,
                   intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=128, max_position_embeddings=8192,
                   sliding_window=4096, query_pre_attn_scalar=128,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # A ~1.0B Mixtral shape: 8 experts of mlp 2816, top-2 (~0.31B active per token), GQA.
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=1024,
                    intermediate_size=2816, num_hidden_layers=13, num_attention_heads=16,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=4096, sliding_window=None),
}
_LAYERS_KEY = {"gpt2": "n_layer"}  # the others: num_hidden_layers


def decoder_hf_config(family: str, layers: int | None = None) -> dict:
    """The Hugging Face config.json fields of a benchmark decoder shape."""
    config = dict(DECODER_HF_CONFIGS[family])
    if layers:
        config[_LAYERS_KEY.get(family, "num_hidden_layers")] = layers
    return config


def decoder_config(family: str, layers: int | None = None) -> dict:
    """The same decoder as a jaxaccel config dict (as a manifest stores it)."""
    # deferred: the models load only to write a checkpoint
    from jaxaccel.models import family_spec

    return dataclasses.asdict(family_spec(family).config.from_hf(decoder_hf_config(family, layers)))


def bert_config(vocab: int = 32000, width: int = 2048, layers: int = 12, heads: int = 16,
                mlp: int | None = None, max_positions: int = 512) -> dict:
    """A BERT config dict (as a manifest stores it); the defaults are the reference tree."""
    # deferred: tensorstore, orbax and the models load only to write a checkpoint
    from jaxaccel.models.bert import Config

    return dataclasses.asdict(Config(vocab_size=vocab, hidden_size=width, num_layers=layers,
                                     num_heads=heads, intermediate_size=mlp or 4 * width,
                                     max_position_embeddings=max_positions))


def synthetic_arrays(config: dict, dtype: str, seed: int = 0, family: str = "bert",
                     std: float = 0.02):
    """Yield (name, array, axes) for every parameter of the `family` model `config` describes
    (weights ~N(0, std), norm scales ~1 + that)."""
    # deferred: tensorstore, orbax and the models load only to write a checkpoint
    import ml_dtypes

    from jaxaccel.models.state import abstract_model
    from jaxaccel.parallel.params import param_specs

    _, abstract = abstract_model(family, config)
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    for name, spec in sorted(param_specs(abstract).items()):
        # Small random weights, like a trained model: norms ~1, everything else ~N(0, 0.02).
        values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)
        if "norm_scale" in name:
            values += 1
        yield name, values.astype(np_dtype, copy=False), spec.axes


def write(dest: pathlib.Path, config: dict, dtype: str = "float32",
          chunk_bytes: int | None | str = "auto", codec: str = "none", overwrite: bool = False,
          family: str = "bert", extra_files: dict | None = None, std: float = 0.02):
    """Write the synthetic checkpoint; `chunk_bytes` as the writer's (None: one chunk per
    array), or "auto" for the default layout. Decoders: `family` and `decoder_config`.
    `extra_files`: tokenizer files to ship with it (name -> source path); `std`: the
    weights' spread (larger than a trained model's makes a tiny model's tokens vary)."""
    # deferred: tensorstore, orbax and the models load only to write a checkpoint
    from jaxaccel.checkpoint.layout import DEFAULT_CHUNK_BYTES
    from jaxaccel.checkpoint.manifest import Manifest
    from jaxaccel.checkpoint.writer import write_checkpoint
    from jaxaccel.conversion.hf import CHUNK_RULE

    manifest = Manifest(family=family, config=config, dtype=dtype, arrays={},
                        source={"synthetic": True})
    if chunk_bytes == "auto":
        chunk_bytes = DEFAULT_CHUNK_BYTES
    return write_checkpoint(dest, manifest, synthetic_arrays(config, dtype, family=family, std=std),
                            extra_files or {},
                            chunk_bytes=chunk_bytes, codec=codec, overwrite=overwrite,
                            chunk_rule=CHUNK_RULE)


def write_orbax_default(dest: pathlib.Path, config: dict, dtype: str) -> None:
    """The same tree saved by orbax's StandardCheckpointer with its default options."""
    # deferred: tensorstore, orbax and the models load only to write a checkpoint
    import orbax.checkpoint as ocp

    tree: dict = {}
    for name, array, _ in synthetic_arrays(config, dtype):
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = array
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pathlib.Path(dest).absolute(), tree, force=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxaccel.bench.synthetic",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    parser.add_argument("--vocab", type=int, default=REFERENCE["vocab"])
    parser.add_argument("--width", type=int, default=REFERENCE["width"])
    parser.add_argument("--layers", type=int, default=REFERENCE["layers"])
    parser.add_argument("--heads", type=int, default=REFERENCE["heads"])
    parser.add_argument("--mlp", type=int, default=None, help="default: 4 x width")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--chunking", default="auto", help="as `jaxaccel convert --chunking`")
    parser.add_argument("--codec", default="none", choices=("none", "zstd"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--orbax-default", type=pathlib.Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Write the checkpoint (and the orbax-default copy) the command line asks for."""
    # deferred: tensorstore, orbax and the models load only to write a checkpoint
    from jaxaccel.cli.convert import chunk_bytes_from

    args = parse_args(argv)
    config = bert_config(args.vocab, args.width, args.layers, args.heads, args.mlp)
    start = time.perf_counter()
    manifest = write(args.dest, config, args.dtype, chunk_bytes_from(args.chunking),
                     args.codec, args.overwrite)
    print(f"wrote {args.dest}: {len(manifest.arrays)} arrays, {manifest.total_bytes / 1e9:.3f} GB "
          f"{args.dtype} in {time.perf_counter() - start:.1f} s")
    if args.orbax_default:
        start = time.perf_counter()
        write_orbax_default(args.orbax_default, config, args.dtype)
        print(f"wrote {args.orbax_default} (orbax defaults) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
