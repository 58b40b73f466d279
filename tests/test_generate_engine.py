"""The front ends on the generation engine: `Model.generate` with per-prompt settings and
`jaxaccel generate --input FILE --output FILE` with per-line overrides, against transformers
generating each prompt alone; outputs in input order; a bad --input line is one error line
naming it, raised before any weights are read."""

import json

import pytest
from cli_runner import one_error_line, run_cli

import jaxaccel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, EOS = 97, 2
PROMPTS = [[5, 6, 7], [11] * 20, [40, 41], [3, 9, 27, 81, 50, 60, 70, 80, 90]]
NEW = [6, 2, 11, 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 (non-trivial weights, EOS id 2) and its converted checkpoint."""
    root = tmp_path_factory.mktemp("engine_front")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
        eos_token_id=EOS, initializer_range=0.3)).eval()
    hf.save_pretrained(root / "src", safe_serialization=True)
    jaxaccel.convert(root / "src", root / "ckpt", progress=False)
    return hf, root / "ckpt"


@pytest.fixture(scope="module")
def model(tiny):
    return jaxaccel.load(tiny[1], progress=False)


def reference(hf, prompt, n, eos=None):
    """transformers' greedy generate of one prompt alone: the new tokens."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_generate_with_per_prompt_max_new_tokens_equals_transformers(tiny, model):
    hf, _ = tiny
    done = model.generate(PROMPTS, max_new_tokens=NEW, greedy=True, ignore_eos=True)
    assert [c.token_ids for c in done] == [reference(hf, p, n) for p, n in zip(PROMPTS, NEW)]
    assert [c.finish_reason for c in done] == ["length"] * len(PROMPTS)
    assert [c.prompt_token_ids for c in done] == PROMPTS


def test_per_prompt_settings_of_the_wrong_length_are_refused(model):
    with pytest.raises(jaxaccel.UsageError, match="max_new_tokens: 2 values for 4 prompt"):
        model.generate(PROMPTS, max_new_tokens=[3, 4])


def test_per_prompt_seeds_do_not_depend_on_the_batch(model):
    """A sampled prompt's tokens depend on its own seed, not on what runs beside it."""
    settings = {"temperature": 1.0, "ignore_eos": True}
    together = model.generate(PROMPTS, max_new_tokens=NEW, seed=[7, 8, 9, 10], **settings)
    alone = model.generate([PROMPTS[2]], max_new_tokens=NEW[2], seed=[9], **settings)
    assert together[2].token_ids == alone[0].token_ids
    other = model.generate([PROMPTS[2]], max_new_tokens=NEW[2], seed=[10], **settings)
    assert other[0].token_ids != alone[0].token_ids


def test_input_file_with_per_line_overrides_writes_outputs_in_input_order(
        tiny, tmp_path, capsys, monkeypatch):
    hf, ckpt = tiny
    lines = [{"prompt_ids": p, "max_new_tokens": n} for p, n in zip(PROMPTS, NEW)]
    lines[1]["ignore_eos"] = False  # the flag says --ignore-eos; this line stops at EOS
    eos_stop = reference(hf, PROMPTS[1], 40, eos=EOS)
    lines[1]["max_new_tokens"] = len(eos_stop) if eos_stop[-1] == EOS else 40
    stop_at = reference(hf, PROMPTS[3], NEW[3])[1]
    lines[3]["stop_token_ids"] = [stop_at]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, monkeypatch, "generate", ckpt, "--input", source,
                           "--output", out, "-n", "3", "--greedy", "--ignore-eos",
                           "--max-num-seqs", "2", "--max-num-batched-tokens", "16", "-q")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_token_ids"] for r in rows] == PROMPTS
    want = [reference(hf, p, n) for p, n in zip(PROMPTS, NEW)]
    want[1] = reference(hf, PROMPTS[1], lines[1]["max_new_tokens"], eos=EOS)
    want[3] = want[3][:2]
    assert [r["token_ids"] for r in rows] == want
    assert rows[3]["finish_reason"] == "stop" and rows[0]["finish_reason"] == "length"
    assert rows[1]["finish_reason"] == ("eos" if want[1][-1] == EOS else "length")


@pytest.mark.parametrize("body, needle", [
    ('{"prompt_ids": [1, 2]}\n\n{"prompt_ids": [3]}\n', "line 2 is empty"),
    ('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3\n', "line 2 is not valid JSON"),
    ('{"prompt_ids": [1]}\n{"prompt_ids": [1], "top_p": 0}\n', "line 2: top_p must be"),
    ('{"prompt_ids": [1]}\n{"prompt_ids": [1, 97]}\n', "line 2: "),
    ('{"prompt_ids": [1]}\n{"prompt_ids": [1], "max_new_tokens": 500}\n', "line 2: "),
    ('{"prompt_ids": [1]}\n{"prompt": "hi"}\n', "line 2: "),
])
def test_a_bad_input_line_is_one_error_naming_it_before_any_weights_are_read(
        tiny, tmp_path, capsys, monkeypatch, body, needle):
    from jaxaccel.startup import start

    def no_restore(*args, **kwargs):
        raise AssertionError("restored despite a bad --input line")

    monkeypatch.setattr(start, "restore_while_compiling", no_restore)
    source, out = tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    source.write_text(body)
    code, _, err = run_cli(capsys, monkeypatch, "generate", tiny[1], "--input", source,
                           "--output", out, "-q")
    line = one_error_line(err)
    assert code == 2 and needle in line and str(source) in line, err
    assert not out.exists()


def test_plan_reports_the_engine_page_pool(tiny, capsys, monkeypatch):
    page = 2 * 2 * 2 * 16 * 16 * 4  # keys+values, 2 layers, 2 kv heads, 16 slots, dim 16, f32
    code, out, err = run_cli(capsys, monkeypatch, "plan", tiny[1], "--json",
                             "--max-num-seqs", "3")
    assert code == 0, err
    assert json.loads(out)["kv_page_pool"] == {
        "pages": 3 * 4 + 1, "page_size": 16, "page_bytes": page, "bytes": 13 * page,
        "tokens": 12 * 16}
    code, out, _ = run_cli(capsys, monkeypatch, "plan", tiny[1], "--json",
                           "--kv-cache-memory", f"{10 * page}")
    assert json.loads(out)["kv_page_pool"]["pages"] == 10



def test_a_stage_mesh_keeps_the_static_path_with_per_prompt_settings(tiny):
    """Pipeline (`stage`) layouts decode in static batches: per-prompt limits still hold."""
    hf, ckpt = tiny
    staged = jaxaccel.load(ckpt, mesh="stage=2", rules="pp", progress=False)
    done = staged.generate(PROMPTS[:2], max_new_tokens=NEW[:2], greedy=True, ignore_eos=True)
    assert [c.token_ids for c in done] == [reference(hf, p, n)
                                           for p, n in zip(PROMPTS[:2], NEW[:2])]
