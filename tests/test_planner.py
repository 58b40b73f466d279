"""`jaxaccel plan` against what a run really holds: parameter bytes exact, total within 20%.

On CPU `device.memory_stats()` is None, so "measured" is: the bytes of the restored shards
that device 0 really holds, plus the KV cache shard it really holds, plus the temporaries and
outputs of the very executable the run compiles (not the planner's own lowering).
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from cli_runner import one_error_line, run_cli

from jaxaccel.startup import planner
from jaxaccel.parallel.sharding import Layout

# Device checks skip these (`-m "not cpu_only"`): they need meshes of 8 simulated CPU devices,
# and 'measured' is defined for the CPU.
pytestmark = pytest.mark.cpu_only


def device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama (GQA: 4 heads, 2 KV heads), converted."""
    # The reference extra (torch, transformers) builds the model; without it, skip, not error.
    torch = pytest.importorskip("torch", reason="reference extra (torch) not installed")
    transformers = pytest.importorskip("transformers", reason="reference extra not installed")

    from jaxaccel.conversion.hf import convert

    root = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "src", safe_serialization=True)
    convert(root / "src", root / "ckpt")
    return root / "ckpt"


@pytest.mark.parametrize("mesh, rules, batch, seq", [
    (None, "dp_tp", 4, 64),
    ("data=2,model=4", "dp_tp", 8, 128),
    ("data=2,stage=2", "dp_tp_pp", 4, 32),
    ("model=8", "tp", 2, 512),
])
def test_minilm_plan_matches_measured(minilm_ckpt, mesh, rules, batch, seq):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    layout = Layout.create(mesh, rules)
    plan = planner.plan(minilm_ckpt, layout, batch=batch, seq=seq)
    loaded = load_model(minilm_ckpt, layout)
    params = device0_bytes(loaded.state)
    assert plan.param_bytes == params  # exact
    embedder = Embedder(loaded, batch_size=batch, max_length=seq)
    ids_bt, mask_bt = embedder.batch_arrays([[1] * seq] * batch)
    stats = embedder.forward.lower(loaded.state, ids_bt, mask_bt).compile().memory_analysis()
    measured = params + stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert plan.activation_source == "xla"
    assert abs(plan.total_bytes - measured) <= 0.2 * measured, (plan.total_bytes, measured)


def test_llama_plan_matches_measured(llama_ckpt):
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.startup.loader import load_model

    layout = Layout.create("data=2,model=2")
    plan = planner.plan(llama_ckpt, layout, batch=3, seq=20, max_new_tokens=30)
    loaded = load_model(llama_ckpt, layout)
    assert plan.param_bytes == device0_bytes(loaded.state)  # exact
    gen = Generator(loaded.graphdef, loaded.state, loaded.config, layout)
    prompts = [list(range(1, 21))] * 3
    gen.generate(prompts, max_new_tokens=30)
    params = device0_bytes(gen.state)
    (key, prefill), = [(k, f) for k, f in gen.runtime.programs.items() if k[0] == "prefill"]
    b, t, slots = key[2:]
    assert (b, t, slots) == (plan.batch, plan.seq, plan.slots)
    args = (gen.state, np.zeros((b, t), np.int32), np.zeros(b, np.int32), np.ones(b, bool),
            np.int32(-1), jax.random.key(0))
    cache = prefill(*args)[0]
    kv = device0_bytes(cache)
    assert plan.kv_cache_bytes == kv  # exact
    stats = prefill.lower(*args).compile().memory_analysis()
    # The prefill's outputs include the cache, counted above.
    measured = params + stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert abs(plan.total_bytes - measured) <= 0.2 * measured, (plan.to_json(), measured)


def test_llama_formula_fallback_is_within_reach(llama_ckpt):
    """Where XLA cannot be asked, the formula still lands in the right range."""
    layout = Layout.create("data=2,model=2")
    xla = planner.plan(llama_ckpt, layout, batch=4, seq=64, max_new_tokens=64)
    formula = planner.plan(llama_ckpt, layout, batch=4, seq=64, max_new_tokens=64,
                           compile_activations=False)
    assert formula.activation_source == "formula" and xla.activation_source == "xla"
    assert formula.param_bytes == xla.param_bytes and formula.kv_cache_bytes == xla.kv_cache_bytes
    assert 0.25 < formula.activation_bytes / xla.activation_bytes < 4


def test_peak_host_memory_bounds_the_restore(minilm_ckpt):
    from jaxaccel.startup.loader import load_model

    budget = 4 << 20
    plan = planner.plan(minilm_ckpt, Layout.create("data=2,model=4"), host_budget=budget,
                        compile_activations=False)
    loaded = load_model(minilm_ckpt, Layout.create("data=2,model=4"), host_memory_budget=budget)
    assert plan.read_bytes == loaded.stats.bytes_read
    assert loaded.stats.peak_bytes_in_flight <= plan.peak_host_bytes
    assert plan.peak_host_bytes <= max(budget, max(loaded.stats.bytes_per_array.values()))


