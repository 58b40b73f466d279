"""Streaming restore: direct reads equal tensorstore's, only local slices are read, the
host-memory budget holds, and damage or mismatch fails loudly."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxaccel.bench import synthetic
from jaxaccel.checkpoint import direct
from jaxaccel.checkpoint.integrity import IntegrityError
from jaxaccel.checkpoint.manifest import PARAMS_DIR, CheckpointError, Manifest
from jaxaccel.checkpoint.restore import RestoreStats, Target, restore_arrays
from jaxaccel.startup.loader import plan_model
from jaxaccel.parallel.sharding import Layout

# Odd sizes (vocab 1001, 3 layers) so partial edge chunks and unaligned shards show up.
SMALL = dict(vocab=1001, width=64, layers=3, heads=4, mlp=256, max_positions=32)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> pathlib.Path:
    """Tiny, but chunked like a large checkpoint: every array cut into <= 16 KiB chunks."""
    from jaxaccel.checkpoint import layout

    dest = tmp_path_factory.mktemp("synthetic") / "small"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "MIN_SPLIT_BYTES", 0)
        synthetic.write(dest, synthetic.bert_config(**SMALL), chunk_bytes=16 << 10)
    return dest


def _restore(ckpt, mesh, rules="dp_tp", dtype=None, **kwargs):
    plan = plan_model(ckpt, Layout.create(mesh, rules), dtype)
    stats = RestoreStats()
    arrays = restore_arrays(ckpt, plan.manifest, plan.targets, stats=stats, **kwargs)
    return plan, arrays, stats


@pytest.mark.parametrize("mesh,dtype,verify", [
    ("data=2,model=4", None, False), ("data=2,model=4", None, True),
    ("model=8", "bfloat16", False), ("data=8", None, True)])
@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_direct_equals_tensorstore_with_requested_shardings(small_ckpt, mesh, dtype, verify):
    """verify=False reads straight into the shards (scatter preadv); True goes through a
    scratch buffer to check each chunk's crc32c; bfloat16 casts while reading."""
    plan, fast, stats = _restore(small_ckpt, mesh, dtype=dtype, engine="direct",
                                 verify_chunks=verify)
    _, slow, _ = _restore(small_ckpt, mesh, dtype=dtype, engine="tensorstore")
    assert set(stats.engines.values()) == {"direct"}
    for name, target in plan.targets.items():
        assert fast[name].sharding.is_equivalent_to(target.sharding, len(target.shape)), name
        assert fast[name].dtype == target.dtype
        np.testing.assert_array_equal(np.asarray(fast[name]), np.asarray(slow[name]), name)


@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_direct_reads_partial_chunks_and_cast(small_ckpt):
    """A sharding that cuts chunks (vocab 1001 over model=2 with 16 KiB chunks) still reads
    exactly the right values, cast to bfloat16 while reading."""
    manifest = Manifest.load(small_ckpt)
    entry = manifest.arrays["embeddings.token_vd"]
    mesh = Layout.create("model=2").mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
    target = Target(entry.shape, np.dtype(jax.numpy.bfloat16), sharding)
    fast = restore_arrays(small_ckpt, _only(manifest, "embeddings.token_vd"),
                          {"embeddings.token_vd": target}, engine="direct")
    slow = restore_arrays(small_ckpt, _only(manifest, "embeddings.token_vd"),
                          {"embeddings.token_vd": target}, engine="tensorstore")
    np.testing.assert_array_equal(np.asarray(fast["embeddings.token_vd"]),
                                  np.asarray(slow["embeddings.token_vd"]))


def _only(manifest: Manifest, name: str) -> Manifest:
    import dataclasses

    return dataclasses.replace(manifest, arrays={name: manifest.arrays[name]})


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_restored_arrays_do_not_alias_the_files(small_ckpt, tmp_path, verify):
    """Restored arrays own copies of the chunk bytes: overwriting every data file in
    place after the restore changes no restored value (compared with a numpy copy taken
    before), and the restore equals tensorstore's read of the same checkpoint."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, ckpt)
    _, arrays, stats = _restore(ckpt, "data=2,model=4", engine="direct", verify_chunks=verify)
    assert set(stats.engines.values()) == {"direct"}
    before = {name: np.array(array) for name, array in arrays.items()}
    for data in (ckpt / PARAMS_DIR / "d").iterdir():
        with open(data, "r+b") as handle:  # in place: same inode, every byte inverted
            raw = handle.read()
            handle.seek(0)
            handle.write(bytes(b ^ 0xFF for b in raw))
    _, intact, _ = _restore(small_ckpt, "data=2,model=4", engine="tensorstore")
    for name, array in arrays.items():
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), before[name][shard.index])
        np.testing.assert_array_equal(before[name], np.asarray(intact[name]), name)


@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_model4_reads_each_byte_once(small_ckpt):
    """With model=4, the bytes each device's reads request sum to the checkpoint size, and no
    array is read whole by every device (replicated arrays are read once and shared)."""
    plan, _, stats = _restore(small_ckpt, "model=4")
    total = plan.manifest.total_bytes
    assert abs(sum(stats.bytes_per_device.values()) - total) <= 0.01 * total
    devices = {d.id for d in plan.layout.mesh.devices.flat}
    assert set(stats.bytes_per_device) <= devices
    for name, entry in plan.manifest.arrays.items():
        whole = {dev for (array, dev), n in stats.bytes_per_array_device.items()
                 if array == name and n == entry.nbytes}
        assert whole != devices, f"{name} read whole by every device"
    sharded = [n for n, t in plan.targets.items() if "model" in str(t.sharding.spec)]
    assert sharded, "the model=4 layout shards nothing"
    for name in sharded:  # each of the 4 devices reads its own quarter
        per_device = [stats.bytes_per_array_device[name, d] for d in devices]
        assert per_device == [plan.manifest.arrays[name].nbytes // 4] * 4, name


def test_ocdbt_index_matches_key_listing(small_ckpt):
    import tensorstore as ts

    from jaxaccel.checkpoint import layout

    index = direct.ocdbt_index(small_ckpt / PARAMS_DIR)
    store = ts.KvStore.open(layout.kvstore_spec(str(small_ckpt / PARAMS_DIR))).result()
    assert set(index) == set(store.list().result())
    sizes = [ref.length for ref in index.values() if ref.inline is None]
    assert sizes and all(size > 0 for size in sizes)


@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_corrupt_chunk_fails_naming_array_and_chunk(small_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, ckpt)
    index = direct.ocdbt_index(ckpt / PARAMS_DIR)
    ref = index[b"blocks.wi_df/c/1/0/0"]
    with open(ref.file, "r+b") as handle:  # flip one byte inside the chunk's values
        handle.seek(ref.offset + 100)
        byte = handle.read(1)
        handle.seek(ref.offset + 100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError, match=r"blocks\.wi_df.*chunk \(1, 0, 0\).*crc32c"):
        _restore(ckpt, "data=2,model=4", engine="direct")  # checked by default


def _flip_inside(ckpt, key: bytes) -> None:
    """Flip 8 bytes in the middle of chunk `key`'s stored value (its data, not its crc)."""
    ref = direct.ocdbt_index(ckpt / PARAMS_DIR)[key]
    at = ref.offset + ref.length // 2
    with open(ref.file, "r+b") as handle:
        handle.seek(at)
        original = handle.read(8)
        handle.seek(at)
        handle.write(bytes(b ^ 0xFF for b in original))


