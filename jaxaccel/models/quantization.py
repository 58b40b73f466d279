"""Weight-only quantization: schemes, which weights they cover, and how one block is quantized.

The quantized array type is qwix's `QArray` (`qvalue` int8/int4/float8 in the weight's stored
shape, `scale` float32, no zero point: symmetric), made by `qwix.quantize`; model code hands it
to the backend's `quantized_matmul` hook (`jaxaccel.models.layers.matmul`). Which weights a
scheme covers is a list of `qwix.QuantizationRule`s whose `module_path` matches dotted
parameter names: the family's `FamilySpec.quantized_weights` (its matmul weights), plus its
LM head (`quantized_head`) with `head=True`. Embeddings, norms and biases stay in the compute dtype.

A tied LM head (GPT-2; Llama/Qwen with `tie_word_embeddings`) is the token embedding table.
With `head=True` the model then also holds its head as a parameter of its own (the family's
`FamilySpec.tied_head`: the head's name and the table it copies; `models.state.abstract_model(...,
head_copy=True)`), quantized from the table: the logits matmul reads the quantized copy, the
embedding lookup keeps the table in the compute dtype. Quantize on load reads the table a
second time for it (`checkpoint.restore.Target.source`); `convert --quantize-head` stores the
copy as the head's NAME.values / NAME.scales and records {head: table} as the manifest's
`quantization.head_copy`.

The head's scheme: `Scheme.head_name`, by default int8 per output channel under every
scheme, int4 included (`HEAD_SCHEMES`; llama.cpp's 4-bit mixes also keep `output.weight` at
higher precision). Measured on GPT-2 124M (docs/performance.md, "The quantized LM head on GPT-2"): with
int4 blocks, an int8 head adds nothing measurable to the KL divergence from fp32 and decodes at
2.4-2.9x bf16 (batch 1); an int4 head adds 12% to it (+1.5e-3 nats) for another 1.29x.

How a weight is quantized is a `QuantSpec`: per axis, the tile its scale covers. Weights are
stored [*k, *n] (in, out), possibly with a leading layers axis:
  * int8 / fp8: one scale per output channel: tile = the whole axis on every k axis, 1 elsewhere
    (scale shape 1 along k);
  * int4: one scale per output channel and group of `group_size` consecutive elements of the
    flattened contraction axes (qwix's tiled/blockwise layout; for wo [n, h, d] with h = 64 and
    g = 128, tiles (2, 64, 1): a group is two heads). Reshaped to 2-D, the scale is always
    [K / g, N].

Stored form (checkpoints, `jaxaccel.json`): a quantized weight NAME is two arrays, NAME.values
(int8: int8; int4: int8 holding -8..7, one per byte; fp8: float8_e4m3fn) and NAME.scales
(float32, shape = values shape / tiles), and the manifest's "quantization" object records the
scheme and each weight's qtype and tiles (`QuantSpec.to_json`). This is jaxaccel's own layout;
qwix's parameter pytree (declared unstable) is never written. A pre-quantized Hugging Face
checkpoint (`conversion.prequantized`) is held the same way, with two additions its formats
need, both recorded per weight in `QuantSpec`: scales in their stored dtype (`scale_dtype`)
and zero points (`zeros`: NAME.zeros, the QArray's `zero_point`, the weight (q - z) * s). A
GPTQ `desc_act` checkpoint, whose groups are not consecutive input rows, is held with its rows
sorted by group (`perm_axes`: the QArray inside a `parallel.params.Permuted`, NAME.perm the
row order; the layer gathers its activations by it).

Quantizing a block is elementwise after a max (and, for int4, a search of the clipping range,
`CLIP_RATIOS`) over each tile, so a block whose edges fall on tile edges quantizes to exactly the corresponding part of the whole array: quantize-on-load
(per slice, `checkpoint.restore`) and convert --quantize (whole arrays) give the same bits.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix
from flax import nnx

from jaxaccel.errors import UsageError
from jaxaccel.models.family import FamilySpec
from jaxaccel.parallel.params import Permuted
from jaxaccel.parallel.sharding import LAYERS

SCHEMES = ("int8", "int4", "fp8")
# The head's scheme under each scheme when not named (see the module doc for why int8).
HEAD_SCHEMES = {"int8": "int8", "int4": "int8", "fp8": "fp8"}
DEFAULT_GROUP_SIZE = 128
QTYPES = {"int8": "int8", "int4": "int4", "fp8": "float8_e4m3fn"}
# What each qtype is stored as in a checkpoint (int4: one value per byte, see module doc).
STORED_DTYPES = {"int8": "int8", "int4": "int8", "float8_e4m3fn": "float8_e4m3fn"}
VALUES, SCALES, ZEROS = "values", "scales", "zeros"
SCALE_DTYPE = np.dtype("float32")
# Platforms whose XLA has float8 dots (H100-class GPUs, TPU v5+); elsewhere fp8 is refused.
FP8_PLATFORMS = ("cuda", "gpu", "tpu")
# Per qtype, the fractions of a tile's absmax tried as its clipping range; each tile keeps the
# one whose round-to-nearest has the least squared error (the clipping search of AWQ's
# auto_clip and llama.cpp's k-quants, without calibration data). For int4's 16 levels this
# matters: on MiniLM with groups of 128 it raises the minimum cosine to the fp32 reference
# from 0.83 to 0.88 for +2-3 s of quantize-on-load on GPT-2 124M (4 ratios: 7 gave 0.89).
# int8 keeps plain absmax (its cosine is 0.996 already).
CLIP_RATIOS = {"int4": (1.0, 0.9, 0.8, 0.7)}


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A weight-only scheme: `name` int8 | int4 | fp8, `group_size` (int4), `head` (also the
    LM head, tied or not), `head_name` (the head's scheme; None: `HEAD_SCHEMES[name]`)."""

    name: str
    group_size: int = DEFAULT_GROUP_SIZE
    head: bool = False
    head_name: str | None = None

    @classmethod
    def parse(cls, name: str | None, group_size: int | None = None,
              head: bool | str = False) -> Scheme | None:
        """`--quantize NAME` -> a Scheme (None for no quantization); `head` True (the default
        head scheme) or a scheme name for the head. UsageError if unknown."""
        if name in (None, "", "none"):
            return None
        if name not in SCHEMES:
            raise UsageError(f"--quantize must be one of {', '.join(SCHEMES)}, got {name!r}")
        if isinstance(head, str) and head not in SCHEMES:
            raise UsageError(f"the head's scheme must be one of {', '.join(SCHEMES)}, "
                             f"got {head!r}")
        group = DEFAULT_GROUP_SIZE if group_size is None else int(group_size)
        if group < 1 or group & (group - 1):
            raise UsageError(f"--group-size must be a power of two, got {group}")
        head_name = head if isinstance(head, str) else None
        return cls(name, group, bool(head), head_name)

    @classmethod
    def from_label(cls, label: str | None, group_size: int | None = None) -> Scheme | None:
        """A scheme from its `label` ("int8", "int4+head", "int4+head=int4": how benchmarks
        name their contenders). UsageError if malformed."""
        if label in (None, "", "none"):
            return None
        name, plus, head = label.partition("+")
        if plus and not (head == "head" or head.startswith("head=")):
            raise UsageError(f"a quantized contender is SCHEME, SCHEME+head or "
                             f"SCHEME+head=SCHEME, got {label!r}")
        return cls.parse(name, group_size, head.partition("=")[2] or bool(plus))

    @property
    def label(self) -> str:
        """"int8", "int4+head" (the default head scheme) or "int4+head=int4"."""
        if not self.head:
            return self.name
        return f"{self.name}+head" + ("" if self.head_name in (None, HEAD_SCHEMES[self.name])
                                      else f"={self.head_name}")

    @property
    def qtype(self) -> str:
        return QTYPES[self.name]

    @property
    def head_scheme(self) -> str:
        return self.head_name or HEAD_SCHEMES[self.name]

    def rules(self, spec: FamilySpec) -> list[qwix.QuantizationRule]:
        """The qwix rules of this scheme for a family: the matmul weights, then the head."""
        rules = [self._rule(spec.quantized_weights, self.name)]
        if self.head:
            rules.append(self._rule(spec.quantized_head, self.head_scheme))
        return [r for r in rules if r is not None]

    def _rule(self, names, scheme: str) -> qwix.QuantizationRule | None:
        if not names:
            return None
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        tile = self.group_size if scheme == "int4" else None
        return qwix.QuantizationRule(module_path=pattern, weight_qtype=QTYPES[scheme],
                                     tile_size=tile)

    def to_json(self) -> dict:
        out = {"scheme": self.name, "head": self.head}
        if self.name == "int4":
            out["group_size"] = self.group_size
        if self.qtype in CLIP_RATIOS:
            out["clip_ratios"] = list(CLIP_RATIOS[self.qtype])
        if self.head:
            out["head_scheme"] = self.head_scheme
        return out


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one weight is quantized: its qtype and, per axis, the tile one scale covers."""

    qtype: str
    tiles: tuple[int, ...]
    # A pre-quantized checkpoint's scales stay in their stored dtype (float16, bfloat16).
    scale_dtype: str = "float32"
    # A zero point per scale (asymmetric, pre-quantized checkpoints only): NAME.zeros, held
    # in the values' qtype; the weight is (values - zeros) * scales.
    zeros: bool = False
    # Rows held in another order (GPTQ desc_act): the axes NAME.perm runs over, flattened
    # (the k axes; a leading layers axis stays its own). (): rows in the stored order.
    perm_axes: tuple[int, ...] = ()

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(d // t for d, t in zip(shape, self.tiles))

    def perm_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """NAME.perm's shape [*lead, K] for a weight of `shape` (perm_axes must be set)."""
        first = self.perm_axes[0]
        return (*shape[:first], int(np.prod([shape[a] for a in self.perm_axes])))

    @property
    def stored_dtype(self) -> str:
        return STORED_DTYPES[self.qtype]

    def to_json(self) -> dict:
        out = {"qtype": self.qtype, "tiles": list(self.tiles)}
        if self.scale_dtype != "float32":
            out["scale_dtype"] = self.scale_dtype
        if self.zeros:
            out["zeros"] = True
        if self.perm_axes:
            out["perm_axes"] = list(self.perm_axes)
        return out

    @classmethod
    def from_json(cls, raw: Mapping) -> QuantSpec:
        return cls(str(raw["qtype"]), tuple(int(t) for t in raw["tiles"]),
                   str(raw.get("scale_dtype", "float32")), bool(raw.get("zeros", False)),
                   tuple(int(a) for a in raw.get("perm_axes", ())))


