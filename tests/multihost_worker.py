"""One process of a multi-host test run (started by tests/test_multihost.py via the launcher).

Joins the cluster from the standard environment variables, restores MiniLM onto a global
mesh (`model=2,stage=4`: model spans the two processes, stages run within each), embeds,
optionally generates greedily with a decoder (a transformers directory), and prints one JSON
object from process 0: embeddings, tokens, and every process's restore bytes.
"""

import json
import sys

from jaxaccel.parallel import distributed

SENTENCES = ["A man is eating food.", "Short.", "ünïcödé and emoji 🙂 tokenise too",
             "The quick brown fox jumps over the lazy dog, twice, and then sleeps for a while."]


PROMPTS = [[5, 7, 9, 11, 3], [8], [10, 20, 30, 40, 50, 60, 70, 80, 90, 15, 25, 35]]


def greedy_tokens(family: str, directory: str, layout) -> list[list[int]]:
    from decoder_reference import load_jax
    from flax import nnx

    from jaxaccel.runtime.generate import Generator

    model, cfg = load_jax(family, __import__("pathlib").Path(directory))
    return Generator(*nnx.split(model), cfg, layout).generate(PROMPTS, 8)


def main(ckpt: str, mesh: str, rules: str, *decoders: str) -> None:
    distributed.initialize(distributed.cluster_from())
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    layout = Layout.create(mesh, rules)
    loaded = load_model(ckpt, layout, quiet=False)
    embeddings = Embedder(loaded, batch_size=8).embed_texts(SENTENCES)[0]
    read = distributed.gather("bytes", loaded.stats.bytes_read)
    pairs = [decoders[i:i + 2] for i in range(0, len(decoders), 2)]  # FAMILY DIR ...
    tokens = {family: greedy_tokens(family, directory, layout) for family, directory in pairs}
    if distributed.is_output_process():
        print(json.dumps({"embeddings": embeddings.tolist(), "bytes_read": read,
                          "total_bytes": loaded.manifest.total_bytes, "tokens": tokens}),
              flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
