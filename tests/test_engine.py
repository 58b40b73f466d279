"""The generation engine against transformers: each request's greedy tokens equal a plain
torch greedy loop over the same weights, run alone, whatever the batch around it (arrival
order, chunked-prefill boundaries inside prompts, preemption by a tiny page pool, prefix-
cache hits), for a GQA Llama-style model and a tied-head GPT-2; seeded sampling repeats
across batch compositions; stop conditions end requests as asked."""

import random

import jax

import numpy as np
import pytest
from decoder_reference import generator, load_jax, save_hf

from jaxaccel.engine.engine import LLMEngine
from jaxaccel.engine.frontend import run_requests
from jaxaccel.engine.requests import Request, SamplingParams
from jaxaccel.errors import InputError
from jaxaccel.parallel import sharding as ax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 101
RNG = np.random.default_rng(0)
LENGTHS = [(5, 7), (1, 12), (23, 3), (40, 10), (9, 20), (17, 6)]  # (prompt, new tokens)
PROMPTS = [RNG.integers(0, VOCAB, n).tolist() for n, _ in LENGTHS]
NEW = [n for _, n in LENGTHS]


def build_hf(kind: str):
    torch.manual_seed(0)
    if kind == "llama_gqa":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, head_dim=8, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=1, eos_token_id=2))
    hf = hf.eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped one shows
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def torch_greedy(hf, prompt, new):
    """The reference: full forward passes, argmax of the last position, no cache, no EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module", params=["llama_gqa", "gpt2_tied"])
def case(request, tmp_path_factory):
    hf = build_hf(request.param)
    family = "llama" if request.param.startswith("llama") else "gpt2"
    model, cfg = load_jax(family, save_hf(hf, tmp_path_factory.mktemp(request.param)))
    expected = [torch_greedy(hf, p, n) for p, n in zip(PROMPTS, NEW)]
    return generator(model, cfg), expected, (model, cfg)


def greedy_requests(order):
    return [Request(i, PROMPTS[i], SamplingParams(max_tokens=NEW[i], ignore_eos=True))
            for i in order]


def run(gen, order, **engine_args):
    engine = LLMEngine(gen, page_size=4, **engine_args)
    outputs = engine.generate(greedy_requests(order))
    assert [o.request_id for o in outputs] == list(order)  # outputs in request order
    assert engine.pool.used_count == 0  # every page freed at the end
    return {o.request_id: o.token_ids for o in outputs}, engine.stats()


def test_all_at_once_in_shuffled_orders(case):
    gen, expected, _ = case
    for seed in (0, 1):
        order = list(range(len(PROMPTS)))
        random.Random(seed).shuffle(order)
        tokens, _ = run(gen, order, num_pages=200, enable_prefix_caching=False)
        assert [tokens[i] for i in range(len(PROMPTS))] == expected


def test_chunked_prefill_splits_prompts_inside(case):
    gen, expected, _ = case
    # A budget of 7 tokens puts chunk boundaries inside every longer prompt, off page edges.
    tokens, _ = run(gen, range(len(PROMPTS)), num_pages=200, max_num_batched_tokens=7,
                    enable_prefix_caching=False)
    assert [tokens[i] for i in range(len(PROMPTS))] == expected


def test_a_tiny_page_pool_preempts_and_recomputes_exactly(case):
    gen, expected, _ = case
    for prefix in (False, True):
        tokens, stats = run(gen, range(len(PROMPTS)), num_pages=14, max_num_seqs=4,
                            enable_prefix_caching=prefix)
        assert stats["preemptions"] > 0
        assert [tokens[i] for i in range(len(PROMPTS))] == expected


def test_prefix_cache_hits_give_the_same_tokens(case):
    gen, expected, _ = case
    shared = PROMPTS[3][:24]  # six full pages
    prompts = [shared + PROMPTS[i][:5] for i in (0, 2, 4)] + [PROMPTS[3]]
    hf_expected = {}
    engine = LLMEngine(gen, page_size=4, num_pages=200)
    first = engine.generate([Request("first", prompts[0], SamplingParams(max_tokens=6,
                                                                          ignore_eos=True))])
    rest = engine.generate([Request(i, p, SamplingParams(max_tokens=6, ignore_eos=True))
                            for i, p in enumerate(prompts[1:])])
    assert engine.stats()["prefix_hit_pages"] >= 6 * 3
    alone = LLMEngine(gen, page_size=4, num_pages=200, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        hf_expected[i] = alone.generate([Request(i, p, SamplingParams(max_tokens=6,
                                                                      ignore_eos=True))])[0]
    assert first[0].token_ids == hf_expected[0].token_ids
    assert [o.token_ids for o in rest] == [hf_expected[i].token_ids for i in (1, 2, 3)]
    assert rest[-1].token_ids == expected[3][:6]  # the full prompt, against transformers


def test_seeded_sampling_does_not_depend_on_the_batch(case):
    gen, _, _ = case
    params = [SamplingParams(max_tokens=NEW[i], temperature=0.9, top_k=30 if i % 2 else 0,
                             top_p=0.9 if i % 3 else 1.0, seed=100 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    requests = [Request(i, p, s) for i, (p, s) in enumerate(zip(PROMPTS, params))]
    alone = [LLMEngine(gen, page_size=4, num_pages=200).generate([r])[0].token_ids
             for r in requests[:3]]
    for pages, order in ((200, requests[::-1]), (14, requests)):  # the second preempts
        engine = LLMEngine(gen, page_size=4, num_pages=pages, max_num_seqs=6)
        batched = {o.request_id: o.token_ids for o in engine.generate(order)}
        assert [batched[i] for i in range(3)] == alone
    assert engine.stats()["preemptions"] > 0
    # Greedy rows in the same batch stay greedy.
    mixed = LLMEngine(gen, page_size=4, num_pages=200).generate(
        requests[:2] + [Request("g", PROMPTS[3], SamplingParams(max_tokens=NEW[3],
                                                                 ignore_eos=True))])
    assert [o.token_ids for o in mixed[:2]] == alone[:2]


def test_stop_conditions_and_finish_reasons(case):
    gen, expected, _ = case
    tokens = expected[4]
    engine = LLMEngine(gen, page_size=4, num_pages=200, eos_token_ids=[tokens[3]])
    out = engine.generate([
        Request("eos", PROMPTS[4], SamplingParams(max_tokens=NEW[4])),
        Request("ignore", PROMPTS[4], SamplingParams(max_tokens=NEW[4], ignore_eos=True)),
        Request("stop_id", PROMPTS[4], SamplingParams(max_tokens=NEW[4], ignore_eos=True,
                                                      stop_token_ids=[tokens[5]])),
        Request("short", PROMPTS[4], SamplingParams(max_tokens=2, ignore_eos=True)),
    ])
    cut_eos = tokens[:tokens.index(tokens[3]) + 1]
    cut_stop = tokens[:tokens.index(tokens[5]) + 1]
    assert [(o.token_ids, o.finish_reason) for o in out] == [
        (cut_eos, "eos"), (tokens, "length"), (cut_stop, "stop"), (tokens[:2], "length")]


def test_stop_strings_cut_the_text(case):
    gen, expected, _ = case
    tokens = expected[4]
    detok = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731 - a stand-in tokenizer
    engine = LLMEngine(gen, page_size=4, num_pages=200, detokenize=detok)
    stop = f"t{tokens[2]}"
    out = engine.generate([Request(0, PROMPTS[4], SamplingParams(
        max_tokens=NEW[4], ignore_eos=True, stop=[stop]))])[0]
    text = detok(tokens)
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]
    assert out.token_ids == tokens[:len(out.token_ids)] and stop in detok(out.token_ids)


def test_bad_requests_are_refused_naming_them(case):
    gen, _, _ = case
    engine = LLMEngine(gen, page_size=4, num_pages=8)
    with pytest.raises(InputError, match="request 'v'.*vocabulary"):
        engine.add_request(Request("v", [VOCAB], SamplingParams()))
    with pytest.raises(InputError, match="request 'l'.*maximum length"):
        engine.add_request(Request("l", [1] * 120, SamplingParams(max_tokens=20)))
    with pytest.raises(InputError, match="request 'p'.*pool holds 28"):
        engine.add_request(Request("p", [1] * 20, SamplingParams(max_tokens=20)))
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        engine.add_request(Request("s", [1], SamplingParams(stop=["x"])))
    with pytest.raises(InputError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InputError, match="prompt_token_ids"):
        Request("e", [], SamplingParams())


def test_run_requests_refuses_a_bad_request_before_any_compute(case):
    gen, _, _ = case
    before = gen.traces.get("engine_step", 0)
    bad = Request("bad", [VOCAB + 5], SamplingParams())
    with pytest.raises(InputError, match="request 'bad'"):
        run_requests(gen, greedy_requests([0]) + [bad], page_size=4, num_pages=50)
    assert gen.traces.get("engine_step", 0) == before


def test_compiled_programs_are_bucketed(case):
    gen, _, _ = case
    before = gen.traces.get("engine_step", 0)
    run(gen, range(len(PROMPTS)), num_pages=200, max_num_batched_tokens=7,
        enable_prefix_caching=False)
    assert gen.traces.get("engine_step", 0) == before  # same buckets as the chunked test


@pytest.mark.parametrize("mesh", ["data=2,model=4", "data=4,model=2"])
@pytest.mark.cpu_only  # meshes of 8 simulated CPU devices (XLA_FLAGS in conftest.py)
def test_sharded_engine_equals_transformers(case, mesh):
    _, expected, (model, cfg) = case
    assert jax.device_count() >= 8, "tests/conftest.py should simulate 8 devices"
    layout = ax.Layout.create(mesh, "dp_tp")
    sharded = generator(model, cfg, layout=layout)
    engine = LLMEngine(sharded, page_size=4, num_pages=14, max_num_seqs=4)
    outputs = engine.generate(greedy_requests(range(len(PROMPTS))))
    assert [o.token_ids for o in outputs] == expected
    # Pages split their kv heads over `model` where the heads divide it.
    spec = tuple(engine.pages.k_lpkch.sharding.spec) + (None,) * 5
    divides = cfg.num_kv_heads % layout.mesh.shape["model"] == 0
    assert spec[2] == ("model" if divides else None)


def test_logprobs_equal_torch_log_softmax(case, request):
    """Each new token's log-probability and the best 3, from the model's distribution
    (before temperature), against torch's log_softmax of the same weights' logits."""
    hf = build_hf(request.node.callspec.params["case"])
    engine = LLMEngine(case[0], page_size=4)
    asked = [Request(0, PROMPTS[3], SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3,
                                                   temperature=0.7, seed=1)),
             Request(1, PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))]
    outputs = engine.generate(asked)
    assert outputs[1].logprobs is None  # only those who ask pay for them
    ids = list(PROMPTS[3])
    with torch.no_grad():
        for token, (chosen, top) in zip(outputs[0].token_ids, outputs[0].logprobs):
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
            want = torch.topk(lp, 3)
            assert chosen == pytest.approx(float(lp[token]), abs=1e-4)
            assert [t for t, _ in top] == want.indices.tolist()
            np.testing.assert_allclose([v for _, v in top], want.values.numpy(), atol=1e-4)
            ids.append(token)


def test_a_step_is_one_ragged_program_over_its_real_tokens():
    """Decode tokens and prefill chunks flatten into one [T] batch padded only to T's bucket:
    a 500-token chunk beside three decode tokens is 512 token rows (two programs padded to
    [rows, longest chunk] computed 4 x 512 + 4), each token at its sequence's own position,
    page and slot."""
    from jaxaccel.engine.engine import step_inputs
    from jaxaccel.engine.page_pool import NULL_PAGE, PagePool
    from jaxaccel.engine.prefix_cache import PrefixCache
    from jaxaccel.engine.scheduler import Scheduler
    from jaxaccel.engine.step import Bucket, bucket

    assert bucket([500, 1, 1, 1], 64) == Bucket(512, 64, False)
    assert bucket([1] * 40, 64) == Bucket(64, 64, True)
    assert bucket([5, 1], 64) == Bucket(16, 2, False)
    pool = PagePool(40)
    scheduler = Scheduler(pool, PrefixCache(pool, 4, False), 4, 8, 16)
    for i, n in enumerate((3, 9, 6)):
        scheduler.add(Request(i, list(range(10 * i, 10 * i + n)), SamplingParams(max_tokens=4)))
    rows = scheduler.schedule()  # 3 + 9 + the first 4 of 6
    step = bucket([r.count for r in rows], 8)
    inputs = step_inputs(rows, step, 5, 4, 0)
    assert step == Bucket(16, 4, False) and list(inputs.cu_q_lens_s) == [0, 3, 12, 16, 16]
    assert list(inputs.num_seqs) == [3] and list(inputs.last_s) == [2, 11, 15, 0]
    assert list(inputs.kv_lens_s) == [3, 9, 4, 0]
    for row, first in zip(rows, inputs.cu_q_lens_s):
        for j in range(row.count):
            position = row.start + j
            assert inputs.ids_t[first + j] == row.seq.tokens[position]
            assert inputs.positions_t[first + j] == position
            assert inputs.page_t[first + j] == row.seq.pages[position // 4]
            assert inputs.slot_t[first + j] == position % 4
    assert list(inputs.table_sw[3]) == [NULL_PAGE] * 5
