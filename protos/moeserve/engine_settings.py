"""Engine limits: KV-cache size, batch shape, queue bound, context length, and the size limits of
one request (`RequestLimits`). Plain data with its own validation; no torch.

The one type for these limits everywhere: `moeserve serve` builds it from its flags, the Ray Serve
app receives it inside `ServeAppConfig.engine`, and the operator fills it from `spec.serving.engine`
and `spec.model.maxModelLen` (the CRD's defaults are these defaults). Errors are `ValueError`s whose
message starts with the field name (`block_size: must be >= 1, got 0`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class RequestLimits:
    """Sizes one request may have, checked before any work proportional to them (tokenizing, stop
    matching); a request beyond one gets INVALID_ARGUMENT naming the field. The defaults are far
    above what a real client sends and small enough that no request can stall the server."""

    max_prompt_bytes: int = 1 << 20
    """UTF-8 bytes of a text `prompt` (1 MiB); checked before it is tokenized (off the event loop)."""
    max_stop_strings: int = 256
    """Number of `sampling.stop` strings."""
    max_stop_bytes: int = 16 << 10
    """UTF-8 bytes of all `sampling.stop` strings together (16 KiB)."""
    max_stop_token_ids: int = 1024
    """Number of `sampling.stop_token_ids`."""
    max_request_id_bytes: int = 256
    """UTF-8 bytes of `request_id` (it is returned in the first streamed message)."""

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_bytes",
            "max_stop_strings",
            "max_stop_bytes",
            "max_stop_token_ids",
            "max_request_id_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EngineSettings:
    """Limits of one engine (one attention rank). Every field has a default fit for a small CPU box."""

    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_tokens: int = 65536
    """KV-cache capacity in tokens, rounded up to whole blocks (one more block is reserved as padding)."""
    max_num_seqs: int = 64
    """Most requests in the running batch at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decode tokens plus prefill chunks. Longer prompts prefill in chunks."""
    max_waiting: int = 256
    """Most requests waiting to be admitted; a request beyond it is refused (RESOURCE_EXHAUSTED)."""
    max_model_len: int | None = None
    """Longest prompt plus completion in tokens. None: the model's max_position_embeddings, capped
    at the KV-cache capacity so that one request always fits on its own."""
    prefix_caching: bool = True
    """Reuse the KV blocks of a cached prompt prefix (full blocks, by chained hash; LRU eviction of
    blocks no request uses). False: every prompt is computed from scratch."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Size limits of one request (prompt text, stop fields, request id)."""
    speculative: Literal["mtp"] | None = None
    """Speculative decoding: "mtp" drafts with the checkpoint's multi-token-prediction layer and
    verifies the drafts in one step (the same output: greedy identical, sampling exact). None: off."""
    num_speculative_tokens: int = 1
    """Draft tokens per step with `speculative` (1 to 3; 2 and 3 reuse the one MTP layer)."""

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "kv_cache_tokens",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_waiting",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens: must hold at least one block ({self.block_size} tokens)")
        if self.speculative not in (None, "mtp"):
            raise ValueError(f"speculative: must be 'mtp' or None, got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 3:
            raise ValueError(f"num_speculative_tokens: must be in [1, 3], got {self.num_speculative_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")

    @property
    def num_blocks(self) -> int:
        """Blocks to allocate, the reserved padding block included."""
        return -(-self.kv_cache_tokens // self.block_size) + 1
