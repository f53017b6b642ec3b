"""Redundant experts and online rebalancing over real local processes (gloo).

With R redundant slots, and across a rebalance done mid-generation (weights copied rank to rank
between two steps), fp32 greedy tokens equal the single-process model's (whose outputs the R = 0
world matches, `test_expert_parallel`), logits within 1e-5; bad settings start no process (and the
CLI exits 2 naming the flag).
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import MAIN_SETTINGS
from serving_support import scrape, wait_until

from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.model.config import ModelConfig
from moeserve.workers.model.loader import load_model
from moeserve.workers.offline.generate import GenerationSettings, generate_lockstep
from moeserve.workers.offline.local_world import LocalWorld, launch_local
from moeserve.workers.offline.rank import Run
from moeserve.workers.parallel.placement import PlacementError
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import ep_loader

pytestmark = pytest.mark.integration

PROMPTS = [list(range(10, 15)), list(range(30, 47)), list(range(60, 93)), [7, 8, 9]]
SETTINGS = GenerationSettings(max_tokens=8)


@pytest.mark.parametrize(
    "name, a, e, redundant",
    [("v3", 1, 2, 2), ("v2_lite", 2, 3, 1)],
    ids=["v3-1x2-R2", "v2_lite-2x3-R1"],
)
def test_redundant_experts_and_a_rebalance_mid_generation_keep_outputs(
    name: str, a: int, e: int, redundant: int, reference_checkpoints
) -> None:
    path = reference_checkpoints[name]
    model = load_model(path)
    ref = generate_lockstep(model, PROMPTS, SETTINGS, model.local_executor(), record_logits=True)
    round_robin = [list(range(r, len(PROMPTS), a)) for r in range(a)]
    prompts = tuple([PROMPTS[i] for i in ids] for ids in round_robin)
    # run 0: rebalance after step 3 of 8 (prefill + 7 decode steps); run 1: the same with ping-pong
    settings = EPSettings(a, e, redundant_experts=redundant, rebalance_interval=3, rebalance_min_gain=0.0)
    results = launch_local(
        path, settings, [Run(prompts, SETTINGS, False, True), Run(prompts, SETTINGS, True, True)]
    )

    for run in range(2):
        for rank, indices in enumerate(round_robin):
            for j, i in enumerate(indices):
                assert results[rank].token_ids[run][j] == ref.token_ids[i], (run, i)
                diff = (results[rank].logits[run][j] - ref.logits[i]).abs().max().item()
                assert diff <= 1e-5, (run, i, diff)
        assert len({r.stats[run]["rebalances"] for r in results}) == 1  # every rank switched together
        assert results[0].stats[run]["rebalances"] >= 1
    start = settings.expert_placement(ModelConfig.from_file(path))
    assert sum(start.slots_per_rank) == ModelConfig.from_file(path).n_routed_experts + redundant
    experts = [r for r in results if r.role == "expert"]
    moved = [
        layer
        for layer in experts[0].stats[0]["expert_ids"]
        if [r.stats[0]["expert_ids"][layer] for r in experts] != [list(ids) for ids in start.ranks]
    ]
    assert moved  # the rebalance changed some layer's map
    for i, r in enumerate(experts):
        assert r.stats[0]["bytes_received"] > 0, i
        per_expert = r.weight_bytes // len(start.ranks[i])
        assert r.weight_bytes == per_expert * len(start.ranks[i])  # the start map's slots only


@pytest.mark.parametrize(
    "settings, message",
    [
        (EPSettings(1, 2, redundant_experts=9), "at most 8 fit"),
        (EPSettings(1, 1, redundant_experts=1), "at most 0 fit"),
        (EPSettings(1, 2, redundant_experts=-1), "must be >= 0"),
        (
            EPSettings(1, 2, placement=((0, 1, 2, 3, 4), (4, 5, 6, 0, 1)), redundant_experts=2),
            "expert(s) [7] are hosted by no rank",
        ),
        (EPSettings(1, 2, placement=((0, 1, 2, 3, 3), (4, 5, 6, 7)), redundant_experts=1), "twice on rank 0"),
        (EPSettings(1, 2, placement=((0, 1, 2, 3, 4), (4, 5, 6, 7)), redundant_experts=2), "need 10"),
        (EPSettings(1, 2, rebalance_interval=-1), "rebalance interval"),
        (EPSettings(1, 3, expert_nodes=2), "do not split evenly"),
    ],
)
def test_invalid_redundancy_settings_start_no_process(
    settings: EPSettings, message: str, reference_checkpoints
) -> None:
    with pytest.raises(
        PlacementError,
        match=re.escape(message),
    ):
        LocalWorld(reference_checkpoints["v2_lite"], settings, [Run(([[1, 2]],))])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["generate", "--prompt-ids", "1,2", "--expert-ranks", "2", "--redundant-experts", "9"],
            "at most 8 fit",
        ),
        (["serve", "--expert-ranks", "2", "--redundant-experts", "9", "--port", "0"], "at most 8 fit"),
    ],
)
def test_cli_rejects_bad_redundancy_before_start(
    args: list[str], message: str, reference_checkpoints
) -> None:
    model = str(reference_checkpoints["v2_lite"])
    done = subprocess.run(
        [sys.executable, "-m", "moeserve.workers.cli.main", *args, "--model", model],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_serving_rebalances_online_with_unchanged_outputs_and_reports_it(serving_checkpoint) -> None:
    """`moeserve serve --expert-ranks 2 --redundant-experts 2 --rebalance-interval 2`: greedy outputs
    equal the single-process server's while maps change between steps; /metrics shows the balance."""
    prompts = [list(range(3, 8)), list(range(20, 37)), list(range(40, 73)), [9], list(range(100, 120))]
    requests = [build_request(None, p, max_tokens=8, temperature=0.0) for p in prompts]

    def outputs(server: BackgroundServer) -> list[list[int]]:
        with InferenceClient(server.address) as client, ThreadPoolExecutor(len(requests)) as pool:
            return [c.token_ids for c in pool.map(client.generate, requests)]

    with BackgroundServer(local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)) as single:
        reference = outputs(single)
    ep = EPSettings(
        1, 2, 10.0, startup_timeout_s=120, redundant_experts=2, rebalance_interval=2, rebalance_min_gain=0.0
    )
    with BackgroundServer(ep_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS, ep)) as server:
        assert outputs(server) == reference
        wait_until(lambda: scrape(server).get("moeserve_expert_rebalances_total", 0) >= 1, timeout=15)
        assert outputs(server) == reference  # again, on the rebalanced map
        values = scrape(server)
    rows = [v for k, v in values.items() if k.startswith("moeserve_expert_rank_tokens{")]
    assert len(rows) == 2 and sum(rows) > 0  # one attention rank x two expert ranks, last step
    assert values["moeserve_expert_rank_imbalance"] >= 1.0
    hosted = [k for k in values if k.startswith("moeserve_expert_map{") and 'layer="1"' in k]
    assert len(hosted) == 8 + 2  # every slot of the map: 8 experts + 2 redundant
