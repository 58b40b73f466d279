"""`jaxaccel bench classify CKPT`: images/s of an image classifier, and of its input pipeline.

Compute: jaxaccel fp32/bf16 against PyTorch eager fp32/bf16 (transformers'
ResNetForImageClassification, channels_last, `jaxaccel_reference.classify_torch`) on the
checkpoint's Hugging Face source, same weights, batch and pixels; baseline: PyTorch in the
same dtype. Pipeline, on real image files (scikit-image's sample photographs re-encoded as
JPEG/PNG/WebP unless --images DIR; --photo-side 3000 makes camera-sized ones): decode-only
(the pool's threads, and one thread), compute-only, end to end with prefetch and without
(decode on one thread, serial: what a user gets without the overlap), and without prefetch
but with the pool decoding each batch (no overlap with the compute); baselines:
min(decode-only, compute-only) and end to end without prefetch. On a CPU, decode and compute
share the same cores: see docs/performance.md (the input pipeline on a CPU).
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Optional

import typer

from jaxaccel.bench import runner
from jaxaccel.bench.runner import BenchError, Worker

DTYPES = ("float32", "bfloat16")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry",
          "hubble_deep_field", "coins", "retina", "colorwheel")
FORMATS = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))


def sample_images(dest: pathlib.Path, count: int, side: int = 500) -> list[str]:
    """`count` photo files (`side` px on the long side, formats in turn) under `dest`;
    scikit-image's photographs are ~512 px, larger sides are upsampled (Lanczos)."""
    try:
        # deferred: scikit-image (the test extra) is needed only without --images
        import skimage.data
        from PIL import Image
    except ImportError:
        raise BenchError("bench classify needs image files: pass --images DIR, or install "
                         "scikit-image for its sample photographs") from None
    paths = []
    for i in range(count):
        image = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.LANCZOS)
        fmt, suffix = FORMATS[i % len(FORMATS)]
        paths.append(str(dest / f"photo{i:04d}{suffix}"))
        image.convert("RGB").save(paths[-1], fmt)
    return paths


def image_files(folder: pathlib.Path | None, count: int, scratch: pathlib.Path,
                side: int = 500) -> list[str]:
    if folder is None:
        return sample_images(scratch, count, side)
    from jaxaccel.inputs.images import (
        list_images,  # deferred: Pillow, only when a folder is given
    )

    return [str(p) for p in list_images(folder)]


def compute_contenders(ckpt, source, batch: int, iters: int) -> dict[str, Worker]:
    common = {"ckpt": str(ckpt), "batch": batch, "iters": iters, "mode": "compute"}
    found = {f"jaxaccel {d}": Worker("jaxaccel.bench.classify_worker", {**common, "dtype": d})
             for d in DTYPES}
    if source is not None and runner.reference_available():
        for d in DTYPES:
            found[f"pytorch eager {d}"] = Worker(
                "jaxaccel_reference.classify_torch",
                {"src": str(source), "dtype": d, "batch": batch, "iters": iters})
    return found


