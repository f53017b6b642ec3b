"""The main loop of one local rank process behind `server.local_ranks.EPFrontend`, and its messages.

The front end talks to each attention rank through two multiprocessing queues:
- inbox (front end -> rank): ("submit", key, prompt_ids, params, deadline), ("abort", key),
  ("stats",), ("stop",);
- outbox (every rank -> front end): ("ready" | "out" | "stats" | "metrics" | "stopped" | "error",
  rank, payload), where "out" carries (key, RequestOutput) and "metrics" (EngineEvents, RankGauges),
  sent every `METRICS_PERIOD_S`.
Expert ranks have no inbox: they serve the lockstep until the world stops. Any failure is reported as
"error" with a one-line message and the process exits non-zero.
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any

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
