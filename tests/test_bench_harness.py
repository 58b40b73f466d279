"""The benchmark harness (`jaxaccel.bench.runner`), driven by a trivial fake worker: fresh
processes in round-robin order, summaries and ratios, the worker environment, and failures
that name the contender. No timing thresholds."""

import os
import textwrap

import numpy as np
import pytest

from jaxaccel.bench import embed, pipeline, restore, runner
from jaxaccel.bench.runner import Worker, WorkerFailed
from jaxaccel.cli.bench import _clean_errors

FAKE_WORKER = '''
import os, sys

from jaxaccel.bench.worker import serve


def main(name, log, value=1.0, fail=False, no_json=False, sleep=0.0):
    import time

    with open(log, "a") as handle:
        handle.write(name + "\\n")
    time.sleep(sleep)
    if fail:
        print("boom: the fake worker was told to fail", file=sys.stderr)
        raise SystemExit(3)
    if no_json:
        print("not json")
        raise SystemExit(0)
    print("a library's chatter before the result")
    return {"value": value, "pid": os.getpid(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "coordinator": os.environ.get("JAX_COORDINATOR_ADDRESS")}


if __name__ == "__main__":
    serve(main)
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A function making a Worker of the fake module, and the log its runs append to."""
    (tmp_path / "fake_bench_worker.py").write_text(textwrap.dedent(FAKE_WORKER))
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    log = tmp_path / "runs.log"

    def make(name, devices=None, **kwargs):
        return Worker("fake_bench_worker", {"name": name, "log": str(log), **kwargs}, devices)

    return make, log


def test_contenders_alternate_round_robin_in_fresh_processes(fake):
    make, log = fake
    before = []
    runs = runner.alternate({"a": make("a", value=1.0), "b": make("b", value=2.0),
                             "c": make("c", value=3.0)}, repeats=2, before_run=before.append)
    assert log.read_text().split() == ["a", "b", "c", "a", "b", "c"]
    assert before == ["a", "b", "c", "a", "b", "c"]
    assert [r["value"] for r in runs["b"]] == [2.0, 2.0]
    pids = [r["pid"] for results in runs.values() for r in results]
    assert len(set(pids)) == 6  # every run its own process


def test_summaries_are_min_median_max_of_every_run():
    assert runner.summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0,
                                                 "runs": [3.0, 1.0, 2.0]}
    assert runner.summarize([1.0, 2.0, 3.0, 10.0])["median"] == 2.5
    runs = {"a": [{"s": 4.0}, {"s": 2.0}], "b": [{"s": 7.0}]}
    each = runner.summarize_each(runs, "s")
    assert each["a"]["median"] == 3.0 and each["b"] == runner.summarize([7.0])


def test_ratio_against_a_missing_baseline_is_not_a_number():
    assert runner.ratio(6.0, 3.0) == 2.0
    assert runner.ratio(0.0, 3.0) == 0.0
    assert runner.ratio(None, 3.0) == "n/a" and runner.ratio(3.0, None) == "n/a"
    assert runner.ratio(3.0, 0.0) == "n/a"


def test_embed_ratios_are_against_the_best_pytorch_median():
    summary = {"jaxaccel float32": runner.summarize([60.0, 70.0, 80.0]),
               "pytorch eager float32": runner.summarize([35.0]),
               "pytorch eager bfloat16": runner.summarize([50.0])}
    rows, best = embed.table_rows(summary)
    assert best == 50.0
    assert rows[0] == ("jaxaccel float32", 60.0, 70.0, 80.0, 70.0 / 50.0)
    rows, best = embed.table_rows({"jaxaccel float32": summary["jaxaccel float32"]})
    assert best is None and rows[0][-1] == "n/a"


def test_restore_ratios_against_orbax_and_raw():
    def run(seconds):
        return {"seconds": seconds, "overhead": 1e6, "bytes": 4e9}

    runs = {"jaxaccel": [run(1.0), run(3.0), run(2.0)], restore.BASELINE: [run(8.0)],
            restore.RAW: [run(0.5)], restore.NO_VERIFY: [run(0.8), run(2.0), run(1.6)],
            restore.FLOOR: [run(1.0), run(1.0), run(1.0)]}
    rows, summary = restore.table_rows(runs)
    name, low, median, high, gb_s, overhead_mb, vs_orbax, vs_raw, vs_floor = rows[0]
    assert (name, low, median, high) == ("jaxaccel", 1.0, 2.0, 3.0)
    assert gb_s == 2.0 and overhead_mb == 1.0
    assert vs_orbax == 4.0 and vs_raw == 4.0 and vs_floor == 2.0
    assert summary["jaxaccel"]["seconds"]["median"] == 2.0
    ratios = restore.ratios(summary)
    assert ratios["verify_on_over_off"] == 2.0 / 1.6
    assert ratios["verify_on_over_copy_floor"] == 2.0
    assert ratios["verify_on_over_off_per_round"] == [1.0 / 0.8, 3.0 / 2.0, 2.0 / 1.6]
    rows, _ = restore.table_rows({"jaxaccel": runs["jaxaccel"]})
    assert rows[0][-3:] == ("n/a", "n/a", "n/a")



def test_cluster_restore_rows_from_a_bucket():
    """`bench restore --processes N --source s3://...`: the network bytes are extra columns;
    the local-source table keeps its columns."""
    from jaxaccel.bench import cluster_restore

    def run(seconds, storage, network):
        return {"seconds": seconds, "storage": storage, "network": network, "total_bytes": 100,
                "processes": {}}

    runs = {"read-all": [run(2.0, 400, 398), run(4.0, 400, 398)],
            "broadcast": [run(1.0, 100, 99), run(3.0, 100, 99)]}
    rows, summary = cluster_restore.table_rows(runs, remote=True)
    assert len(rows[1]) == len(cluster_restore.REMOTE_COLUMNS)
    assert rows[1] == ("broadcast", 1.0, 2.0, 3.0, 100e-6, 1.0, 1.5, 0.25, 99e-6, 0.99)
    assert summary["read-all"]["bytes_from_network"] == 398
    rows, _ = cluster_restore.table_rows(runs)
    assert len(rows[0]) == len(cluster_restore.COLUMNS) == 8

def test_worker_env_sets_the_host_device_count(monkeypatch):
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8",
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1", "KEEP": "me"}
    env = runner.worker_env(4, base=base)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1",
                                        "--xla_force_host_platform_device_count=4"]
    assert env["KEEP"] == "me"
    assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & set(env)
    assert runner.worker_env(None, base=base)["XLA_FLAGS"] == base["XLA_FLAGS"]
    assert runner.mesh_devices("data=2,model=4") == 8
    assert runner.mesh_devices("stage=3") == 3
    assert runner.mesh_devices("data=-1") == 8


def test_a_worker_gets_its_devices_and_no_cluster(fake, monkeypatch):
    make, _ = fake
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    result = runner.run_worker("three devices", make("x", devices=3))
    assert "--xla_force_host_platform_device_count=3" in result["xla_flags"].split()
    assert result["coordinator"] is None


def test_benchmarks_give_each_worker_the_devices_its_mesh_needs(tmp_path):
    found = restore.contenders(tmp_path, "data=2,model=2", "dp_tp", "default", None, False)
    assert {w.devices for w in found.values()} == {4}
    assert list(found)[-1] == restore.RAW
    assert found[restore.BASELINE].kwargs["contender"] == "orbax"
    assert found[restore.DEFAULT].kwargs["contender"] == "jaxaccel"  # crc32c checked
    assert found[restore.NO_VERIFY].kwargs["contender"] == "jaxaccel-noverify"
    assert found[restore.FLOOR].kwargs["contender"] == "copy-floor"
    found = pipeline.contenders(3, {"layers": 2})
    assert list(found) == ["1 device", "data=3", "stage=3 M=1", "stage=3 M=6", "stage=3 M=12"]
    assert {w.devices for w in found.values()} == {3}
    assert found["stage=3 M=6"].kwargs == {"layers": 2, "mesh": "stage=3", "microbatches": 6}


def test_a_failing_worker_names_the_contender_and_its_stderr(fake):
    make, _ = fake
    with pytest.raises(WorkerFailed) as info:
        runner.run_worker("broken one", make("broken one", fail=True))
    message = str(info.value)
    assert "'broken one'" in message and "exit code 3" in message
    assert "boom: the fake worker was told to fail" in message
    assert "fake_bench_worker" in message  # the command, to rerun it by hand


def test_a_worker_without_a_json_result_fails_clearly(fake):
    make, _ = fake
    with pytest.raises(WorkerFailed, match="'quiet' printed no JSON result"):
        runner.run_worker("quiet", make("quiet", no_json=True))


def test_a_result_followed_by_library_logs_is_still_found():
    # vLLM logs its shutdown to stdout after the worker's result line.
    stdout = ('INFO start\n{"tok_s": 1.5}\n(EngineCore pid=1) INFO shutdown {x}\n'
              '{not json\n[1, 2]\n')
    assert runner.last_json_object(stdout) == {"tok_s": 1.5}
    assert runner.last_json_object("INFO only logs\n[1]\n") is None


def test_bench_commands_print_a_failure_as_one_error(capsys):
    def command():
        raise WorkerFailed("contender 'x' failed, exit code 1; stderr ends:\nboom")

    with pytest.raises(SystemExit) as info:
        _clean_errors(command)()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: contender 'x' failed") and "boom" in err


def test_copy_floor_copies_every_byte(tmp_path):
    """The floor contender's timed call really moves the files' bytes (pieces and threads)."""
    from jaxaccel.bench import restore_worker

    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate((0, 5, restore_worker.COPY_PIECE + 3)):
        path = tmp_path / f"f{i}"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        files.append(path)
    copied = restore_worker.copy_floor(files, threads=2)()
    assert [bytes(buf) for buf in copied] == [p.read_bytes() for p in files]


# A contender that fails or times out keeps the others' results (issue 29) ------------------

@pytest.fixture
def fresh_run():
    runner.reset()
    runner.set_timeout(None)
    yield
    runner.reset()
    runner.set_timeout(None)


def test_a_failed_contender_is_skipped_and_the_others_keep_their_runs(fake, fresh_run, capsys):
    make, log = fake
    runs = runner.alternate({"a": make("a", value=1.0), "broken": make("broken", fail=True),
                             "c": make("c", value=3.0)}, repeats=3)
    assert log.read_text().split() == ["a", "broken", "c", "a", "c", "a", "c"]
    assert {n: [r["value"] for r in rs] for n, rs in runs.items()} == {"a": [1.0] * 3,
                                                                     "c": [3.0] * 3}
    [(name, why)] = runner.failures().items()
    assert name == "broken" and "exit code 3" in why and "boom" in why
    assert "warning: contender 'broken' failed" in capsys.readouterr().err


def test_a_contender_past_the_timeout_is_a_timed_out_row(fake, fresh_run, tmp_path, capsys):
    make, _ = fake
    runner.set_timeout(2)
    runs = runner.alternate({"slow": make("slow", sleep=30), "quick": make("quick")}, 1)
    assert list(runs) == ["quick"] and "no result after 2 s" in runner.failures()["slow"]
    runner.print_table("t", ("contender", "value", "x"), [("quick", 1.0, "n/a")])
    out = capsys.readouterr().out
    assert "slow" in out and "TIMED OUT" in out and "quick" in out
    runner.write_json(tmp_path / "r.json", {"results": {"quick": 1.0}})
    import json
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["results"] == {"quick": 1.0} and list(payload["failed"]) == ["slow"]


def test_the_limit_scales_with_the_slowest_finished_run(fake, fresh_run):
    make, _ = fake
    assert runner.timeout_s() == runner.DEFAULT_TIMEOUT_S
    runner._RUN["longest_s"] = 200.0  # as if a contender had taken 200 s
    assert runner.timeout_s() == runner.TIMEOUT_FACTOR * 200.0
    runner.set_timeout(5)
    assert runner.timeout_s() == 5


def test_every_contender_failing_is_one_error(fake, fresh_run):
    make, _ = fake
    with pytest.raises(runner.BenchError, match="every contender failed.*'x'.*'y'"):
        runner.alternate({"x": make("x", fail=True), "y": make("y", fail=True)}, 2)


def test_a_benchmark_with_a_failed_contender_prints_the_rest_and_exits_1(fake, fresh_run,
                                                                         capsys):
    make, _ = fake

    def command():
        runs = runner.alternate({"ok": make("ok", value=2.0), "bad": make("bad", fail=True)}, 1)
        runner.print_table("values", ("contender", "value"),
                           [(n, r[0]["value"]) for n, r in runs.items()])

    with pytest.raises(SystemExit) as info:
        _clean_errors(command)()
    assert info.value.code == 1
    out, err = capsys.readouterr()
    assert "ok" in out and "2" in out and "bad" in out and "FAILED" in out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "1 contender(s) failed: bad" in errors[0]


def test_bench_embed_with_a_broken_baseline_still_reports_jaxaccel(minilm_src, tmp_path,
                                                                  capsys, monkeypatch):
    """A real benchmark: the PyTorch contenders' source loses its weights after the convert,
    so they fail; the jaxaccel rows print and go into the JSON, and the exit status is 1."""
    import json
    import shutil

    from cli_runner import run_cli

    if not runner.reference_available():
        pytest.skip("needs the reference extra (torch, transformers)")
    src = tmp_path / "src"
    shutil.copytree(minilm_src, src)
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt", "-q")
    assert code == 0, err
    (src / "model.safetensors").unlink()
    code, out, err = run_cli(capsys, monkeypatch, "bench", "--timeout", "300", "embed",
                             tmp_path / "ckpt", "--batch", "2", "--length", "8", "--iters",
                             "1", "--repeats", "1", "--no-roofline", "--json",
                             tmp_path / "b.json")
    assert code == 1, err
    payload = json.loads((tmp_path / "b.json").read_text())
    assert set(payload["results"]) == {"jaxaccel float32", "jaxaccel bfloat16"}
    assert set(payload["failed"]) == {"pytorch eager float32", "pytorch eager bfloat16"}
    assert "jaxaccel float32" in out and "FAILED" in out
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        line for line in err.splitlines() if "contender(s) failed" in line]


def test_restore_from_a_hugging_face_directory_ratios(tmp_path):
    """`bench restore CKPT --hf DIR`: three contenders, each in its own worker; the goals'
    ratios from the medians and per round."""
    found = restore.hf_contenders(tmp_path / "ckpt", tmp_path / "hf", "data=2,model=2",
                                  "dp_tp", "default")
    assert [w.kwargs["contender"] for w in found.values()] == [
        "jaxaccel", "orbax-safetensors", "jaxaccel"]
    assert found[restore.HF].kwargs["ckpt"] == str(tmp_path / "hf")
    assert found[restore.CONVERTED].kwargs["ckpt"] == str(tmp_path / "ckpt")

    def run(seconds):
        return {"seconds": seconds, "overhead": 1e6, "bytes": 4e9}

    runs = {restore.HF: [run(2.0), run(4.0)], restore.ORBAX_SAFETENSORS: [run(6.0), run(8.0)],
            restore.CONVERTED: [run(1.0), run(4.0)]}
    rows, summary = restore.table_rows(runs, baseline=restore.ORBAX_SAFETENSORS)
    assert rows[0][6] == 7.0 / 3.0  # orbax / this, medians
    ratios = restore.hf_ratios(summary)
    assert ratios["orbax_safetensors_over_hf"] == 7.0 / 3.0
    assert ratios["hf_over_converted"] == 3.0 / 2.5
    assert ratios["orbax_safetensors_over_hf_per_round"] == [3.0, 2.0]
    assert ratios["hf_over_converted_per_round"] == [2.0, 1.0]
