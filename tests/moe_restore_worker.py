"""One process of the expert-parallel restore test (tests/test_moe_multihost.py, started via
`jaxaccel launch`): joins the cluster, restores a MoE checkpoint onto `expert=4` spanning
the processes, runs one forward pass, and prints one JSON object from process 0 with every
process's restore counts and the last-position logits.
"""

import json
import sys

from jaxaccel.parallel import distributed

PROMPT = [5, 7, 9, 11, 3, 8]


def main(ckpt: str, mesh: str, rules: str) -> None:
    distributed.initialize(distributed.cluster_from())
    import jax

    from jaxaccel.parallel.sharding import Layout
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.startup.loader import load_model

    loaded = load_model(ckpt, Layout.create(mesh, rules))
    stats = loaded.stats
    mine = {
        "bytes_per_array": dict(stats.bytes_per_array),
        "bytes_from_storage": stats.bytes_from_storage,
        # device id -> its position along the expert axis (which experts it holds)
        "expert_index": {str(d.id): int(i) for i, d in enumerate(
            loaded.layout.mesh.devices.reshape(-1)) if d.process_index == jax.process_index()},
        "bytes_per_array_device": [[a, d, n] for (a, d), n in
                                   stats.bytes_per_array_device.items()],
    }
    counts = distributed.gather("moe-restore", mine)
    gen = Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                    dtype=loaded.dtype, compiler_options={"xla_backend_optimization_level": 0})
    logits = gen.last_logits([PROMPT])[0]
    if distributed.is_output_process():
        print(json.dumps({"processes": counts, "logits": logits.tolist()}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
