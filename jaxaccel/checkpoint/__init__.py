"""Checkpoints: the on-disk format, where its bytes live, and restoring them onto devices.

Modules:
  manifest      `jaxaccel.json`: families, arrays, dtypes, chunking (`Manifest`)
  layout        chunk shapes (along the axes the caller's `ChunkRule` names), chunk grids
                and counts, and the OCDBT + zarr3 array layout
  storage       local paths and `gs://` / `s3://` / `https://` URLs
  remote        ranged reads from object stores; `chunk_cache` keeps them on local disk
  direct        the direct reader: decode zarr3 chunks without tensorstore's copy
  integrity     chunk lengths and crc32c checks (`jaxaccel verify`)
  restore       stream each device's slices within a host-memory budget
  broadcast     multi-host restore: read once, broadcast to peers
  restore_mode  which reader a restore uses
  writer        write a checkpoint atomically (convert, quantize)

Knows no model family and no quantization scheme: callers hand it per-array transforms.
"""
