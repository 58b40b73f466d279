"""What every pre-quantized format shares: the source view, the held specs, the reader."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxaccel.conversion.safetensors_source import ConvertError
from jaxaccel.models import quantization
from jaxaccel.parallel.params import PERM, perm_axes

@dataclasses.dataclass(frozen=True)
class Linear:
    """One quantized linear layer of the source: its float weight is [out, in_]."""

    prefix: str  # the module's name: PREFIX.weight is the float weight it stands for
    out: int
    in_: int
    bits: int  # 4 or 8
    group: int  # input columns per scale (in_ for one scale per output channel)
    scale_dtype: str  # numpy name of the stored scales' dtype
    zeros: bool  # has zero points
    tensors: tuple[str, ...]  # the source tensors it is stored as
    rows: int = 1  # output rows per scale (FP8 blocks: 128; per tensor: out)
    float8: bool = False  # float8_e4m3fn values (else integers)
    # Groups are not consecutive input rows (GPTQ desc_act): held with the rows sorted by
    # group, `fmt.row_order(files, lin)`.
    permuted: bool = False

    @property
    def qtype(self) -> str:
        """The `quantization.QTYPES` key: int4, int8 or fp8."""
        return "fp8" if self.float8 else "int4" if self.bits == 4 else "int8"

    @property
    def groups(self) -> int:
        return self.in_ // self.group

    @property
    def row_groups(self) -> int:
        return self.out // self.rows

    def expand(self, per_scale: np.ndarray) -> np.ndarray:
        """[out / rows, in / group] -> [out, in]: each scale (zero point) over its block."""
        return np.repeat(np.repeat(per_scale, self.rows, axis=0), self.group, axis=1)


class QuantizedSource:
    """A `TensorFiles` seen through a format: each quantized linear is one float tensor
    PREFIX.weight [out, in] (its packed parts hidden), so `hf.plan_arrays` checks it like a
    full-precision weight. Everything else is the files' own."""

    def __init__(self, files, fmt):
        self.files, self.format = files, fmt
        self.linears = fmt.linears(files)
        if not self.linears:
            raise ConvertError(f"{fmt.config_path}: quantization_config declares {fmt.label}, "
                               "but no tensor is stored that way (expected its packed "
                               "weights, e.g. PREFIX.qweight or PREFIX.weight_packed)")
        self.parts = {n for lin in self.linears.values() for n in lin.tensors}
        self.file_of = dict(files.file_of)
        for lin in self.linears.values():
            self.file_of[lin.prefix + ".weight"] = files.file_of[lin.tensors[0]]
        self.dropped = files.dropped

    def quantized(self, name: str) -> Linear | None:
        return self.linears.get(name.removesuffix(".weight")) if name.endswith(".weight") \
            else None

    def names(self) -> set[str]:
        return (self.files.names() - self.parts) | {p + ".weight" for p in self.linears}

    def shape(self, name: str) -> tuple[int, ...]:
        lin = self.quantized(name)
        return (lin.out, lin.in_) if lin else self.files.shape(name)

    def check_dtype(self, name: str) -> None:
        if self.quantized(name) is None:
            self.files.check_dtype(name)

    def read(self, name: str) -> np.ndarray:
        lin = self.quantized(name)
        return self.files.read(name) if lin is None else dequantize(self.format, self.files, lin)

    def held_dtype(self) -> str:
        """The dtype of the unquantized tensors holding most bytes (the manifest's)."""
        weight: dict = {}
        for name, t in self.files.tensors.items():
            if name not in self.parts and t.dtype in _HELD:
                weight[_HELD[t.dtype]] = weight.get(_HELD[t.dtype], 0) + t.stop - t.start
        return max(weight, key=weight.get) if weight else "float32"


_HELD = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def dequantize(fmt, files, lin: Linear) -> np.ndarray:
    """The float32 weight [out, in] a quantized linear stands for: (v - z) * scale."""
    values = held_values(fmt, files, lin).astype(np.float32)
    scales = lin.expand(fmt.scales(files, lin).astype(np.float32))
    zeros = fmt.zeros(files, lin)
    if zeros is not None:
        values = values - lin.expand(zeros.astype(np.float32))
    held = values * scales
    if not lin.permuted:
        return held
    weight = np.empty_like(held)
    weight[:, fmt.row_order(files, lin)] = held
    return weight


def held_values(fmt, files, lin: Linear) -> np.ndarray:
    """The values [out, in] in the order they are held: input rows sorted by group when the
    groups are not consecutive (`Linear.permuted`), else as stored."""
    values = fmt.values(files, lin)
    return values[:, fmt.row_order(files, lin)] if lin.permuted else values


