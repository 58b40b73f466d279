"""`jaxaccel embed CKPT`: sentence embeddings from an encoder checkpoint."""

from __future__ import annotations

import json
import pathlib
import time
from typing import List, Optional

import typer

from jaxaccel.utils import progress
from jaxaccel.cli import options
from jaxaccel.errors import UsageError
from jaxaccel.utils.files import read_lines, save_npy_atomically
from jaxaccel.utils.units import parse_bytes


def read_text_lines(path: pathlib.Path) -> list[str]:
    """One text per line, UTF-8; a clear error for a missing, empty or non-UTF-8 file."""
    return read_lines(path, "--input")


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed_cmd(
        ckpt: str = typer.Argument(..., help="Encoder checkpoint: " + options.CKPT_HELP),
        text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="A text to embed "
                                                 "(repeatable)."),
        input_file: Optional[pathlib.Path] = typer.Option(None, "--input", "-i", help="UTF-8 "
                                                          "file with one text per line."),
        dtype: Optional[str] = options.DTYPE,
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Rows per jitted call."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=2, help="Token limit "
                                                 "per text (default: the model's maximum)."),
        prompt_name: Optional[str] = options.PROMPT_NAME,
        no_truncate: bool = typer.Option(False, "--no-truncate", help="Refuse texts longer than "
                                         "--max-length instead of truncating with a warning."),
        out: Optional[pathlib.Path] = typer.Option(None, "--out", help="Save a float32 [n, dim] "
                                                   ".npy array, rows in input order."),
        mesh: Optional[str] = options.MESH,
        rules: str = options.RULES,
        rule: Optional[str] = options.RULE_OVERRIDES,
        budget: str = options.HOST_MEMORY_BUDGET,
        device_memory: Optional[str] = options.DEVICE_MEMORY,
        verify_checksums: bool = options.VERIFY_CHECKSUMS,
        microbatches: Optional[int] = options.MICROBATCHES,
        quantize: Optional[str] = options.QUANTIZE,
        group_size: int = options.GROUP_SIZE,
        compile_cache: Optional[pathlib.Path] = options.COMPILE_CACHE,
        no_compile_cache: bool = options.NO_COMPILE_CACHE,
        as_json: bool = options.JSON,
        quiet: bool = options.QUIET,
    ) -> None:
        """Embed texts: sentence embeddings with the model's sentence-transformers pipeline
        (prompt, pooling, Dense, Normalize as converted; without one, mean-pooled and
        L2-normalised), computed by a jitted, sharded forward pass."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        from jaxaccel.parallel import distributed
        from jaxaccel.startup import coldstart
        from jaxaccel.runtime import compile_cache as xla_cache

        if bool(text) == bool(input_file):
            raise UsageError("give texts with --text (repeatable) or --input FILE, not both")
        texts = list(text) if text else read_text_lines(input_file)
        xla_cache.configure(compile_cache, enabled=not no_compile_cache)
        started, encoded = coldstart.start_for_texts(
            ckpt, texts, options.layout_from(mesh, rules, rule), dtype,
            device_memory=options.device_memory_from(device_memory), batch_size=batch_size,
            max_length=max_length, truncate=not no_truncate, microbatches=microbatches,
            prompt_name=prompt_name,
            quantize=options.scheme_from(quantize, group_size),
            host_memory_budget=parse_bytes(budget, "--host-memory-budget"),
            verify_checksums=verify_checksums, quiet=quiet)
        embedder, loaded, truncated = started.embedder, started.loaded, encoded.truncated
        start = time.perf_counter()
        embeddings = embedder.embed_ids(encoded.ids)
        seconds = time.perf_counter() - start
        if distributed.is_output_process():  # multi-host: one copy of the output
            report(ckpt, texts, embeddings, embedder.max_length, truncated, loaded.dtype,
                   seconds, out, as_json, quiet)


def report(ckpt, texts, embeddings, max_length: int, truncated: list[int], dtype: str,
           seconds: float, out, as_json: bool, quiet: bool) -> None:
    """Warn about truncation, save --out, print JSON or a summary line."""
    if truncated:
        progress.say(f"warning: {len(truncated)} input(s) truncated to {max_length} "
                     f"tokens (first: input {truncated[0] + 1}); --no-truncate refuses them")
    if out:
        save_npy_atomically(out, embeddings)
    if as_json:
        print(json.dumps({"model": str(ckpt), "dtype": dtype, "embeddings": embeddings.tolist()}))
    else:
        progress.say(f"embedded {len(texts)} text(s) -> [{embeddings.shape[0]}, "
                     f"{embeddings.shape[1]}] {dtype} in {seconds:.2f} s"
                     + (f"; saved {out}" if out else ""), quiet)
