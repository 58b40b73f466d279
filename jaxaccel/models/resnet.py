"""ResNet v1.5 image classifier (Hugging Face `ResNetForImageClassification` layout).

Shape legend: b batch, h/w image height/width, c channels (i input, o output of a kernel),
v labels. Activations are NHWC, kernels HWIO.

Inference only: each batch norm is folded into the convolution before it at convert time
(kernel scaled by gamma / sqrt(var + eps), shift moved into a bias), so the graph holds
convolutions, ReLUs, one max pool, a mean and one matmul. Precision as in `layers`:
parameters and activations in the compute dtype, every convolution and the head accumulate
in float32 (`preferred_element_type`), residual sums, pooling and logits in float32.
ResNet v1.5 puts a bottleneck block's stride on its 3x3 convolution (`downsample_in_bottleneck`
false, the default), v1 on its first 1x1.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxaccel.parallel import sharding as ax
from jaxaccel.models import layers
from jaxaccel.models.family import ActivationShape, FamilySpec
from jaxaccel.models.weights import SourceLayout, WeightRule, transpose_to
from jaxaccel.utils.files import read_json

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which both layouts use


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    labels: tuple[str, ...]  # id2label, indexed by id
    layer_type: str = "bottleneck"  # or "basic"
    num_channels: int = 3
    embedding_size: int = 64
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    # Preprocessing (preprocessor_config.json, ConvNext/ResNet image processor semantics).
    image_size: int = 224  # the square crop the model sees
    crop_pct: float | None = 0.875  # resize shortest edge to image_size / crop_pct, then crop
    resample: int = 3  # PIL resampling filter id (3 = bicubic)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_layers(self) -> int:
        """Residual blocks (not stacked: each stage's widths differ, so no pipeline split)."""
        return sum(self.depths)

    @property
    def max_length(self) -> int:
        """The input side length: images are resized and cropped to it."""
        return self.image_size

    @property
    def default_length(self) -> int:
        return self.image_size

    def stage_strides(self) -> tuple[int, ...]:
        first = 2 if self.downsample_in_first_stage else 1
        return (first,) + (2,) * (len(self.depths) - 1)

    @classmethod
    def from_hf(cls, hf: dict) -> "Config":
        if hf.get("layer_type", "bottleneck") not in ("bottleneck", "basic"):
            raise ValueError(f"layer_type must be bottleneck or basic, got {hf['layer_type']!r}")
        id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
        count = hf.get("num_labels") or len(id2label) or 2
        labels = tuple(id2label.get(i, f"LABEL_{i}") for i in range(count))
        return cls(hidden_sizes=tuple(hf["hidden_sizes"]), depths=tuple(hf["depths"]),
                   labels=labels, layer_type=hf.get("layer_type", "bottleneck"),
                   num_channels=hf.get("num_channels", 3),
                   embedding_size=hf.get("embedding_size", 64),
                   hidden_act=hf.get("hidden_act", "relu"),
                   downsample_in_first_stage=bool(hf.get("downsample_in_first_stage", False)),
                   downsample_in_bottleneck=bool(hf.get("downsample_in_bottleneck", False)),
                   **preprocessing(hf.get("preprocessor") or {}))


def preprocessing(pre: dict) -> dict:
    """Config fields from a `preprocessor_config.json` (defaults: ImageNet, 224, crop 0.875)."""
    size = pre.get("size", {})
    if isinstance(size, dict):
        side = size.get("shortest_edge") or size.get("height") or 224
    else:
        side = int(size)
    out = {"image_size": int(side), "crop_pct": pre.get("crop_pct", 0.875 if side < 384 else None),
           "resample": int(pre.get("resample", 3)),
           "do_rescale": bool(pre.get("do_rescale", True)),
           "rescale_factor": float(pre.get("rescale_factor", 1 / 255)),
           "do_normalize": bool(pre.get("do_normalize", True))}
    for key in ("image_mean", "image_std"):
        if key in pre:
            out[key] = tuple(float(v) for v in pre[key])
    if pre.get("do_resize") is False:
        raise ValueError("preprocessor_config.json: do_resize false is not supported")
    return out


def conv(x_bhwi, w_hwio, b_o, stride: int) -> jax.Array:
    """Same-padded convolution plus bias, float32 result (float32 accumulation)."""
    if w_hwio.shape[:2] == (1, 1):
        # A 1x1 convolution is a matmul over channels of the strided input. Written as a dot,
        # XLA:CPU runs it 2.5x (f32) to 6x (bf16) faster than as a convolution (measured at
        # [32, 56, 56, 256] -> 64), and a dot is no worse anywhere else.
        y = jnp.einsum("bhwi,io->bhwo", x_bhwi[:, ::stride, ::stride],
                       w_hwio[0, 0].astype(x_bhwi.dtype), preferred_element_type=jnp.float32)
        return y + b_o.astype(jnp.float32)
    pad = w_hwio.shape[0] // 2
    y = jax.lax.conv_general_dilated(
        x_bhwi, w_hwio.astype(x_bhwi.dtype), (stride, stride), [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    return y + b_o.astype(jnp.float32)


def max_pool(x_bhwc) -> jax.Array:
    """3x3, stride 2, padding 1 (padding never wins the max)."""
    low = jnp.array(-jnp.inf, x_bhwc.dtype)
    return jax.lax.reduce_window(x_bhwc, low, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class Conv(nnx.Module):
    """A convolution with its batch norm folded in: kernel [h, w, i, o] and bias [o]."""

    def __init__(self, c_in: int, c_out: int, size: int, stride: int, *, dtype, rngs):
        self.w_hwio = layers.make_param(rngs, (size, size, c_in, c_out),
                                        (None, None, ax.CHANNELS_IN, ax.CHANNELS), dtype)
        self.b_o = layers.make_param(rngs, (c_out,), (ax.CHANNELS,), dtype, layers.zeros_init)
        self.stride = stride

    def __call__(self, x_bhwi) -> jax.Array:
        return conv(x_bhwi, self.w_hwio[...], self.b_o[...], self.stride)


def block_convs(cfg: Config, c_in: int, c_out: int, stride: int) -> list[tuple]:
    """(c_in, c_out, kernel size, stride) of a block's main-path convolutions."""
    if cfg.layer_type == "basic":
        return [(c_in, c_out, 3, stride), (c_out, c_out, 3, 1)]
    mid, v1 = c_out // 4, cfg.downsample_in_bottleneck
    return [(c_in, mid, 1, stride if v1 else 1), (mid, mid, 3, 1 if v1 else stride),
            (mid, c_out, 1, 1)]


class Block(nnx.Module):
    def __init__(self, cfg: Config, c_in: int, c_out: int, stride: int, *, dtype, rngs):
        self.convs = nnx.List([Conv(*shape, dtype=dtype, rngs=rngs)
                               for shape in block_convs(cfg, c_in, c_out, stride)])
        needs_shortcut = c_in != c_out or stride != 1
        self.shortcut = Conv(c_in, c_out, 1, stride, dtype=dtype, rngs=rngs) if needs_shortcut else None
        self.act = layers.activation(cfg.hidden_act)

    def __call__(self, x_bhwc) -> jax.Array:
        h = x_bhwc
        for conv_layer in self.convs[:-1]:
            h = self.act(conv_layer(h)).astype(x_bhwc.dtype)
        y = self.convs[-1](h)
        skip = self.shortcut(x_bhwc) if self.shortcut is not None else x_bhwc.astype(jnp.float32)
        return self.act(y + skip).astype(x_bhwc.dtype)


def stage_shapes(cfg: Config) -> list[list[tuple[int, int, int]]]:
    """Per stage, per block: (c_in, c_out, stride)."""
    shapes, c_in = [], cfg.embedding_size
    for c_out, depth, stride in zip(cfg.hidden_sizes, cfg.depths, cfg.stage_strides()):
        shapes.append([(c_in, c_out, stride)] + [(c_out, c_out, 1)] * (depth - 1))
        c_in = c_out
    return shapes


class Model(nnx.Module):
    def __init__(self, cfg: Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.stem = Conv(cfg.num_channels, cfg.embedding_size, 7, 2, dtype=dtype, rngs=rngs)
        self.stages = nnx.List([
            nnx.List([Block(cfg, *shape, dtype=dtype, rngs=rngs) for shape in stage])
            for stage in stage_shapes(cfg)])
        c = cfg.hidden_sizes[-1]
        self.head_cv = layers.make_param(rngs, (c, cfg.num_labels), (ax.CHANNELS_IN, None), dtype)
        self.head_v = layers.make_param(rngs, (cfg.num_labels,), (None,), dtype, layers.zeros_init)

    def __call__(self, pixels_bhwc) -> jax.Array:
        """Float32 logits [b, v] of normalised pixels [b, h, w, num_channels]."""
        dtype = self.head_cv[...].dtype
        x = self.stem(pixels_bhwc.astype(dtype))
        x = max_pool(layers.activation(self.config.hidden_act)(x).astype(dtype))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        pooled_bc = x.astype(jnp.float32).mean(axis=(1, 2)).astype(dtype)
        logits = jnp.einsum("bc,cv->bv", pooled_bc, self.head_cv[...],
                            preferred_element_type=jnp.float32)
        return logits + self.head_v[...].astype(jnp.float32)

    def classify(self, pixels_bhwc) -> jax.Array:
        return self(pixels_bhwc)


# Converting -------------------------------------------------------------------------------


def _bn_scale(gamma, var) -> np.ndarray:
    return gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)


def fold_kernel(w_oihw, gamma, beta, mean, var) -> np.ndarray:
    """torch conv weight [o, i, h, w] times its batch norm's scale, as HWIO."""
    scaled = w_oihw.astype(np.float64) * _bn_scale(gamma, var)[:, None, None, None]
    return scaled.transpose(2, 3, 1, 0).astype(np.float32)


def fold_bias(beta, gamma, mean, var) -> np.ndarray:
    """The batch norm's shift once its scale sits in the kernel: beta - mean * scale."""
    return (beta.astype(np.float64) - mean * _bn_scale(gamma, var)).astype(np.float32)


def conv_bn_rules(target: str, conv_weight: str, bn: str) -> list[WeightRule]:
    """A Conv's kernel and bias from a torch conv weight and the batch norm named `bn`."""
    stats = tuple(bn + suffix for suffix in ("weight", "bias", "running_mean", "running_var"))
    return [WeightRule(f"{target}.w_hwio", conv_weight, fold_kernel, extra=stats),
            WeightRule(f"{target}.b_o", bn + "bias", fold_bias,
                       extra=(stats[0], stats[2], stats[3]))]


def conv_targets(cfg: Config):
    """(parameter prefix, stage, block, conv) of every Conv: conv is an index into the
    block's main path or "shortcut"; the stem is ("stem", None, None, None)."""
    yield "stem", None, None, None
    for s, stage in enumerate(stage_shapes(cfg)):
        for b, (c_in, c_out, stride) in enumerate(stage):
            for j in range(len(block_convs(cfg, c_in, c_out, stride))):
                yield f"stages.{s}.{b}.convs.{j}", s, b, j
            if c_in != c_out or stride != 1:
                yield f"stages.{s}.{b}.shortcut", s, b, "shortcut"


def _rules(cfg: Config, names, head: str) -> list[WeightRule]:
    """Rules of a layout whose `names(stage, block, conv)` gives (conv weight, batch-norm
    prefix) and whose classifier is the torch Linear `head`."""
    rules = []
    for target, s, b, j in conv_targets(cfg):
        rules += conv_bn_rules(target, *names(s, b, j))
    return rules + [WeightRule("head_cv", head + "weight", transpose_to),
                    WeightRule("head_v", head + "bias")]


def _hf_names(s, b, j) -> tuple[str, str]:
    if s is None:
        prefix = "resnet.embedder.embedder."
    else:
        block = f"resnet.encoder.stages.{s}.layers.{b}."
        prefix = block + ("shortcut." if j == "shortcut" else f"layer.{j}.")
    return prefix + "convolution.weight", prefix + "normalization."


def weight_rules(cfg: Config) -> list[WeightRule]:
    """How Hugging Face `ResNetForImageClassification` tensors map onto this module."""
    return _rules(cfg, _hf_names, "classifier.1.")


# torchvision's layout (torchvision/models/resnet.py: conv1, bn1, layer1.0.conv1, ...,
# layer1.0.downsample.0/1, fc), as a state dict saved to safetensors.


def _torchvision_names(s, b, j) -> tuple[str, str]:
    if s is None:
        return "conv1.weight", "bn1."
    block = f"layer{s + 1}.{b}."
    if j == "shortcut":
        return block + "downsample.0.weight", block + "downsample.1."
    return block + f"conv{j + 1}.weight", block + f"bn{j + 1}."


def torchvision_weight_rules(cfg: Config) -> list[WeightRule]:
    return _rules(cfg, _torchvision_names, "fc.")


def torchvision_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """A Hugging Face-style config inferred from a torchvision state dict's tensor shapes,
    with torchvision's ImageNet preprocessing (resize 256 bilinear, center crop 224)."""
    if "conv1.weight" not in shapes or "fc.weight" not in shapes:
        raise ValueError("not a torchvision ResNet state dict (no conv1.weight or fc.weight)")
    depths = []
    while f"layer{len(depths) + 1}.0.conv1.weight" in shapes:
        stage = len(depths) + 1
        depths.append(sum(1 for name in shapes
                          if name.startswith(f"layer{stage}.") and name.endswith(".conv1.weight")))
    bottleneck = "layer1.0.conv3.weight" in shapes
    last = "conv3" if bottleneck else "conv2"
    return {"depths": depths, "layer_type": "bottleneck" if bottleneck else "basic",
            "hidden_sizes": [shapes[f"layer{s + 1}.0.{last}.weight"][0] for s in range(len(depths))],
            "embedding_size": shapes["conv1.weight"][0], "num_channels": shapes["conv1.weight"][1],
            "num_labels": shapes["fc.weight"][0],
            "preprocessor": {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 2}}


def extra_sources(src: pathlib.Path) -> tuple[dict, dict]:
    """({"preprocessor": preprocessor_config.json}, no extra weight files): the image
    processor's settings, which `Config.from_hf` keeps (resize, crop, rescale, normalise)."""
    values = read_json(pathlib.Path(src) / "preprocessor_config.json")
    return ({"preprocessor": values} if values is not None else {}), {}


def activation_bytes(cfg: Config, shape: ActivationShape) -> int:
    """Rough activation peak when XLA cannot be asked, in float32: the input, the stem's
    output [b, s/2, s/2, embedding] and four maps of the first stage [b, s/4, s/4, hidden]
    (a block's input, shortcut, main path and sum live at once), split as the rules split
    the batch and the channels. ResNet-50 at b32, 224 px: 508 MiB (XLA's analysis: 515 MiB);
    ResNet-18: 214 MiB (XLA: 123 MiB, it fuses more)."""
    b, side = math.ceil(shape.batch / shape.split(ax.BATCH)), cfg.image_size
    stem = (side // 2) ** 2 * math.ceil(cfg.embedding_size / shape.split(ax.CHANNELS))
    first = (side // 4) ** 2 * math.ceil(cfg.hidden_sizes[0] / shape.split(ax.CHANNELS))
    return b * 4 * (side * side * cfg.num_channels + stem + 4 * first)


SPEC = FamilySpec(
    name="resnet", task="classify", hf_model_types=("resnet",), config=Config, model=Model,
    weight_rules=weight_rules, activation_bytes=activation_bytes,
    # Batch-norm step counters: training bookkeeping, unused by inference.
    ignored_source_weights=(r"num_batches_tracked$",),
    source_layouts={"torchvision": SourceLayout(torchvision_config, torchvision_weight_rules)},
    metadata_files=("preprocessor_config.json",), read_extra_sources=extra_sources,
    conversion_notes={"batch_norm": "folded into the preceding convolution (kernel and bias)"})
