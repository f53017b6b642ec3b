"""MTP speculative decoding in the engine: draft K tokens with the MTP layer, verify them in one step.

Per engine step (all through the runner, one batch each):
1. the main model runs every scheduled chunk; a decoding request feeds its last token plus its K'
   drafts (K' <= K), each new token attending on the absorbed decode path with its own causal
   context, and the step returns hidden states of all new tokens;
2. drafts are verified (`accept_greedy`: identical to greedy decoding; `accept_sampled`: the
   standard speculative rejection sampling of Leviathan et al. / Chen et al., so the output follows
   the model's distribution after temperature, top-k and top-p): a drafts accepted, one token more
   (the correction, or the bonus when all pass); only the accepted positions count as computed, so
   the rejected tokens' latent KV (main layers and the MTP layer alike) is rolled back by the
   sequence's token count and overwritten by the next step;
3. the MTP layer runs on every position the main model has just computed (hidden h_i with the next
   token t_{i+1}), so its own cache keeps pace with the main layers' (chunked prefill included), and
   its output at the last position drafts the next token; drafts 2..K reuse the layer on its own
   output (one single-token MTP step each).
A request's drafts are dropped when it is preempted (it recomputes everything, the MTP layer
included). This module knows nothing about requests' text, stops or streaming: the engine appends
the tokens it returns.
Legend: T tokens, S sequences, D hidden, V vocab, K draft tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moeserve.workers.engine.request import Request, SamplingParams
from moeserve.workers.engine.sampler import filtered_probs
from moeserve.workers.model.batch import SequenceStep

MAX_SPECULATIVE_TOKENS = 3
log = logging.getLogger(__name__)


class SpeculativeRunner(Protocol):
    """What speculation needs from a runner beyond `ModelRunner.step` (`LocalModelRunner` has it)."""

    @property
    def has_mtp(self) -> bool: ...

    def step_hidden(self, steps: list[SequenceStep]) -> torch.Tensor:
        """Run the main model; final-normed hidden states [T, D] of every new token."""
        ...

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows [R, D] of `step_hidden` -> logits [R, V] fp32 on the CPU."""
        ...

    def mtp_step(self, steps: list[SequenceStep], previous_hidden: torch.Tensor) -> torch.Tensor:
        """Run the MTP layer (new tokens = the next tokens); its output h' [T, D]."""
        ...

    def mtp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows [R, D] of `mtp_step` -> draft logits [R, V] fp32 on the CPU."""
        ...


@dataclass
class SpeculativeStats:
    """Draft tokens proposed and accepted so far, by draft position (0 = the first draft)."""

    proposed: list[int] = field(default_factory=lambda: [0] * MAX_SPECULATIVE_TOKENS)
    accepted: list[int] = field(default_factory=lambda: [0] * MAX_SPECULATIVE_TOKENS)

    @property
    def num_proposed(self) -> int:
        return sum(self.proposed)

    @property
    def num_accepted(self) -> int:
        return sum(self.accepted)

    def acceptance_rate(self, position: int | None = None) -> float:
        """Accepted / proposed at one draft position, or over all; 0 before any draft."""
        p = self.num_proposed if position is None else self.proposed[position]
        a = self.num_accepted if position is None else self.accepted[position]
        return a / p if p else 0.0

    def record(self, proposed: int, accepted: int) -> None:
        for i in range(proposed):
            self.proposed[i] += 1
            self.accepted[i] += int(i < accepted)


def accept_greedy(target_ids: list[int], drafts: list[int]) -> list[int]:
    """target_ids [k+1]: the model's argmax at the last token and after each draft. The accepted
    drafts, then the model's own token where the first draft differs (or the bonus after all k)."""
    out: list[int] = []
    for target, draft in zip(target_ids, drafts, strict=False):
        out.append(target)
        if target != draft:
            return out
    out.append(target_ids[len(drafts)])
    return out


