"""On-disk layout of one parameter array: its tensorstore spec and chunk shape.

Arrays live in one OCDBT database under `params/`, each as a zarr3 array keyed by its dotted
name, exactly where orbax's PyTreeCheckpointHandler puts them, so plain orbax restores them.

We choose chunk shapes ourselves because orbax cannot: its `shard_axes` option shrinks every
listed axis to width 1 (an MLP matrix would become one chunk per column). Our chunks follow the
axes that rule tables shard: one chunk per layer (a pipeline stage reads only its layers), and
sharded dims (heads, mlp, vocab, ...) cut into 8 aligned pieces, so a device on `model=2/4/8`
reads exactly the chunks it holds and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxaccel.parallel import sharding as ax
from jaxaccel.checkpoint import storage

# Logical axes some rule table maps to a mesh axis: these are where chunks get cut.
SPLIT_AXES = (ax.LAYERS, ax.HEADS, ax.KV_HEADS, ax.MLP, ax.VOCAB, ax.CHANNELS)
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


def chunk_shape(shape: Sequence[int], axes: Sequence[str | None], itemsize: int,
                max_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape for an array; `max_chunk_bytes=None` means one chunk per array."""
    chunk = [max(1, d) for d in shape]
    if max_chunk_bytes is None or math.prod(chunk) * itemsize < MIN_SPLIT_BYTES:
        return tuple(chunk)
    for i, name in enumerate(axes):
        if name == ax.LAYERS:
            chunk[i] = 1
        elif name in SPLIT_AXES:
            pieces = next((p for p in SPLIT_PIECES if chunk[i] % p == 0), 1)
            chunk[i] //= pieces
    # Still too large (e.g. an embedding with a prime vocab): cut along the first cuttable dim.
    for i in range(len(chunk)):
        while math.prod(chunk) * itemsize > max_chunk_bytes and chunk[i] > 1:
            chunk[i] = math.ceil(chunk[i] / 2)
    return tuple(chunk)


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
