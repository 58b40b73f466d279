"""The checkpoint on disk: orbax-readable, faithful to the source tensors, written atomically."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file


@pytest.fixture(scope="module")
def source_tensors(minilm_src):
    return load_file(str(minilm_src / "model.safetensors"))


@pytest.fixture(scope="module")
def orbax_tree(minilm_ckpt):
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore((minilm_ckpt / "params").absolute())


def test_plain_orbax_restores_the_source_tensors(orbax_tree, source_tensors):
    """Transposes/reshapes written out by hand here, independent of the converter's rules."""
    emb = orbax_tree["embeddings"]
    np.testing.assert_array_equal(emb["token_vd"], source_tensors["embeddings.word_embeddings.weight"])
    blocks = orbax_tree["blocks"]
    assert blocks["wq_dnh"].shape == (6, 384, 12, 32)
    for layer in (0, 5):
        query = source_tensors[f"encoder.layer.{layer}.attention.self.query.weight"]  # [out, in]
        np.testing.assert_array_equal(blocks["wq_dnh"][layer].reshape(384, 384), query.T)
        out = source_tensors[f"encoder.layer.{layer}.attention.output.dense.weight"]
        np.testing.assert_array_equal(blocks["wo_nhd"][layer].reshape(384, 384), out.T)
        wi = source_tensors[f"encoder.layer.{layer}.intermediate.dense.weight"]
        np.testing.assert_array_equal(blocks["wi_df"][layer], wi.T)


def test_plain_orbax_equals_jaxaccel_restore(orbax_tree, minilm_ckpt):
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.params import flat_arrays

    ours = flat_arrays(load_model(minilm_ckpt).state)
    assert len(ours) == 21
    for name, array in ours.items():
        group, leaf = name.split(".")
        np.testing.assert_array_equal(np.asarray(array), orbax_tree[group][leaf], err_msg=name)


def test_manifest_describes_every_array(minilm_ckpt, orbax_tree):
    manifest = json.loads((minilm_ckpt / "jaxaccel.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["family"] == "bert" and manifest["dtype"] == "float32"
    assert manifest["config"]["num_layers"] == 6 and manifest["config"]["hidden_size"] == 384
    assert "tokenizer.json" in manifest["tokenizer_files"]
    assert (minilm_ckpt / "tokenizer.json").is_file()
    entry = manifest["arrays"]["blocks.wi_df"]
    assert entry["shape"] == [6, 384, 1536] and entry["axes"] == ["layers", "embed", "mlp"]
    assert entry["nbytes"] == 6 * 384 * 1536 * 4
    assert manifest["total_bytes"] == sum(
        a.nbytes for group in orbax_tree.values() for a in group.values())


def test_bfloat16_convert_halves_the_bytes(minilm_src, minilm_ckpt, tmp_path):
    import ml_dtypes

    from jaxaccel.conversion.hf import convert

    f32 = json.loads((minilm_ckpt / "jaxaccel.json").read_text())["total_bytes"]
    manifest = convert(minilm_src, tmp_path / "bf16", dtype="bfloat16")
    assert manifest.total_bytes * 2 == f32
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "bf16" / "params").absolute())
    assert tree["blocks"]["wi_df"].dtype == ml_dtypes.bfloat16


def test_existing_destination_is_refused_and_kept(minilm_src, tmp_path):
    from jaxaccel.checkpoint.manifest import CheckpointError
    from jaxaccel.conversion.hf import convert

    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(minilm_src, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging directory left


def test_chunks_follow_sharded_axes(minilm_ckpt):
    """A model=8 device reads only its eighth: chunks cut the mlp axis in 8 and layers in 1."""
    import tensorstore as ts

    from jaxaccel.checkpoint import layout

    store = ts.open(layout.array_spec(str(minilm_ckpt / "params"), "blocks.wi_df")).result()
    assert tuple(store.chunk_layout.read_chunk.shape) == (1, 384, 1536 // 8)


def test_sharded_safetensors_with_index_convert_identically(minilm_src, minilm_ckpt, tmp_path):
    """Hugging Face's sharded layout (two files + model.safetensors.index.json) gives the same
    arrays as the single-file source."""
    import shutil

    import orbax.checkpoint as ocp
    from safetensors.numpy import load_file, save_file

    from jaxaccel.conversion.hf import convert

    src = tmp_path / "sharded"
    src.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(minilm_src / name, src)
    tensors = load_file(str(minilm_src / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(src / file))
        weight_map.update({n: file for n in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert(src, tmp_path / "out")
    ours = ocp.PyTreeCheckpointer().restore((tmp_path / "out" / "params").absolute())
    single = ocp.PyTreeCheckpointer().restore((minilm_ckpt / "params").absolute())
    for group, leaves in single.items():
        for leaf, array in leaves.items():
            np.testing.assert_array_equal(ours[group][leaf], array, err_msg=f"{group}.{leaf}")
