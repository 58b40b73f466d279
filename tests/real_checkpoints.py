"""Tiny Hugging Face decoders shaped like shipped repositories, for the real-checkpoint tests:
built with transformers, saved as safetensors, converted, and run through the CLI in-process."""

from __future__ import annotations

import json
import pathlib

from safetensors.numpy import load_file, save_file

FAMILIES = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny_config(kind: str, vocab: int = 128, hidden: int = 16, layers: int = 1,
                positions: int = 64, **overrides) -> dict:
    if kind == "gpt2":
        base = dict(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers,
                    n_head=2, bos_token_id=1, eos_token_id=2)
    else:
        base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 3,
                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=positions, bos_token_id=1, eos_token_id=2)
    return {**base, **overrides}


def build(kind: str, seed: int = 0, **overrides):
    """A transformers causal LM with random, non-trivial weights (eval mode)."""
    import pytest  # deferred: only here, where a missing reference extra means skip

    torch = pytest.importorskip("torch", reason="reference extra (torch) not installed")
    transformers = pytest.importorskip("transformers", reason="reference extra not installed")

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[kind])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**tiny_config(kind, **overrides))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def save(model, directory: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def greedy(model, prompt: list[int], n: int, eos=None) -> list[int]:
    """transformers' greedy new tokens (stopping on any of `eos` when given)."""
    import torch  # deferred: see build

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def edit_json(path: pathlib.Path, **changes) -> None:
    values = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**values, **changes}))


def edit_tensors(directory: pathlib.Path, edit) -> None:
    """Rewrite model.safetensors with `edit(dict of arrays)` applied."""
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def reshard(directory: pathlib.Path, groups: list[list[str]], index: bool = True) -> list[str]:
    """Split model.safetensors into len(groups) shards (names may repeat across groups);
    write an index mapping each name to the first group holding it. Returns the file names."""
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        save_file({k: tensors[k] for k in group}, directory / name, metadata={"format": "pt"})
        for k in group:
            weight_map.setdefault(k, name)
    if index:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names