def tied_head(spec: FamilySpec, config, scheme: Scheme | None) -> dict[str, str]:
    """{head: table} when `scheme` quantizes the head of a model whose head is its embedding
    table (the family's `tied_head`, config `tie_word_embeddings`); else {}."""
    tied = spec.tied_head
    if scheme is None or not scheme.head or tied is None:
        return {}
    return {tied[0]: tied[1]} if getattr(config, "tie_word_embeddings", False) else {}


def manifest_head_copy(manifest) -> dict[str, str]:
    """{head: table} of a checkpoint that stores a quantized copy of its tied head."""
    return dict((manifest.quantization or {}).get("head_copy", {}))


def weight_axes(spec: FamilySpec, name: str, head: bool) -> tuple[int, ...] | None:
    """The contraction axes (in the unstacked shape) of weight `name`, None if not covered."""
    table = dict(spec.quantized_weights)
    if head:
        table.update(spec.quantized_head)
    return table.get(name)


def matching(rules: Sequence[qwix.QuantizationRule], name: str) -> qwix.QuantizationRule | None:
    """The first rule whose module_path matches the dotted parameter name."""
    return next((r for r in rules if r.weight_qtype and re.fullmatch(r.module_path, name)), None)


def spec_for(shape: Sequence[int], k_axes: Sequence[int], stacked: bool,
             rule: qwix.QuantizationRule) -> QuantSpec:
    """The QuantSpec of a weight of `shape` (with a leading layers axis when `stacked`) whose
    contraction axes are `k_axes` (unstacked numbering)."""
    offset = 1 if stacked else 0
    k = [a + offset for a in k_axes]
    tiles = [1] * len(shape)
    if rule.tile_size is None:  # per output channel: one scale over all of k
        for a in k:
            tiles[a] = shape[a]
    else:
        group = _fitting_group([shape[a] for a in k], int(rule.tile_size))
        for a, t in zip(k, group_tiles([shape[a] for a in k], group)):
            tiles[a] = t
    return QuantSpec(str(jnp.dtype(rule.weight_qtype)), tuple(tiles))


