"""A checkpoint -> an `OpenAIServer`, through the one start path (`startup.start`)."""

from __future__ import annotations

from jaxaccel import models
from jaxaccel.errors import UsageError
from jaxaccel.model import Model
from jaxaccel.runtime.generate import Generator
from jaxaccel.serving.server import OpenAIServer
from jaxaccel.startup.start import default_prepare, start


def open_server(ckpt, *, layout=None, dtype: str | None = None, quantize=None,
                served_model_name: str | None = None, chat_template_file=None,
                engine_args: dict | None = None, max_waiting: int | None = None,
                quiet: bool = True) -> OpenAIServer:
    """Restore `ckpt` and wrap it: decoders behind the engine (its programs compile at the
    server's warm-up, not here), encoders for embeddings. UsageError for other families."""
    started = start(ckpt, layout, dtype, quantize=quantize, prepare=_prepare, quiet=quiet)
    model = Model(started.loaded, runner=started.runner)
    if model.task not in ("generate", "embed"):
        raise UsageError(f"{ckpt} holds a {model.family!r} model ({model.task}); serve needs "
                         f"a decoder (completions, chat) or a text encoder (embeddings)")
    generator = started.runner if model.task == "generate" else None
    return OpenAIServer(model, generator, served_model_name=served_model_name or str(ckpt),
                        chat_template_file=chat_template_file, engine_args=engine_args,
                        max_waiting=max_waiting)


def _prepare(plan):
    """Decoders: the Generator's weights and runtime only (the engine compiles its own step
    programs); anything else: the first call's programs, as `Model` uses them."""
    if models.task(plan.manifest.family) == "generate":
        return Generator.from_plan(plan), lambda: None
    return default_prepare()(plan)
