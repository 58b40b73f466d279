"""Conversion: Hugging Face checkpoints (safetensors, configs, tokenizers) -> jaxaccel
checkpoints, and re-writing a checkpoint quantized.

Modules:
  hf                 `convert`: read a Hugging Face directory and write a jaxaccel checkpoint
  safetensors_source memory-mapped safetensors tensors (never unpickled)
  generation         `generation_config.json` -> the manifest's generation settings
  bundled            the bundled all-MiniLM-L6-v2 weights (`jaxaccel demo`)
  quantize           `convert --quantize`: a checkpoint's matmul weights stored quantized
"""
