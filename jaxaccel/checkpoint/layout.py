"""On-disk layout of one parameter array: its tensorstore spec and chunk shape.

Arrays live in one OCDBT database under `params/`, each as a zarr3 array keyed by its dotted
name, exactly where orbax's PyTreeCheckpointHandler puts them, so plain orbax restores them.

We choose chunk shapes ourselves because orbax cannot: its `shard_axes` option shrinks every
listed axis to width 1 (an MLP matrix would become one chunk per column). Our chunks follow the
axes that rule tables shard, which the caller names in a `ChunkRule` (this module knows no
logical axis): one chunk per index of a per-index axis (per layer: a pipeline stage reads only
its layers), and split dims (heads, mlp, vocab, ...) cut into 8 aligned pieces, so a device on
`model=2/4/8` reads exactly the chunks it holds and nothing else.

Chunk arithmetic shared by the writer, the readers and the verifier lives here too: the grid
of chunks of a shape, their count, and how an error message names one chunk.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

from jaxaccel.checkpoint import storage

# Cut sharded dims into this many pieces (when it divides): aligned for mesh sizes 1, 2, 4, 8.
SPLIT_PIECES = (8, 4, 2)
DEFAULT_CHUNK_BYTES = 64 << 20  # cap: larger chunks are cut further along their first dim
MIN_SPLIT_BYTES = 256 << 10  # below this an array is cheap to read whole; don't cut it
CODECS = ("none", "zstd")

OCDBT_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100_000_000,
    "version_tree_arity_log2": 4,
    "compression": {"id": "zstd"},
}


@dataclasses.dataclass(frozen=True)
class ChunkRule:
    """Which logical axes (the names in an array's `axes`) chunks are cut along.

    per_index: one chunk per index (a pipeline's layer axis: a stage reads only its layers).
    split:     cut into SPLIT_PIECES aligned pieces (axes a rule table shards over devices).
    The default cuts no axis by name: only the `max_chunk_bytes` cap applies."""

    per_index: frozenset[str] = frozenset()
    split: frozenset[str] = frozenset()


def chunk_shape(shape: Sequence[int], axes: Sequence[str | None], itemsize: int,
                max_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
                rule: ChunkRule = ChunkRule()) -> tuple[int, ...]:
    """Chunk shape for an array whose dims carry the logical names `axes`, cut along the
    axes `rule` names; `max_chunk_bytes=None` means one chunk per array."""
    chunk = [max(1, d) for d in shape]
    if max_chunk_bytes is None or math.prod(chunk) * itemsize < MIN_SPLIT_BYTES:
        return tuple(chunk)
    for i, name in enumerate(axes):
        if name in rule.per_index:
            chunk[i] = 1
        elif name in rule.split:
            pieces = next((p for p in SPLIT_PIECES if chunk[i] % p == 0), 1)
            chunk[i] //= pieces
    # Still too large (e.g. an embedding with a prime vocab): cut along the first cuttable dim.
    for i in range(len(chunk)):
        while math.prod(chunk) * itemsize > max_chunk_bytes and chunk[i] > 1:
            chunk[i] = math.ceil(chunk[i] / 2)
    return tuple(chunk)


def chunk_grid(shape: Sequence[int], chunk: Sequence[int]
               ) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """(chunk index, slices) of every chunk, in C order; a 0-d array is one chunk `()`, an
    array with a zero-size dim has none."""
    counts = [_chunks_along(d, c) for d, c in zip(shape, chunk)]
    for index in itertools.product(*(range(n) for n in counts)):
        yield index, tuple(slice(i * c, min((i + 1) * c, d))
                           for i, c, d in zip(index, chunk, shape))


def chunk_count(shape: Sequence[int], chunk: Sequence[int]) -> int:
    """How many chunks `chunk_grid` yields: 0 when a dim has size 0, 1 for a 0-d array."""
    return math.prod(_chunks_along(d, c) for d, c in zip(shape, chunk))


def _chunks_along(dim: int, chunk: int) -> int:
    # A zero-size dim has no chunks, whatever its chunk width (which may be 0 there too).
    return math.ceil(dim / chunk) if dim else 0


def format_chunk(index: Sequence[int]) -> str:
    """A chunk's grid index as error messages print it: `(0, 3)`, `(2,)`, `()`."""
    return "(" + ", ".join(map(str, index)) + ("," if len(index) == 1 else "") + ")"


def kvstore_spec(params_dir) -> dict:
    """The OCDBT database at `params_dir`: a local directory or a remote prefix (gs://,
    s3://, http(s)://; see checkpoint.storage)."""
    return {"driver": "ocdbt", "base": storage.kvstore_spec(params_dir), "config": OCDBT_CONFIG}


def array_spec(params_dir: str, name: str) -> dict:
    """Spec to open an existing array for reading."""
    return {
        "driver": "zarr3",
        "kvstore": {**kvstore_spec(params_dir), "path": f"{name}/"},
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }


def create_spec(params_dir: str, name: str, shape, dtype: str, chunk, codec: str) -> dict:
    """Spec to create an array. Each chunk carries a crc32c, so every read is checked."""
    if codec not in CODECS:
        raise ValueError(f"--codec must be one of {CODECS}, got {codec!r}")
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3}})
    codecs.append({"name": "crc32c"})
    return {
        **array_spec(params_dir, name),
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "codecs": codecs,
            "fill_value": 0,
        },
        "create": True,
    }
