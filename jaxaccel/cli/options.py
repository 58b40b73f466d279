"""Options shared by several commands, declared once so their help text stays the same."""

from __future__ import annotations

from typing import Optional

import typer

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
    None, "--kernels/--no-kernels", help="bfloat16 on one CPU device: read the matmul "
    "weights packed, through jaxaccel's compiled kernel (built with the system C++ "
    "compiler on first use, then cached). Default: wherever it applies; --kernels "
    "insists (an error where it cannot), --no-kernels keeps XLA's own dots.")

PROMPT_NAME = typer.Option(
    None, "--prompt-name", help="Put this prompt of the model's "
    "config_sentence_transformers.json before every text (default: its "
    "default_prompt_name, if any), as sentence-transformers' encode(prompt_name=).")