def test_plan_json(capsys, monkeypatch, minilm_ckpt):
    code, out, err = run_cli(capsys, monkeypatch, "plan", minilm_ckpt, "--mesh", "data=2,model=4",
                             "--batch", "8", "--seq", "128", "--device-memory", "1GiB", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["per_device"]["fits"] is True
    assert payload["per_device"]["activation_source"] == "xla"
    assert payload["per_process"]["read_bytes"] == 90261504
    assert next(iter(payload["largest_arrays"])) == "embeddings.token_vd"


def test_plan_refuses_and_suggests(capsys, monkeypatch, minilm_ckpt):
    # At the model's full 512 positions (its default input limit is sentence-transformers' 256),
    # 90 MiB: parameters 86.1 MiB + activations 9.3 MiB with the CPU's fused attention (30.8
    # MiB with XLA's batched dots) do not fit on one device.
    code, out, err = run_cli(capsys, monkeypatch, "plan", minilm_ckpt, "--device-memory", "90MiB",
                             "--seq", "512")
    assert code == 1
    line = one_error_line(err)
    assert "embeddings.token_vd" in line and "90.00 MiB" in line
    assert "--mesh data=4,model=2,stage=1 --rules dp_tp" in line


def test_embed_refuses_before_reading_any_byte(capsys, monkeypatch, minilm_ckpt, tmp_path):
    import jaxaccel.startup.loader

    def no_reads(*args, **kwargs):
        raise AssertionError("restore started although the plan does not fit")

    monkeypatch.setattr(jaxaccel.startup.loader, "restore_checkpoint", no_reads)
    out = tmp_path / "v.npy"
    code, _, err = run_cli(capsys, monkeypatch, "embed", minilm_ckpt, "--text", "hello",
                           "--device-memory", "90MiB", "--max-length", "512", "--out", out)
    assert code == 1, err
    line = one_error_line(err)
    assert "plan: each device would need" in line and "embeddings.token_vd" in line
    assert "--mesh data=4,model=2" in line
    assert not out.exists()


def test_embed_runs_when_it_fits(capsys, monkeypatch, minilm_ckpt):
    code, out, err = run_cli(capsys, monkeypatch, "embed", minilm_ckpt, "--text", "hello",
                             "--device-memory", "1GiB", "--json", "--quiet")
    assert code == 0, err
    assert len(json.loads(out)["embeddings"][0]) == 384


def test_suggested_mesh_really_fits(minilm_ckpt):
    plan = planner.plan(minilm_ckpt, Layout.create(), batch=1, seq=512, device_memory=90 << 20)
    sizes, rules, predicted = planner.suggest_mesh(plan, 8)
    again = planner.plan(minilm_ckpt, Layout.create(sizes, rules), batch=1, seq=512,
                         device_memory=90 << 20)
    assert again.fits and again.param_bytes + again.kv_cache_bytes <= predicted


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory) -> pathlib.Path:
    """A small random bottleneck ResNet (64 px images, 10 labels), converted."""
    pytest.importorskip("torch", reason="reference extra (torch) not installed")
    pytest.importorskip("transformers", reason="reference extra not installed")
    from jaxaccel.conversion.hf import convert
    from jaxaccel_reference.random_resnet import hf_model, write_hf

    root = tmp_path_factory.mktemp("resnet")
    model = hf_model(depths=(1, 1, 1, 1), hidden_sizes=(32, 64, 64, 128), embedding_size=16,
                     num_labels=10)
    write_hf(model, root / "hf", image_size=64)
    convert(root / "hf", root / "ckpt")
    return root / "ckpt"


@pytest.mark.parametrize("mesh, batch", [(None, 4), ("data=8", 8), ("data=2,model=4", 6)])
def test_resnet_plan_matches_measured(resnet_ckpt, mesh, batch):
    """classify: parameter bytes exact (channels split over `model`), total within 20% of the
    shards device 0 holds plus what the classifier's own executable allocates."""
    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import load_model

    layout = Layout.create(mesh, "dp_tp")
    plan = planner.plan(resnet_ckpt, layout, batch=batch)
    loaded = load_model(resnet_ckpt, layout)
    params = device0_bytes(loaded.state)
    assert plan.param_bytes == params  # exact
    assert (plan.task, plan.seq, plan.kv_cache_bytes) == ("classify", 64, 0)
    classifier = Classifier(loaded, batch_size=batch)
    pixels = classifier.put(np.zeros((batch, 64, 64, 3), np.float32))
    assert plan.batch == pixels.shape[0]
    stats = classifier.forward.lower(loaded.state, pixels).compile().memory_analysis()
    measured = params + stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert plan.activation_source == "xla"
    assert abs(plan.total_bytes - measured) <= 0.2 * measured, (plan.total_bytes, measured)
    formula = planner.plan(resnet_ckpt, layout, batch=batch, compile_activations=False)
    assert formula.activation_source == "formula"
    assert 0.25 < formula.activation_bytes / plan.activation_bytes < 4


def test_resnet_plan_cli_fits_refuses_and_suggests(capsys, monkeypatch, resnet_ckpt):
    code, out, err = run_cli(capsys, monkeypatch, "plan", resnet_ckpt, "--batch", "8",
                             "--device-memory", "1GiB", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["task"] == "classify" and payload["per_device"]["fits"] is True
    code, _, err = run_cli(capsys, monkeypatch, "plan", resnet_ckpt, "--batch", "8",
                           "--device-memory", "300KiB")
    line = one_error_line(err)
    assert code == 1 and "plan: each device would need" in line
    assert "--mesh data=" in line and "stage=1 --rules dp_tp" in line  # no pipeline for ResNet
    code, _, err = run_cli(capsys, monkeypatch, "plan", resnet_ckpt, "--seq", "32")
    assert code == 2 and "image size 64" in one_error_line(err)