def group_tiles(k_dims: Sequence[int], group: int) -> list[int] | None:
    """Tiles over the k axes whose product is `group` consecutive elements of flattened k
    (None: no such tiles)."""
    tiles, remaining = [1] * len(k_dims), group
    for i in reversed(range(len(k_dims))):
        dim = k_dims[i]
        if remaining >= dim:
            if remaining % dim:
                return None
            tiles[i], remaining = dim, remaining // dim
        else:
            if dim % remaining:
                return None
            tiles[i], remaining = remaining, 1
        if remaining == 1:
            return tiles
    return tiles if remaining == 1 else None


def _fitting_group(k_dims: Sequence[int], group: int) -> int:
    """`group`, or the largest power-of-two fraction of it that tiles k (small test models)."""
    while group > 1 and group_tiles(k_dims, group) is None:
        group //= 2
    return max(group, 1)


def abstract_qarray(shape, spec: QuantSpec) -> qwix.QArray | Permuted:
    """A QArray of ShapeDtypeStructs: the held form of a quantized weight (inside a
    `Permuted` with its int32 row order when `spec.perm_axes`)."""
    zeros = (jax.ShapeDtypeStruct(spec.scale_shape(shape), jnp.dtype(spec.qtype))
             if spec.zeros else None)
    held = qwix.QArray(jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(spec.qtype)),
                       jax.ShapeDtypeStruct(spec.scale_shape(shape), np.dtype(spec.scale_dtype)),
                       zeros, jnp.dtype(spec.qtype))
    if not spec.perm_axes:
        return held
    return Permuted(held, jax.ShapeDtypeStruct(spec.perm_shape(shape), jnp.int32))


