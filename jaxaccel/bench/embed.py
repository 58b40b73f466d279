"""`jaxaccel bench embed CKPT`: sentences/s, jaxaccel fp32/bf16 vs PyTorch eager fp32/bf16."""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Optional

import typer

from jaxaccel.bench import runner

REFERENCE_SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "reference_embed_torch.py"


def contenders(ckpt: pathlib.Path, source: Optional[pathlib.Path], batch: int, length: int,
               iters: int) -> dict[str, list[str]]:
    shape = [str(batch), str(length), str(iters)]
    found = {f"jaxaccel {d}": ["-m", "jaxaccel.bench.embed_worker", str(ckpt), d, *shape]
             for d in ("float32", "bfloat16")}
    torch_ok = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
    if source is not None and torch_ok and REFERENCE_SCRIPT.is_file():
        for d in ("float32", "bfloat16"):
            found[f"pytorch eager {d}"] = [str(REFERENCE_SCRIPT), str(source), d, *shape]
    return found


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("embed")
    def bench_embed(
        ckpt: pathlib.Path = typer.Argument(..., help="Encoder checkpoint (e.g. checkpoints/minilm)."),
        batch: int = typer.Option(32, "--batch", help="Sentences per batch."),
        length: int = typer.Option(128, "--length", help="Tokens per sentence."),
        iters: int = typer.Option(8, "--iters", help="Timed batches per process."),
        repeats: int = typer.Option(3, "--repeats", help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Throughput of jaxaccel (fp32, bf16) against PyTorch eager (fp32, bf16, when torch and
        transformers are installed) on the same weights, batch and tokens, in one run."""
        from jaxaccel.checkpoint.manifest import Manifest

        source = pathlib.Path(Manifest.load(ckpt).source.get("path", ""))
        runs = runner.alternate(contenders(ckpt, source if source.is_dir() else None, batch,
                                           length, iters), repeats)
        summary = {name: runner.summarize([r["sentences_per_s"] for r in results])
                   for name, results in runs.items()}
        best_torch = max((s["median"] for n, s in summary.items() if n.startswith("pytorch")),
                         default=None)
        rows = [(name, s["min"], s["median"], s["max"],
                 s["median"] / best_torch if best_torch else "n/a") for name, s in summary.items()]
        runner.print_table(f"sentences/s, batch {batch} x {length} tokens ({repeats} fresh "
                           "processes each)", ("contender", "min", "median", "max",
                                               "x best pytorch"), rows)
        runner.write_json(json_out, {"benchmark": "embed", "batch": batch, "length": length,
                                     "iters": iters, "results": summary,
                                     "best_pytorch_median": best_torch})
