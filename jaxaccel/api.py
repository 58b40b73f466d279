"""The functions `import jaxaccel` offers scripts and notebooks; the CLI calls the same ones.

    import jaxaccel
    model = jaxaccel.load("checkpoints/minilm", mesh="data=2,model=4")
    vectors = model.embed(["A man is eating food.", "A man is eating bread."])

Every function takes paths as `str` or `pathlib.Path` (checkpoints also as gs://, s3://,
https:// URLs: see jaxaccel.checkpoint.storage) and raises the errors of
`jaxaccel.errors` (importable from `jaxaccel` itself) with one-line messages.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from collections.abc import Mapping

from jax.sharding import Mesh

from jaxaccel.models import quantization
from jaxaccel.startup import planner
from jaxaccel.utils import progress
from jaxaccel.utils.arguments import checked
from jaxaccel.parallel import sharding as ax
from jaxaccel.checkpoint import storage
from jaxaccel.checkpoint.integrity import VerifyReport, verify_checkpoint
from jaxaccel.checkpoint.layout import DEFAULT_CHUNK_BYTES
from jaxaccel.checkpoint.manifest import MANIFEST_NAME, Manifest
from jaxaccel.checkpoint.restore import DEFAULT_HOST_MEMORY_BUDGET
from jaxaccel.conversion import hf
from jaxaccel.conversion.bundled import resolve_source
from jaxaccel.conversion.hf_checkpoint import open_checkpoint
from jaxaccel.conversion.quantize import quantize_checkpoint
from jaxaccel.conversion.safetensors_source import choose_weight_files
from jaxaccel.errors import ConvertError, UsageError
from jaxaccel.startup.start import start
from jaxaccel.model import Model
from jaxaccel.utils.units import parse_bytes

MeshLike = str | Mapping[str, int] | Mesh | None


def layout(mesh: MeshLike = None, rules: str | Mapping | None = None) -> ax.Layout:
    """A Layout from a mesh given as "data=2,model=4", {"data": 2, "model": 4}, or a
    `jax.sharding.Mesh` with axes named from ("data", "model", "stage"), and a rule table
    (name such as "dp_tp", or a {logical: mesh axis} dict; default "dp_tp")."""
    if isinstance(mesh, Mesh):
        unknown = set(mesh.axis_names) - set(ax.MESH_AXES)
        if unknown:
            raise UsageError(f"mesh axes {sorted(unknown)} are not among {ax.MESH_AXES}")
        return ax.Layout(mesh, ax.resolve_rules(rules))
    return ax.Layout.create(mesh, rules)


@checked
def load(path: str | pathlib.Path, *, mesh: MeshLike = None, rules: str | Mapping | None = None,
         dtype: str | None = None, host_memory_budget: int | str | None = None,
         verify: bool = True, progress: bool = True, microbatches: int | None = None,
         restore_mode: str | None = None, quantize: str | None = None,
         group_size: int | None = None, quantize_head: bool | str = False) -> Model:
    """Restore a checkpoint onto `mesh` (default: one device) in compute `dtype` ("float32"
    or "bfloat16"; default: the checkpoint's), streaming only the slices each device holds.

    `quantize` "int8" | "int4" | "fp8" (GPU/TPU): weight-only quantization of the matmul
    weights, each slice quantized on the host as it streams in (`group_size` for int4,
    default 128; `quantize_head` also the LM head: True for int8 per output channel, or a
    scheme name; a tied head becomes a quantized copy of the embedding table, the lookup
    keeps the table in `dtype`). A checkpoint written by
    `convert(..., quantize=...)` is quantized already and needs no `quantize`.

    `host_memory_budget`: bytes (or "2GiB") of restore reads in flight. `verify` (default
    True): check every chunk's crc32c while reading (+0-25% of restore time, measured in
    checkpoint/direct.py); False skips it (missing or short chunks are always refused).
    `progress`: a progress bar on a terminal or in Jupyter. `restore_mode` (multi-host):
    "read-all", "broadcast" or "auto" (the default; see docs/parallelism.md, Clusters).

    The one start path of every command (`jaxaccel.startup.start`): planned once, refused
    before reading a byte where a device whose memory the backend reports would overflow
    (PlanError), and the programs of a first small call compiled while the weights stream in.
    Raises CheckpointError, PlanError, UsageError.
    """
    budget = _bytes(host_memory_budget, "host_memory_budget") or DEFAULT_HOST_MEMORY_BUDGET
    scheme = quantization.Scheme.parse(quantize, group_size, quantize_head)
    started = start(path, layout(mesh, rules), dtype, quantize=scheme,
                    microbatches=microbatches, host_memory_budget=budget, quiet=not progress,
                    verify_checksums=verify, restore_mode=restore_mode)
    return Model(started.loaded, microbatches=microbatches, runner=started.runner)


@checked
def convert(src: str | pathlib.Path, dest: str | pathlib.Path, *, dtype: str | None = None,
            family: str = "auto", layout: str = "hf", overwrite: bool = False,
            progress: bool = True, chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
            codec: str = "none", allow_overflow: bool = False, quantize: str | None = None,
            group_size: int | None = None, quantize_head: bool | str = False,
            force_family: bool = False) -> Manifest:
    """Convert a Hugging Face directory (config.json + safetensors; "minilm" for the bundled
    all-MiniLM-L6-v2) into a jaxaccel checkpoint at `dest` (written atomically, as `dtype`:
    float32, bfloat16 or float16); another `layout` of a family, e.g. family="resnet",
    layout="torchvision". `chunk_bytes`: chunk size target (None: one chunk per array);
    `codec`: "none" or "zstd"; `allow_overflow`: store values past the dtype's range.
    `quantize` "int8" | "int4": a weight-only quantized checkpoint (values + scales per weight,
    see `jaxaccel.models.quantization`); `src` may then also be a full-precision jaxaccel checkpoint.
    A `family` that config.json's model_type contradicts is a ConvertError naming both, unless
    `force_family` (then a warning). Raises ConvertError, UsageError."""
    scheme = quantization.Scheme.parse(quantize, group_size, quantize_head)
    if scheme is not None:
        return _convert_quantized(src, dest, scheme, dtype=dtype, family=family, layout=layout,
                                  overwrite=overwrite, progress=progress,
                                  chunk_bytes=chunk_bytes, codec=codec,
                                  allow_overflow=allow_overflow, force_family=force_family)
    source = resolve_source(str(src))
    total = _source_bytes(source)
    with _bar(total, f"convert {source.name}", progress) as advance:
        return hf.convert(source, dest, dtype=dtype or "float32", family=family,
                          layout=layout, chunk_bytes=chunk_bytes, codec=codec,
                          overwrite=overwrite, allow_overflow=allow_overflow,
                          force_family=force_family, on_array=lambda name, n: advance(n))


def _convert_quantized(src, dest, scheme, *, progress: bool, chunk_bytes, codec: str,
                       overwrite: bool, **convert_args) -> Manifest:
    """convert --quantize: quantize a jaxaccel checkpoint, or convert a Hugging Face
    directory to a full-precision one first (in a temporary directory next to DEST)."""
    if scheme.name == "fp8":
        raise UsageError("convert --quantize: int8 or int4 (fp8 is quantize-on-load only)")
    source = resolve_source(str(src))
    dest = pathlib.Path(dest)
    quantize = functools.partial(quantize_checkpoint, dest=dest, scheme=scheme,
                                 chunk_bytes=chunk_bytes, codec=codec, overwrite=overwrite)
    if (source / MANIFEST_NAME).is_file():
        return quantize(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.fp-", dir=dest.parent) as tmp:
        convert(source, pathlib.Path(tmp) / "fp", progress=progress, chunk_bytes=chunk_bytes,
                codec=codec, **convert_args)
        return quantize(pathlib.Path(tmp) / "fp")


@checked
def inspect(path: str | pathlib.Path) -> Manifest:
    """A checkpoint's manifest: family, config, dtype, every array's shape/dtype/axes/bytes
    (of a Hugging Face directory: the manifest it is read with, `source.format` "huggingface")."""
    return open_checkpoint(path)


@checked
def plan(path: str | pathlib.Path, *, mesh: MeshLike = None, rules: str | Mapping | None = None,
         dtype: str | None = None, batch: int = 1, seq: int | None = None,
         max_new_tokens: int = 0, device_memory: int | str | None = None,
         quantize: str | None = None, group_size: int | None = None,
         quantize_head: bool | str = False) -> planner.MemoryPlan:
    """Per-device and per-process memory of a run, before reading a byte (`.fits`,
    `.to_json()`; `jaxaccel.startup.planner.check_fits` raises PlanError when it does not fit).
    `quantize` etc.: as in `load` (a quantize-on-load run)."""
    return planner.plan(path, layout(mesh, rules), dtype, batch=batch, seq=seq,
                        max_new_tokens=max_new_tokens,
                        device_memory=_bytes(device_memory, "device_memory"),
                        quantize=quantization.Scheme.parse(quantize, group_size, quantize_head))


@checked
def verify(path: str | pathlib.Path, *, progress: bool = True) -> VerifyReport:
    """Re-read every chunk and compare it with the manifest's checksums; raises
    IntegrityError naming every damaged array and chunk."""
    total = Manifest.load(path).total_bytes
    with _bar(total, f"verify {storage.checkpoint_path(path).name}", progress) as advance:
        return verify_checkpoint(path, on_bytes=advance)


def _source_bytes(source: pathlib.Path) -> int:
    """Bytes of the safetensors files convert will read (the progress bar's total); 0 where
    there are none to count (convert itself then says what is wrong)."""
    try:
        return sum(p.stat().st_size for p in choose_weight_files(source)[0])
    except (ConvertError, OSError):
        return 0


def _bar(total: int, description: str, enabled: bool):
    return progress.byte_progress(total, description, enabled=enabled)


def _bytes(value: int | str | None, name: str) -> int | None:
    return parse_bytes(value, name) if isinstance(value, str) else value
