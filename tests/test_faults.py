"""Fault matrix: every way a checkpoint can be damaged or half-written fails with one clear
line, a non-zero exit, and nothing half-written; never with wrong numbers.

Each row damages a private copy of the session's MiniLM checkpoint, then runs `verify` (which
checks everything) and `embed --out` (which restores and must refuse before writing output).
"""

import json
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest
import tensorstore as ts
from cli_runner import one_error_line, run_cli, run_subprocess

FAILURE = 1


@pytest.fixture
def ckpt(minilm_ckpt, tmp_path) -> pathlib.Path:
    dest = tmp_path / "ckpt"
    shutil.copytree(minilm_ckpt, dest)
    return dest


@pytest.fixture
def cli(capsys, monkeypatch):
    return lambda *args: run_cli(capsys, monkeypatch, *args)


def largest_data_file(ckpt: pathlib.Path) -> pathlib.Path:
    return max((ckpt / "params" / "d").iterdir(), key=lambda p: p.stat().st_size)


def delete_keys(ckpt: pathlib.Path, start: str, stop: str) -> None:
    from jaxaccel.checkpoint import layout

    store = ts.KvStore.open(layout.kvstore_spec(str(ckpt / "params"))).result()
    store.delete_range(ts.KvStore.KeyRange(start, stop)).result()


def edit_manifest(ckpt: pathlib.Path, edit) -> None:
    path = ckpt / "jaxaccel.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def assert_refused(cli, ckpt: pathlib.Path, tmp_path, *needles, verify: bool = True,
                   embed_flags=()) -> None:
    """`verify` and `embed --out` both fail with one line naming `needles`; no output file."""
    commands = [("verify", ckpt, "--quiet")] if verify else []
    out = tmp_path / "vectors.npy"
    commands.append(("embed", ckpt, "--text", "hello", "--out", out, "--quiet", *embed_flags))
    for args in commands:
        code, stdout, err = cli(*args)
        assert code == FAILURE, (args, err)
        line = one_error_line(err)
        for needle in needles:
            assert needle in line, (args[0], needle, line)
        assert stdout == ""
    assert not out.exists()
    assert not list(tmp_path.glob(".vectors.npy*"))