def held_row_order(fmt, files, lin: Linear, transform, k_count: int) -> np.ndarray:
    """int32 [K]: the row order of a linear as its held weight [*k, *n] sees it (K = the
    product of its k dims; arange(K) for one held in the stored order): the activations'
    flattened k gathered by it meet the held rows. The weight rule's `transform` maps HF
    input columns to held k positions; one that moves them along the output axes is refused."""
    if not lin.permuted:
        return np.arange(lin.in_, dtype=np.int32)
    columns = transform(np.broadcast_to(np.arange(lin.in_, dtype=np.int32), (lin.out, lin.in_)))
    held = columns.reshape(math.prod(columns.shape[:k_count]), -1)
    rows = held[:, 0]  # the HF input column at each held k row
    if not np.array_equal(held, np.broadcast_to(rows[:, None], held.shape)):
        raise ConvertError(f"{files.file_of[lin.tensors[0]]}: {lin.prefix}'s reordered input "
                           "rows (g_idx) cannot be held: the family's layout moves input "
                           "columns along its output axes")
    # Held row j holds (sorted) column rows[j], i.e. stored column order[rows[j]], which
    # the activations carry at held position argsort(rows)[order[rows[j]]].
    order = fmt.row_order(files, lin)
    return np.argsort(rows)[order[rows]].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Held:
    """How one jaxaccel parameter holds a quantized source weight."""

    spec: quantization.QuantSpec
    stacked: bool
    linears: tuple[Linear, ...]  # per stacked layer (or one)


def quantized_arrays(source: QuantizedSource, family, plan, specs, arrays: dict):
    """(arrays with each quantized parameter as NAME.values/NAME.scales[/NAME.zeros],
    the manifest's quantization object, {name: Held}). ConvertError when a parameter mixes
    quantized and float sources, or its groups do not fall on whole held tiles."""
    held, weights = {}, {}
    for item in plan.arrays:
        lins = [source.quantized(n) for group in item.sources for n in group]
        if not any(lins):
            continue
        name = item.rule.target
        first = next(n for g in item.sources for n in g)
        if not all(lins) or len(item.sources[0]) != 1 or len({
                (lin.qtype, lin.group, lin.rows, lin.zeros, lin.scale_dtype)
                for lin in lins}) != 1:
            raise ConvertError(f"{source.file_of[first]}: {name} is read from {first} and "
                               "tensors quantized differently (or not at all); jaxaccel "
                               "holds a parameter in one scheme")
        head = name in dict(family.quantized_head)
        k_axes = quantization.weight_axes(family, name, head)
        if k_axes is None:
            raise ConvertError(f"{source.file_of[first]}: {first} is stored quantized, but "
                               f"jaxaccel runs {name} in full precision only")
        entry = arrays.pop(name)
        spec = _held_spec(entry.shape, k_axes, item.rule.per_layer, lins[0], first, source)
        if any(lin.permuted for lin in lins):
            spec = _permuted(spec, k_axes, item.rule.per_layer, head, first, source)
            # Refuses a layout it cannot hold before any weight is read (every layer has
            # the same layout: its first permuted one is checked).
            held_row_order(source.format, source.files, next(lin for lin in lins
                                                             if lin.permuted),
                           item.rule.transform, len(k_axes))
            lead = 1 if item.rule.per_layer else 0
            arrays[f"{name}.{PERM}"] = dataclasses.replace(
                entry, shape=spec.perm_shape(entry.shape), dtype="int32",
                axes=perm_axes(tuple(entry.axes), lead))
        _check_groups(item.rule.transform, lins[0], spec, item.rule.per_layer, first, source)
        held[name] = Held(spec, item.rule.per_layer, tuple(lins))
        weights[name] = spec.to_json()
        values, scales = quantization.quantized_names(name)
        arrays[values] = dataclasses.replace(entry, dtype=spec.stored_dtype)
        arrays[scales] = dataclasses.replace(entry, shape=spec.scale_shape(entry.shape),
                                             dtype=spec.scale_dtype)
        if lins[0].zeros:
            arrays[quantization.zeros_name(name)] = dataclasses.replace(
                entry, shape=spec.scale_shape(entry.shape), dtype=spec.stored_dtype)
    lin = next(iter(held.values())).linears[0] if held else None
    info = {"scheme": lin.qtype if lin else None, "format": source.format.label,
            "head": any(n in dict(family.quantized_head) for n in held),
            **({"group_size": lin.group} if lin and lin.group != lin.in_ else {}),
            **({"block": [lin.rows, lin.group]} if lin and 1 < lin.rows < lin.out else {}),
            **({"zero_points": True} if lin and lin.zeros else {}),
            **({"row_order": "g_idx"} if any(h.spec.perm_axes for h in held.values()) else {}),
            **({"notes": list(source.format.notes)} if source.format.notes else {}),
            "weights": dict(sorted(weights.items()))}
    return arrays, info, held


def _held_spec(shape, k_axes, stacked: bool, lin: Linear, first: str, source):
    """The QuantSpec of the held parameter: one scale per output channel, or tiles over the
    contraction axes that hold `lin.group` consecutive elements of the flattened k."""
    offset = 1 if stacked else 0
    k = [a + offset for a in k_axes]
    n = [a for a in range(offset, len(shape)) if a not in k]
    tiles = [1] * len(shape)
    for axes, size, what in ((k, lin.group, "input columns"), (n, lin.rows, "output rows")):
        axis_tiles = quantization.group_tiles([shape[a] for a in axes], size)
        if axis_tiles is None:
            raise ConvertError(f"{source.file_of[first]}: {first}'s scale blocks of {size} "
                               f"{what} do not tile the held weight {tuple(shape)}")
        for a, t in zip(axes, axis_tiles):
            tiles[a] = t
    dtype = quantization.QTYPES[lin.qtype]
    return quantization.QuantSpec(dtype, tuple(tiles), lin.scale_dtype, lin.zeros)


