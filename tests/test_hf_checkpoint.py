"""A Hugging Face directory is a checkpoint: generate and embed on it equal its converted
checkpoint's (tokens identical, embeddings bit-equal in float32), on 1 device and on
data=2,model=4, locally and from the S3 test server, with sharded safetensors and an index;
quantize on load; and wrong inputs named with what was found. References: the converted
checkpoint (convert's own path through orbax/tensorstore) and transformers."""

import json
import shutil

import numpy as np
import pytest
from conftest import BUCKET

import jaxaccel
from jaxaccel.checkpoint.manifest import Manifest
from jaxaccel.errors import CheckpointError

pytestmark = pytest.mark.cpu_only  # meshes of the 8 simulated host devices

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7], [9, 3, 11, 40, 2]]
SENTENCES = ["A man is eating food.", "Short.", "ünïcödé and emoji 🙂 tokenise too"]
MESHES = (None, "data=2,model=4")


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """(Hugging Face directory saved in 3+ shards with an index, its converted checkpoint,
    the transformers model)."""
    root = tmp_path_factory.mktemp("hfdir")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, varied tokens
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "hf", safe_serialization=True, max_shard_size="20KB")
    assert (root / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((root / "hf").glob("model-*.safetensors"))) >= 3
    jaxaccel.convert(root / "hf", root / "ckpt", progress=False)
    return root / "hf", root / "ckpt", model


@pytest.fixture(scope="module")
def converted_tokens(llama_dirs):
    """The converted checkpoint's tokens per mesh, computed once (the reference side)."""
    cache = {}

    def tokens(mesh, **options):
        key = (mesh, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = _tokens(llama_dirs[1], mesh, **options)[0]
        return cache[key]
    return tokens


def _tokens(path, mesh=None, **options):
    model = jaxaccel.load(path, mesh=mesh, progress=False, **options)
    done = model.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    return [c.token_ids for c in done], model


def _reference(model, prompt, n=6):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("mesh", MESHES)
def test_generate_on_hf_directory_equals_converted(llama_dirs, converted_tokens, mesh):
    hf_dir, _, reference = llama_dirs
    got, model = _tokens(hf_dir, mesh)
    assert got == converted_tokens(mesh)
    assert got[0] == _reference(reference, PROMPTS[0])
    assert set(model.loaded.stats.engines.values()) == {"foreign"}


def test_generate_quantized_on_load_equals_converted(llama_dirs):
    hf_dir, ckpt, _ = llama_dirs
    got, model = _tokens(hf_dir, "data=2,model=4", quantize="int8")
    want, _ = _tokens(ckpt, "data=2,model=4", quantize="int8")
    assert got == want and model.loaded.quantization["on_load"]


@pytest.mark.parametrize("mesh", MESHES)
def test_embed_on_hf_directory_bit_equal_to_converted(minilm_src, minilm_ckpt, mesh):
    got = jaxaccel.load(minilm_src, mesh=mesh, progress=False).embed(SENTENCES)
    want = jaxaccel.load(minilm_ckpt, mesh=mesh, progress=False).embed(SENTENCES)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory, minilm_src):
    """A tiny random BERT encoder with MiniLM's tokenizer: (Hugging Face directory, its
    converted checkpoint). Small, as moto answers each ranged read of an object in time that
    grows with the object's size."""
    root = tmp_path_factory.mktemp("hfbert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(
        root / "hf", safe_serialization=True)
    shutil.copy(minilm_src / "tokenizer.json", root / "hf")
    jaxaccel.convert(root / "hf", root / "ckpt", progress=False)
    return root / "hf", root / "ckpt"


