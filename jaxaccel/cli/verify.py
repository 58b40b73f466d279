"""`jaxaccel verify CKPT`: re-read every chunk and check it against the manifest's checksums."""

from __future__ import annotations

import json

import typer

from jaxaccel.utils import progress
from jaxaccel.cli.options import CKPT_HELP, JSON, QUIET
from jaxaccel.errors import JaxaccelError


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify_cmd(ckpt: str = typer.Argument(..., help=CKPT_HELP),
                   as_json: bool = JSON, quiet: bool = QUIET) -> None:
        """Check a checkpoint's integrity: every array present with its manifest shape and
        dtype, every chunk present and matching the crc32 recorded when it was written.

        Exits 1 with one line naming each damaged array and chunk. Restore always checks the
        cheap part (every chunk present, with its stored length); it checks each chunk's crc32c
        only with --verify-checksums (that costs more than 10% of restore time). This command
        checks everything.
        """
        from jaxaccel import (
            api,  # deferred: tensorstore and jax load only when verifying
        )

        try:
            report = api.verify(ckpt, progress=not quiet)
        except JaxaccelError as err:
            if as_json:  # machines get JSON either way; the exit code still says it failed
                print(json.dumps({"ckpt": str(ckpt), "ok": False, "error": str(err)}))
            raise
        if as_json:
            print(json.dumps({"ckpt": str(ckpt), "ok": True, "arrays": report.arrays,
                              "chunks": report.chunks, "bytes": report.bytes_read,
                              "seconds": round(report.seconds, 3),
                              "unchecked_arrays": report.unchecked}))
            return
        progress.say(f"ok: {ckpt}: {report.arrays} arrays, {report.chunks} chunks, "
                     f"{report.bytes_read / 1e9:.3f} GB checked in {report.seconds:.2f} s "
                     f"({report.gb_per_s:.2f} GB/s)", quiet)
        if report.unchecked:
            progress.say(f"warning: {len(report.unchecked)} array(s) have no recorded checksum "
                         f"(read but not compared): {report.unchecked[:5]}")
