"""A tiny random-weight decoder checkpoint with a byte-level BPE tokenizer and a chat
template (numpy + `tokenizers` only: no torch), and a server on 127.0.0.1 for the serving
tests."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import socket
import threading
import time

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "héllo wörld, ça va? 日本語 €",
          "Compiled inference with JAX runs on many devices.", "user: hi\nassistant:"] * 20
EOS = "<|endoftext|>"


def write_tokenizer(dest: pathlib.Path, vocab: int) -> dict[str, pathlib.Path]:
    """tokenizer.json (byte-level BPE trained on CORPUS, `vocab` ids at most) and
    tokenizer_config.json with CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": EOS, "bos_token": EOS}))
    return {"tokenizer.json": dest / "tokenizer.json",
            "tokenizer_config.json": dest / "tokenizer_config.json"}


def write_decoder(dest: pathlib.Path, vocab: int = 320, tokenizer: bool = True) -> pathlib.Path:
    """A 2-layer GPT-2-shaped random decoder (hidden 32, 128 positions)."""
    from jaxaccel.bench import synthetic
    from jaxaccel.models import family_spec

    files = write_tokenizer(dest.parent / f"{dest.name}-tok", vocab) if tokenizer else {}
    hf = dict(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2,
              bos_token_id=0, eos_token_id=0)
    config = dataclasses.asdict(family_spec("gpt2").config.from_hf(hf))
    synthetic.write(dest, config, "float32", family="gpt2", extra_files=files, std=0.5)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn in a thread of this process, on a free port, until `stop`."""

    def __init__(self, state):
        import uvicorn

        from jaxaccel.serving.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
