"""The `jaxaccel` command line. Thin: parse, call a module, print.

jax is imported only inside commands, after the global `--host-devices` option has had the
chance to set XLA_FLAGS (XLA reads it once, when its CPU backend starts).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import typer

from jaxaccel import platform

app = typer.Typer(
    name="jaxaccel",
    help="Compiled, sharded, streaming-restore inference for Flax models on JAX/XLA.\n\n"
         "Convert a Hugging Face safetensors model into a jaxaccel checkpoint (orbax OCDBT + "
         "zarr3), inspect it, and run it jitted on a device mesh. Try `jaxaccel demo`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    host_devices: Optional[int] = typer.Option(
        None, "--host-devices", min=1,
        help="On CPU, simulate N devices (sets XLA's host device count before jax starts); "
             "use with --mesh to try data/tensor/pipeline parallel layouts on one machine."),
) -> None:
    platform.configure_host_devices(host_devices)


# Command modules under jaxaccel/commands/, in --help order; each has `register(app)`.
COMMANDS = ("convert", "inspect", "embed", "generate", "demo", "plan", "verify", "launch", "bench")

for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"jaxaccel.commands.{_name}")
    except ModuleNotFoundError as _err:  # a command whose module is not part of this build
        if _err.name != f"jaxaccel.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    from jaxaccel.errors import run_with_clean_errors

    sys.exit(run_with_clean_errors(app))


if __name__ == "__main__":
    main()
