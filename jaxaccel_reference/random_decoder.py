"""Write a random-weight decoder as a Hugging Face directory and as a jaxaccel checkpoint.

    python -m jaxaccel_reference.random_decoder /tmp/gpt2-124m       # GPT-2 124M shape
    python -m jaxaccel_reference.random_decoder /tmp/llama --family llama --layers 4

No pretrained decoder weights can be downloaded here; `jaxaccel bench generate` needs only
the shapes. Writes DEST/hf (config.json + model.safetensors, the transformers baseline's
input; transformers initialises the weights, hence this package) and DEST/ckpt (converted;
its manifest points back at DEST/hf).
"""

from __future__ import annotations

import argparse
import pathlib


def hf_model(family: str, layers: int | None):
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":  # GPT-2 small: 124M parameters
        config = transformers.GPT2Config(n_layer=layers or 12)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(  # a ~150M Llama-shaped model with GQA
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers or 12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxaccel_reference.random_decoder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    parser.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="stored dtype of the checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from jaxaccel.convert.hf import convert

    args = parse_args(argv)
    hf_dir = args.dest / "hf"
    hf_model(args.family, args.layers).save_pretrained(hf_dir, safe_serialization=True)
    convert(hf_dir, args.dest / "ckpt", dtype=args.dtype)
    print(f"wrote {hf_dir} and {args.dest / 'ckpt'}")


if __name__ == "__main__":
    main()
