"""`jaxaccel classify CKPT`: top-k labels of images from an image classifier checkpoint."""

from __future__ import annotations

import json
import pathlib
import time
from typing import List, Optional

import typer

from jaxaccel.utils import progress
from jaxaccel.cli import options
from jaxaccel.errors import UsageError
from jaxaccel.inputs.images import list_images, read_list
from jaxaccel.utils.files import save_npy_atomically
from jaxaccel.utils.units import parse_bytes


def image_inputs(image, input_dir, input_list) -> list[pathlib.Path]:
    """The images named by exactly one of --image, --input-dir, --input."""
    given = [x for x in (image, input_dir, input_list) if x]
    if len(given) != 1:
        raise UsageError("give images with --image FILE (repeatable), --input-dir DIR or "
                         "--input LIST.txt: exactly one of them")
    if image:
        return list(image)
    return list_images(input_dir) if input_dir else read_list(input_list)


def register(app: typer.Typer) -> None:
    @app.command("classify")
    def classify_cmd(
        ckpt: str = typer.Argument(..., help="Image classifier checkpoint: " + options.CKPT_HELP),
        image: Optional[List[pathlib.Path]] = typer.Option(None, "--image", help="An image "
                                                           "file (repeatable)."),
        input_dir: Optional[pathlib.Path] = typer.Option(None, "--input-dir", help="Classify "
                                                         "every image file in this folder."),
        input_list: Optional[pathlib.Path] = typer.Option(None, "--input", "-i", help="Text "
                                                          "file with one image path a line."),
        top_k: int = typer.Option(5, "--top-k", min=1, help="Labels shown per image."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per jitted call."),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip files that do not "
                                      "decode (listed at the end) instead of stopping."),
        dtype: Optional[str] = options.DTYPE,
        out: Optional[pathlib.Path] = typer.Option(None, "--out", help="Save float32 logits "
                                                   "[n, labels] as .npy, rows in input order "
                                                   "(NaN rows for skipped files)."),
        mesh: Optional[str] = options.MESH,
        rules: str = options.RULES,
        rule: Optional[str] = options.RULE_OVERRIDES,
        budget: str = options.HOST_MEMORY_BUDGET,
        device_memory: Optional[str] = options.DEVICE_MEMORY,
        verify_checksums: bool = options.VERIFY_CHECKSUMS,
        compile_cache: Optional[pathlib.Path] = options.COMPILE_CACHE,
        no_compile_cache: bool = options.NO_COMPILE_CACHE,
        as_json: bool = options.JSON,
        quiet: bool = options.QUIET,
    ) -> None:
        """Classify images: decoded on host threads and preprocessed as the checkpoint's
        preprocessor_config.json says, batches transferred one step ahead of the compute.
        The weights stream in while XLA compiles the batches these images need."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        from jaxaccel.startup import coldstart
        from jaxaccel.runtime import compile_cache as xla_cache

        paths = image_inputs(image, input_dir, input_list)
        xla_cache.configure(compile_cache, enabled=not no_compile_cache)
        started = coldstart.start_classifier(
            ckpt, options.layout_from(mesh, rules, rule), dtype, images=len(paths),
            batch_size=batch_size, device_memory=options.device_memory_from(device_memory),
            host_memory_budget=parse_bytes(budget, "--host-memory-budget"),
            verify_checksums=verify_checksums, quiet=quiet)
        start = time.perf_counter()
        result = started.classifier.classify(paths, skip_bad=skip_bad)
        seconds = time.perf_counter() - start
        report(ckpt, result, started.loaded.dtype, top_k, seconds, out, as_json, quiet)


def report(ckpt, result, dtype: str, top_k: int, seconds: float, out, as_json: bool,
           quiet: bool) -> None:
    """Save --out; print JSON or one line per image; list skipped files last."""
    if out:
        save_npy_atomically(out, result.logits)
    predictions = result.top_k(top_k)
    if as_json:
        print(json.dumps({"model": str(ckpt), "dtype": dtype, "predictions": predictions,
                          "skipped": [{"image": n, "error": e} for n, e in result.skipped]}))
    else:
        for item in predictions:
            labels = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in item["top_k"])
            print(f"{item['image']}: {labels}")
        progress.say(f"classified {len(predictions)} image(s) in {seconds:.2f} s"
                     + (f"; saved {out}" if out else ""), quiet)
    for name, reason in result.skipped:
        progress.say(f"skipped {reason}" if reason.startswith(name) else f"skipped {name}: {reason}",
                     False)
