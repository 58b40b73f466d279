"""Inputs: turning user data into model-ready host arrays.

Modules:
  tokenizer  text -> token ids with the checkpoint's own `tokenizer.json`
  images     image files -> pixels with the checkpoint's preprocessing (Pillow)
  batches    host-thread decoding that keeps devices fed, one step ahead, in order
"""
