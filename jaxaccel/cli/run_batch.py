"""`jaxaccel run-batch -i requests.jsonl -o results.jsonl CKPT`: OpenAI's batch file format
through the serving engine, without HTTP."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Optional

import typer

from jaxaccel.cli import options
from jaxaccel.utils.files import read_lines, write_atomically


def register(app: typer.Typer) -> None:
    @app.command("run-batch")
    def run_batch_cmd(
        ckpt: str = typer.Argument(..., help=options.CKPT_HELP),
        input_file: pathlib.Path = typer.Option(..., "--input-file", "-i", help="Batch "
                                                "requests, one JSON object per line."),
        output_file: pathlib.Path = typer.Option(..., "--output-file", "-o", help="Results, "
                                                 "one line per request, in input order."),
        mesh: Optional[str] = options.MESH,
        rules: str = options.RULES,
        dtype: Optional[str] = options.DTYPE,
        quantize: Optional[str] = options.QUANTIZE,
        max_num_seqs: int = options.MAX_NUM_SEQS,
        max_num_batched_tokens: int = options.MAX_NUM_BATCHED_TOKENS,
        kv_cache_memory: Optional[str] = options.KV_CACHE_MEMORY,
        no_prefix_cache: bool = options.NO_PREFIX_CACHE,
        served_model_name: Optional[str] = options.SERVED_MODEL_NAME,
        chat_template: Optional[pathlib.Path] = options.CHAT_TEMPLATE,
        quiet: bool = options.QUIET,
    ) -> None:
        """Run every request of a batch file (/v1/completions, /v1/chat/completions,
        /v1/embeddings lines) and write one result line each; a bad line is an error line."""
        # deferred: jax loads only when a command runs
        import asyncio

        from jaxaccel.serving.batch import run_lines
        from jaxaccel.serving.load import open_server

        lines = read_lines(input_file, "--input-file")
        server = open_server(ckpt, layout=options.layout_from(mesh, rules), dtype=dtype,
                             quantize=options.scheme_from(quantize),
                             served_model_name=served_model_name,
                             chat_template_file=chat_template,
                             engine_args=options.engine_args_from(max_num_seqs, max_num_batched_tokens,
                                                          kv_cache_memory, no_prefix_cache),
                             quiet=quiet)
        server.start()
        try:
            results = asyncio.run(run_lines(server, lines))
        finally:
            server.stop(drain=False, timeout=30)
        write_atomically(output_file, "".join(json.dumps(r) + "\n" for r in results).encode())
        failed = sum(1 for r in results if r["error"] or r["response"]["status_code"] != 200)
        if not quiet:
            print(f"{len(results)} requests, {failed} failed -> {output_file}", file=sys.stderr)
