"""`jaxaccel bench roofline`: its table and JSON at tiny sizes (real workers, fresh
processes), the peak arithmetic, and the fractions other benchmarks print from it."""

import json
import pathlib

import pytest
from cli_runner import one_error_line, run_cli

from jaxaccel.bench import embed, roofline, runner


def _proc_flags() -> set[str]:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.cpu_only
def test_roofline_json_schema_at_tiny_sizes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out_file = tmp_path / "roofline.json"
    code, out, err = run_cli(capsys, monkeypatch, "bench", "roofline", "--shape", "16x8x4",
                             "--shape", "3x8x8x8", "--min-seconds", "0.001", "--json", out_file)
    assert code == 0, err
    payload = json.loads(out_file.read_text())
    assert payload["benchmark"] == "roofline" and payload["repeats"] == 1
    features = payload["cpu"]["features"]
    assert {name for name, present in features.items() if present} == (
        _proc_flags() & set(features))
    contenders = {"xla", "pytorch"} if runner.reference_available() else {"xla"}
    rows = {(r["name"], r["dtype"], r["contender"]): r for r in payload["matmul"]}
    assert set(rows) == {(s, d, c) for s in ("16x8x4", "3x8x8x8")
                         for d in roofline.DTYPES for c in contenders}
    assert (rows["3x8x8x8", "float32", "xla"]["batch"], rows["16x8x4", "float32", "xla"]["m"],
            rows["16x8x4", "float32", "xla"]["n"]) == (3, 16, 4)
    for row in payload["matmul"]:
        g = row["gflops"]
        assert 0 < g["min"] <= g["median"] <= g["max"]
    for dtype in roofline.DTYPES:
        fastest = max(r["gflops"]["median"] for r in payload["matmul"] if r["dtype"] == dtype)
        assert payload["peaks"][dtype]["gflops"] == fastest
    assert payload["read_bytes_per_s"]["median"] > 0
    assert "16x8x4" in out and payload["cpu"]["model"] in out
    assert not (tmp_path / "cache").exists()  # --shape runs are not this CPU's roofline


def test_bad_shape_is_a_usage_error(capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "bench", "roofline", "--shape", "8x8")
    assert code == 2 and "--shape" in err


def test_flops_and_peaks():
    from jaxaccel.bench.roofline_worker import flops

    assert flops({"batch": 3, "m": 5, "k": 7, "n": 11}) == 2 * 3 * 5 * 7 * 11
    payload = {"matmul": [
        {"name": "a", "dtype": "bfloat16", "contender": "xla", "gflops": {"median": 50.0}},
        {"name": "b", "dtype": "bfloat16", "contender": "pytorch", "gflops": {"median": 80.0}},
        {"name": "a", "dtype": "float32", "contender": "xla", "gflops": {"median": 30.0}}],
        "read_bytes_per_s": {"median": 2e10}}
    peaks = roofline.peaks(payload)
    assert peaks["bfloat16"] == {"gflops": 80.0, "shape": "b", "contender": "pytorch"}
    assert peaks["float32"]["gflops"] == 30.0 and peaks["read_bytes_per_s"] == 2e10
    assert roofline.fraction(40.0, peaks["bfloat16"]) == 0.5
    assert roofline.fraction(40.0, None) == "n/a"


def test_forward_flops_of_minilm(minilm_ckpt):
    # MiniLM-L6: 6 layers, d=384, f=1536, 128 tokens; dense 2*t*(4d^2 + 2df), attention
    # 2 batched matmuls of 2*t*t*d each (all t x t scores, as both contenders compute).
    t, d, f = 128, 384, 1536
    expected = 6 * (2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d)
    assert roofline.forward_flops(minilm_ckpt, t) == expected


def test_embed_rows_carry_fraction_of_peak():
    summary = {"jaxaccel bfloat16": {"min": 1.0, "median": 2.0, "max": 3.0},
               "pytorch eager bfloat16": {"min": 1.0, "median": 4.0, "max": 5.0}}
    rows, best = embed.table_rows(summary, 5e9, {"bfloat16": {"gflops": 40.0}})
    assert best == 4.0
    assert rows[0] == ("jaxaccel bfloat16", 1.0, 2.0, 3.0, 0.5, 10.0, 0.25)


def test_cached_roofline_is_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert roofline.cached() is None
    roofline.cache_path().parent.mkdir(parents=True)
    runner.write_json(roofline.cache_path(), {"peaks": {"bfloat16": {"gflops": 1.0}}})
    assert roofline.limits()[0] == {"bfloat16": {"gflops": 1.0}}


def test_one_error_line_for_failed_worker(capsys, monkeypatch):
    monkeypatch.setattr(roofline, "XLA_WORKER", "jaxaccel.bench.no_such_worker")
    monkeypatch.setattr(runner, "reference_available", lambda: False)
    code, _, err = run_cli(capsys, monkeypatch, "bench", "roofline", "--shape", "4x4x4",
                           "--no-bandwidth")
    assert code == 1 and "xla" in one_error_line(err)
