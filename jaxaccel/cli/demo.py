"""`jaxaccel demo`: the bundled MiniLM end to end — convert, restore, embed, compare."""

from __future__ import annotations

import json
import pathlib
import time

import typer
from rich.console import Console
from rich.table import Table

DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new movie is so great.",
    "A monkey is playing drums.",
    "Compiled inference with JAX runs on many devices.",
]


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        ckpt: pathlib.Path = typer.Option(pathlib.Path("checkpoints/minilm"), "--ckpt",
                                          help="Where the converted MiniLM lives (made if absent)."),
        dtype: str = typer.Option("float32", "--dtype", help="Compute dtype."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No timings line."),
        as_json: bool = typer.Option(False, "--json", help="Print sentences, similarity matrix "
                                     "and timings as one JSON object."),
    ) -> None:
        """Convert the bundled all-MiniLM-L6-v2 (once), embed a few sentences, and print a
        cosine-similarity table and timings."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        from jaxaccel.conversion.bundled import bundled_minilm_path
        from jaxaccel.conversion.hf import convert
        from jaxaccel.startup.coldstart import start_for_texts

        console = Console()
        timings = {}
        if not (ckpt / "jaxaccel.json").is_file():
            start = time.perf_counter()
            convert(bundled_minilm_path(), ckpt)
            timings["convert"] = time.perf_counter() - start
        started, encoded = start_for_texts(ckpt, DEMO_SENTENCES, None, dtype)
        timings["restore + compile"] = started.timings["ready"]
        embedder = started.embedder
        start = time.perf_counter()
        embedder.embed_ids(encoded.ids)
        timings["first embed"] = time.perf_counter() - start
        start = time.perf_counter()
        vectors, _ = embedder.embed_texts(DEMO_SENTENCES)
        timings["second embed"] = time.perf_counter() - start
        if as_json:
            print(json.dumps({"sentences": DEMO_SENTENCES, "similarity": (vectors @ vectors.T).tolist(),
                              "seconds": timings}))
            return
        _print_similarity(console, vectors)
        if not quiet:
            console.print("  ".join(f"{k}: {v * 1e3:.0f} ms" for k, v in timings.items()))


def _print_similarity(console, vectors) -> None:
    sims = vectors @ vectors.T
    table = Table("", *[f"#{i + 1}" for i in range(len(DEMO_SENTENCES))],
                  title="cosine similarity, all-MiniLM-L6-v2")
    for i, sentence in enumerate(DEMO_SENTENCES):
        table.add_row(f"#{i + 1} {sentence}", *[f"{s:.2f}" for s in sims[i]])
    console.print(table)
