"""Options shared by several commands, declared once so their help text stays the same."""

from __future__ import annotations

from typing import Optional

import typer

DTYPE = typer.Option(None, "--dtype", help="Compute dtype: float32 or bfloat16 (default: the "
                     "checkpoint's). bfloat16 keeps norms, softmax and matmul accumulation in "
                     "float32.")
MESH = typer.Option(None, "--mesh", help="Device mesh, e.g. data=2,model=4 (axes data, model, "
                    "stage; -1 = the rest of the devices). Default: one device.")
RULES = typer.Option("dp_tp", "--rules", help="Logical-axis rule table: replicated, dp, tp, "
                     "dp_tp, pp, dp_tp_pp.")
RULE_OVERRIDES = typer.Option(None, "--rule", help="Override single rules, e.g. "
                              "'heads=None,mlp=model'.")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout (for machines).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines.")
HOST_MEMORY_BUDGET = typer.Option("2GiB", "--host-memory-budget",
                                  help="Bound on host memory held by restore reads in flight.")


def layout_from(mesh: Optional[str], rules: str, rule_overrides: Optional[str] = None):
    from jaxaccel.sharding import Layout

    return Layout.create(mesh, rules, rule_overrides)