@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_no_verify_reads_damaged_bytes_unchecked(small_ckpt, tmp_path):
    """verify_chunks=False (`--no-verify`) skips the crc32c: the damaged element comes back
    wrong, the rest equal tensorstore's read of the intact checkpoint."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_ckpt, ckpt)
    _flip_inside(ckpt, b"blocks.wi_df/c/1/0/0")
    _, damaged, _ = _restore(ckpt, "data=2,model=4", engine="direct", verify_chunks=False)
    _, intact, _ = _restore(small_ckpt, "data=2,model=4", engine="tensorstore")
    differ = np.asarray(damaged["blocks.wi_df"]) != np.asarray(intact["blocks.wi_df"])
    assert 1 <= differ.sum() <= 3  # 8 flipped bytes touch 2-3 float32 values
    assert np.argwhere(differ)[0][0] == 1  # in layer 1, the chunk that was damaged


@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_zstd_checkpoint_checks_crc32c_by_default(tmp_path):
    """zstd chunks go through tensorstore, which checks each chunk's crc32c on read: a
    damaged chunk fails the default restore, naming the array and chunk."""
    from jaxaccel.checkpoint import layout

    ckpt = tmp_path / "zstd"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "MIN_SPLIT_BYTES", 0)
        synthetic.write(ckpt, synthetic.bert_config(**SMALL), chunk_bytes=16 << 10,
                        codec="zstd")
    _flip_inside(ckpt, b"blocks.wi_df/c/1/0/0")
    with pytest.raises(IntegrityError, match=r"blocks\.wi_df.*chunk \(1, 0, 0\).*crc32c") as err:
        _restore(ckpt, "data=2,model=4")
    assert "\n" not in str(err.value)


def test_mismatch_fails_before_reading(small_ckpt):
    plan = plan_model(small_ckpt, Layout.create())
    targets = dict(plan.targets)
    targets.pop("blocks.wi_df")
    targets["blocks.extra"] = targets["blocks.bi_f"]
    wq = targets["blocks.wq_dnh"]
    targets["blocks.wq_dnh"] = Target((1, *wq.shape[1:]), wq.dtype, wq.sharding)
    with pytest.raises(CheckpointError) as err:
        restore_arrays(small_ckpt, plan.manifest, targets)
    for name in ("blocks.wi_df", "blocks.extra", "blocks.wq_dnh"):
        assert name in str(err.value)


BUDGET_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from jaxaccel.checkpoint import direct, integrity, restore
    from jaxaccel.startup.loader import plan_model
    from jaxaccel.parallel.sharding import Layout

    ckpt, budget, engine = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    plan = plan_model(ckpt, Layout.create("data=2,model=4"))
    jax.block_until_ready(jax.device_put(np.ones(8, np.float32), jax.devices()[0]))

    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
    before = status("VmRSS")
    arrays = restore.restore_arrays(ckpt, plan.manifest, plan.targets, engine=engine,
                                    host_memory_budget=budget)
    peak = status("VmHWM")
    buffers = {}  # replicas may share one host buffer on CPU: count each buffer once
    for array in arrays.values():
        for shard in array.addressable_shards:
            buffers[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    print(json.dumps({"before": before, "peak": peak, "resident": sum(buffers.values())}))
""")


@pytest.mark.cpu_only  # a mesh of up to 8 simulated CPU devices
def test_host_memory_budget_holds(tmp_path_factory, engine="auto"):
    ckpt = tmp_path_factory.getbasetemp() / "budget-ckpt"
    if not ckpt.exists():  # ~100 MB: 4 layers, 512 wide
        synthetic.write(ckpt, synthetic.bert_config(vocab=8192, width=512, layers=4, heads=8))
    budget = 16 << 20
    assert Manifest.load(ckpt).total_bytes >= 4 * budget
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", BUDGET_SCRIPT, str(ckpt), str(budget), engine],
                         capture_output=True, text=True, env=env, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    overhead = m["peak"] - (m["before"] + m["resident"])
    assert overhead <= 1.1 * budget, (overhead / 2**20, m)
