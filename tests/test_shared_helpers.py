"""The helpers that used to be written several times (issue #23), each now in one place:
chunk arithmetic (`checkpoint.layout`), `storage.is_remote`, `utils.units.round_up`,
`utils.files.write_atomically`, the `tp`/`dp_tp` rule table; the chunking rule the caller
hands the writer; and the host transform restore takes instead of knowing quantization."""

import itertools
import math
import os
import pathlib

import jax
import numpy as np
import pytest

from jaxaccel.checkpoint import layout, restore_mode, storage
from jaxaccel.parallel import sharding as ax
from jaxaccel.utils.files import write_atomically
from jaxaccel.utils.units import round_up


@pytest.mark.parametrize("shape, chunk", [((0,), (1,)), ((0, 5), (0, 2)), ((3, 0, 4), (2, 1, 4)),
                                          ((5, 7), (2, 3)), ((), ()), ((4,), (4,))])
def test_chunk_count_and_grid_agree_with_an_enumeration(shape, chunk):
    """Zero-size dims have no chunks (even with a chunk width of 0 there), a 0-d array one."""
    starts = [range(0, d, max(c, 1)) for d, c in zip(shape, chunk)]
    expected = [tuple(s // max(c, 1) for s, c in zip(index, chunk))
                for index in itertools.product(*starts)]
    assert [index for index, _ in layout.chunk_grid(shape, chunk)] == expected
    assert layout.chunk_count(shape, chunk) == len(expected)


def test_format_chunk_writes_python_tuples():
    for index in [(), (2,), (0, 3), (1, 2, 3)]:
        assert layout.format_chunk(index) == repr(tuple(index))


def test_chunk_shape_cuts_only_the_axes_the_caller_names():
    shape, axes, itemsize = (6, 384, 1536), ("layers", "embed", "mlp"), 4
    assert layout.chunk_shape(shape, axes, itemsize) == shape  # no rule: only the byte cap
    rule = layout.ChunkRule(per_index=frozenset({"layers"}), split=frozenset({"mlp"}))
    assert layout.chunk_shape(shape, axes, itemsize, rule=rule) == (1, 384, 1536 // 8)
    odd = layout.ChunkRule(split=frozenset({"embed"}))
    assert layout.chunk_shape(shape, axes, itemsize, rule=odd) == (6, 384 // 8, 1536)


def test_the_converter_chunks_along_the_axes_rule_tables_shard():
    from jaxaccel.conversion.hf import CHUNK_RULE

    assert CHUNK_RULE.per_index == {"layers", "experts"}  # one chunk per layer and expert
    assert CHUNK_RULE.split == {"heads", "kv_heads", "mlp", "vocab", "channels"}


def test_tp_and_dp_tp_are_one_table_under_both_names():
    assert ax.RULE_TABLES["tp"] is ax.RULE_TABLES["dp_tp"]
    assert ax.resolve_rules("tp") == ax.resolve_rules("dp_tp") == {
        "batch": "data", "heads": "model", "kv_heads": "model", "mlp": "model",
        "vocab": "model", "channels": "model"}
    assert ax.axes_sharded_over("stage") == {"layers"}


@pytest.mark.parametrize("location, remote", [
    ("s3://bucket/ckpt", True), ("gs://b/x", True), ("HTTPS://host/x", True),
    (pathlib.Path("s3://bucket/ckpt"), True), (storage.RemotePath("gs://b/x"), True),
    ("/data/ckpt", False), ("relative/dir:with/colon", False), (pathlib.Path("/x"), False),
    ("file:///data/ckpt", False), ("ftp://host/x", False)])
def test_is_remote(location, remote):
    assert storage.is_remote(location) is remote
    mode = restore_mode.resolve("auto", location, replicated_across_processes=True)
    assert mode == ("broadcast" if remote else "read-all")


def test_round_up():
    for n, m in itertools.product(range(0, 20), range(1, 7)):
        assert round_up(n, m) == math.ceil(n / m) * m


def test_write_atomically_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    write_atomically(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    write_atomically(path, lambda handle: handle.write(b"from a writer"), durable=False)
    assert path.read_bytes() == b"from a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    # Files get the mode the umask gives (a plain open), as before the fold.
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail, temp_prefix=".tmp-")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.cpu_only  # 4 simulated CPU devices
def test_restore_applies_a_host_transform_per_device_part(tmp_path):
    """Restore knows no quantization: a caller's transform (here: the block doubled, and the
    sum of each tile of 3 columns) runs on each block read, and every device receives its
    part of each output, equal to numpy's transform of the whole array."""
    from jaxaccel.checkpoint.manifest import Manifest
    from jaxaccel.checkpoint.restore import HostTransform, Output, Target, restore_arrays
    from jaxaccel.checkpoint.writer import write_checkpoint

    x = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    manifest = write_checkpoint(tmp_path / "ckpt", Manifest("test", {}, "float32", {}),
                                [("x", x, (None, None))], {}, chunk_bytes=None)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    spec = jax.sharding.PartitionSpec("data", "model")
    sharding = jax.sharding.NamedSharding(mesh, spec)
    tiles = (1, 3)

    def apply(block):
        return block * 2, block.reshape(block.shape[0], -1, 3).sum(-1)

    transform = HostTransform(apply, tiles, (
        Output("x.double", x.shape, np.dtype(np.float32), sharding, (1, 1)),
        Output("x.sums", (8, 4), np.dtype(np.float32), sharding, tiles)))
    target = Target(x.shape, np.dtype(np.float32), sharding, transform=transform)
    arrays = restore_arrays(tmp_path / "ckpt", manifest, {"x": target})
    assert set(arrays) == {"x.double", "x.sums"}
    np.testing.assert_array_equal(np.asarray(arrays["x.double"]), x * 2)
    np.testing.assert_array_equal(np.asarray(arrays["x.sums"]),
                                  np.add.reduceat(x, [0, 3, 6, 9], axis=1))
    assert arrays["x.sums"].sharding.is_equivalent_to(sharding, 2)
