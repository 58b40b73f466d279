"""Multi-host on one machine: 2 processes x 4 simulated CPU devices, jax.distributed + gloo.

Each test launches real processes (costly: ~10 s each), so each run checks several things.
"""

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxaccel.parallel import launcher

# Device checks skip these (`-m "not cpu_only"`): they need processes of 4 simulated CPU devices
# each, gloo CPU collectives.
pytestmark = pytest.mark.cpu_only

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"


def _single_process_embeddings(ckpt):
    from multihost_worker import SENTENCES

    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    return Embedder(load_model(ckpt), batch_size=8).embed_texts(SENTENCES)[0]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from decoder_reference import save_hf

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_positions=96, n_embd=46, n_layer=3, n_head=2, bos_token_id=1,
        eos_token_id=2)).eval()
    return save_hf(model, tmp_path_factory.mktemp("gpt2"))


def _single_process_tokens(directory):
    from decoder_reference import load_jax
    from flax import nnx
    from multihost_worker import PROMPTS

    from jaxaccel.runtime.generate import Generator

    model, cfg = load_jax("gpt2", directory)
    return Generator(*nnx.split(model), cfg).generate(PROMPTS, 8)


def test_two_processes_match_one_and_each_reads_half(minilm_ckpt, gpt2_dir, tmp_path):
    """Via `jaxaccel launch`: embeddings and greedy tokens equal the single-process run, and
    under a layout sharded over `model` across the processes (and `stage` within each) every
    process reads 50% +- 5% of the checkpoint's bytes."""
    command = [sys.executable, "-m", "jaxaccel.cli.main", "launch", "--processes", "2",
               "--devices-each", "4", "--timeout", "60", "--log-dir", str(tmp_path), "--",
               sys.executable, str(WORKER), str(minilm_ckpt), "model=2,stage=4", "dp_tp_pp",
               "gpt2", str(gpt2_dir)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)  # only process 0 printed, and nothing but the JSON
    shares = {int(p): b / result["total_bytes"] for p, b in result["bytes_read"].items()}
    print("per-process restore bytes:", result["bytes_read"], "of", result["total_bytes"])
    assert sorted(shares) == [0, 1]
    assert all(0.45 <= share <= 0.55 for share in shares.values()), shares
    assert "process 1:" in run.stderr and "GB/s" in run.stderr  # the per-process restore line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process-0.log", "process-1.log"]
    got = np.array(result["embeddings"])
    want = _single_process_embeddings(minilm_ckpt)
    assert (got * want).sum(-1).min() >= 0.99999
    assert result["tokens"]["gpt2"] == _single_process_tokens(gpt2_dir)


def test_killed_process_is_named_within_the_timeout(minilm_ckpt):
    """Kill process 1 as it starts restoring: process 0 exits non-zero within the configured
    timeout, naming process 1. Uses the CLI's global --coordinator/--num-processes flags."""
    timeout = 8
    port = launcher.free_port()
    env = launcher.process_env(0, 2, port, host_devices=4)

    def start(i):
        cmd = [sys.executable, "-m", "jaxaccel.cli.main", "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(i), "--distributed-timeout",
               str(timeout), "embed", str(minilm_ckpt), "--mesh", "model=2,stage=4",
               "--rules", "dp_tp_pp", "--text", "hello"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT)

    first, second = start(0), start(1)
    try:
        for line in second.stderr:  # connected = both joined; the restore comes next
            if "connected" in line:
                break
        second.kill()
        killed_at = time.monotonic()
        _, err = first.communicate(timeout=timeout + 30)
        waited = time.monotonic() - killed_at
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert first.returncode not in (0, None), err
    assert waited <= timeout + 5, waited
    assert "process 1" in err and "did not arrive" in err, err[-2000:]


def test_launcher_fails_when_any_process_fails(tmp_path, capsys):
    """Cheap (no jax): env vars reach each process, logs are kept, a failure is the result."""
    script = ("import os, sys; print('pid', os.environ['JAX_PROCESS_ID'], 'of', "
              "os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS']); "
              "sys.exit(3 if os.environ['JAX_PROCESS_ID'] == '1' else 0)")
    result = launcher.launch_local([sys.executable, "-c", script], 3, log_dir=tmp_path,
                                   grace_s=5)
    assert result.codes == [0, 3, 0] and result.exit_code == 3 and not result.ok
    out, err = capsys.readouterr()
    assert out.startswith("pid 0 of 3 127.0.0.1:")  # process 0's stdout passes through
    assert "[p2] pid 2 of 3" in err and "process 1 exited with status 3" in err
    assert "pid 1 of 3" in (tmp_path / "process-1.log").read_text()


def test_cluster_from_flags_and_environment():
    from jaxaccel.parallel import distributed

    assert distributed.cluster_from(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    cluster = distributed.cluster_from(environ=env)
    assert (cluster.coordinator, cluster.num_processes, cluster.process_id) == ("10.0.0.1:1234", 4, 3)
    assert distributed.cluster_from(process_id=1, environ=env).process_id == 1  # flags win
    with pytest.raises(ValueError, match="missing --num-processes, --process-id"):
        distributed.cluster_from("h:1", environ={})
    with pytest.raises(ValueError, match="--process-id must be in"):
        distributed.cluster_from("h:1", 2, 2, environ={})
    # Alone, every blocking step returns at once.
    assert distributed.gather("x", 5) == {0: 5} and distributed.is_output_process()


def test_launch_runs_jaxaccel_without_the_virtualenv_on_path(minilm_ckpt):
    """`launch -- jaxaccel ...` resolves `jaxaccel` to this installation (no activated venv,
    nothing on PATH) and keeps gloo's connection chatter out of the output."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxaccel.cli.main", "launch", "-n", "2", "--devices-each", "4",
         "--timeout", "60", "--", "jaxaccel", "embed", str(minilm_ckpt), "--mesh",
         "data=2,model=4", "-t", "hello", "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["embeddings"][0]) == 384
    assert "[Gloo]" not in proc.stderr + proc.stdout
