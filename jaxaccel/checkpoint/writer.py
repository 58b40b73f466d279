"""Write a jaxaccel checkpoint atomically, one array at a time.

Everything is built in a hidden sibling directory and renamed onto DEST only when complete, so
an interrupted or failed write never leaves a DEST that loads. Arrays stream through one by one:
host memory holds a single array (plus its cast copy), whatever the model size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorstore as ts

from jaxaccel.checkpoint import integrity, layout, storage
from jaxaccel.checkpoint.manifest import (
    MANIFEST_NAME,
    PARAMS_DIR,
    ArrayEntry,
    CheckpointError,
    Manifest,
)
from jaxaccel.errors import UsageError

ORBAX_TREE_METADATA = "_METADATA"
ORBAX_COMMIT_MARKER = "commit_success.txt"


def checksum(array: np.ndarray) -> str:
    """crc32 of the array's little-endian bytes, as stored."""
    return integrity.crc32(array)


@contextlib.contextmanager
def staging_directory(dest: pathlib.Path, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of `dest`; on success rename it onto `dest`, else delete it."""
    dest = pathlib.Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise CheckpointError(f"{dest}: already exists; choose another destination or pass "
                              "--overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _publish(staging, dest, overwrite)
    finally:
        _remove(staging)


def _remove(path: pathlib.Path, attempts: int = 100) -> None:
    """Delete a staging directory for good. After a failed write (disk full), tensorstore's
    background threads may still land a file in it while rmtree runs, which left the
    directory behind under load; retry until it is gone (a few milliseconds at most)."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.02)


def _publish(staging: pathlib.Path, dest: pathlib.Path, overwrite: bool) -> None:
    old = None
    if overwrite and dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, old)
    try:
        # rename(2) onto a non-empty directory fails: of two racing writers only one wins.
        os.rename(staging, dest)
    except OSError as err:
        if old is not None:
            os.rename(old, dest)
        raise CheckpointError(f"{dest}: could not be created ({err.strerror}); another writer "
                              "may have created it first") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_arrays(params_dir: pathlib.Path, arrays: Iterable[tuple[str, np.ndarray, tuple]],
                 chunk_bytes: int | None, codec: str,
                 on_array: Callable[[str, int], None] = lambda name, nbytes: None,
                 chunk_rule: layout.ChunkRule = layout.ChunkRule(),
                 ) -> dict[str, ArrayEntry]:
    """Write (name, array, logical axes) triples into an OCDBT/zarr3 store (a local directory
    or a remote prefix), chunked along the axes `chunk_rule` names; return entries."""
    if isinstance(params_dir, pathlib.Path):
        params_dir.mkdir(parents=True, exist_ok=True)
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    entries = {}
    for name, array, axes in arrays:
        dtype = str(array.dtype)
        chunk = layout.chunk_shape(array.shape, axes, array.dtype.itemsize, chunk_bytes,
                                   chunk_rule)
        spec = layout.create_spec(str(params_dir), name, array.shape, dtype, chunk, codec)
        # Store all-zero chunks too: then a missing key can only mean damage (see integrity).
        spec["store_data_equal_to_fill_value"] = True
        try:
            ts.open(spec, context=context).result().write(array).result()
        except ValueError as err:  # tensorstore's errors: disk full, file too large, EIO...
            raise CheckpointError(f"{params_dir.parent}: writing array {name!r} failed "
                                  f"({_os_reason(err)})") from None
        entries[name] = ArrayEntry(tuple(array.shape), dtype, tuple(axes), checksum(array),
                                   tuple(chunk), integrity.chunk_checksums(array, chunk))
        on_array(name, array.nbytes)
    _write_orbax_tree_metadata(params_dir, entries)
    return entries