def _permuted(spec, k_axes, stacked: bool, head: bool, first: str, source):
    """`spec` holding its rows reordered (NAME.perm over the k axes)."""
    offset = 1 if stacked else 0
    k = [a + offset for a in k_axes]
    if head or k != list(range(offset, offset + len(k))):
        raise ConvertError(f"{source.file_of[first]}: {first} has reordered groups (g_idx), "
                           "which jaxaccel holds for the layers' matmul weights only")
    return dataclasses.replace(spec, perm_axes=tuple(k))


def _check_groups(transform, lin: Linear, spec, stacked: bool, first: str, source) -> None:
    """Every held tile covers exactly one source group (else the scales cannot be kept as
    stored): checked on the group numbers sent through the weight rule's transform."""
    ids = np.arange(lin.row_groups * lin.groups, dtype=np.int64).reshape(lin.row_groups,
                                                                          lin.groups)
    full = transform(lin.expand(ids))
    tiles = spec.tiles[1:] if stacked else spec.tiles
    if np.array_equal(full, expand(take_tiles(full, tiles), tiles)):
        return
    raise ConvertError(f"{source.file_of[first]}: {first}'s scale groups do not fall on whole "
                       f"tiles {tiles} of the held weight (the family's layout reorders its "
                       "input columns)")


def take_tiles(full: np.ndarray, tiles) -> np.ndarray:
    """One entry per tile (its first) of an array constant on each tile."""
    return full[tuple(slice(None, None, t) for t in tiles)]


def expand(per_tile: np.ndarray, tiles) -> np.ndarray:
    for axis, t in enumerate(tiles):
        per_tile = np.repeat(per_tile, t, axis=axis)
    return per_tile


class PrequantizedReader:
    """A manifest `reader` for a pre-quantized directory: NAME.values / NAME.scales /
    NAME.zeros slices unpacked from the source's quantized tensors; every other array read
    by `base` (the directory's `HfSliceReader`)."""

    def __init__(self, base, fmt, plan: dict, held: dict[str, Held]):
        self.base, self.format, self.plan, self.held = base, fmt, plan, held
        self.parts, self.orders = {}, {}
        for name, h in held.items():
            for part in ("values", "scales", "zeros", PERM):
                self.parts[f"{name}.{part}"] = (name, part)

    def __getattr__(self, attr):  # network_bytes, cache_bytes, finish, ...
        return getattr(self.base, attr)

    def read_into(self, name: str, index: tuple[slice, ...], dest: np.ndarray) -> int:
        """Fill `dest` with the slice `index` of NAME (see `HfSliceReader.read_into`);
        returns the source bytes touched."""
        if name not in self.parts:
            return self.base.read_into(name, index, dest)
        weight, part = self.parts[name]
        held, transform = self.held[weight], self.plan[weight].rule.transform
        if not held.stacked:
            return self._one(held.linears[0], part, transform, held.spec, index, dest)
        spec = dataclasses.replace(held.spec, tiles=held.spec.tiles[1:],
                                   perm_axes=tuple(a - 1 for a in held.spec.perm_axes))
        touched = 0
        for j, layer in enumerate(range(index[0].start, index[0].stop)):
            touched += self._one(held.linears[layer], part, transform, spec, index[1:], dest[j])
        return touched

    def _one(self, lin: Linear, part: str, transform, spec, index, dest) -> int:
        """One layer's slice `index` of `part` (`spec`: the layer's own, unstacked)."""
        files = self.base.files
        if part == "values":
            dest[...] = transform(held_values(self.format, files, lin))[index]
        elif part == PERM:  # one row order per layer, kept: every device slice reads it
            if lin.prefix not in self.orders:
                self.orders[lin.prefix] = held_row_order(self.format, files, lin, transform,
                                                         len(spec.perm_axes))
            dest[...] = self.orders[lin.prefix][index]
        else:
            per_group = (self.format.scales(files, lin) if part == "scales"
                         else self.format.zeros(files, lin))
            full = transform(lin.expand(per_group))
            dest[...] = take_tiles(full, spec.tiles)[index]
        return dest.nbytes


def held_bytes(source: QuantizedSource) -> int:
    """The stored bytes of every quantized linear's tensors (what the devices hold)."""
    return sum(source.files.tensors[n].stop - source.files.tensors[n].start
               for n in source.parts)


def unpack_int32(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned `bits`-bit fields of int32 words along the last axis, element i at bit
    i * bits of the row's little-endian bit stream (32 / bits per word, lowest first):
    uint8 [..., count]."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    fields = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return fields.reshape(*words.shape[:-1], words.shape[-1] * per)[..., :count].astype(np.uint8)

