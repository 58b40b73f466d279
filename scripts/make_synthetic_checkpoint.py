"""Write a transformer-shaped jaxaccel checkpoint of random weights, for restore benchmarks.

    python scripts/make_synthetic_checkpoint.py /tmp/ref                # 2.68 GB, 2048 wide
    python scripts/make_synthetic_checkpoint.py /tmp/small --width 256 --layers 4 --vocab 4096
    python scripts/make_synthetic_checkpoint.py /tmp/ref --orbax-default /tmp/ref-orbax

The default is the reference tree of `jaxaccel bench restore` (2.68 GB float32, see
jaxaccel/bench/synthetic.py). `--orbax-default DIR` also saves the same arrays with orbax's
StandardCheckpointer defaults, the baseline `jaxaccel bench restore --orbax-default` times.
"""

from __future__ import annotations

import argparse
import pathlib
import time


def main() -> None:
    from jaxaccel.bench import synthetic
    from jaxaccel.commands.convert import chunk_bytes_from

    ref = synthetic.REFERENCE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    parser.add_argument("--vocab", type=int, default=ref["vocab"])
    parser.add_argument("--width", type=int, default=ref["width"])
    parser.add_argument("--layers", type=int, default=ref["layers"])
    parser.add_argument("--heads", type=int, default=ref["heads"])
    parser.add_argument("--mlp", type=int, default=None, help="default: 4 x width")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--chunking", default="auto", help="as `jaxaccel convert --chunking`")
    parser.add_argument("--codec", default="none", choices=("none", "zstd"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--orbax-default", type=pathlib.Path, default=None)
    args = parser.parse_args()
    config = synthetic.bert_config(args.vocab, args.width, args.layers, args.heads,
                                   args.mlp)
    start = time.perf_counter()
    manifest = synthetic.write(args.dest, config, args.dtype, chunk_bytes_from(args.chunking),
                               args.codec, args.overwrite)
    print(f"wrote {args.dest}: {len(manifest.arrays)} arrays, {manifest.total_bytes / 1e9:.3f} GB "
          f"{args.dtype} in {time.perf_counter() - start:.1f} s")
    if args.orbax_default:
        start = time.perf_counter()
        synthetic.write_orbax_default(args.orbax_default, config, args.dtype)
        print(f"wrote {args.orbax_default} (orbax defaults) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
