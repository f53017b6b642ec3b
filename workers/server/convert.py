"""Translation between `moeserve.v1` messages and engine objects, with request validation.

`check_sizes` is the cheap first check (field sizes against `RequestLimits`, O(number of stop
strings), fit for the event loop). `to_engine` tokenizes and checks what only the API knows
(exactly one prompt field, text needs a tokenizer, defaults of unset fields); it is proportional to
the request's size, so servers run it off the event loop. The engine checks the rest (lengths,
ranges, vocab). All raise `InvalidRequest` with the field's API path in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.engine_settings import RequestLimits
from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.engine.core import Engine
from moeserve.workers.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    check_stop_sizes,
)
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16
FINISH_REASONS: dict[FinishReason | None, pb.FinishReason] = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: list[int]
    sampling: SamplingParams


def utf8_size_over(text: str, limit: int) -> int | None:
    """The UTF-8 size of `text` if it is over `limit`, else None (encodes only when it may be)."""
    if len(text) * 4 <= limit:  # a character is at most 4 bytes
        return None
    size = len(text) if len(text) > limit else len(text.encode())
    return size if size > limit else None


def check_sizes(request: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Every size limit of the request, before anything proportional to its size (InvalidRequest)."""
    if (size := utf8_size_over(request.request_id, limits.max_request_id_bytes)) is not None:
        raise InvalidRequest("request_id", f"{size}+ bytes, at most {limits.max_request_id_bytes} allowed")
    if request.HasField("prompt"):
        if (size := utf8_size_over(request.prompt, limits.max_prompt_bytes)) is not None:
            raise InvalidRequest(
                "prompt", f"{size}+ bytes of text, at most {limits.max_prompt_bytes} allowed"
            )
    check_stop_sizes(request.sampling.stop, len(request.sampling.stop_token_ids), limits)


def to_engine(request: pb.GenerateRequest, engine: Engine, tokenizer: Tokenizer | None) -> EngineRequest:
    """Validated prompt ids and sampling parameters, or InvalidRequest naming the field."""
    check_sizes(request, engine.settings.limits)
    has_text = request.HasField("prompt")
    has_ids = len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        which = "both are set" if has_text else "neither is set"
        raise InvalidRequest("prompt", f"give exactly one of prompt or prompt_token_ids ({which})")
    if has_text:
        if not request.prompt:
            raise InvalidRequest("prompt", "must not be empty")
        if tokenizer is None:
            raise InvalidRequest("prompt", "this model has no tokenizer; send prompt_token_ids")
        prompt_ids, prompt_field = tokenizer.encode(request.prompt), "prompt"
        if not prompt_ids:
            raise InvalidRequest("prompt", "encodes to no tokens")
    else:
        prompt_ids, prompt_field = list(request.prompt_token_ids), "prompt_token_ids"
    s = request.sampling
    room = engine.max_model_len - len(prompt_ids)
    sampling = SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else max(1, min(DEFAULT_MAX_TOKENS, room)),
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )
    engine.check(prompt_ids, sampling, prompt_field)
    return EngineRequest(prompt_ids, sampling)


def to_response(out: RequestOutput, first: bool = True) -> pb.GenerateResponse:
    """The API message of one output; the request id goes in the first message of a stream only."""
    response = pb.GenerateResponse(
        request_id=out.request_id if first else "",
        token_ids=out.token_ids,
        text=out.text,
        finish_reason=FINISH_REASONS[out.finish_reason],
        logprobs=[
            pb.TokenLogprobs(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top=[pb.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
            for lp in out.logprobs
        ],
    )
    if out.finished:
        response.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                cached_prompt_tokens=out.cached_prompt_tokens,
            )
        )
    return response


def model_info(
    name: str,
    config: ModelConfig,
    engine: Engine,
    dtype: str,
    has_tokenizer: bool,
    attention_ranks: int = 1,
    expert_ranks: int = 0,
) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_name=name,
        architecture=pb.Architecture(
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            kv_lora_rank=config.kv_lora_rank,
            qk_rope_head_dim=config.qk_rope_head_dim,
            n_routed_experts=config.n_routed_experts,
            n_shared_experts=config.n_shared_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            num_moe_layers=len(config.moe_layers),
            kv_values_per_token_per_layer=config.latent_dim,
        ),
        max_model_len=engine.max_model_len,
        vocab_size=config.vocab_size,
        attention_ranks=attention_ranks,
        expert_ranks=expert_ranks,
        kv_block_size=engine.runner.block_size,
        kv_num_blocks=engine.runner.allocator.num_blocks - 1,
        dtype=dtype,
        has_tokenizer=has_tokenizer,
    )
