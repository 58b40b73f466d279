"""The `jaxaccel` command line: `main` parses and dispatches; one module per command, each
exposing `register(app)` and importing jax lazily so `--help` stays fast."""
