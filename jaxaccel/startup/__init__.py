"""Start-up: from a checkpoint path to a ready model, planned once, compiled while restoring.

Modules:
  loader     read the manifest, build the abstract model, restore its sharded state
  planner    per-device and per-process memory of a run, before reading a byte
  coldstart  compile a model's programs while its weights stream in

The layer that joins `checkpoint` (bytes), `models` (families) and `runtime` (programs).
"""
