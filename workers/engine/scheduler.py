"""Which requests run in the next step, and how many tokens each feeds.

Policy (first come, first served):
1. Requests already running go first, in admission order: one token each when decoding, a chunk of
   their remaining prompt when prefilling, all under the step's token budget. When the KV cache has
   no block for one of them, the most recently admitted running request is preempted (its blocks are
   freed; it goes back to the front of the queue and later recomputes its prompt and output so far).
2. If nothing was preempted, waiting requests are admitted while the budget, the batch size and the
   free blocks allow: a request is admitted only when its first chunk's blocks are free.
Prefix caching (`prefix_cache.py`, on unless `EngineSettings.prefix_caching` is False): an admitted
request first adopts the cached blocks of its leading full blocks (never the block of its last
token), so only the rest is computed and counts against the budget; cached blocks nobody uses count
as free (allocating evicts them, least recently used first). Computed full blocks enter the cache at
the start of the next schedule, and before a finished, aborted or preempted request lets go of them,
so a preempted request finds its own blocks again when it is readmitted.
The scheduler reserves blocks; it never runs the model or samples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeserve.engine_settings import EngineSettings
from moeserve.workers.engine.prefix_cache import PrefixCache
from moeserve.workers.engine.request import Request
from moeserve.workers.model.kv_cache import BlockAllocator, OutOfBlocks


@dataclass
class Schedule:
    """One step's plan: (request, new tokens) pairs, and who was preempted to make room."""

    chunks: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, settings: EngineSettings, allocator: BlockAllocator, cache_salt: bytes = b""):
        self.settings = settings
        self.allocator = allocator
        self.prefix = PrefixCache(allocator, settings.prefix_caching, cache_salt)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished or aborted) and free its blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.prefix.commit(request)
        request.blocks.release(self.allocator)

    def schedule(self) -> Schedule:
        plan = Schedule()
        for request in self.running:  # blocks the last step completed enter the cache
            self.prefix.commit(request)
        budget = self.settings.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_wanted, budget)
            if not self._reserve_or_preempt(request, n + request.lookahead, plan):
                break  # the request itself was preempted: nothing after it can run either
            plan.chunks.append((request, n))
            budget -= n
            i += 1
        if plan.preempted:
            return plan
        while self.waiting and budget > 0 and len(self.running) < self.settings.max_num_seqs:
            request = self.waiting[0]
            request.blocks.adopt(self.allocator, self.prefix.match(request))  # cached leading blocks
            n = min(request.num_uncomputed, budget)
            if request.blocks.blocks_needed(n + request.lookahead) > self.allocator.num_free:
                request.blocks.release(self.allocator)  # not admitted: the adopted blocks go back
                break
            request.blocks.reserve(self.allocator, n + request.lookahead)
            self.prefix.record_admission(request)
            self.waiting.popleft()
            self.running.append(request)
            request.admitted = True
            plan.chunks.append((request, n))
            budget -= n
        return plan

    def _reserve_or_preempt(self, request: Request, n: int, plan: Schedule) -> bool:
        while True:
            try:
                request.blocks.reserve(self.allocator, n)
                return True
            except OutOfBlocks:
                victim = self.running.pop()
                self.prefix.commit(victim)  # its computed blocks stay cached: readmitted, it finds them
                victim.blocks.release(self.allocator)
                victim.num_preemptions += 1
                self.waiting.appendleft(victim)
                plan.preempted.append(victim)
                if victim is request:
                    return False
