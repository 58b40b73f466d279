"""Start-up: from a checkpoint path to a ready model, planned once, compiled while restoring.

Modules:
  loader     read the manifest, build the abstract model, restore its sharded state
  planner    per-device and per-process memory of a run, before reading a byte
  start      the one start path of `jaxaccel.load` and every command: plan once, refuse a
             wrong task or an overflow from that plan, compile while the weights stream in
  coldstart  what each command compiles (the buckets of its inputs), through `start`

The layer that joins `checkpoint` (bytes), `models` (families) and `runtime` (programs).
"""
