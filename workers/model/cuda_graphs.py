"""CUDA graphs of the decode step: one graph per batch-size bucket, replayed with new inputs.

A decode step at small batch launches well over a thousand small kernels; replaying a captured
graph launches them all at once. `Transformer.forward_decode` has static shapes and never reads
back to the host, so it is captured as is: per bucket (1, 2, 4, 8, 16, 32, ... up to `max_batch`)
one graph over fixed input buffers; a step of n <= bucket sequences copies its inputs into the
first n rows, pads the rest (token 0 at position 0 into the reserved padding block 0, context 1)
and replays. Graphs share one memory pool and are captured on first use, largest first when
`capture_all` runs. Prefill and mixed steps, steps wider than the largest bucket or than the
buffers' block tables, and expert parallelism (its all-to-all splits depend on the routing) stay
eager: `decode` returns None for them.
On other devices the same buckets and padding run `forward_decode` eagerly (no graphs there): the
CPU tests and the device check's rehearsal exercise everything but the capture itself.
This module knows nothing of scheduling or sampling.
Legend: B bucket rows, n sequences of the step, nb blocks per table, V vocab.
"""

from __future__ import annotations

import torch

from moeserve.workers.kernels.mla_decode import num_splits
from moeserve.workers.model.batch import DecodeInputs, ForwardBatch
from moeserve.workers.model.kv_cache import PagedLatentCache
from moeserve.workers.model.transformer import Transformer

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The default buckets below max_batch, and max_batch itself."""
    return tuple(sorted({b for b in DEFAULT_BUCKETS if b < max_batch} | {max_batch}))


class CudaGraphDecoder:
    """Captures and replays `model.forward_decode` over `cache` for batch-size buckets (on CUDA)."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedLatentCache,
        max_batch: int,
        max_context: int,
        buckets: tuple[int, ...] | None = None,
    ):
        self.model = model
        self.cache = cache
        self.buckets = buckets or buckets_up_to(max_batch)
        self.max_context = max_context
        self.max_blocks = -(-max_context // cache.block_size)
        b, device = self.buckets[-1], model.device
        self._inputs = DecodeInputs(
            input_ids=torch.zeros(b, dtype=torch.long, device=device),
            positions=torch.zeros(b, dtype=torch.long, device=device),
            slots=torch.zeros(b, dtype=torch.long, device=device),
            block_tables=torch.zeros(b, self.max_blocks, dtype=torch.long, device=device),
            context_lens=torch.ones(b, dtype=torch.long, device=device),
        )
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graphs = model.device.type == "cuda"
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        model.prepare_decode()

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def decode(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Logits [n, V] fp32 of a decode-only step through its bucket's graph; None when the step
        is not one a graph can take (the caller runs it eagerly)."""
        n = batch.num_seqs
        bucket = self.bucket_for(n)
        width = batch.decode_block_tables.shape[1] if n else 0
        if not batch.all_decode or bucket is None or width > self.max_blocks or n == 0:
            return None
        inp = self._inputs
        inp.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        inp.positions[:n].copy_(batch.positions, non_blocking=True)
        inp.slots[:n].copy_(batch.slots, non_blocking=True)
        inp.block_tables[:n, :width].copy_(batch.decode_block_tables, non_blocking=True)
        inp.context_lens[:n].copy_(batch.decode_context, non_blocking=True)
        self._pad(n, bucket)
        if not self.graphs:
            with torch.inference_mode():
                return self.model.forward_decode(self._view(bucket), self.cache, self._splits(bucket))[:n]
        graph, logits = self._graphs.get(bucket) or self._capture(bucket)
        graph.replay()
        return logits[:n].clone()

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (smaller graphs then reuse its pool memory)."""
        if not self.graphs:
            return
        for bucket in sorted(self.buckets, reverse=True):
            if bucket not in self._graphs:
                self._capture(bucket)

    def _pad(self, start: int, end: int) -> None:
        inp = self._inputs
        for t in (inp.input_ids, inp.positions, inp.slots):
            t[start:end].zero_()
        inp.block_tables[start:end].zero_()
        inp.context_lens[start:end].fill_(1)

    def _splits(self, bucket: int) -> int:
        return num_splits(bucket, self.model.config.num_attention_heads, self.max_context)

    def _view(self, bucket: int) -> DecodeInputs:
        inp = self._inputs
        return DecodeInputs(
            inp.input_ids[:bucket],
            inp.positions[:bucket],
            inp.slots[:bucket],
            inp.block_tables[:bucket],
            inp.context_lens[:bucket],
        )

    @torch.inference_mode()
    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = self._view(bucket)
        splits = self._splits(bucket)
        # slot 0 of the padding block: what capture-time runs write to the cache is never read
        saved = inputs.slots.clone()
        inputs.slots.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile the kernels and warm cuBLAS outside the capture
            for _ in range(2):
                self.model.forward_decode(inputs, self.cache, splits)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.forward_decode(inputs, self.cache, splits)
        inputs.slots.copy_(saved)
        self._graphs[bucket] = (graph, logits)
        return graph, logits
