"""`jaxaccel serve CKPT`: an OpenAI-compatible HTTP server (completions, chat, embeddings)."""

from __future__ import annotations

import pathlib
import signal
import sys
from typing import Optional

import typer

from jaxaccel.cli import options
from jaxaccel.utils.units import parse_bytes

# The engine's settings, as `generate` declares them (vLLM's names).
MAX_NUM_SEQS = typer.Option(64, "--max-num-seqs", min=1, help="Sequences in a step at most.")
MAX_NUM_BATCHED_TOKENS = typer.Option(512, "--max-num-batched-tokens", min=1,
                                      help="Tokens in a step at most (chunked prefill).")
KV_CACHE_MEMORY = typer.Option(None, "--kv-cache-memory", help="KV cache pool size, e.g. "
                               "2GiB (default: enough for --max-num-seqs full-length "
                               "sequences, at most 1GiB).")
NO_PREFIX_CACHE = typer.Option(False, "--no-prefix-cache", help="Do not share the KV pages "
                               "of equal prompt prefixes between requests.")


def engine_args_from(max_num_seqs: int, max_num_batched_tokens: int,
                     kv_cache_memory: Optional[str], no_prefix_cache: bool) -> dict:
    """The engine flags as LLMEngine's keyword arguments."""
    args = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "enable_prefix_caching": not no_prefix_cache}
    if kv_cache_memory:
        args["kv_cache_bytes"] = parse_bytes(kv_cache_memory, "--kv-cache-memory")
    return args


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
        max_num_seqs: int = MAX_NUM_SEQS,
        max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
        kv_cache_memory: Optional[str] = KV_CACHE_MEMORY,
        no_prefix_cache: bool = NO_PREFIX_CACHE,
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="JAXACCEL_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on "
                                              "/v1 routes ($JAXACCEL_API_KEY)."),
        served_model_name: Optional[str] = typer.Option(
            None, "--served-model-name", help="The model name clients send (default: CKPT "
            "as given)."),
        chat_template: Optional[pathlib.Path] = typer.Option(
            None, "--chat-template", help="A jinja2 chat template file (default: the "
            "checkpoint's tokenizer_config.json chat_template)."),
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
        engine_args = engine_args_from(max_num_seqs, max_num_batched_tokens, kv_cache_memory,
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