def test_s3_hf_directories_equal_local(llama_dirs, converted_tokens, bert_dirs, s3_server,
                                       monkeypatch, tmp_path):
    """Sharded llama (generate) and a BERT encoder (embed) from moto's S3 on data=2,model=4
    equal their converted checkpoints read locally."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("JAXACCEL_CACHE_DIR", str(tmp_path / "cache"))
    mesh = "data=2,model=4"
    hf_dir = llama_dirs[0]
    s3_server.upload_dir(hf_dir, BUCKET, "hf-llama")
    got, model = _tokens(f"s3://{BUCKET}/hf-llama", mesh)
    assert got == converted_tokens(mesh)
    assert model.loaded.stats.bytes_from_network > 0
    # A second restore reads every range from the chunk cache, none from the server.
    again, model = _tokens(f"s3://{BUCKET}/hf-llama", mesh)
    assert again == got and model.loaded.stats.bytes_from_network == 0
    assert model.loaded.stats.bytes_from_cache > 0
    bert_hf, bert_ckpt = bert_dirs
    s3_server.upload_dir(bert_hf, BUCKET, "hf-bert")
    embedded = jaxaccel.load(f"s3://{BUCKET}/hf-bert", mesh=mesh, progress=False)
    np.testing.assert_array_equal(
        embedded.embed(SENTENCES),
        jaxaccel.load(bert_ckpt, mesh=mesh, progress=False).embed(SENTENCES))


def test_inspect_shows_the_directory_as_convert_would(llama_dirs):
    hf_dir, ckpt, _ = llama_dirs
    got, want = jaxaccel.inspect(hf_dir), Manifest.load(ckpt)
    assert got.family == want.family and got.config == want.config
    assert {n: e.shape for n, e in got.arrays.items()} == {
        n: e.shape for n, e in want.arrays.items()}
    assert got.source["format"] == "huggingface" and got.generation == want.generation


def _copy(src, dest):
    shutil.copytree(src, dest)
    return dest


def test_wrong_inputs_say_what_was_found(llama_dirs, tmp_path):
    hf_dir, ckpt, _ = llama_dirs
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(hf_dir / "config.json", pickles)
    (pickles / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="Hugging Face checkpoint .* no usable "
                                              "safetensors.*pickle"):
        jaxaccel.load(pickles, progress=False)
    with pytest.raises(CheckpointError) as err:  # commands that need a converted checkpoint
        Manifest.load(hf_dir)
    assert "interrupted" not in str(err.value) and "Hugging Face" in str(err.value)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(CheckpointError, match="jaxaccel.json: missing; .* neither a jaxaccel checkpoint nor a Hugging Face"):
        jaxaccel.load(nothing, progress=False)
    interrupted = _copy(ckpt, tmp_path / "interrupted")
    (interrupted / "jaxaccel.json").unlink()
    with pytest.raises(CheckpointError, match="interrupted convert"):
        jaxaccel.load(interrupted, progress=False)


def test_index_and_tensor_checks_as_convert(llama_dirs, tmp_path):
    hf_dir, _, _ = llama_dirs
    bad = _copy(hf_dir, tmp_path / "bad-index")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values()))
                 if f != index["weight_map"][name])
    index["weight_map"][name] = other  # the index names a file without the tensor
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{other}: the index names tensor '{name}'"):
        jaxaccel.load(bad, progress=False)
    missing = _copy(hf_dir, tmp_path / "missing")
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensors.*up_proj"):
        jaxaccel.load(missing, progress=False)


def test_nan_in_a_tensor_fails_naming_it(tmp_path):
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"][3, 4] = np.nan
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj.weight' holds NaN or inf"):
        jaxaccel.load(tmp_path, progress=False)


def test_prequantized_checkpoint_is_named(llama_dirs, tmp_path):
    hf_dir = _copy(llama_dirs[0], tmp_path / "gptq")
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="declares gptq int4 group 128 symmetric, but no "
                                              "tensor is stored that way"):
        jaxaccel.load(hf_dir, progress=False)


def test_bf16_directory_restores_bit_equal_to_converted(tmp_path):
    """bf16 weights (the transposes run in the kernel of checkpoint.transpose) restored onto
    data=2,model=4 equal the converted checkpoint's arrays bit for bit, with sizes that leave
    part tiles (intermediate 88, a head of 12)."""
    from jaxaccel.checkpoint.restore import restore_arrays
    from jaxaccel.parallel.sharding import Layout
    from jaxaccel.startup.loader import plan_model

    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=88,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(
        tmp_path / "hf", safe_serialization=True)
    jaxaccel.convert(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16", progress=False)
    restored = []
    for path in (tmp_path / "hf", tmp_path / "ckpt"):
        plan = plan_model(path, Layout.create("data=2,model=4", "dp_tp"))
        restored.append(restore_arrays(path, plan.manifest, plan.targets))
    got, want = restored
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype == np.dtype("bfloat16"), name
        assert got[name].sharding == want[name].sharding, name
        np.testing.assert_array_equal(np.asarray(got[name]).view(np.uint16),
                                      np.asarray(want[name]).view(np.uint16), err_msg=name)
