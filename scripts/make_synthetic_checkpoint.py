"""Write a transformer-shaped jaxaccel checkpoint of random weights, for restore benchmarks.

The default is the issue's reference tree, 2.68 GB float32: vocab 32000 x width 2048, 12
layers with q, k, v, o 2048x2048, an MLP 2048 -> 8192 -> 2048 and two norms per layer. It is
written as a BERT-family checkpoint (the loader restores it and `embed` runs it), so the
few extra small arrays (biases, position embeddings) add ~0.3% to the bytes.

    python scripts/make_synthetic_checkpoint.py /tmp/ref                # 2.68 GB, 2048 wide
    python scripts/make_synthetic_checkpoint.py /tmp/small --width 256 --layers 4 --vocab 4096
    python scripts/make_synthetic_checkpoint.py /tmp/ref --orbax-default /tmp/ref-orbax

`--orbax-default DIR` also saves the same arrays with orbax's StandardCheckpointer defaults
(zarr3 + zstd, orbax's chunking), the baseline `jaxaccel bench restore --orbax-default` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import numpy as np


def bert_config(vocab: int, width: int, layers: int, heads: int, mlp: int) -> dict:
    from jaxaccel.models.bert import Config

    return dataclasses.asdict(Config(vocab_size=vocab, hidden_size=width, num_layers=layers,
                                     num_heads=heads, intermediate_size=mlp,
                                     max_position_embeddings=512))


def synthetic_arrays(config: dict, dtype: str, seed: int = 0):
    """Yield (name, array, axes) for every parameter of the BERT model `config` describes."""
    import ml_dtypes

    from jaxaccel.models.state import abstract_model, param_specs

    _, abstract = abstract_model("bert", config)
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    for name, spec in sorted(param_specs(abstract).items()):
        # Small random weights, like a trained model: norms ~1, everything else ~N(0, 0.02).
        values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(0.02)
        if "norm_scale" in name:
            values += 1
        yield name, values.astype(np_dtype, copy=False), spec.axes


def write(dest: pathlib.Path, config: dict, dtype: str, chunk_bytes: int | None, codec: str,
          overwrite: bool = False):
    from jaxaccel.checkpoint.manifest import Manifest
    from jaxaccel.checkpoint.writer import write_checkpoint

    manifest = Manifest(family="bert", config=config, dtype=dtype, arrays={},
                        source={"synthetic": True})
    return write_checkpoint(dest, manifest, synthetic_arrays(config, dtype), {},
                            chunk_bytes=chunk_bytes, codec=codec, overwrite=overwrite)


def write_orbax_default(dest: pathlib.Path, config: dict, dtype: str) -> None:
    """The same tree saved by orbax's StandardCheckpointer with its default options."""
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


def main() -> None:
    from jaxaccel.commands.convert import chunk_bytes_from

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=None, help="default: 4 x width")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--chunking", default="auto", help="as `jaxaccel convert --chunking`")
    parser.add_argument("--codec", default="none", choices=("none", "zstd"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--orbax-default", type=pathlib.Path, default=None)
    args = parser.parse_args()
    config = bert_config(args.vocab, args.width, args.layers, args.heads,
                         args.mlp or 4 * args.width)
    start = time.perf_counter()
    manifest = write(args.dest, config, args.dtype, chunk_bytes_from(args.chunking), args.codec,
                     args.overwrite)
    print(f"wrote {args.dest}: {len(manifest.arrays)} arrays, {manifest.total_bytes / 1e9:.3f} GB "
          f"{args.dtype} in {time.perf_counter() - start:.1f} s")
    if args.orbax_default:
        start = time.perf_counter()
        write_orbax_default(args.orbax_default, config, args.dtype)
        print(f"wrote {args.orbax_default} (orbax defaults) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
