"""Runtime: the jitted programs under every front end, and the runners built on them.

Modules:
  programs       `Runtime`, `Buckets`, parameter shardings and placement: compile once per bucket
  embed          `Embedder`: sentence embeddings (tokenise, bucket, run, un-pad)
  generate       `Generator`: prefill + decode over a KV cache
  classify       `Classifier`: image classification
  loaded         `LoadedModel`: the restored model the runners consume
  requests       one validator of generation requests (sampling, stop strings, limits)
  detokenize     `IncrementalDetokenizer`: new tokens' text in the context of the prompt
  sampling       greedy / temperature / top-k / top-p token choice
  compile_cache  XLA's persistent compilation cache

Uses `models`, `backends`, `parallel` and `inputs`; knows no checkpoint format and no family.
"""
