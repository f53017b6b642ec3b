"""Response bodies of the OpenAI API from engine outputs: whole responses and stream chunks.

Plain dicts in the documented shapes (the `openai` client's models parse them); whole responses are
built off the event loop, as they are proportional to the output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from moeserve.workers.engine.request import RequestOutput, TokenLogprobs
from moeserve.workers.model.tokenizer import Tokenizer
from moeserve.workers.server.openai_api.convert import Prepared
from moeserve.workers.server.openai_api.schemas import ChatCompletionRequest


@dataclass
class ChoiceText:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


def _token(tokenizer: Tokenizer | None, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def top_k(prepared: Prepared) -> int:
    r = prepared.request
    if isinstance(r, ChatCompletionRequest):
        return r.top_logprobs or 0
    return r.logprobs or 0


def completion_logprobs(
    lps: list[TokenLogprobs], k: int, tokenizer: Tokenizer | None, offset: int
) -> dict[str, Any]:
    tokens = [_token(tokenizer, lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_token(tokenizer, t): v for t, v in lp.top[:k]} for lp in lps],
        "text_offset": offsets,
    }


def chat_logprobs(lps: list[TokenLogprobs], k: int, tokenizer: Tokenizer | None) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:k]]}
            for lp in lps
        ]
    }


def wants_logprobs(prepared: Prepared) -> bool:
    r = prepared.request
    return r.logprobs if isinstance(r, ChatCompletionRequest) else r.logprobs is not None


def usage(prepared: Prepared, completion_tokens: int) -> dict[str, Any]:
    p = prepared.prompt_tokens
    return {
        "prompt_tokens": p,
        "completion_tokens": completion_tokens,
        "total_tokens": p + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prepared.cached_tokens},
    }


class ResponseBuilder:
    """Builds the bodies of one request; `chat` picks chat.completion or text_completion shapes."""

    def __init__(self, prepared: Prepared, model: str, tokenizer: Tokenizer | None, request_id: str):
        self.prepared = prepared
        self.chat = isinstance(prepared.request, ChatCompletionRequest)
        self.model = model
        self.tokenizer = tokenizer
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.k = top_k(prepared)
        self.logprobs = wants_logprobs(prepared)
        self.offsets = [len(c.echo) for c in prepared.choices]

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "text_completion"
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, choices: list[ChoiceText]) -> bytes:
        """The non-streamed response (run off the event loop)."""
        body = self._head(chunk=False)
        out = []
        for c, choice in zip(self.prepared.choices, choices, strict=True):
            lp = None
            if self.chat:
                if self.logprobs:
                    lp = chat_logprobs(choice.logprobs, self.k, self.tokenizer)
                message = {"role": "assistant", "content": choice.text}
                out.append(
                    {
                        "index": c.index,
                        "message": message,
                        "logprobs": lp,
                        "finish_reason": choice.finish_reason,
                    }
                )
            else:
                if self.logprobs:
                    lp = completion_logprobs(choice.logprobs, self.k, self.tokenizer, len(c.echo))
                text = c.echo + choice.text
                out.append(
                    {"index": c.index, "text": text, "logprobs": lp, "finish_reason": choice.finish_reason}
                )
        body["choices"] = out
        body["usage"] = usage(self.prepared, sum(len(c.token_ids) for c in choices))
        return json.dumps(body, ensure_ascii=False).encode()

    def event(self, body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    def role_chunks(self) -> list[bytes]:
        """Chat streams open each choice with the assistant role (before any token)."""
        delta = {"role": "assistant", "content": ""}
        return [
            self.event(
                {
                    **self._head(True),
                    "choices": [{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}],
                    **self._usage_none(),
                }
            )
            for c in self.prepared.choices
        ]

    def _usage_none(self) -> dict[str, Any]:
        options = self.prepared.request.stream_options
        return {"usage": None} if options is not None and options.include_usage else {}

    def chunk(self, index: int, out: RequestOutput, first: bool) -> bytes:
        choice: dict[str, Any] = {"index": index}
        lp = None
        if self.chat:
            choice["delta"] = {"content": out.text} if out.text or not out.finished else {}
            if self.logprobs:
                lp = chat_logprobs(out.logprobs, self.k, self.tokenizer)
        else:
            echo = self.prepared.choices[index].echo if first else ""
            choice["text"] = echo + out.text
            if self.logprobs:
                lp = completion_logprobs(out.logprobs, self.k, self.tokenizer, self.offsets[index])
                self.offsets[index] += sum(len(t) for t in lp["tokens"])
        choice["logprobs"] = lp
        choice["finish_reason"] = out.finish_reason
        return self.event({**self._head(True), "choices": [choice], **self._usage_none()})

    def usage_chunk(self, completion_tokens: int) -> bytes:
        return self.event(
            {**self._head(True), "choices": [], "usage": usage(self.prepared, completion_tokens)}
        )
