"""Reference implementations that jaxaccel is measured and tested against.

They use torch and transformers (the `reference` extra), which nothing under `jaxaccel/` may
import; each module runs on its own as `python -m jaxaccel_reference.MODULE ...`. They may
import jaxaccel's torch-free helpers, so that both sides see the same inputs and clocks.
"""
