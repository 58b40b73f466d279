"""`jaxaccel bench generate` arithmetic: ratios and bandwidth use from worker results."""

from jaxaccel.bench import generate


def run(prefill_ms, b1, b8, param_bytes=1_000):
    return {"prefill_ms": prefill_ms, "decode_b1_tok_s": b1, "decode_b8_tok_s": b8,
            "param_bytes": param_bytes}


def test_summary_ratios_and_bandwidth_use():
    runs = {"jaxaccel bfloat16": [run(200, 100, 400), run(300, 120, 500), run(250, 110, 450)],
            "jaxaccel bfloat16 xla-dots": [run(500, 50, 250)],
            "transformers bfloat16": [run(500, 55, 300)]}
    summary = generate.summarize(runs, bandwidth=110_000, peak_bandwidth=220_000)
    ours = summary["jaxaccel bfloat16"]
    assert ours["decode_b1_tok_s"]["median"] == 110
    assert ours["bandwidth_utilisation_b1"] == 1_000 * 110 / 110_000
    assert ours["bandwidth_utilisation_b1_vs_max"] == 1_000 * 110 / 220_000
    assert generate.ratio(summary, "jaxaccel bfloat16", "decode_b1_tok_s") == 2.0
    assert generate.ratio(summary, "jaxaccel bfloat16", "prefill_ms") == 2.0  # theirs / ours
    assert generate.ratio(summary, "jaxaccel bfloat16 xla-dots", "decode_b8_tok_s") == 250 / 300
    assert generate.ratio(summary, "transformers bfloat16", "decode_b1_tok_s") == "n/a"


def test_prefill_gflops_as_fraction_of_peak():
    runs = {"jaxaccel bfloat16": [run(500, 1, 1)], "jaxaccel float32": [run(250, 1, 1)]}
    summary = generate.summarize(runs, bandwidth=1.0, peak_bandwidth=1.0)
    generate.add_prefill_flops(summary, 10 * 10**9, {"bfloat16": {"gflops": 40.0}})
    assert summary["jaxaccel bfloat16"]["prefill_gflops"] == 20.0
    assert summary["jaxaccel bfloat16"]["prefill_fraction_of_peak"] == 0.5
    assert summary["jaxaccel float32"]["prefill_fraction_of_peak"] == "n/a"
    assert generate.table_rows(summary)[0][-1] == "20 (0.50)"