def pipeline_contenders(ckpt, dtype: str, batch: int, iters: int, images: list[str],
                        workers: Optional[int]) -> dict[str, Worker]:
    common = {"ckpt": str(ckpt), "dtype": dtype, "batch": batch, "workers": workers}
    files = {"images": images, "iters": max(1, len(images) // batch)}
    return {"decode only": Worker("jaxaccel.bench.classify_worker",
                                  {**common, **files, "mode": "decode"}),
            "decode only, 1 thread": Worker("jaxaccel.bench.classify_worker",
                                            {**common, **files, "mode": "decode",
                                             "workers": 1}),
            "compute only": Worker("jaxaccel.bench.classify_worker",
                                   {**common, "iters": iters, "mode": "compute"}),
            "end to end, prefetch": Worker("jaxaccel.bench.classify_worker",
                                           {**common, **files, "mode": "pipeline"}),
            "end to end, no prefetch": Worker("jaxaccel.bench.classify_worker",
                                              {**common, **files, "mode": "serial"}),
            "end to end, no prefetch, pool decode": Worker(
                "jaxaccel.bench.classify_worker", {**common, **files, "mode": "serial_parallel"})}


def compute_rows(summary: dict[str, dict]) -> list[tuple]:
    """Each contender's ratio against PyTorch in its own dtype."""
    def torch_median(name: str):
        dtype = name.split()[-1]
        return summary.get(f"pytorch eager {dtype}", {}).get("median")

    return [(name, s["min"], s["median"], s["max"], runner.ratio(s["median"], torch_median(name)))
            for name, s in summary.items()]


def pipeline_rows(summary: dict[str, dict]) -> tuple[list[tuple], dict]:
    bound = min(summary["decode only"]["median"], summary["compute only"]["median"])
    serial = summary["end to end, no prefetch"]["median"]
    rows = [(name, s["min"], s["median"], s["max"], runner.ratio(s["median"], bound),
             runner.ratio(s["median"], serial)) for name, s in summary.items()]
    return rows, {"min_decode_compute": bound, "no_prefetch": serial}


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("classify")
    def bench_classify(
        ckpt: pathlib.Path = typer.Argument(..., help="Image classifier checkpoint (e.g. a "
                                            "ResNet-50 converted from Hugging Face)."),
        batch: int = typer.Option(32, "--batch", help="Images per batch."),
        iters: int = typer.Option(4, "--iters", help="Timed batches per compute process."),
        repeats: int = typer.Option(3, "--repeats", help="Fresh processes per contender."),
        images: Optional[pathlib.Path] = typer.Option(None, "--images", help="Folder of image "
                                                      "files (default: sample photographs)."),
        num_images: int = typer.Option(128, "--num-images", help="Sample photographs to "
                                       "write when --images is not given."),
        pipeline_dtype: str = typer.Option("float32", "--pipeline-dtype", help="Compute dtype "
                                           "of the pipeline runs."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Decode threads "
                                              "(default: the CPU count, at most 8)."),
        photo_side: int = typer.Option(500, "--photo-side", min=64, help="Long side (px) of "
                                       "the sample photographs (e.g. 3000: camera-sized)."),
        compute_table: bool = typer.Option(True, "--compute/--no-compute", help="Also time "
                                           "the forward alone against PyTorch."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Images/s of jaxaccel (fp32, bf16) against PyTorch eager channels_last (when torch
        and transformers are installed), then the input pipeline on real image files."""
        compute = {}
        if compute_table:
            compute = runner.summarize_each(runner.alternate(
                compute_contenders(ckpt, runner.hf_source(ckpt), batch, iters), repeats),
                "images_per_s")
            runner.print_table(f"images/s, compute only, batch {batch} ({repeats} fresh "
                               "processes each)", ("contender", "min", "median", "max",
                                                   "x pytorch same dtype"), compute_rows(compute))
        with tempfile.TemporaryDirectory(prefix="jaxaccel-bench-images-") as scratch:
            files = image_files(images, num_images, pathlib.Path(scratch), photo_side)
            runs = runner.alternate(pipeline_contenders(
                ckpt, pipeline_dtype, batch, iters, files, workers), repeats)
        pipeline = runner.summarize_each(runs, "images_per_s")
        cpu = runner.summarize_each(runs, "cpu_s_per_image")
        rows, baselines = pipeline_rows(pipeline)
        rows = [(*row, cpu[row[0]]["median"]) for row in rows]
        runner.print_table(f"images/s, input pipeline on {len(files)} files, batch {batch}, "
                           f"{pipeline_dtype}", ("contender", "min", "median", "max",
                                                 "x min(decode, compute)", "x no prefetch",
                                                 "CPU s/image"), rows)
        runner.write_json(json_out, {"benchmark": "classify", "batch": batch, "iters": iters,
                                     "compute": compute, "pipeline": pipeline,
                                     "pipeline_dtype": pipeline_dtype,
                                     "pipeline_cpu_s_per_image": cpu,
                                     "pipeline_baselines": baselines, "images": len(files),
                                     "photo_side": None if images else photo_side})
