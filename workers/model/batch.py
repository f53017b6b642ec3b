"""One forward step's token batch: many sequences flattened into T tokens, plus paging metadata.

A sequence contributes its new tokens (a whole prompt, a prefill chunk or one decode token) on top
of `cached` tokens already in the latent cache. This module computes positions, cache slots and the
split between prefill sequences (naive MLA) and decode sequences (absorbed MLA); it runs no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceStep:
    """What one sequence feeds to a step."""

    new_token_ids: list[int]
    cached: int  # tokens of this sequence already in the cache
    block_table: list[int]  # must cover cached + len(new_token_ids) tokens
    decode_each: bool = False  # every new token takes the absorbed decode path with its own causal
    # context (speculative verification: a few tokens over a long context, no expansion)


@dataclass(frozen=True)
class DecodeInputs:
    """A decode step as fixed-shape tensors (one token per sequence, B rows, padding included), all
    the model reads in `Transformer.forward_decode`: no Python lists, nothing the host must read.
    A padding row feeds token 0 at position 0 to slot 0 (block 0 is the reserved padding block)
    with a context of 1."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slots: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, nb] int64; entries past a context are never read
    context_lens: torch.Tensor  # [B] int64, the new token included


@dataclass
class ForwardBatch:
    """Flattened inputs of a step. Dimension letters: T tokens, S sequences, B decode sequences."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64, flat cache row per token
    starts: list[int]  # [S] offset of each sequence's first new token
    lengths: list[int]  # [S] new tokens per sequence
    cached: list[int]  # [S] tokens cached before this step
    block_tables: list[torch.Tensor]  # [S] each [nb_s] int64
    decode_rows: torch.Tensor  # [B] token rows of single-token sequences (absorbed path)
    decode_block_tables: torch.Tensor  # [B, nb_max] int64, padded with block 0
    decode_context: torch.Tensor  # [B] context length including the new token
    decode_padding: torch.Tensor  # [B, 1, L] bool, True past each context (L = nb_max * block_size)
    prefill_seqs: list[int]  # sequence indices that take the naive path
    rope_tables: torch.Tensor | None = None  # cos + i·sin at `positions` [T, 1, R/2], once per step

    @property
    def all_decode(self) -> bool:
        """Every sequence feeds one token, in order: decode rows are all rows."""
        return not self.prefill_seqs and self.decode_rows.numel() == self.num_tokens

    def decode_inputs(self) -> DecodeInputs:
        """This step as `DecodeInputs` (every sequence must be a decode sequence)."""
        if not self.all_decode:
            raise ValueError("decode_inputs needs a step of single-token sequences only")
        return DecodeInputs(
            self.input_ids, self.positions, self.slots, self.decode_block_tables, self.decode_context
        )

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    @property
    def last_token_rows(self) -> torch.Tensor:
        """[S] row of each sequence's last new token (where its next-token logits come from)."""
        rows = [s + n - 1 for s, n in zip(self.starts, self.lengths, strict=True)]
        return torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

    @classmethod
    def build(
        cls, steps: list[SequenceStep], block_size: int, device: str | torch.device = "cpu"
    ) -> ForwardBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_context: list[int] = []
        prefill: list[int] = []
        for index, step in enumerate(steps):
            n = len(step.new_token_ids)
            if n == 0:
                raise ValueError(f"sequence {index} has no new tokens")
            end = step.cached + n
            if -(-end // block_size) > len(step.block_table):
                raise ValueError(f"sequence {index}: block table too short for {end} tokens")
            starts.append(len(ids))
            ids.extend(step.new_token_ids)
            for pos in range(step.cached, end):
                positions.append(pos)
                slots.append(step.block_table[pos // block_size] * block_size + pos % block_size)
            if n == 1 or step.decode_each:
                for j in range(n):  # row j sees the context up to and including itself
                    decode_rows.append(starts[-1] + j)
                    decode_tables.append(step.block_table[: -(-end // block_size)])
                    decode_context.append(step.cached + j + 1)
            else:
                prefill.append(index)
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]

        def longs(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            input_ids=longs(ids),
            positions=longs(positions),
            slots=longs(slots),
            starts=starts,
            lengths=[len(s.new_token_ids) for s in steps],
            cached=[s.cached for s in steps],
            block_tables=[
                longs(s.block_table[: -(-(s.cached + len(s.new_token_ids)) // block_size)]) for s in steps
            ],
            decode_rows=longs(decode_rows),
            decode_block_tables=longs(padded).view(len(padded), width),
            decode_context=longs(decode_context),
            decode_padding=(  # one mask per step, not per layer
                torch.arange(width * block_size, device=device)[None, None, :]
                >= longs(decode_context)[:, None, None]
            ),
            prefill_seqs=prefill,
        )
