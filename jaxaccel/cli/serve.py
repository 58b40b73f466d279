"""`jaxaccel serve CKPT`: an OpenAI-compatible HTTP server (completions, chat, embeddings)."""

from __future__ import annotations

import pathlib
import signal
import sys
from typing import Optional

import typer

from jaxaccel.cli import options

def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        ckpt: str = typer.Argument(..., help=options.CKPT_HELP),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", min=0, max=65535),
        mesh: Optional[str] = options.MESH,
        rules: str = options.RULES,
        dtype: Optional[str] = options.DTYPE,
        quantize: Optional[str] = options.QUANTIZE,
        max_num_seqs: int = options.MAX_NUM_SEQS,
        max_num_batched_tokens: int = options.MAX_NUM_BATCHED_TOKENS,
        kv_cache_memory: Optional[str] = options.KV_CACHE_MEMORY,
        no_prefix_cache: bool = options.NO_PREFIX_CACHE,
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="JAXACCEL_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on "
                                              "/v1 routes ($JAXACCEL_API_KEY)."),
        served_model_name: Optional[str] = options.SERVED_MODEL_NAME,
        chat_template: Optional[pathlib.Path] = options.CHAT_TEMPLATE,
        max_waiting: Optional[int] = typer.Option(
            None, "--max-waiting", min=0, help="Requests queued beyond this are answered "
            "429 (default: no limit)."),
        drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0, help="On "
                                            "SIGTERM: seconds running requests get to finish."),
        quiet: bool = options.QUIET,
    ) -> None:
        """Serve CKPT over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions
        (decoders), /v1/embeddings (encoders), /v1/models, /health, /metrics."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        from jaxaccel.serving.app import ServerState, serve
        from jaxaccel.serving.load import open_server

        layout = options.layout_from(mesh, rules)
        scheme = options.scheme_from(quantize)
        engine_args = options.engine_args_from(max_num_seqs, max_num_batched_tokens, kv_cache_memory,
                                       no_prefix_cache)

        def load():
            return open_server(ckpt, layout=layout, dtype=dtype, quantize=scheme,
                               served_model_name=served_model_name,
                               chat_template_file=chat_template, engine_args=engine_args,
                               max_waiting=max_waiting, quiet=quiet)

        state = ServerState(load, api_key)
        if not quiet:
            print(f"jaxaccel serve: http://{host}:{port} (GET /health is 200 once {ckpt} "
                  f"is loaded)", file=sys.stderr, flush=True)
        # uvicorn handles SIGTERM (stop accepting, drain) and raises it again when done:
        # by then the drain is over, and the exit is a clean 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        serve(state, host, port, drain_timeout)
        if state.error is not None:
            raise state.error
