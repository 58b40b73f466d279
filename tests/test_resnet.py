"""ResNet through jaxaccel vs. transformers' ResNetForImageClassification on the same weights.

The reference nets are small (ResNet-18 blocks; a ResNet-50-shaped bottleneck net with
narrow widths) with random batch-norm statistics, so a folding bug changes the logits.
Inputs are preprocessed pixels of 64x64 crops of scikit-image's sample photographs.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="reference extra (torch) not installed")
pytest.importorskip("transformers", reason="reference extra not installed")
skimage_data = pytest.importorskip("skimage.data", reason="test extra (scikit-image) missing")

SIDE = 64
NETS = {
    "resnet18": dict(depths=(2, 2, 2, 2), hidden_sizes=(16, 32, 64, 128), layer_type="basic",
                     embedding_size=16, num_labels=10),
    "resnet50": dict(depths=(3, 4, 6, 3), hidden_sizes=(32, 64, 128, 256),
                     layer_type="bottleneck", embedding_size=16, num_labels=12),
}


def sample_pixels(n: int = 6) -> np.ndarray:
    """Normalised float32 [n, SIDE, SIDE, 3] from real photographs (plain resize)."""
    from PIL import Image

    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(),
              skimage_data.rocket(), np.stack([skimage_data.camera()] * 3, -1),
              skimage_data.immunohistochemistry()]
    out = [np.asarray(Image.fromarray(p).resize((SIDE, SIDE)), np.float32) / 255 for p in photos]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((np.stack(out[:n]) - mean) / std).astype(np.float32)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return sample_pixels()


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request, tmp_path_factory, pixels):
    """(name, hf dir, jaxaccel checkpoint, reference logits) of one reference net."""
    from jaxaccel.conversion.hf import convert
    from jaxaccel_reference.random_resnet import hf_model, write_hf

    model = hf_model(**NETS[request.param])
    root = tmp_path_factory.mktemp(request.param)
    write_hf(model, root / "hf", image_size=SIDE)
    convert(root / "hf", root / "ckpt")
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits.numpy()
    return request.param, root / "hf", root / "ckpt", ref


def logits(ckpt, pixels, dtype="float32", mesh=None, rules=None, batch_size=4):
    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    layout = Layout.create(mesh, rules) if mesh else None
    return Classifier(load_model(ckpt, layout, dtype=dtype), batch_size=batch_size).logits(pixels)


def test_float32_logits_match_transformers(net, pixels):
    _, _, ckpt, ref = net
    ours = logits(ckpt, pixels)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)


def test_torchvision_layout_matches_transformers(net, pixels, tmp_path):
    """The reference's weights saved under torchvision's parameter names (conv1, bn1,
    layer1.0.conv1, ..., downsample.0/1, fc), no config.json: the architecture comes from
    the shapes. torchvision itself does not import beside the CPU torch wheel used here."""
    from safetensors import safe_open

    from jaxaccel.conversion.hf import convert
    from jaxaccel_reference.random_resnet import hf_model, write_torchvision

    name, _, _, ref = net
    src = write_torchvision(hf_model(**NETS[name]), tmp_path / "tv")
    with safe_open(str(src / "model.safetensors"), "numpy") as f:
        assert {"conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "fc.bias",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias"} <= set(f.keys())
    manifest = convert(src, tmp_path / "ckpt", family="resnet", layout="torchvision")
    assert manifest.source["layout"] == "torchvision"
    assert manifest.config["depths"] == NETS[name]["depths"]
    ours = logits(tmp_path / "ckpt", pixels)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_bfloat16_top1_identical_and_logits_within_tolerance(net, pixels):
    """bf16 weights/activations, f32 accumulation: logits within 2% of their range
    (measured: 0.55% ResNet-18 blocks, 0.83% ResNet-50 shape)."""
    _, _, ckpt, ref = net
    ours = logits(ckpt, pixels, "bfloat16")
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(ours - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.cpu_only
@pytest.mark.parametrize("mesh, rules", [("data=8", "dp"), ("data=2,model=4", "dp_tp")])
def test_sharded_logits_equal_single_device(net, pixels, mesh, rules):
    _, _, ckpt, _ = net
    single = logits(ckpt, pixels, batch_size=8)
    sharded = logits(ckpt, pixels, mesh=mesh, rules=rules, batch_size=8)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5 * np.abs(single).max())


def test_manifest_records_folded_batch_norm_and_labels(net):
    name, _, ckpt, _ = net
    manifest = json.loads((ckpt / "jaxaccel.json").read_text())
    assert manifest["family"] == "resnet"
    assert "batch_norm" in manifest["source"]
    assert not any("norm" in key or "running" in key for key in manifest["arrays"])
    assert manifest["config"]["labels"][:2] == ["class_0", "class_1"]
    assert manifest["config"]["image_size"] == SIDE


def test_channels_split_over_model_axis(net):
    from jax.sharding import PartitionSpec

    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    _, _, ckpt, _ = net
    loaded = load_model(ckpt, Layout.create("data=2,model=4", "dp_tp"))
    kernel = loaded.state["stages"][1][0]["convs"][0]["w_hwio"]
    assert kernel[...].sharding.spec == PartitionSpec(None, None, None, "model")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_and_tpu_programs_are_plain_xla_and_sharded(net, platform):
    """As tests/test_export.py checks the text families: lowered for another platform with
    `jax.export`, the classify program has no CPU-only op and keeps data/model shardings."""
    from test_export import assert_plain_and_sharded, exported_text

    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import plan_model
    from jaxaccel.parallel.sharding import Layout

    plan = plan_model(net[2], Layout.create("data=2,model=4", "dp_tp"), "bfloat16")
    classifier = Classifier(plan, batch_size=8, platform=platform)
    text = exported_text(classifier.forward.jitted, classifier.abstract_args(8), platform)
    assert_plain_and_sharded(text)
    assert "stablehlo.convolution" in text and "bf16" in text


def test_resnet50_full_shape_lowers():
    """The true ResNet-50 (25.6M parameters) builds and lowers at 224x224, batch 2."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxaccel.models.resnet import Config, Model

    cfg = Config(hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3),
                 labels=tuple(map(str, range(1000))))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0))))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    # torchvision's resnet50 has 25,557,032; folding drops each batch norm's scale (26,560
    # channels in all) and keeps its shift as the convolution's bias.
    assert count == 25_557_032 - 26_560
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 1000) and out.dtype == jnp.float32
