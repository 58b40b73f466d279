"""The engine's front-end pieces: `--input` JSONL records to Requests (per-line settings over
the command's defaults, one-line errors naming the line), `run_requests` in input order,
and the throughput benchmark's workload and table arithmetic."""

import json

import numpy as np
import pytest

from jaxaccel.bench import throughput, throughput_workload
from jaxaccel.engine.frontend import request_from_record
from jaxaccel.engine.requests import SamplingParams
from jaxaccel.errors import InputError

DEFAULTS = SamplingParams(max_tokens=8, temperature=0.5, top_k=3)


def encode(text):
    return [ord(c) % 50 for c in text]


def test_records_override_the_defaults_field_by_field():
    r = request_from_record({"prompt_ids": [1, 2], "max_new_tokens": 3, "seed": 7,
                             "stop": "x", "ignore_eos": True}, 4, DEFAULTS, None)
    assert r.request_id == 4 and r.prompt_token_ids == (1, 2)
    assert r.params == SamplingParams(max_tokens=3, temperature=0.5, top_k=3, seed=7,
                                      stop=("x",), ignore_eos=True)
    assert request_from_record({"prompt": "ab"}, 1, DEFAULTS, encode).prompt_token_ids == (47, 48)


@pytest.mark.parametrize("record, message", [
    ([1, 2], "line 3: expected a JSON object"),
    ({}, "line 3: give exactly one of 'prompt'"),
    ({"prompt": "a", "prompt_ids": [1]}, "line 3: give exactly one"),
    ({"prompt_ids": []}, "line 3: 'prompt_ids' must be a non-empty list"),
    ({"prompt_ids": [1, "2"]}, "line 3: 'prompt_ids' must be a non-empty list"),
    ({"prompt": ""}, "line 3: 'prompt' must be a non-empty string"),
    ({"prompt_ids": [1], "max_new_tokens": 0}, "line 3: max_tokens must be"),
    ({"prompt_ids": [1], "top_p": 0}, "line 3: top_p must be"),
    ({"prompt_ids": [1], "temperature": "hot"}, "line 3: "),
    ({"prompt_ids": [1], "stop": [1]}, "line 3: stop must be a list of strs"),
    ({"prompt_ids": [1], "colour": 1}, r"line 3: unknown field\(s\) \['colour'\]"),
])
def test_bad_records_are_one_line_errors_naming_the_line(record, message):
    with pytest.raises(InputError, match=message):
        request_from_record(record, 3, DEFAULTS, encode)


def test_text_prompts_need_a_tokenizer():
    with pytest.raises(InputError, match="line 1: a text 'prompt' needs"):
        request_from_record({"prompt": "hi"}, 1, DEFAULTS, None)


def test_synthetic_workload_is_seeded_and_within_bounds():
    work = throughput_workload.synthetic(200, 125, 62, vocab=1000, seed=3)
    assert work == throughput_workload.synthetic(200, 125, 62, vocab=1000, seed=3)
    prompts = [len(w["prompt_ids"]) for w in work]
    outputs = [w["max_new_tokens"] for w in work]
    assert 8 <= min(prompts) and max(prompts) <= 512 and 8 <= min(outputs) <= max(outputs) <= 256
    assert 90 <= np.median(prompts) <= 160 and 45 <= np.median(outputs) <= 80


def test_workload_file_errors_name_the_line(tmp_path):
    path = tmp_path / "w.jsonl"
    good = json.dumps({"prompt_len": 4, "max_new_tokens": 2})
    path.write_text(good + "\n" + json.dumps({"prompt_ids": [1]}) + "\n")
    with pytest.raises(InputError, match=r"w.jsonl:2: expected a JSON object"):
        throughput_workload.from_file(path, 100)
    path.write_text(json.dumps({"prompt_len": 4, "max_new_tokens": 2}) + "\n")
    assert [len(w["prompt_ids"]) for w in throughput_workload.from_file(path, 100)] == [4]


def test_throughput_table_ratios_and_missing_contenders():
    runs = {"engine": [{"output_tok_s": 30.0, "ttft_s": {"p50": 0.5, "p99": 1.0},
                        "tpot_s": {"p50": 0.01, "p99": 0.02}, "cold_s": 9.0,
                        "kv_pages_peak": 10, "kv_pages": 100, "preemptions": 0,
                        "prefix_hit_pages": 2, "prefill_tokens": 50}],
            "static": [{"output_tok_s": 10.0, "ttft_s": {"p50": 2.0, "p99": 2.0},
                        "tpot_s": {"p50": 0.05, "p99": 0.05}}]}
    rows = throughput.table_rows(throughput.summarize(runs), ["vllm (not installed)"])
    assert rows[0][:6] == ("engine", 30.0, 3.0, "n/a", "0.5 / 1", "10 / 20")
    assert rows[0][7:] == ("10 / 100", 0, 2, 50, "n/a")
    assert rows[1][2] == 1.0 and rows[1][7] == "n/a"
    assert rows[2][:2] == ("vllm (not installed)", "missing")
    assert len(rows[2]) == len(throughput.COLUMNS)


def test_token_agreement_with_vllm_counts_equal_requests():
    summary = {"engine": {"token_ids": [[1, 2], [3]]}, "vllm": {"token_ids": [[1, 2], [4]]}}
    assert throughput.agreement(summary) == {"engine": "1/2"}
    assert "token_ids" not in summary["engine"]
