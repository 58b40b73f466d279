"""Expert parallelism across processes: 2 processes x 2 simulated CPU devices (jax.distributed
on 127.0.0.1, gloo), a Mixtral-family checkpoint restored onto `expert=4`, which spans both
processes. Each process must read its own experts' bytes and no other expert's.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.cpu_only  # processes of simulated CPU devices, gloo collectives

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "moe_restore_worker.py"
EXPERT_WEIGHTS = ("blocks.moe.wg_edf", "blocks.moe.wu_edf", "blocks.moe.wm_efd")


def test_each_process_reads_only_its_experts(tmp_path):
    """Per process: exactly half of every expert weight's bytes are requested, each device a
    quarter (its 2 of 8 experts); from storage, whole chunks of its own experts only (the
    other half of the expert bytes is never read). The 2-process logits equal one process's."""
    from moe_restore_worker import PROMPT

    from jaxaccel import models
    from jaxaccel.bench import synthetic
    from jaxaccel.checkpoint.manifest import Manifest
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.startup.loader import load_model

    config = models.family_spec("mixtral").config.from_hf({
        "model_type": "mixtral", "vocab_size": 101, "hidden_size": 64, "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 64})
    ckpt = tmp_path / "ckpt"
    synthetic.write(ckpt, dataclasses.asdict(config), family="mixtral", std=0.2)
    arrays = Manifest.load(ckpt).arrays
    command = [sys.executable, "-m", "jaxaccel.cli.main", "launch", "--processes", "2",
               "--devices-each", "2", "--timeout", "60", "--log-dir", str(tmp_path / "logs"),
               "--", sys.executable, str(WORKER), str(ckpt), "expert=4", "ep"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    processes = {int(p): counts for p, counts in result["processes"].items()}
    assert sorted(processes) == [0, 1]

    stored = sum(p.stat().st_size for p in (ckpt / "params" / "d").iterdir())
    expert_bytes = sum(arrays[w].to_json()["nbytes"] for w in EXPERT_WEIGHTS)
    for process, counts in processes.items():
        for weight in EXPERT_WEIGHTS:
            nbytes = arrays[weight].to_json()["nbytes"]
            assert counts["bytes_per_array"][weight] == nbytes // 2, (process, weight)
            per_device = {d: n for a, d, n in counts["bytes_per_array_device"] if a == weight}
            # each of this process's devices requested a quarter: its own experts' slice
            assert sorted(map(int, per_device)) == sorted(map(int, counts["expert_index"]))
            assert list(per_device.values()) == [nbytes // 4] * 2, (process, weight)
        # Storage: the other process's experts (half the expert bytes) are never read; the
        # rest (attention, embeddings, router, b-tree nodes) is read in full by both.
        print(f"process {process}: {counts['bytes_from_storage']} bytes from storage of "
              f"{stored} stored ({expert_bytes} expert bytes)")
        assert counts["bytes_from_storage"] <= stored - expert_bytes // 2
        assert counts["bytes_from_storage"] >= expert_bytes // 2  # its own experts were read
    assert sorted(i for c in processes.values() for i in c["expert_index"].values()) == [0, 1, 2, 3]

    loaded = load_model(ckpt)
    want = Generator(loaded.graphdef, loaded.state, loaded.config, dtype=loaded.dtype,
                     compiler_options={"xla_backend_optimization_level": 0}
                     ).last_logits([PROMPT])[0]
    np.testing.assert_allclose(result["logits"], want, rtol=0, atol=1e-4 * np.abs(want).max())