def test_intact_checkpoint_verifies(cli, minilm_ckpt):
    code, stdout, err = cli("verify", minilm_ckpt, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["ok"] and report["arrays"] == 21 and report["chunks"] > 21
    assert report["bytes"] == json.loads((minilm_ckpt / "jaxaccel.json").read_text())["total_bytes"]


def test_truncated_chunk_file(cli, ckpt, tmp_path):
    data = largest_data_file(ckpt)
    with open(data, "r+b") as handle:
        handle.truncate(data.stat().st_size // 3)
    assert_refused(cli, ckpt, tmp_path, "embeddings.token_vd", "chunk (", "truncated")


def test_flipped_bytes_in_a_chunk(cli, ckpt, tmp_path):
    data = largest_data_file(ckpt)
    middle = data.stat().st_size // 2
    with open(data, "r+b") as handle:
        handle.seek(middle)
        original = handle.read(4)
        handle.seek(middle)
        handle.write(bytes(b ^ 0xFF for b in original))
    # `--verify-checksums` (opt-in once, the default now) is still accepted.
    assert_refused(cli, ckpt, tmp_path, "embeddings.token_vd", "chunk (", "corrupted",
                   embed_flags=["--verify-checksums"])


def chunk_ranges(ckpt: pathlib.Path, data: pathlib.Path) -> list[tuple[int, int, str]]:
    """(start, stop, array name) of every chunk value stored in the data file `data`."""
    from jaxaccel.checkpoint import direct

    index = direct.ocdbt_index(ckpt / "params")
    return [(ref.offset, ref.offset + ref.length, key.decode().split("/")[0])
            for key, ref in index.items()
            if ref.inline is None and pathlib.Path(ref.file) == data]


def flip_three_runs(ckpt: pathlib.Path) -> set[str]:
    """The issue's bar: flip 3 x 64 bytes in the largest stored file (at 1/4, 1/2 and 3/4 of
    it). Returns the arrays whose chunk values were hit, from the OCDBT index read before."""
    data = largest_data_file(ckpt)
    ranges = chunk_ranges(ckpt, data)
    size = data.stat().st_size
    hit = set()
    with open(data, "r+b") as handle:
        for at in (size // 4, size // 2, 3 * size // 4):
            handle.seek(at)
            original = handle.read(64)
            handle.seek(at)
            handle.write(bytes(b ^ 0x5A for b in original))
            hit |= {name for start, stop, name in ranges if start <= at and at + 64 <= stop}
    return hit


def test_flipped_bytes_fail_embed_by_default(cli, ckpt, tmp_path):
    """No flag: every chunk's crc32c is checked on restore, so embed exits 1 naming an array,
    and never prints embeddings of damaged weights."""
    hit = flip_three_runs(ckpt)
    assert hit, "no flip landed inside chunk values: the test would not test the check"
    out = tmp_path / "vectors.npy"
    code, stdout, err = cli("embed", ckpt, "--text", "hello", "--out", out, "--quiet")
    assert code == FAILURE, err
    line = one_error_line(err)
    assert any(f"array {name!r}" in line for name in hit), (hit, line)
    assert "crc32c mismatch" in line
    assert stdout == "" and not out.exists()


def test_no_verify_skips_the_check(cli, ckpt, minilm_ckpt, tmp_path):
    """`--no-verify` / `verify=False` restore damaged chunk bytes without noticing (the
    choice when storage is trusted): the load succeeds with values unlike the intact ones;
    `verify` left at its default refuses the same checkpoint."""
    import jax
    import numpy as np

    import jaxaccel

    hit = flip_three_runs(ckpt)
    assert hit
    with pytest.raises(jaxaccel.IntegrityError, match="crc32c mismatch"):
        jaxaccel.load(ckpt, progress=False)
    damaged = jaxaccel.load(ckpt, verify=False, progress=False).loaded.state
    intact = jaxaccel.load(minilm_ckpt, progress=False).loaded.state
    differ = [not np.array_equal(a, b) for a, b in
              zip(jax.tree.leaves(intact), jax.tree.leaves(damaged))]
    assert sum(differ) >= 1
    code, _, err = cli("embed", ckpt, "--text", "hello", "--quiet", "--no-verify")
    assert code == 0, err


def test_deleted_array(cli, ckpt, tmp_path):
    delete_keys(ckpt, "blocks.bo_d/", "blocks.bo_d0")  # zarr.json and every chunk
    assert_refused(cli, ckpt, tmp_path, "'blocks.bo_d'", "missing")


def test_deleted_chunk_is_not_read_as_zeros(cli, ckpt, tmp_path):
    # zarr returns the fill value for an absent chunk: restore must refuse, not embed zeros.
    delete_keys(ckpt, "blocks.wi_df/c/2/0/1", "blocks.wi_df/c/2/0/1\x00")
    assert_refused(cli, ckpt, tmp_path, "'blocks.wi_df'", "chunk(s) missing", "(2, 0, 1)")


def test_deleted_params_directory(cli, ckpt, tmp_path):
    shutil.rmtree(ckpt / "params")
    assert_refused(cli, ckpt, tmp_path, "params")


@pytest.mark.parametrize("damage, needles", [
    (lambda p: p.unlink(), ["jaxaccel.json", "missing", "interrupted"]),
    (lambda p: p.write_text("{not json"), ["jaxaccel.json", "not valid JSON"]),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), ["jaxaccel.json", "not valid JSON"]),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": 99})),
     ["format_version 99 is not supported"]),
    (lambda p: p.write_text("[1, 2]"), ["expected a JSON object"]),
], ids=["missing", "not-json", "not-utf8", "wrong-version", "not-object"])
def test_bad_manifest(cli, ckpt, tmp_path, damage, needles):
    damage(ckpt / "jaxaccel.json")
    assert_refused(cli, ckpt, tmp_path, *needles)
    code, _, err = cli("inspect", ckpt)
    assert code == FAILURE and needles[0] in one_error_line(err)