def _tiled_view(shape: Sequence[int], tiles: Sequence[int]):
    """(view shape, tile axes, scale view shape) of a block of `shape`: each axis cut into
    (tiles along it, tile) where 1 < tile < its size, so per-tile reductions are over the tile
    axes and a scale reshaped to the scale view broadcasts against the view."""
    view, tile_axes, scale_view = [], [], []
    for dim, tile in zip(shape, tiles):
        if tile == 1:
            view.append(dim)
            scale_view.append(dim)
        elif tile == dim:
            tile_axes.append(len(view))
            view.append(dim)
            scale_view.append(1)
        else:
            view += [dim // tile, tile]
            tile_axes.append(len(view) - 1)
            scale_view += [dim // tile, 1]
    return tuple(view), tuple(tile_axes), tuple(scale_view)


def _clip_search(x: jax.Array, scale: jax.Array, tile_axes: tuple[int, ...], qtype: str,
                 ratios: Sequence[float]) -> jax.Array:
    """Per tile, `scale` * the ratio in `ratios` whose round-to-nearest of `x` has the least
    squared error (x and scale in the views of `_tiled_view`; scale: qwix's absmax scale)."""
    info = jnp.iinfo(jnp.dtype(qtype))
    best, best_error = scale, None
    for ratio in ratios:  # ratios[0] == 1.0 (plain absmax) wins ties
        candidate = scale * ratio
        error = jnp.sum(jnp.square(jnp.round(x / candidate).clip(info.min, info.max)
                                   * candidate - x), axis=tile_axes, keepdims=True)
        if best_error is None:
            best_error = error
        else:
            better = error < best_error
            best, best_error = jnp.where(better, candidate, best), jnp.minimum(error, best_error)
    return best


@functools.cache
def _quantizer(shape: tuple[int, ...], spec: QuantSpec):
    channelwise = [a for a, t in enumerate(spec.tiles) if t == 1]
    tiled = {a: t for a, t in enumerate(spec.tiles) if t != 1}
    ratios = CLIP_RATIOS.get(spec.qtype)

    @jax.jit
    def run(block):
        q = qwix.quantize(block, jnp.dtype(spec.qtype), channelwise_axes=channelwise,
                          tiled_axes=tiled)
        if not ratios:
            return q.qvalue, q.scale.astype(jnp.float32)
        view, tile_axes, scale_view = _tiled_view(block.shape, spec.tiles)
        x = block.reshape(view)
        scale = _clip_search(x, q.scale.reshape(scale_view), tile_axes, spec.qtype, ratios)
        info = jnp.iinfo(jnp.dtype(spec.qtype))
        # The same rounding as qwix's integer convert_to, with the range clipped explicitly.
        values = jnp.round(x / scale).clip(info.min, info.max)
        return (values.astype(q.qvalue.dtype).reshape(block.shape),
                scale.reshape(q.scale.shape).astype(jnp.float32))

    return run


def quantize_block(block: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(values, scales) of a float32 host block whose edges fall on tile edges, computed with
    qwix on the host CPU (never on an accelerator). values: int8 / ml_dtypes.int4 / float8."""
    block = np.asarray(block, np.float32)
    for dim, tile in zip(block.shape, spec.tiles):
        if dim % tile:
            raise ValueError(f"block {block.shape} is not a whole number of tiles {spec.tiles}")
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        values, scales = _quantizer(block.shape, spec)(jax.device_put(block, cpu))
        return np.asarray(values), np.asarray(scales)


def to_stored(values: np.ndarray) -> np.ndarray:
    """Held values -> their checkpoint dtype (int4 widens to int8)."""
    return values.astype(np.int8) if values.dtype == ml_dtypes.int4 else values


def check_platform(scheme: Scheme | None, platform: str) -> None:
    """fp8 needs float8 dots; refuse it, naming the platform, where XLA has none."""
    if scheme is not None and scheme.name == "fp8" and platform not in FP8_PLATFORMS:
        raise UsageError(f"--quantize fp8: the {platform} backend has no float8 matmuls "
                         f"(fp8 runs on {', '.join(FP8_PLATFORMS)}); use int8 or int4")


def check_stored_platform(specs: Mapping[str, QuantSpec], platform: str, path) -> None:
    """A checkpoint stored with fp8 weights needs float8 dots: refuse it, naming the
    platform, where XLA has none."""
    fp8 = sorted(n for n, s in specs.items() if s.qtype == QTYPES["fp8"])
    if fp8 and platform not in FP8_PLATFORMS:
        raise UsageError(f"{path}: the checkpoint's weights are stored as fp8 (float8_e4m3fn, "
                         f"{len(fp8)} weights); the {platform} backend has no float8 matmuls "
                         f"(fp8 runs on {', '.join(FP8_PLATFORMS)}); load the full-precision "
                         "original, with --quantize int8/int4 on the CPU")


def values_name(name: str) -> str:
    return f"{name}.{VALUES}"


def scales_name(name: str) -> str:
    return f"{name}.{SCALES}"


def zeros_name(name: str) -> str:
    return f"{name}.{ZEROS}"


def quantized_names(name: str) -> tuple[str, str]:
    """(NAME.values, NAME.scales): the two arrays a quantized weight NAME is held/stored as."""
    return values_name(name), scales_name(name)


def quantize_abstract(state, family: FamilySpec, scheme: Scheme):
    """(abstract state with the scheme's weights as abstract QArrays, {name: QuantSpec})."""
    rules = scheme.rules(family)
    specs = {}
    for path, variable in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        if matching(rules, name) is None:
            continue
        value = variable.get_value()
        stacked = tuple(variable.get_metadata().get("axes", ()))[:1] == (LAYERS,)
        specs[name] = spec_for(value.shape, weight_axes(family, name, scheme.head),
                               stacked, matching(rules, name))
    return apply_specs(state, specs), specs


def apply_specs(state, specs: Mapping[str, QuantSpec]):
    """`state` whose parameters named in `specs` are abstract QArrays of that spec."""
    flat = []
    for path, variable in nnx.to_flat_state(state):
        spec = specs.get(".".join(map(str, path)))
        if spec is not None:
            variable = variable.replace(value=abstract_qarray(variable.get_value().shape, spec))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


def manifest_specs(manifest) -> dict[str, QuantSpec]:
    """{weight name: QuantSpec} of a quantized checkpoint ({} for a full-precision one)."""
    weights = (manifest.quantization or {}).get("weights", {})
    return {name: QuantSpec.from_json(raw) for name, raw in weights.items()}


def manifest_scheme(manifest) -> str | None:
    """The scheme name a checkpoint was quantized with, None if full precision."""
    return (manifest.quantization or {}).get("scheme")


def read_bytes(state, skip: Sequence[str] = ()) -> int:
    """Bytes one pass over `state`'s parameters reads: quantized values at their bit width
    (int4: half a byte, as GPU/TPU hold them) plus scales; other arrays at their itemsize.
    `skip`: dotted names of parameters the pass does not read whole (`lookup_only`)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_qarray)[0]:
        if _dotted(path) in skip:
            continue
        if isinstance(leaf, qwix.QArray):
            bits = 4 if leaf.qvalue.dtype == jnp.int4 else 8
            total += leaf.qvalue.size * bits // 8 + leaf.scale.size * leaf.scale.dtype.itemsize
            if leaf.zero_point is not None:
                total += leaf.zero_point.size * bits // 8
        else:
            total += leaf.size * leaf.dtype.itemsize
    return total


def lookup_only(state, spec: FamilySpec) -> tuple[str, ...]:
    """The embedding table a decode step only looks rows up in (not read whole): the
    family's tied table when the model has a head of its own (untied, or a quantized copy)."""
    tied = spec.tied_head
    names = {_dotted(path) for path, _ in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=_is_qarray)[0]}
    return (tied[1],) if tied is not None and tied[0] in names else ()


def _dotted(path) -> str:
    """A state leaf's dotted parameter name (without the Variable's `value` key)."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(k for k in keys if k not in ("value", "raw_value"))


def _is_qarray(x) -> bool:
    return isinstance(x, qwix.QArray)