def _write_orbax_tree_metadata(params_dir, entries) -> None:
    """The `_METADATA` file orbax's PyTreeCheckpointHandler reads to rebuild the tree."""
    tree = {}
    for name in sorted(entries):
        keys = name.split(".")
        tree[str(tuple(keys))] = {
            "key_metadata": [{"key": key, "key_type": 2} for key in keys],
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    metadata = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": True,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    storage.write_bytes(params_dir / ORBAX_TREE_METADATA, json.dumps(metadata).encode())


def write_checkpoint(dest: pathlib.Path, manifest: Manifest,
                     arrays: Iterable[tuple[str, np.ndarray, tuple]],
                     extra_files: dict[str, pathlib.Path], *, chunk_bytes: int | None,
                     codec: str = "none", overwrite: bool = False,
                     on_array: Callable[[str, int], None] = lambda name, nbytes: None,
                     chunk_rule: layout.ChunkRule = layout.ChunkRule()) -> Manifest:
    """Write arrays (chunked as `write_arrays` does), copy `extra_files` (name -> source
    path), then the manifest; publish. A remote `dest` (storage.RemotePath) is written in
    place, the manifest last."""
    if isinstance(dest, storage.RemotePath):
        return _write_remote(dest, manifest, arrays, extra_files, chunk_bytes=chunk_bytes,
                             codec=codec, overwrite=overwrite, on_array=on_array,
                             chunk_rule=chunk_rule)
    with staging_directory(dest, overwrite) as staging:
        try:
            entries = write_arrays(staging / PARAMS_DIR, arrays, chunk_bytes, codec, on_array,
                                   chunk_rule)
        except CheckpointError as err:  # name DEST, not the hidden staging directory
            raise CheckpointError(str(err).replace(str(staging), str(dest))
                                  + "; nothing was published") from None
        manifest = dataclasses.replace(manifest, arrays=entries,
                                       tokenizer_files=tuple(extra_files))
        try:
            for name, source in extra_files.items():
                shutil.copyfile(source, staging / name)
            manifest.write(staging)
        except OSError as err:
            raise CheckpointError(f"{dest}: writing the checkpoint failed ({err.strerror}); "
                                  "nothing was published") from None
    return manifest


def _write_remote(dest: storage.RemotePath, manifest: Manifest, arrays, extra_files: dict, *,
                  chunk_bytes, codec: str, overwrite: bool, on_array,
                  chunk_rule: layout.ChunkRule) -> Manifest:
    """Write a checkpoint to a bucket. Object stores have no rename, so atomicity comes from
    order: the manifest, which makes a checkpoint loadable, is deleted first (on overwrite)
    and written last; a convert killed in between leaves objects that do not load."""
    if dest.scheme.startswith("http"):
        raise UsageError(f"{dest}: http(s) locations are read-only; write to gs:// or s3://")
    names = [MANIFEST_NAME, *extra_files]
    existing = storage.list_keys(dest)
    if existing and not overwrite:
        raise CheckpointError(f"{dest}: already holds {len(existing)} object(s) (a checkpoint "
                              "or an interrupted convert); choose another destination or pass "
                              "--overwrite")
    if existing:  # only what a convert writes: never other objects under the prefix
        storage.delete_keys(dest, [MANIFEST_NAME])
        storage.delete_tree(dest / PARAMS_DIR)
        storage.delete_keys(dest, names)
    entries = write_arrays(dest / PARAMS_DIR, arrays, chunk_bytes, codec, on_array, chunk_rule)
    manifest = dataclasses.replace(manifest, arrays=entries, tokenizer_files=tuple(extra_files))
    for name, source in extra_files.items():
        storage.write_bytes(dest / name, pathlib.Path(source).read_bytes())
    # orbax's completeness marker on object stores (no rename there): plain orbax then
    # restores DEST/params from gs:// as it does a local copy.
    storage.write_bytes(dest / PARAMS_DIR / ORBAX_COMMIT_MARKER, b"written by jaxaccel convert")
    manifest.write(dest)
    return manifest


def _os_reason(err: Exception) -> str:
    """'File too large [errno 27]' out of tensorstore's long status message."""
    text = str(err).splitlines()[0]
    match = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)", text)
    return f"{match.group(1)} [errno {match.group(2)}]" if match else text[:200]
