"""`jaxaccel convert SRC DEST`: Hugging Face safetensors directory -> jaxaccel checkpoint."""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Optional

import typer

from jaxaccel import models
from jaxaccel.cli.options import GROUP_SIZE, JSON, QUANTIZE_HEAD, QUIET
from jaxaccel.utils.units import parse_bytes


def chunk_bytes_from(chunking: str) -> int | None:
    if chunking == "auto":
        from jaxaccel.checkpoint.layout import (
            DEFAULT_CHUNK_BYTES,  # deferred: tensorstore
        )

        return DEFAULT_CHUNK_BYTES
    if chunking == "none":
        return None
    return parse_bytes(chunking, "--chunking")


_SRC = typer.Argument(..., help="Hugging Face model directory (config.json + "
    "*.safetensors), or `minilm` for the bundled all-MiniLM-L6-v2.")
_DEST = typer.Argument(..., help="New checkpoint directory (must not exist), or "
    "gs://BUCKET/PATH, s3://BUCKET/PATH (manifest written last).")
_DTYPE = typer.Option("float32", "--dtype", help="Stored dtype: float32, bfloat16 "
    "(halves the bytes) or float16.")
_FAMILY = typer.Option("auto", "--family", help="Model family: auto (from "
    f"config.json's model_type), {', '.join(models.known_families())}.")
_FORCE_FAMILY = typer.Option(False, "--force-family", help="Convert with --family even "
    "where config.json's model_type says another architecture (refused by default, naming "
    "both: the weights would run with the wrong equations); warns.")
_LAYOUT = typer.Option("hf", "--layout", help="Source layout: hf (Hugging Face), "
    "or another layout the family reads, e.g. `--layout torchvision` for an image "
    "classifier (a torchvision state dict as safetensors; config.json optional, for labels).")
_CHUNKING = typer.Option("auto", "--chunking", help="auto: one chunk per layer, "
    "sharded dims cut in 8 aligned pieces, chunks <= 64MiB; "
    "none: one chunk per array; or a max chunk size like 16MiB.")
_CODEC = typer.Option("none", "--codec", help="Chunk codec: none (fastest restore) "
    "or zstd (smaller, slower). Every chunk carries a crc32c.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace DEST if it exists "
    "(atomically, only once the new checkpoint is complete).")
_ALLOW_OVERFLOW = typer.Option(False, "--allow-overflow", help="Convert even where "
    "a value does not fit the stored dtype (float16 "
    "beyond 65504 becomes inf) or the source holds "
    "NaN/inf; refused by default, naming the tensor.")
_QUANTIZE = typer.Option(None, "--quantize", help="Write a weight-only "
    "quantized checkpoint: int8 (per output channel) "
    "or int4 (groups along the input axis, "
    "--group-size); values + scales per weight. SRC "
    "may also be a full-precision jaxaccel checkpoint.")


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        src: str = _SRC,
        dest: str = _DEST,
        dtype: str = _DTYPE,
        family: str = _FAMILY,
        force_family: bool = _FORCE_FAMILY,
        layout: str = _LAYOUT,
        chunking: str = _CHUNKING,
        codec: str = _CODEC,
        overwrite: bool = _OVERWRITE,
        allow_overflow: bool = _ALLOW_OVERFLOW,
        quantize: Optional[str] = _QUANTIZE,
        group_size: int = GROUP_SIZE,
        quantize_head: bool = QUANTIZE_HEAD,
        as_json: bool = JSON,
        quiet: bool = QUIET,
    ) -> None:
        """Convert a Hugging Face safetensors model into a jaxaccel checkpoint.

        Reads memory-mapped safetensors only (pickle-based .bin/.pt files are refused), checks
        every tensor against config.json before writing, and writes atomically: DEST appears
        only when complete.
        """
        # deferred: the converter pulls in jax and tensorstore, which `--help` does not need
        from jaxaccel import api

        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # one `warning:` line each
            warnings.simplefilter("always")
            manifest = api.convert(src, dest, dtype=dtype, family=family, layout=layout,
                                   overwrite=overwrite, progress=not quiet,
                                   chunk_bytes=chunk_bytes_from(chunking), codec=codec,
                                   allow_overflow=allow_overflow, quantize=quantize,
                                   group_size=group_size, quantize_head=quantize_head,
                                   force_family=force_family)
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        seconds = time.perf_counter() - start
        _report(dest, manifest, seconds, as_json, quiet)


def _report(dest, manifest, seconds: float, as_json: bool, quiet: bool) -> None:
    """The convert result: one JSON object, or the ignored tensors and a summary line."""
    # deferred: progress is light, but keeps --help free of the package's imports
    from jaxaccel.utils import progress

    ignored = manifest.source.get("ignored_tensors", [])
    ignored_files = manifest.source.get("ignored_files", [])
    if as_json:
        print(json.dumps({"dest": str(dest), "family": manifest.family, "dtype": manifest.dtype,
                          "quantization": manifest.quantization.get("scheme"),
                          "arrays": len(manifest.arrays), "total_bytes": manifest.total_bytes,
                          "ignored_tensors": ignored, "ignored_files": ignored_files,
                          "seconds": round(seconds, 3)}))
    else:
        if ignored_files:
            progress.say(f"ignored {len(ignored_files)} file(s) transformers does not load: "
                         + ", ".join(ignored_files), quiet)
        if ignored:
            progress.say(f"ignored {len(ignored)} source tensor(s) the model does not use: "
                         + ", ".join(ignored[:6]) + (" ..." if len(ignored) > 6 else ""),
                         quiet)
        progress.say(f"wrote {dest}: {manifest.family}, {len(manifest.arrays)} arrays, "
                     f"{manifest.total_bytes / 1e6:.1f} MB {manifest.dtype} in {seconds:.1f} s",
                     quiet)
