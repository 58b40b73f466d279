"""`jaxaccel bench restore CKPT`: jaxaccel's restore (crc32c checked, and `--no-verify`) vs
orbax's vs a raw read of the same bytes vs the copy floor.

Every run is a fresh process (jaxaccel.bench.restore_worker) that plans outside the clock,
pre-touches memory, then times one restore onto the mesh; contenders alternate round by round
(`runner.alternate`). Baseline: orbax restoring the same checkpoint. The copy floor (the
same bytes copied from a warm page cache into memory touched before the clock, one thread per
core) bounds what any restore can reach here; `verify cost` is jaxaccel / `--no-verify`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import typer

from jaxaccel.bench import cluster_restore, runner
from jaxaccel.bench.runner import Worker
from jaxaccel.checkpoint import storage

BASELINE = "orbax (same checkpoint)"
RAW = "raw read (page cache)"
FLOOR = "copy floor (page cache -> touched memory)"
DEFAULT = "jaxaccel"
NO_VERIFY = "jaxaccel --no-verify"
WORKER = "jaxaccel.bench.restore_worker"


HF = "jaxaccel (Hugging Face directory)"
ORBAX_SAFETENSORS = "orbax v1 safetensors (Hugging Face directory)"


def hf_contenders(ckpt: pathlib.Path, hf_dir: pathlib.Path, mesh: str, rules: str,
                  dtype: str) -> dict[str, Worker]:
    """--hf: jaxaccel from the Hugging Face directory (no convert), orbax v1 loading its
    safetensors, and jaxaccel from CKPT, its converted checkpoint."""
    devices = runner.mesh_devices(mesh)

    def worker(contender: str, path: pathlib.Path) -> Worker:
        return Worker(WORKER, {"contender": contender, "ckpt": str(path), "mesh": mesh,
                               "rules": rules, "dtype": dtype, "manifest_from": str(path)},
                      devices)
    return {HF: worker("jaxaccel", hf_dir), ORBAX_SAFETENSORS: worker("orbax-safetensors", hf_dir),
            CONVERTED: worker("jaxaccel", ckpt)}


CONVERTED = "jaxaccel (converted checkpoint)"


def hf_ratios(summary: dict) -> dict:
    """The Hugging Face directory's goals: orbax v1 / it (>= 2.5) and it / converted (<= 1.3),
    of the medians and per round."""
    def runs(name):
        return summary[name]["seconds"]["runs"]
    median = {name: summary[name]["seconds"]["median"] for name in summary}
    return {"orbax_safetensors_over_hf": runner.ratio(median[ORBAX_SAFETENSORS], median[HF]),
            "hf_over_converted": runner.ratio(median[HF], median[CONVERTED]),
            "orbax_safetensors_over_hf_per_round": [
                a / b for a, b in zip(runs(ORBAX_SAFETENSORS), runs(HF))],
            "hf_over_converted_per_round": [a / b for a, b in zip(runs(HF), runs(CONVERTED))]}


def contenders(ckpt: pathlib.Path, mesh: str, rules: str, dtype: str,
               orbax_default: Optional[pathlib.Path], engines: bool) -> dict[str, Worker]:
    devices = runner.mesh_devices(mesh)

    def worker(contender: str, path: pathlib.Path = ckpt) -> Worker:
        return Worker(WORKER, {"contender": contender, "ckpt": str(path), "mesh": mesh,
                               "rules": rules, "dtype": dtype, "manifest_from": str(ckpt)},
                      devices)

    # "jaxaccel" checks every chunk's crc32c, as restores do by default.
    found = {DEFAULT: worker("jaxaccel"), NO_VERIFY: worker("jaxaccel-noverify")}
    if engines:
        found["jaxaccel (tensorstore engine)"] = worker("jaxaccel-tensorstore")
    found[BASELINE] = worker("orbax")
    if orbax_default is not None:
        found["orbax (orbax default format)"] = worker("orbax", orbax_default)
    found[FLOOR] = worker("copy-floor")
    found[RAW] = worker("raw")
    return found


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("restore")
    def bench_restore(
        ckpt: pathlib.Path = typer.Argument(..., help="jaxaccel checkpoint (e.g. from "
                                            "`python -m jaxaccel.bench.synthetic DEST`)."),
        mesh: str = typer.Option("data=2,model=4", "--mesh", help="Device mesh to restore onto."),
        rules: str = typer.Option("dp_tp", "--rules", help="Rule table."),
        dtype: str = typer.Option("default", "--dtype", help="Compute dtype (default: the "
                                  "checkpoint's)."),
        orbax_default: Optional[pathlib.Path] = typer.Option(
            None, "--orbax-default", help="The same tree saved with orbax's defaults (`python -m "
            "jaxaccel.bench.synthetic DEST --orbax-default DIR`): also time orbax on its own "
            "format."),
        engines: bool = typer.Option(False, "--engines", help="Also time jaxaccel with every "
                                     "array read through tensorstore."),
        cold: bool = typer.Option(False, "--cold", help="Drop the page cache before every run "
                                  "(needs root): cold-disk figures."),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
        processes: int = typer.Option(1, "--processes", min=1, help="Restore across this many "
                                      "local processes (jax.distributed, gloo) and compare "
                                      "--restore-mode read-all with broadcast instead."),
        source: Optional[str] = typer.Option(
            None, "--source", help="The same checkpoint in a bucket (s3://, gs://): time "
            "jaxaccel from it with a cold and a warm chunk cache, a raw parallel download of its "
            "data files (boto3 for s3://), and CKPT from local files; see --orbax-source. With "
            "--processes: where the processes read the checkpoint (default CKPT)."),
        orbax_source: Optional[str] = typer.Option(
            None, "--orbax-source", help="With --source: the same checkpoint at a gs:// URL "
            "(e.g. on an emulator, STORAGE_EMULATOR_HOST + TENSORSTORE_GCS_HTTP_URL) for orbax "
            "to restore."),
        hf_dir: Optional[pathlib.Path] = typer.Option(
            None, "--hf", help="The Hugging Face directory CKPT was converted from: time "
            "jaxaccel restoring it as it is vs orbax v1 loading its safetensors vs jaxaccel "
            "restoring CKPT."),
    ) -> None:
        """Restore time, GB/s and peak host-memory overhead of jaxaccel (crc32c checked, and
        --no-verify) vs orbax vs raw read vs the copy floor; with --hf, from a Hugging Face
        directory;
        with --source, from a bucket; with --processes N, read-all vs broadcast restore across
        N processes."""
        if processes > 1:
            _bench_cluster(str(source or ckpt), mesh, rules, dtype, processes, repeats, json_out)
            return
        if hf_dir is not None:
            _bench_hf(ckpt, hf_dir, mesh, rules, dtype, repeats, json_out)
            return
        found = (remote_contenders(ckpt, source, orbax_source, mesh, rules, dtype) if source
                 else contenders(ckpt, mesh, rules, dtype, orbax_default, engines))
        runs = runner.alternate(found, repeats, before_run=drop_page_cache if cold else None)
        rows, summary = table_rows(runs, REMOTE_RAW if source else RAW)
        where = "cold page cache" if cold else "page cache warm, memory pre-touched"
        runner.print_table(f"restore {ckpt.name} onto {mesh} ({rules}, dtype {dtype}); {where}; "
                           f"{repeats} fresh processes each", COLUMNS, rows)
        runner.write_json(json_out, {"benchmark": "restore", "ckpt": str(ckpt), "mesh": mesh,
                                     "rules": rules, "dtype": dtype, "cold": cold,
                                     "results": summary, "ratios": ratios(summary)})


def _bench_hf(ckpt: pathlib.Path, hf_dir: pathlib.Path, mesh: str, rules: str, dtype: str,
              repeats: int, json_out) -> None:
    runs = runner.alternate(hf_contenders(ckpt, hf_dir, mesh, rules, dtype), repeats)
    rows, summary = table_rows(runs, baseline=ORBAX_SAFETENSORS)
    runner.print_table(f"restore {hf_dir.name} (Hugging Face directory) onto {mesh} ({rules}, "
                       f"dtype {dtype}); page cache warm, memory pre-touched; {repeats} fresh "
                       "processes each, alternated", COLUMNS, rows)
    found = hf_ratios(summary)
    print(f"orbax v1 safetensors / jaxaccel HF: {found['orbax_safetensors_over_hf']:.2f}x "
          f"(goal >= 2.5);  jaxaccel HF / converted: {found['hf_over_converted']:.2f}x "
          "(goal <= 1.3)")
    cpu = {name: {"seconds": s} for name, s in runner.summarize_each(runs, "cpu_seconds").items()}
    cpu_ratios = hf_ratios(cpu)
    print("process CPU s, median (all threads; steadier than wall time on a shared machine): "
          + ", ".join(f"{name} {cpu[name]['seconds']['median']:.2f}" for name in cpu)
          + f"; orbax / HF {cpu_ratios['orbax_safetensors_over_hf']:.2f}x, HF / converted "
          f"{cpu_ratios['hf_over_converted']:.2f}x")
    runner.write_json(json_out, {"benchmark": "restore-hf", "ckpt": str(ckpt),
                                 "hf": str(hf_dir), "mesh": mesh, "rules": rules,
                                 "dtype": dtype, "results": summary, "ratios": found,
                                 "cpu_seconds": {n: c["seconds"] for n, c in cpu.items()},
                                 "cpu_ratios": cpu_ratios})


def _bench_cluster(source: str, mesh: str, rules: str, dtype: str, processes: int,
                   repeats: int, json_out) -> None:
    runs = cluster_restore.measure(source, mesh, rules, dtype, processes, repeats)
    remote = storage.is_remote(source)
    rows, summary = cluster_restore.table_rows(runs, remote)
    runner.print_table(f"restore {source} onto {mesh} ({rules}) across {processes} processes; "
                       f"{repeats} launches each, alternated",
                       cluster_restore.REMOTE_COLUMNS if remote else cluster_restore.COLUMNS,
                       rows)
    runner.write_json(json_out, {"benchmark": "restore-cluster", "source": source, "mesh": mesh,
                                 "rules": rules, "processes": processes, "results": summary})


COLUMNS = ("contender", "min s", "median s", "max s", "GB/s (median)", "peak RSS overhead MB",
           "orbax / this", "this / raw", "this / copy floor")


def remote_contenders(ckpt: pathlib.Path, source: str, orbax_source: Optional[str], mesh: str,
                      rules: str, dtype: str) -> dict[str, Worker]:
    """jaxaccel from the bucket (cold, warm cache), from local files, orbax from gs://, and
    the raw parallel download (bench.remote_restore)."""
    devices = runner.mesh_devices(mesh)

    def worker(contender: str, url: Optional[str] = source) -> Worker:
        return Worker(WORKER, {"contender": contender, "ckpt": str(ckpt), "mesh": mesh,
                               "rules": rules, "dtype": dtype, "manifest_from": str(ckpt),
                               "source": url}, devices)

    found = {"jaxaccel, cold cache": worker("remote-cold"),
             "jaxaccel, warm cache": worker("remote-warm"),
             "jaxaccel, local file": worker("jaxaccel")}
    if orbax_source:
        found["orbax via gs://"] = worker("remote-orbax", orbax_source)
    found[REMOTE_RAW] = worker("remote-raw")
    return found


REMOTE_RAW = "raw parallel download"


def table_rows(runs: dict[str, list[dict]], raw_name: str = RAW,
               baseline: str = BASELINE) -> tuple[list, dict]:
    seconds = runner.summarize_each(runs, "seconds")
    overhead = runner.summarize_each(runs, "overhead")
    summary = {name: {"seconds": seconds[name], "overhead_bytes": overhead[name],
                      "bytes": results[0]["bytes"]} for name, results in runs.items()}
    orbax, raw, floor = (seconds[n]["median"] if n in seconds else None
                         for n in (baseline, raw_name, FLOOR))
    rows = []
    for name, s in summary.items():
        t = s["seconds"]
        rows.append((name, t["min"], t["median"], t["max"], s["bytes"] / t["median"] / 1e9,
                     s["overhead_bytes"]["median"] / 1e6,
                     runner.ratio(orbax, t["median"]), runner.ratio(t["median"], raw),
                     runner.ratio(t["median"], floor)))
    return rows, summary


def ratios(summary: dict) -> dict:
    """Median-time ratios of the issue's goals: verify on / off (<= 1.10) and verify on /
    copy floor (<= 1.5); also per-round (each round runs all contenders back to back)."""
    def median(name):
        return summary[name]["seconds"]["median"] if name in summary else None

    def per_round(a, b):
        if a not in summary or b not in summary:
            return []
        return [x / y for x, y in zip(summary[a]["seconds"]["runs"], summary[b]["seconds"]["runs"])]
    return {"verify_on_over_off": runner.ratio(median(DEFAULT), median(NO_VERIFY)),
            "verify_on_over_copy_floor": runner.ratio(median(DEFAULT), median(FLOOR)),
            "verify_on_over_off_per_round": per_round(DEFAULT, NO_VERIFY),
            "verify_on_over_copy_floor_per_round": per_round(DEFAULT, FLOOR)}


def drop_page_cache(contender: str = "") -> None:
    """Drop the page cache (before `contender`'s run): the next read comes from disk."""
    os.sync()
    try:
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise runner.BenchError(f"--cold needs root to drop the page cache ({err.strerror})"
                                ) from None