def accept_sampled(
    target_logits: torch.Tensor,
    drafts: list[int],
    draft_probs: list[torch.Tensor],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative rejection sampling. target_logits [k+1, V] raw; draft i was drawn from
    draft_probs[i] [V]. Draft i is kept with probability min(1, p(d)/q(d)); the first rejected one is
    replaced by a draw from norm(max(p - q, 0)); if all are kept, one more token is drawn from the
    last row. Each emitted token then follows p, the filtered target distribution."""
    out: list[int] = []
    for i, (draft, q) in enumerate(zip(drafts, draft_probs, strict=True)):
        p = filtered_probs(target_logits[i], params)  # [V]
        u = float(torch.rand((), generator=generator))
        if u * float(q[draft]) < float(p[draft]):  # u < p/q without dividing
            out.append(draft)
            continue
        residual = (p - q).clamp_(min=0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p  # p == q where q has mass: p itself
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    p = filtered_probs(target_logits[len(drafts)], params)
    out.append(int(torch.multinomial(p, 1, generator=generator)))
    return out


def draft_from(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, torch.Tensor | None]:
    """One draft token from MTP logits [V]: greedy requests take the argmax (no probabilities
    needed), sampled ones draw from q = the same filtering applied to the draft logits."""
    if params.greedy:
        return int(logits.argmax()), None
    q = filtered_probs(logits, params)
    return int(torch.multinomial(q, 1, generator=generator)), q


@dataclass
class ChunkPlan:
    """One scheduled request in a speculative step: where its rows are and what it fed."""

    request: Request
    cached: int  # tokens in the cache before the step
    base: int  # tokens of prompt/output fed (the rest of the chunk are drafts)
    drafts: list[int]
    start: int  # its first row in the step's flattened tokens
    computed: int = 0  # positions the step leaves valid (base + accepted drafts)
    tokens: list[int] = field(default_factory=list)  # tokens to append, in order
    rows: list[int] = field(default_factory=list)  # logits rows of `tokens`' distributions
    error: str = ""  # verification failed for this request alone (the engine aborts it)


class MTPSpeculator:
    """The engine's speculative decoding with an MTP layer (`--speculative mtp`)."""

    def __init__(self, runner: SpeculativeRunner, num_speculative_tokens: int = 1):
        if not 1 <= num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens: must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                f"got {num_speculative_tokens}"
            )
        self.runner = runner
        self.k = num_speculative_tokens
        self.stats = SpeculativeStats()

    @property
    def lookahead(self) -> int:
        """Cache slots a request needs beyond its verified tokens: drafts 2..K write the MTP layer's
        cache past them."""
        return self.k - 1

    def plan(
        self, chunks: list[tuple[Request, int]], preempted: list[Request]
    ) -> tuple[list[ChunkPlan], list[SequenceStep]]:
        """The main model's input of one step: each chunk's tokens, drafts cut to its budget."""
        for request in preempted:  # recomputes from scratch: its drafts' context is gone
            request.draft_ids, request.draft_probs = [], []
        plans: list[ChunkPlan] = []
        steps: list[SequenceStep] = []
        start = 0
        for request, n in chunks:
            base = min(n, request.num_uncomputed)
            drafts = request.draft_ids[: n - base] if base == request.num_uncomputed else []
            request.draft_ids, request.draft_probs = [], request.draft_probs[: len(drafts)]
            c = request.num_computed
            ids = request.token_slice(c, c + base) + drafts
            verify = bool(drafts)
            steps.append(SequenceStep(ids, c, request.blocks.blocks, decode_each=verify))
            plans.append(ChunkPlan(request, c, base, drafts, start))
            start += len(ids)
        return plans, steps

    def verify(self, plans: list[ChunkPlan], hidden: torch.Tensor) -> torch.Tensor | None:
        """Accept drafts for every chunk that samples; sets each plan's tokens and computed count
        and the requests' token counts. Returns the logits of the sampled rows (for logprobs)."""
        rows: list[int] = []
        for cp in plans:
            cp.computed = cp.base
            if cp.request.num_uncomputed - cp.base == 0:  # prompt (and output so far) all cached
                first = cp.start + cp.base - 1
                cp.rows = list(range(len(rows), len(rows) + len(cp.drafts) + 1))
                rows.extend(range(first, first + len(cp.drafts) + 1))
        if not rows:
            for cp in plans:
                cp.request.blocks.num_tokens += cp.computed
            return None
        logits = self.runner.head_logits(hidden[torch.tensor(rows, device=hidden.device)])  # [R, V]
        greedy = logits.argmax(dim=-1).tolist()
        for cp in plans:
            if cp.rows:
                request = cp.request
                try:
                    if request.sampling.greedy:
                        cp.tokens = accept_greedy([greedy[r] for r in cp.rows], cp.drafts)
                    else:
                        cp.tokens = accept_sampled(
                            logits[cp.rows],
                            cp.drafts,
                            request.draft_probs,
                            request.sampling,
                            request.generator,
                        )
                except Exception as e:  # noqa: BLE001 - one request's sampling fails that request alone
                    cp.error, cp.tokens, cp.rows = f"{type(e).__name__}: {str(e)[:200]}", [], []
                    continue
                accepted = len(cp.tokens) - 1
                cp.computed += accepted
                cp.rows = cp.rows[: len(cp.tokens)]
                if cp.drafts:
                    self.stats.record(len(cp.drafts), accepted)
                request.draft_probs = []
            cp.request.blocks.num_tokens += cp.computed
        return logits

    def propose(self, plans: list[ChunkPlan], hidden: torch.Tensor, room: dict[int, int]) -> None:
        """Run the MTP layer over what each live chunk computed, then draft for decoding requests.
        `room[key]`: tokens the request may still generate (only live requests are in it)."""
        live = [cp for cp in plans if cp.request.key in room and cp.computed > 0]
        if not live:
            return
        steps = []
        rows: list[int] = []
        for cp in live:
            r = cp.request
            ids = r.token_slice(cp.cached + 1, cp.cached + cp.computed + 1)  # the next tokens
            steps.append(SequenceStep(ids, cp.cached, r.blocks.blocks, decode_each=bool(cp.drafts)))
            rows.extend(range(cp.start, cp.start + cp.computed))
        out = self.runner.mtp_step(steps, hidden[torch.tensor(rows, device=hidden.device)])  # [T', D]
        ends = torch.tensor(_cumsum([cp.computed for cp in live]), device=out.device) - 1
        last = out[ends]  # [S', D] the MTP output at each sequence's last computed position
        drafting = [
            i for i, cp in enumerate(live) if cp.request.num_uncomputed == 1 and room[cp.request.key] > 1
        ]
        if not drafting:
            return
        counts = {i: min(self.k, room[live[i].request.key] - 1) for i in drafting}
        h = last[torch.tensor(drafting, device=last.device)]  # [S'', D]
        for j in range(max(counts.values())):
            if j > 0:  # drafts 2..K: the layer again, on its own output and the previous draft
                h = self.runner.mtp_step(
                    [
                        SequenceStep(
                            [live[i].request.draft_ids[-1]],
                            live[i].request.num_computed + j - 1,
                            live[i].request.blocks.blocks,
                        )
                        for i in drafting
                    ],
                    h,
                )
            logits = self.runner.mtp_logits(h)  # [S'', V]
            for row, i in enumerate(drafting):
                request = live[i].request
                try:
                    token, q = draft_from(logits[row], request.sampling, request.generator)
                except Exception:  # noqa: BLE001 - bad draft logits: this request decodes without drafts
                    log.exception(
                        "request %s: drafting failed; it goes on without drafts", request.request_id
                    )
                    request.draft_ids, request.draft_probs, counts[i] = [], [], 0
                    continue
                request.draft_ids.append(token)
                if q is not None:
                    request.draft_probs.append(q)
            still = [row for row, i in enumerate(drafting) if counts[i] > j + 1]
            drafting = [drafting[row] for row in still]
            if not drafting:
                return
            h = h[torch.tensor(still, device=h.device)]


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
