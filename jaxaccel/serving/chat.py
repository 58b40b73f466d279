"""Chat messages -> prompt text with the checkpoint's chat template, rendered as transformers'
`apply_chat_template` renders it: jinja2's sandbox, `trim_blocks` and `lstrip_blocks`,
`raise_exception` and a `tojson` filter, the tokenizer's special tokens as variables.

The template comes from `--chat-template FILE` or the checkpoint's `tokenizer_config.json`
(`chat_template`: a string, or a list of named templates whose "default" is used).
"""

from __future__ import annotations

import json
import pathlib

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxaccel.errors import InputError

NO_TEMPLATE = ("this checkpoint has no chat template (tokenizer_config.json has no "
               "chat_template): start the server with --chat-template FILE (a jinja2 file), "
               "or use /v1/completions")


class ChatTemplate:
    """A compiled chat template with the tokenizer's special tokens (`bos_token`, ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise InputError(f"the chat template does not compile: {err}") from None
        self.special_tokens = special_tokens or {}

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text of `messages`; InputError for what the template refuses."""
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **kwargs)
        except jinja2.TemplateError as err:
            raise InputError(f"the chat template failed on these messages: {err}") from None


def _raise(message: str):
    raise jinja2.TemplateError(message)


def load(template_file: str | pathlib.Path | None, checkpoint_dir) -> ChatTemplate | None:
    """The template of `--chat-template` or of the checkpoint's tokenizer_config.json (None
    when neither has one). InputError for an unreadable file."""
    config = _tokenizer_config(checkpoint_dir)
    specials = {k: _token_text(config.get(k)) for k in
                ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
    if template_file is not None:
        try:
            return ChatTemplate(pathlib.Path(template_file).read_text(), specials)
        except OSError as err:
            raise InputError(f"--chat-template {template_file}: {err.strerror}") from None
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates, as transformers stores several
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    return ChatTemplate(source, specials) if isinstance(source, str) else None


def _tokenizer_config(checkpoint_dir) -> dict:
    path = pathlib.Path(str(checkpoint_dir)) / "tokenizer_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # remote checkpoints and those without one: no template
        return {}


def _token_text(token) -> str:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    return token.get("content", "") if isinstance(token, dict) else str(token)
