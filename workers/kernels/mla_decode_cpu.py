"""The absorbed MLA decode on the CPU, read in place from the paged fp32 latent cache (AVX2 kernel).

The same contract as `mla_decode.paged_mla_decode` (its torch form, `paged_mla_decode_torch`, is the
reference): q [B, H, C + R] absorbed queries, one layer's cache [blocks, block_size, C + R], block
tables [B, nb], context lengths [B] -> [B, H, C], the softmax-weighted sum of each context's c_KV rows.
Why a kernel: torch's form gathers every context into a padded copy and reads it twice (scores,
then values), about 1.3 ms per layer at 2,048 tokens on a 2-core AVX2 host, a quarter of the step.
The kernel (`csrc/avx2_kernels.c`) reads each cached row once, through the block table, and splits
a long context between the threads (merged by log-sum-exp, as flash-decoding does).
Legend: B decode sequences, H heads, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import torch

from moeserve.workers.kernels import avx2

MAX_HEADS = 256  # the kernel's score buffer: heads x 32 rows on the stack


def supports(q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int) -> bool:
    """Whether the kernel takes these: fp32 on the CPU, C a multiple of 8, at most 256 heads."""
    return (
        avx2.available()
        and q.device.type == "cpu"
        and q.dtype == cache.dtype == torch.float32
        and kv_lora_rank % 8 == 0
        and q.shape[1] <= MAX_HEADS
    )


def paged_mla_decode_cpu(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    splits: int = 1,
) -> torch.Tensor:
    """See the module docstring; `splits` is accepted for `paged_mla_decode`'s signature (the
    kernel splits by its thread count)."""
    if not supports(q, cache, kv_lora_rank):
        raise ValueError(
            f"paged_mla_decode_cpu: needs fp32 CPU tensors, C % 8 == 0 and <= {MAX_HEADS} heads "
            f"({avx2.why_unavailable() or 'the kernel is available'}); got q {q.dtype} {list(q.shape)}, "
            f"cache {cache.dtype}, C {kv_lora_rank}"
        )
    b, heads, width = q.shape
    _, block_size, cache_width = cache.shape
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    if cache_width != width or tables.shape[0] != b or lens.shape != (b,):
        raise ValueError(
            f"paged_mla_decode_cpu: q {list(q.shape)}, cache {list(cache.shape)}, "
            f"tables {list(tables.shape)}, lens {list(lens.shape)} do not fit"
        )
    if b and (int(lens.min()) < 0 or int(lens.max()) > tables.shape[1] * block_size):
        raise ValueError(f"paged_mla_decode_cpu: context lengths {lens.tolist()} beyond the block tables")
    q = q.contiguous()
    cache = cache.contiguous()
    out = torch.empty(b, heads, kv_lora_rank, dtype=torch.float32)
    assert avx2.ext is not None
    avx2.ext.mla_decode(
        q.data_ptr(), b, heads, width, kv_lora_rank, float(scale), cache.data_ptr(), block_size,
        tables.data_ptr(), tables.shape[1], lens.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out
