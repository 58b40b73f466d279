"""Write a random-weight decoder as a Hugging Face directory and as a jaxaccel checkpoint.

    python scripts/make_random_decoder.py /tmp/gpt2-124m                 # GPT-2 124M shape
    python scripts/make_random_decoder.py /tmp/llama --family llama --layers 4
    python scripts/make_random_decoder.py /tmp/gpt2 --without-torch      # DEST/ckpt only

No pretrained decoder weights can be downloaded here; `jaxaccel bench generate` needs only
the shapes. Writes DEST/hf (config.json + model.safetensors, the transformers baseline's
input) and DEST/ckpt (converted; its manifest points back at DEST/hf). `--without-torch`
writes DEST/ckpt straight from numpy (same shapes, no transformers baseline): for machines
without the reference extra, e.g. a GPU host where a CUDA torch would cost gigabytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

# Hugging Face config fields of each shape (GPT-2 small: 124M parameters; a ~150M
# Llama-shaped model with GQA); `--layers` overrides the layer count.
HF_CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                 n_head=12, bos_token_id=50256, eos_token_id=50256),
    "llama": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  max_position_embeddings=2048),
}
LAYERS_KEY = {"gpt2": "n_layer", "llama": "num_hidden_layers"}


def hf_config(family: str, layers: int | None) -> dict:
    config = dict(HF_CONFIGS[family])
    if layers:
        config[LAYERS_KEY[family]] = layers
    return config


def hf_model(family: str, layers: int | None):
    import torch
    import transformers

    torch.manual_seed(0)
    fields = {k: v for k, v in hf_config(family, layers).items() if k != "model_type"}
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))


def write_without_torch(family: str, layers: int | None, dest: pathlib.Path, dtype: str):
    """The same shapes as `hf_model`, random N(0, 0.02) weights (norm scales ~1) written
    directly as a jaxaccel checkpoint, as jaxaccel.bench.synthetic does for BERT."""
    import ml_dtypes
    import numpy as np

    from jaxaccel.checkpoint.layout import DEFAULT_CHUNK_BYTES
    from jaxaccel.checkpoint.manifest import Manifest
    from jaxaccel.checkpoint.writer import write_checkpoint
    from jaxaccel.models import family_module
    from jaxaccel.models.state import abstract_model, param_specs

    config = family_module(family).Config.from_hf(hf_config(family, layers))
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)

    def arrays():
        for name, spec in sorted(param_specs(abstract_model(family, config)[1]).items()):
            values = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(0.02)
            if "norm_scale" in name:
                values += 1
            yield name, values.astype(np_dtype, copy=False), spec.axes

    manifest = Manifest(family=family, config=dataclasses.asdict(config), dtype=dtype,
                        arrays={}, source={"synthetic": True})
    write_checkpoint(dest, manifest, arrays(), {}, chunk_bytes=DEFAULT_CHUNK_BYTES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    parser.add_argument("--family", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="stored dtype of the checkpoint")
    parser.add_argument("--without-torch", action="store_true",
                        help="write DEST/ckpt from numpy only (no DEST/hf, no torch needed)")
    args = parser.parse_args()

    if args.without_torch:
        write_without_torch(args.family, args.layers, args.dest / "ckpt", args.dtype)
        print(f"wrote {args.dest / 'ckpt'} (random weights, no Hugging Face source)")
        return

    from jaxaccel.convert.hf import convert

    hf_dir = args.dest / "hf"
    hf_model(args.family, args.layers).save_pretrained(hf_dir, safe_serialization=True)
    convert(hf_dir, args.dest / "ckpt", dtype=args.dtype)
    print(f"wrote {hf_dir} and {args.dest / 'ckpt'}")


if __name__ == "__main__":
    main()