def test_unknown_family(cli, ckpt, tmp_path):
    edit_manifest(ckpt, lambda raw: raw.update(family="mamba"))
    assert_refused(cli, ckpt, tmp_path, "unknown model family 'mamba'", "bert", verify=False)
    code, _, err = cli("plan", ckpt)
    assert code == FAILURE and "'mamba'" in one_error_line(err)


def test_manifest_shape_disagrees_with_stored_array(cli, ckpt, tmp_path):
    # Same chunk count, so the manifest itself stays consistent; the stored array disagrees.
    def shrink(raw):
        entry = raw["arrays"]["blocks.wi_df"]
        entry["shape"] = [6, 384, 1535]
        entry["nbytes"] = 6 * 384 * 1535 * 4
    edit_manifest(ckpt, shrink)
    code, _, err = cli("verify", ckpt, "--quiet")
    assert code == FAILURE
    assert "'blocks.wi_df': stored as (6, 384, 1536) float32, manifest says (6, 384, 1535)" \
        in one_error_line(err)
    assert_refused(cli, ckpt, tmp_path, "blocks.wi_df", verify=False)


def test_manifest_checksum_mismatch_names_the_chunk(cli, ckpt):
    # A chunk whose bytes are valid but are not what was written (e.g. swapped in from another
    # checkpoint): only the recorded checksums can tell.
    def swap(raw):
        sums = raw["arrays"]["blocks.wi_df"]["chunk_checksums"]
        sums[3], sums[4] = sums[4], sums[3]
    edit_manifest(ckpt, swap)
    code, _, err = cli("verify", ckpt, "--quiet")
    assert code == FAILURE
    line = one_error_line(err)
    assert "2 integrity problem(s)" in line
    assert "'blocks.wi_df', chunk (0, 0, 3): checksum crc32:" in line


KILL_AFTER_ARRAYS = """
import os, signal, sys
from jaxaccel.conversion.bundled import bundled_minilm_path
from jaxaccel.conversion.hf import convert
seen = []
def on_array(name, nbytes):
    seen.append(name)
    if len(seen) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
convert(bundled_minilm_path(), sys.argv[1], on_array=on_array)
"""


def test_convert_killed_midway_leaves_no_destination(cli, tmp_path):
    dest = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_ARRAYS, str(dest)],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert list(tmp_path.glob(".out.partial-*")), "the kill should have hit a staging directory"
    code, _, err = cli("embed", dest, "--text", "hi")
    assert code == FAILURE and "not a directory" in one_error_line(err)
    # A new convert to the same DEST is not blocked by the dead one's leftovers.
    code, _, err = cli("convert", "minilm", dest, "--quiet")
    assert code == 0, err
    assert cli("verify", dest, "--quiet")[0] == 0


DISK_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(2), not a signal death
resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # no file may exceed 4 MiB
sys.argv = ["jaxaccel", "convert", "minilm", sys.argv[1], "--quiet"]
from jaxaccel.cli.main import main
main()
"""


def test_disk_full_during_convert(tmp_path):
    dest = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(dest)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == FAILURE, proc.stderr
    line = one_error_line(proc.stderr)
    assert str(dest) in line and "writing array" in line and "nothing was published" in line
    assert "too large" in line.lower() or "space" in line.lower(), line
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.*")), "the staging directory must be cleaned up"


def test_two_converts_racing_to_one_destination(tmp_path):
    dest = tmp_path / "out"
    args = [sys.executable, "-m", "jaxaccel.cli.main", "convert", "minilm", str(dest), "--quiet"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, FAILURE], results
    loser = next(err for code, err in results if code)
    line = one_error_line(loser)
    assert str(dest) in line and ("already exists" in line or "another writer" in line)
    code, _, err = run_subprocess("verify", dest, "--quiet")
    assert code == 0, err
    assert not list(tmp_path.glob(".out.*"))
