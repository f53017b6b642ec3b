"""The main loop of one local rank process behind `server.local_ranks.EPFrontend`, and its messages.

The front end talks to each attention rank through two multiprocessing queues:
- inbox (front end -> rank): ("submit", key, prompt_ids, params, deadline), ("abort", key),
  ("stats",), ("expert_map", token), ("rebalance", token, timeout_s), ("stop",);
- outbox (every rank -> front end): ("ready" | "out" | "stats" | "metrics" | "answer" | "stopped" |
  "error", rank, payload), where "out" carries (key, RequestOutput), "metrics" (EngineEvents,
  RankGauges), sent every `METRICS_PERIOD_S`, and "answer" (token, result, error) for "expert_map"
  and "rebalance": error None, or (kind "timeout" | "unavailable", message) with result None.
  A rebalance waits for the check on a thread of its own, so the inbox keeps being served.
Expert ranks have no inbox: they serve the lockstep until the world stops. Any failure is reported as
"error" with a one-line message and the process exits non-zero.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from moeserve.workers.engine.loop import EngineStopped
from moeserve.workers.engine.observe import EventRecorder
from moeserve.workers.parallel.world import Rendezvous
from moeserve.workers.ranks.serving import AttentionRank, ServingRankSpec, join_world, run_expert_rank

METRICS_PERIOD_S = 0.5  # how often attention ranks report engine events and gauges


def rank_main(rank: int, rendezvous: Rendezvous, spec: ServingRankSpec, inbox: Any, outbox: Any) -> None:
    """Process entry of one rank; reports ("ready"|"out"|"stopped"|"error", rank, payload)."""
    name = spec.ep.layout.describe(rank)
    try:
        world = join_world(spec, rank, rendezvous.host, rendezvous.port, rendezvous.secret)
        if world.role == "expert":
            run_expert_rank(spec, world)
            outbox.put(("stopped", rank, None))
            return
        recorder = EventRecorder()
        ranker = AttentionRank(
            spec, world, lambda key, out: outbox.put(("out", rank, (key, out))), observer=recorder
        )
        ranker.start()
        outbox.put(("ready", rank, None))
        reported = 0.0
        while True:
            if time.monotonic() - reported >= METRICS_PERIOD_S:  # the front end's /metrics
                outbox.put(("metrics", rank, (recorder.drain(), ranker.gauges())))
                reported = time.monotonic()
            try:
                message = inbox.get(timeout=METRICS_PERIOD_S / 2)
            except queue.Empty:
                if ranker.loop.failure is not None:
                    raise ranker.loop.failure from None
                if not ranker.loop.alive:  # another rank stopped the world
                    message = ("stop",)
                else:
                    continue
            if message[0] == "submit":
                ranker.submit(*message[1:])
            elif message[0] == "abort":
                ranker.abort(message[1])
            elif message[0] == "stats":
                outbox.put(("stats", rank, ranker.stats()))
            elif message[0] == "expert_map":
                outbox.put(("answer", rank, (message[1], ranker.expert_map(), None)))
            elif message[0] == "rebalance":
                threading.Thread(
                    target=_rebalance, args=(ranker, rank, outbox, *message[1:]), daemon=True
                ).start()
            else:
                ranker.stop()
                outbox.put(("metrics", rank, (recorder.drain(), ranker.gauges())))
                outbox.put(("stopped", rank, None))
                return
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the process ends
        outbox.put(("error", rank, f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        outbox.close()
        outbox.join_thread()
        os._exit(1)


def _rebalance(ranker: AttentionRank, rank: int, outbox: Any, token: int, timeout_s: float) -> None:
    """Answer one "rebalance" once its check ran on every rank (or it timed out)."""
    try:
        outbox.put(("answer", rank, (token, ranker.request_rebalance(timeout_s), None)))
    except TimeoutError as e:
        outbox.put(("answer", rank, (token, None, ("timeout", str(e)))))
    except EngineStopped as e:
        outbox.put(("answer", rank, (token, None, ("unavailable", str(e)))))
