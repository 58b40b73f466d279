"""`jaxaccel embed CKPT`: sentence embeddings from an encoder checkpoint."""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import List, Optional

import typer

from jaxaccel.commands import options


def read_text_lines(path: pathlib.Path) -> list[str]:
    """One text per line, UTF-8; a clear error for a missing, empty or non-UTF-8 file."""
    from jaxaccel.tokenizer import InputError

    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"--input {path}: cannot be read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(f"--input {path}: not UTF-8 (line {line}, byte {err.start})") from None
    lines = text.splitlines()
    if not lines:
        raise InputError(f"--input {path}: the file is empty; expected one text per line")
    return lines


def save_npy_atomically(path: pathlib.Path, array) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def load_for_inference(ckpt, mesh, rules, rule_overrides, dtype, budget: str, quiet: bool, *,
                       device_memory: str | None = None, batch: int = 1, seq: int | None = None,
                       max_new_tokens: int = 0, verify_checksums: bool = False):
    """Plan (refusing a run that would overflow a device, before reading a byte), then load."""
    from jaxaccel.loader import load_model
    from jaxaccel.planner import refuse_if_too_big
    from jaxaccel.units import parse_bytes

    layout = options.layout_from(mesh, rules, rule_overrides)
    memory = parse_bytes(device_memory, "--device-memory") if device_memory else None
    refuse_if_too_big(ckpt, layout, dtype, batch=batch, seq=seq, max_new_tokens=max_new_tokens,
                      device_memory=memory)
    return load_model(ckpt, layout, dtype,
                      host_memory_budget=parse_bytes(budget, "--host-memory-budget"), quiet=quiet,
                      verify_checksums=verify_checksums)


def start_for_texts(ckpt, texts, mesh, rules, rule_overrides, dtype, budget: str, quiet: bool,
                    *, device_memory, batch_size: int, max_length, truncate: bool, microbatches,
                    verify_checksums: bool):
    """Tokenise first (bad input fails before a byte is read), then restore the weights while
    XLA compiles the forward for exactly the buckets these texts need."""
    from jaxaccel.coldstart import batch_shapes, start_embedder
    from jaxaccel.loader import plan_model
    from jaxaccel.planner import refuse_if_too_big
    from jaxaccel.tokenizer import InputError, TextTokenizer
    from jaxaccel.units import parse_bytes

    layout = options.layout_from(mesh, rules, rule_overrides)
    memory = parse_bytes(device_memory, "--device-memory") if device_memory else None
    refuse_if_too_big(ckpt, layout, dtype, batch=min(batch_size, len(texts)), seq=max_length,
                      device_memory=memory)
    plan = plan_model(ckpt, layout, dtype)
    if plan.manifest.family != "bert" or "tokenizer.json" not in plan.manifest.tokenizer_files:
        raise InputError(f"{ckpt}: embed needs an encoder checkpoint with a tokenizer.json "
                         f"(this one is {plan.manifest.family})")
    limit = min(max_length or plan.config.default_length, plan.config.max_length)
    encoded = TextTokenizer(pathlib.Path(ckpt) / "tokenizer.json").encode(texts, limit,
                                                                           truncate=truncate)
    shapes = batch_shapes(plan, [len(ids) for ids in encoded.ids], batch_size, max_length,
                          microbatches)
    started = start_embedder(ckpt, layout, dtype, shapes=shapes, batch_size=batch_size,
                             max_length=max_length, microbatches=microbatches,
                             host_memory_budget=parse_bytes(budget, "--host-memory-budget"),
                             verify_checksums=verify_checksums, quiet=quiet, plan=plan)
    return started, encoded


def register(app: typer.Typer) -> None:
    @app.command("embed")
    def embed_cmd(
        ckpt: pathlib.Path = typer.Argument(..., help="Encoder checkpoint directory."),
        text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="A text to embed "
                                                 "(repeatable)."),
        input_file: Optional[pathlib.Path] = typer.Option(None, "--input", "-i", help="UTF-8 "
                                                          "file with one text per line."),
        dtype: Optional[str] = options.DTYPE,
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Rows per jitted call."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=2, help="Token limit "
                                                 "per text (default: the model's maximum)."),
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
        compile_cache: Optional[pathlib.Path] = options.COMPILE_CACHE,
        no_compile_cache: bool = options.NO_COMPILE_CACHE,
        as_json: bool = options.JSON,
        quiet: bool = options.QUIET,
    ) -> None:
        """Embed texts: mean-pooled, L2-normalised sentence embeddings (sentence-transformers
        semantics), computed by a jitted, sharded forward pass."""
        from jaxaccel import compile_cache as xla_cache
        from jaxaccel import distributed
        from jaxaccel.errors import UsageError

        if bool(text) == bool(input_file):
            raise UsageError("give texts with --text (repeatable) or --input FILE, not both")
        texts = list(text) if text else read_text_lines(input_file)
        xla_cache.configure(compile_cache, enabled=not no_compile_cache)
        started, encoded = start_for_texts(ckpt, texts, mesh, rules, rule, dtype, budget, quiet,
                                           device_memory=device_memory, batch_size=batch_size,
                                           max_length=max_length, truncate=not no_truncate,
                                           microbatches=microbatches,
                                           verify_checksums=verify_checksums)
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
    from jaxaccel import progress

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
