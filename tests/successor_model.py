"""A tiny Llama checkpoint whose greedy next token is a chosen function of the current one,
so tests can make the model emit exact token sequences through every output path.

Built in transformers: embeddings are the identity (hidden size = vocabulary), every layer's
output projections are zero (the residual stream stays the current token's one-hot row), and
the LM head maps token i to `successor[i]`: after the final RMSNorm the logits are
sqrt(V) at `successor[i]` and 0 elsewhere.
"""

from __future__ import annotations

import pathlib


def build(root: pathlib.Path, tokenizer, successor: dict[int, int], *, filler: int = 0,
          eos_token_id: int | None = None) -> pathlib.Path:
    """Convert the model (with `tokenizer`, a `tokenizers.Tokenizer`) into `root / "ckpt"`."""
    import torch
    import transformers

    import jaxaccel

    vocab = -(-tokenizer.get_vocab_size(with_added_tokens=True) // 8) * 8
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=vocab, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=eos_token_id,
        bos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    head = torch.zeros(vocab, vocab)
    for i in range(vocab):
        head[successor.get(i, filler), i] = 1.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if name.endswith("norm.weight")
                        else torch.zeros_like(param))
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.copy_(head)
    model.save_pretrained(root / "src", safe_serialization=True)
    tokenizer.save(str(root / "src" / "tokenizer.json"))
    jaxaccel.convert(root / "src", root / "ckpt", progress=False)
    return root / "ckpt"


def chain(successor: dict[int, int], last: int, n: int, filler: int = 0) -> list[int]:
    """The n ids greedy decoding of such a model emits after a prompt ending in `last`."""
    out = []
    for _ in range(n):
        last = successor.get(last, filler)
        out.append(last)
    return out
