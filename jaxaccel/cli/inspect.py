"""`jaxaccel inspect CKPT`: what a checkpoint holds, from its manifest alone."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from jaxaccel.checkpoint.manifest import CheckpointError, Manifest
from jaxaccel.cli.options import CKPT_HELP, JSON, QUIET
from jaxaccel.utils.units import format_bytes


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(ckpt: str = typer.Argument(..., help=CKPT_HELP),
                    as_json: bool = JSON, quiet: bool = QUIET) -> None:
        """Show a checkpoint's family, config, and every array's shape, dtype and bytes
        (--quiet: the array table alone)."""
        manifest = _manifest(ckpt)
        if as_json:
            print(json.dumps(manifest.to_json()))
            return
        _print_table(ckpt, manifest, quiet)


def _manifest(ckpt: str) -> Manifest:
    """What jaxaccel.inspect returns: a jaxaccel checkpoint's manifest without loading jax,
    or the manifest a Hugging Face directory is read with."""
    try:
        return Manifest.load(ckpt)
    except CheckpointError:
        # deferred: a Hugging Face directory's plan needs jax; a jaxaccel manifest does not
        from jaxaccel.conversion.hf_checkpoint import is_hf_directory, open_checkpoint
        if not is_hf_directory(ckpt):
            raise
        return open_checkpoint(ckpt)


def _print_table(ckpt, manifest, quiet: bool = False) -> None:
    console = Console()
    if not quiet:
        console.print(f"[bold]{ckpt}[/]  family={manifest.family}  dtype={manifest.dtype}  "
                      f"arrays={len(manifest.arrays)}  "
                      f"total={format_bytes(manifest.total_bytes)}")
        console.print("config: " + ", ".join(f"{k}={v}" for k, v in manifest.config.items()))
        if manifest.generation:
            console.print("generation: " + ", ".join(f"{k}={v}" for k, v in
                                                     manifest.generation.items()))
        quant = manifest.quantization
        if quant:
            group = f", group {quant['group_size']}" if "group_size" in quant else ""
            stored = "NAME.values + NAME.scales" + (" + NAME.zeros" if quant.get(
                "zero_points") else "") + (" + NAME.perm (rows sorted by group, g_idx)"
                                          if quant.get("row_order") else "")
            console.print(f"quantization: {quant['scheme']} weight-only{group}"
                          f"{_head(quant)}; "
                          + (f"stored as {quant['format']}; " if "format" in quant else "")
                          + f"{len(quant.get('weights', {}))} weights held as {stored}")
        ignored = manifest.source.get("ignored_tensors")
        if ignored:
            console.print(f"ignored source tensors ({len(ignored)}): " + ", ".join(ignored))
    table = Table("array", "shape", "dtype", "logical axes", "bytes")
    for name, entry in sorted(manifest.arrays.items()):
        table.add_row(name, "×".join(map(str, entry.shape)) or "scalar", entry.dtype,
                      ",".join(str(a) for a in entry.axes), format_bytes(entry.nbytes))
    console.print(table)


def _head(quant: dict) -> str:
    """", LM head too (int8)" and, for a tied head, which table its quantized copy is of."""
    if not quant.get("head"):
        return ""
    scheme = quant.get("head_scheme", quant["scheme"])
    copies = "".join(f"; {head}: {scheme} copy of the tied {table}"
                     for head, table in quant.get("head_copy", {}).items())
    return f", LM head too ({scheme}){copies}"
