"""`convert --quantize`: a full-precision jaxaccel checkpoint -> a weight-only quantized one.

Each weight the scheme covers (`jaxaccel.models.quantization`) is read whole as float32, quantized
with the same function quantize-on-load applies per slice, and written as NAME.values and
NAME.scales; every other array is copied as stored. A tied LM head quantized
(`--quantize-head`) is written as the head's NAME.values / NAME.scales, quantized from the
embedding table, which is also kept as stored (the lookup reads it). The manifest's
"quantization" object records the scheme, each weight's qtype and tiles, and such a copy as
`head_copy` {head: table}. Writing is atomic (checkpoint.writer).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorstore as ts

from jaxaccel.models import quantization
from jaxaccel.checkpoint import layout, writer
from jaxaccel.checkpoint.manifest import PARAMS_DIR, Manifest
from jaxaccel.conversion.hf import CHUNK_RULE
from jaxaccel.errors import UsageError
from jaxaccel.models import config_from_dict, family_spec
from jaxaccel.models.state import abstract_model


def quantize_checkpoint(src: str | pathlib.Path, dest: str | pathlib.Path,
                        scheme: quantization.Scheme, *, chunk_bytes: int | None,
                        codec: str = "none", overwrite: bool = False,
                        on_array: Callable[[str, int], None] = lambda name, nbytes: None,
                        ) -> Manifest:
    """Write DEST: SRC (a full-precision jaxaccel checkpoint) quantized with `scheme`.

    Raises UsageError if SRC is already quantized; CheckpointError from reading/writing."""
    src, dest = pathlib.Path(src), pathlib.Path(dest)
    manifest = Manifest.load(src)
    if manifest.quantization:
        raise UsageError(f"{src}: already quantized "
                         f"({quantization.manifest_scheme(manifest)}); convert it from its "
                         "full-precision checkpoint")
    family = family_spec(manifest.family)
    copies = quantization.tied_head(family, config_from_dict(manifest.family, manifest.config),
                                    scheme)
    _, abstract = abstract_model(manifest.family, manifest.config, head_copy=bool(copies))
    _, specs = quantization.quantize_abstract(abstract, family, scheme)
    info = {**scheme.to_json(), "weights": {n: s.to_json() for n, s in sorted(specs.items())},
            **({"head_copy": copies} if copies else {})}
    out = dataclasses.replace(manifest, quantization=info,
                              source={**manifest.source, "quantized_from": str(src.absolute())})
    extras = {name: src / name for name in manifest.tokenizer_files}
    return writer.write_checkpoint(dest, out, _arrays(src, manifest, specs, copies), extras,
                                   chunk_bytes=chunk_bytes, codec=codec, overwrite=overwrite,
                                   on_array=on_array, chunk_rule=CHUNK_RULE)


def _arrays(src: pathlib.Path, manifest: Manifest, specs: dict,
            copies: dict) -> Iterator[tuple[str, np.ndarray, tuple]]:
    """(name, array, axes) to write, one source array in memory at a time; `copies`
    {head: table} also quantizes `table` as `head`."""
    params = str(src / PARAMS_DIR)
    copied_from = {table: head for head, table in copies.items()}
    for name, entry in sorted(manifest.arrays.items()):
        store = ts.open(layout.array_spec(params, name), read=True).result()
        if name in copied_from:  # the table stays as stored; its head copy is quantized
            yield name, store.read().result(), entry.axes
            name = copied_from[name]
        spec = specs.get(name)
        if spec is None:
            yield name, store.read().result(), entry.axes
            continue
        whole = ts.cast(store, ts.float32).read().result()
        values, scales = quantization.quantize_block(whole, spec)
        del whole
        yield quantization.values_name(name), quantization.to_stored(values), entry.axes
        yield quantization.scales_name(name), scales, entry.axes
