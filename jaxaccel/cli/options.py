"""Options shared by several commands, declared once so their help text stays the same."""

from __future__ import annotations

from typing import Optional

import typer

from jaxaccel.errors import UsageError
from jaxaccel.utils.units import parse_bytes

CKPT_HELP = ("Checkpoint directory, or a remote one: gs://BUCKET/PATH, s3://BUCKET/PATH, "
             "https://HOST/PATH (chunks cached locally; see `jaxaccel cache`).")
DTYPE = typer.Option(None, "--dtype", help="Compute dtype: float32 or bfloat16 (default: the "
                     "checkpoint's). bfloat16 keeps norms, softmax and matmul accumulation in "
                     "float32.")
MESH = typer.Option(None, "--mesh", help="Device mesh, e.g. data=2,model=4 (axes data, model, "
                    "stage, expert; -1 = the rest of the devices). Default: one device.")
RULES = typer.Option("dp_tp", "--rules", help="Logical-axis rule table: replicated, dp, tp, "
                     "dp_tp, pp, dp_tp_pp; mixture-of-experts models: ep, dp_ep, "
                     "tp_ep.")
RULE_OVERRIDES = typer.Option(None, "--rule", help="Override single rules, e.g. "
                              "'heads=None,mlp=model'.")
MICROBATCHES = typer.Option(None, "--microbatches", min=1, help="Pipeline microbatches on a "
                            "mesh with stage>1 (default: the stage count). More shrink the "
                            "bubble, (S-1)/(M+S-1); the batch is padded to a multiple.")
COMPILE_CACHE = typer.Option(None, "--compile-cache", help="Persistent XLA compilation cache "
                             "directory (default: ~/.cache/jaxaccel/xla): a second start with "
                             "the same model, mesh and shapes skips compiling.")
NO_COMPILE_CACHE = typer.Option(False, "--no-compile-cache", help="Do not read or write the "
                                "persistent compilation cache.")
QUANTIZE = typer.Option(None, "--quantize", help="Weight-only quantization of the matmul "
                        "weights while they restore: int8 (per output channel), int4 (groups "
                        "along the input axis, --group-size) or fp8 (e4m3; GPU/TPU only). "
                        "Embeddings, norms and biases stay in the compute dtype.")
GROUP_SIZE = typer.Option(128, "--group-size", min=1, help="int4: input-axis elements per scale "
                          "(a power of two).")
QUANTIZE_HEAD = typer.Option(False, "--quantize-head", help="Also quantize the LM head (int8 "
                             "per output channel under every scheme); a tied head gets a "
                             "quantized copy of the embedding table, whose lookup stays in "
                             "the compute dtype.")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout (for machines).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines.")
HOST_MEMORY_BUDGET = typer.Option("2GiB", "--host-memory-budget",
                                  help="Bound on host memory held by restore reads in flight.")
VERIFY_CHECKSUMS = typer.Option(True, "--verify-checksums/--no-verify", help="Check every "
                                "chunk's crc32c as it is read (the default; +0-25% of restore "
                                "time, measured on 2.68 GB). --no-verify skips it; missing or "
                                "truncated chunks are always refused; `jaxaccel verify` checks "
                                "everything.")
DEVICE_MEMORY = typer.Option(None, "--device-memory", help="Memory per device, e.g. 16GiB "
                             "(default: what the backend reports; CPU reports none). When set or "
                             "detected, the run is planned first and refused before reading a "
                             "byte if a device would overflow.")


def layout_from(mesh: Optional[str], rules: str, rule_overrides: Optional[str] = None):
    from jaxaccel.parallel.sharding import (
        Layout,  # deferred: builds a jax mesh (after --host-devices)
    )

    return Layout.create(mesh, rules, rule_overrides)


def scheme_from(quantize: Optional[str], group_size: int = 128, head: bool = False):
    """--quantize/--group-size/--quantize-head as a quantization.Scheme (None: no quantization)."""
    from jaxaccel.models.quantization import Scheme  # deferred: imports jax and qwix

    return Scheme.parse(quantize, group_size, head)


def device_memory_from(text: Optional[str]) -> Optional[int]:
    """--device-memory as bytes (None when not given)."""
    return parse_bytes(text, "--device-memory") if text else None

KERNELS = typer.Option(
    None, "--kernels/--no-kernels", help="bfloat16 or float32 on one CPU device: read the "
    "matmul weights packed, through jaxaccel's compiled kernels (built with the system C++ "
    "compiler on first use, then cached). Default: wherever it applies; --kernels "
    "insists (an error where it cannot), --no-kernels keeps XLA's own dots.")

PROMPT_NAME = typer.Option(
    None, "--prompt-name", help="Put this prompt of the model's "
    "config_sentence_transformers.json before every text (default: its "
    "default_prompt_name, if any), as sentence-transformers' encode(prompt_name=).")

# The generation engine's settings (`generate`; `serve` declares the same) -----------------

MAX_NUM_SEQS = typer.Option(64, "--max-num-seqs", min=1, help="Sequences in flight at once "
                            "(rows of one engine step), as vLLM's max_num_seqs.")
MAX_NUM_BATCHED_TOKENS = typer.Option(512, "--max-num-batched-tokens", min=1, help="Tokens "
                                      "per engine step (decode tokens plus prefill chunks), "
                                      "as vLLM's max_num_batched_tokens.")
KV_CACHE_MEMORY = typer.Option(None, "--kv-cache-memory", help="Memory of the paged KV "
                               "cache: bytes with units (e.g. 2GiB), or a fraction in (0, 1] of "
                               "the memory free once the weights are placed (host memory on "
                               "CPU). Default: 1GiB, or less when --max-num-seqs sequences of "
                               "the model's maximum length fit in less.")
NO_PREFIX_CACHE = typer.Option(False, "--no-prefix-cache", help="Do not reuse the KV pages "
                               "of prompt prefixes shared between requests (on by default).")


def kv_cache_memory_from(text: Optional[str]) -> int | float | None:
    """--kv-cache-memory as bytes (int) or a fraction of free memory (float in (0, 1])."""
    if text is None:
        return None
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None and "." in text:  # "0.5": a fraction; "1000": bytes
        if not 0.0 < fraction <= 1.0:
            raise UsageError(f"--kv-cache-memory: a fraction must be in (0, 1], got {text!r}; "
                             f"give bytes with units (e.g. 2GiB) for an absolute size")
        return fraction
    return parse_bytes(text, "--kv-cache-memory")


def engine_args_from(max_num_seqs: int, max_num_batched_tokens: int,
                     kv_cache_memory: Optional[str], no_prefix_cache: bool) -> dict:
    """The engine flags as `LLMEngine` keyword arguments."""
    return {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
            "kv_cache_bytes": kv_cache_memory_from(kv_cache_memory),
            "enable_prefix_caching": not no_prefix_cache}


# The OpenAI-compatible front ends (`serve`, `run-batch`) -----------------------------------

SERVED_MODEL_NAME = typer.Option(None, "--served-model-name", help="The model name clients "
                                 "send (default: CKPT as given).")
CHAT_TEMPLATE = typer.Option(None, "--chat-template", help="A jinja2 chat template file "
                             "(default: the checkpoint's tokenizer_config.json chat_template).")
