"""The model's chat template: a jinja2 template rendered as transformers' `apply_chat_template`
renders it (sandboxed environment, `trim_blocks` and `lstrip_blocks`, the special tokens of
`tokenizer_config.json` as variables, `raise_exception`), with `add_generation_prompt=True`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that does not compile, or a conversation it refuses (`raise_exception`)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from e
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_model_dir(
        cls, model_dir: Path, override: Path | None = None, override_source: str = ""
    ) -> ChatTemplate | None:
        """The template of `override` (a jinja file), of `override_source` (its text) or of the
        model's tokenizer_config.json (`chat_template`: a string, or a list of named templates of
        which "default" is used); None when there is none. The special tokens always come from
        tokenizer_config.json."""
        config: dict[str, Any] = {}
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        tokens = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        if override is not None:
            return cls(override.read_text(), tokens)
        if override_source:
            return cls(override_source, tokens)
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
        return cls(source, tokens)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a conversation, ending with the assistant's turn opened."""
        try:
            return str(
                self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
