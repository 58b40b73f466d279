"""One process of a cluster test (tests/test_cluster.py), started the way srun/mpirun start it.

Takes no jaxaccel flags: it joins through `distributed.cluster_from()` with `--distributed
auto`, i.e. jax.distributed's own detection of the SLURM / Open MPI variables the test set.
Restores MiniLM and a small GPT-2 (both jaxaccel checkpoints, from SOURCE: a local directory
or an s3:// URL) onto MESH with RESTORE_MODE, embeds and
generates greedily, and prints one JSON object from process 0: embeddings, tokens, and every
process's bytes read from storage. With `restore-only` it restores and reports bytes only.

    python tests/cluster_worker.py MINILM_SOURCE GPT2_SOURCE MESH RULES RESTORE_MODE [restore-only]
"""

import json
import socket
import sys

from jaxaccel.parallel import distributed

SENTENCES = ["A man is eating food.", "Short.", "ünïcödé and emoji 🙂 tokenise too"]
PROMPTS = [[5, 7, 9, 11, 3], [8], [10, 20, 30, 40, 50, 60, 70, 80, 90, 15, 25, 35]]
NEW_TOKENS = 6


def main(minilm: str, gpt2: str, mesh: str, rules: str, mode: str, only: str = "") -> None:
    distributed.initialize(distributed.cluster_from())
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    layout = Layout.create(mesh, rules)
    encoder = load_model(minilm, layout, quiet=False, restore_mode=mode)
    decoder = load_model(gpt2, layout, quiet=False, restore_mode=mode)
    embeddings, tokens = None, None
    if only != "restore-only":
        embeddings = Embedder(encoder, batch_size=4).embed_texts(SENTENCES)[0].tolist()
        tokens = Generator(decoder.graphdef, decoder.state, decoder.config, layout,
                           dtype=decoder.dtype).generate(PROMPTS, NEW_TOKENS)
    mine = {"storage": encoder.stats.bytes_from_storage + decoder.stats.bytes_from_storage,
            "received": encoder.stats.bytes_broadcast + decoder.stats.bytes_broadcast,
            "host": socket.gethostname()}
    every = distributed.gather("cluster-worker", mine)
    if distributed.is_output_process():
        print(json.dumps({"embeddings": embeddings, "tokens": tokens,
                          "processes": every, "cluster": distributed.active().environment,
                          "total_bytes": encoder.manifest.total_bytes
                          + decoder.manifest.total_bytes}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
