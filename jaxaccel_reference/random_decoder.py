"""Write a random-weight decoder as a Hugging Face directory and as a jaxaccel checkpoint.

    python -m jaxaccel_reference.random_decoder /tmp/gpt2-124m       # GPT-2 124M shape
    python -m jaxaccel_reference.random_decoder /tmp/llama --family llama --layers 4
    python -m jaxaccel_reference.random_decoder /tmp/qwen3 --family qwen3     # Qwen3-0.6B shape
    python -m jaxaccel_reference.random_decoder /tmp/gemma2 --family gemma2   # ~0.45B Gemma 2
    python -m jaxaccel_reference.random_decoder /tmp/mixtral --family mixtral # ~1.0B, 8 experts
    python -m jaxaccel_reference.random_decoder /tmp/gpt2 --without-torch   # DEST/ckpt only

No pretrained decoder weights can be downloaded here; `jaxaccel bench generate` needs only
the shapes. Writes DEST/hf (config.json + model.safetensors, the transformers baseline's
input; transformers initialises the weights, hence this package) and DEST/ckpt (converted;
its manifest points back at DEST/hf). `--without-torch` writes DEST/ckpt straight from numpy
(same shapes, `jaxaccel.bench.synthetic`), for machines without the reference extra, e.g. a
GPU host where a CUDA torch would cost gigabytes.
"""

from __future__ import annotations

import argparse
import pathlib


def hf_model(family: str, layers: int | None):
    import torch
    import transformers

    from jaxaccel.bench.synthetic import decoder_hf_config

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**decoder_hf_config(family, layers))
    return transformers.AutoModelForCausalLM.from_config(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxaccel_reference.random_decoder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    from jaxaccel.bench.synthetic import DECODER_HF_CONFIGS

    parser.add_argument("--family", choices=tuple(DECODER_HF_CONFIGS), default="gpt2")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="stored dtype of the checkpoint")
    parser.add_argument("--without-torch", action="store_true",
                        help="write DEST/ckpt from numpy only (no DEST/hf, no torch needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from jaxaccel.conversion.hf import convert

    args = parse_args(argv)
    if args.without_torch:
        from jaxaccel.bench import synthetic

        synthetic.write(args.dest / "ckpt", synthetic.decoder_config(args.family, args.layers),
                        args.dtype, family=args.family)
        print(f"wrote {args.dest / 'ckpt'} (random weights, no Hugging Face source)")
        return
    hf_dir = args.dest / "hf"
    hf_model(args.family, args.layers).save_pretrained(hf_dir, safe_serialization=True)
    convert(hf_dir, args.dest / "ckpt", dtype=args.dtype)
    print(f"wrote {hf_dir} and {args.dest / 'ckpt'}")


if __name__ == "__main__":
    main()
