"""`LoadedModel`: what the runners consume, a restored model and the facts about it.

The contract between start-up (which fills it from a checkpoint) and the runtime (whose
`Embedder`, `Generator` and `Classifier` read it): the runtime knows no checkpoint format, so
the checkpoint's types appear here only for type checkers. A runner built from a plan before
the weights arrive reads the same fields, with `abstract_state` in place of `state`. The
runtime imports nothing from the checkpoint layer, so its types are named in comments.
"""

from __future__ import annotations

import dataclasses
import pathlib

from flax import nnx

from jaxaccel.parallel.sharding import Layout


@dataclasses.dataclass
class LoadedModel:
    manifest: object  # checkpoint.manifest.Manifest: family, config, generation settings
    family: str
    config: object  # the family's Config dataclass
    graphdef: nnx.GraphDef
    state: nnx.State  # placed on `layout`'s devices
    layout: Layout
    dtype: str  # compute dtype name
    path: pathlib.Path  # or a remote path (checkpoint.storage.RemotePath)
    stats: object | None = None  # checkpoint.restore.RestoreStats of the restore
    quantization: dict = dataclasses.field(default_factory=dict)  # {"scheme", ...} or {}
    tokenizer_path: pathlib.Path | None = None  # a local tokenizer.json, if the model ships one

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)
