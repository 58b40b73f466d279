"""`jaxaccel plan CKPT`: per-device and per-process memory of a run, before reading a byte."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from jaxaccel.cli import options
from jaxaccel.utils.units import format_bytes as fb
from jaxaccel.utils.units import parse_bytes


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        ckpt: str = typer.Argument(..., help=options.CKPT_HELP),
        mesh: Optional[str] = options.MESH,
        rules: str = options.RULES,
        rule: Optional[str] = options.RULE_OVERRIDES,
        dtype: Optional[str] = options.DTYPE,
        batch: int = typer.Option(1, "--batch", min=1, help="Rows per forward call."),
        seq: Optional[int] = typer.Option(None, "--seq", min=1, help="Tokens per row (default: "
                                          "the model's maximum); for decoders, the prompt; "
                                          "image classifiers run at their image size."),
        max_new_tokens: int = typer.Option(0, "--max-new-tokens", min=0, help="Decoders: "
                                           "tokens to generate (sizes the KV cache)."),
        device_memory: Optional[str] = options.DEVICE_MEMORY,
        budget: str = options.HOST_MEMORY_BUDGET,
        quantize: Optional[str] = options.QUANTIZE,
        group_size: int = options.GROUP_SIZE,
        quantize_head: bool = options.QUANTIZE_HEAD,
        max_num_seqs: int = options.MAX_NUM_SEQS,
        kv_cache_memory: Optional[str] = options.KV_CACHE_MEMORY,
        as_json: bool = options.JSON,
        quiet: bool = options.QUIET,
    ) -> None:
        """Print, per device, the bytes for parameters, KV cache and activations (XLA's
        compiled memory analysis) and, per process, the bytes restore reads and its peak host
        memory; for decoders, the generation engine's KV page pool (pages, page size, bytes;
        --max-num-seqs and --kv-cache-memory as `generate` takes them). Exits 1, naming the largest arrays and a mesh that fits, when a device with
        known memory (--device-memory) would overflow."""
        # deferred: jax loads only when a command runs, after --host-devices set XLA's flags
        import jax

        from jaxaccel.startup import planner

        layout = options.layout_from(mesh, rules, rule)
        memory = options.device_memory_from(device_memory)
        result = planner.plan(ckpt, layout, dtype, batch=batch, seq=seq,
                              max_new_tokens=max_new_tokens,
                              host_budget=parse_bytes(budget, "--host-memory-budget"),
                              device_memory=memory,
                              quantize=options.scheme_from(quantize, group_size, quantize_head))
        pool = _page_pool(result, max_num_seqs, kv_cache_memory)
        if as_json:
            print(json.dumps({**result.to_json(), **({"kv_page_pool": pool} if pool else {})}))
        else:
            _print_plan(result, quiet)
            if pool:
                Console().print(f"engine KV page pool: {pool['pages'] - 1} pages of "
                                f"{pool['page_size']} tokens ({fb(pool['page_bytes'])} each, "
                                f"{pool['tokens']} tokens), {fb(pool['bytes'])} in all, kv "
                                f"heads split over model" + (
                                    f"; a sequence holds at most "
                                    f"{pool['window_pages_per_sequence']} (sliding window)"
                                    if "window_pages_per_sequence" in pool else ""))
        planner.check_fits(result, len(jax.devices()))


def _page_pool(result, max_num_seqs: int, kv_cache_memory: Optional[str]) -> dict | None:
    """The engine's page pool for a decoder plan (None for other tasks)."""
    if result.task != "generate":
        return None
    import jax  # deferred: as above

    from jaxaccel.engine.engine import pool_plan

    free = (result.device_memory - result.param_bytes - result.activation_bytes
            if result.device_memory else None)
    return pool_plan(result.config, result.dtype, jax.devices()[0].platform,
                     max_num_seqs=max_num_seqs,
                     kv_cache_bytes=options.kv_cache_memory_from(kv_cache_memory),
                     free_bytes=free)


def _scheme(info: dict) -> str:
    """'int4 (group 128, on load)' from a plan's quantization object."""
    details = [info["format"]] if "format" in info else []  # a pre-quantized checkpoint's
    details += [f"group {info['group_size']}"] if "group_size" in info else []
    details += ["rows reordered by g_idx"] if info.get("row_order") else []
    details += ["LM head too"] if info.get("head") else []
    details += ["on load"] if info.get("on_load") else []
    return info["scheme"] + (f" ({', '.join(details)})" if details else "")


def _print_plan(plan, quiet: bool = False) -> None:
    from jaxaccel.parallel.sharding import format_mesh  # deferred: the module imports jax

    console = Console()
    rows = (f"{plan.seq}x{plan.seq} images" if plan.task == "classify" else f"seq {plan.seq}")
    console.print(f"[bold]{plan.ckpt}[/]  {plan.family}  {plan.dtype}  mesh {format_mesh(plan.mesh)}"
                  f"  batch {plan.batch} x {rows}"
                  + (f" + {plan.max_new_tokens} new" if plan.max_new_tokens else "")
                  + (f"  quantized {_scheme(plan.quantization)}" if plan.quantization else ""))
    table = Table("per device", "bytes", title=None)
    table.add_row("parameters", fb(plan.param_bytes))
    table.add_row("KV cache", fb(plan.kv_cache_bytes))
    table.add_row(f"activations ({plan.activation_source})", fb(plan.activation_bytes))
    table.add_row("[bold]total[/]", f"[bold]{fb(plan.total_bytes)}[/]")
    memory = "unknown (pass --device-memory)" if plan.device_memory is None else fb(plan.device_memory)
    verdict = {None: "", True: "  [green]fits[/]", False: "  [red]does not fit[/]"}[plan.fits]
    table.add_row("device memory", memory + verdict)
    console.print(table)
    console.print(f"per process: reads {fb(plan.read_bytes)}; peak host memory of restore reads "
                  f"{fb(plan.peak_host_bytes)} (budget {fb(plan.host_budget)})")
    console.print("largest arrays per device: " + ", ".join(
        f"{name} {fb(n)}" for name, n in plan.largest_arrays()))
    if plan.sliding_window:
        window = plan.sliding_window
        bound = (f"KV cache bounded to {window['pages_per_sequence']} pages "
                 f"({fb(window['bytes_per_sequence'])}) per sequence"
                 if window["kv_cache_bounded"] else "KV cache not bounded")
        console.print(f"sliding window {window['window']} on {window['windowed_layers']} of "
                      f"{window['layers']} layers; {bound}: {window['note']}")
    for warning in [] if quiet else plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
