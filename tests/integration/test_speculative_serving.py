"""`--speculative mtp` with expert ranks: the attention ranks hold the MTP layer, its routed experts
live on the expert ranks and go through the same all-to-all every step (K passes). Greedy outputs
equal the single-process server's without speculation, drafts are accepted (the embedded model's
trained MTP layer) and the acceptance counters reach the metrics."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import MAIN_SETTINGS
from serving_support import scrape, wait_until

from moeserve.v1 import inference_pb2 as pb
from moeserve.workers.cli.main import default_model_path
from moeserve.workers.client import InferenceClient, build_request
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import ep_loader

pytestmark = pytest.mark.integration
TIMEOUT_S = 20.0  # collective timeout of the expert-parallel worlds here
METRICS_WAIT_S = 60.0  # the ranks report metrics every METRICS_PERIOD_S; generous on a busy host
PROMPTS = [
    "import os\nimport sys\n\n\ndef main():\n    ",
    "class Parser:\n    def __init__(self, text):\n",
    "def read(path):\n    with open(path) as f:\n",
]


def requests() -> list[pb.GenerateRequest]:
    text = [
        build_request(p, None, max_tokens=20 + 3 * i, temperature=0.0, request_id=f"t-{i}")
        for i, p in enumerate(PROMPTS)
    ]
    ids = [build_request(None, [5, 9, 200, 31], max_tokens=1, temperature=0.0, request_id="one-token")]
    return [*text, *ids]


def run(address: str, reqs: list[pb.GenerateRequest]) -> list[tuple]:
    with InferenceClient(address) as client, ThreadPoolExecutor(len(reqs)) as pool:
        done = list(pool.map(client.generate, reqs))
    return [(c.token_ids, c.finish_reason) for c in done]


@pytest.fixture(scope="module")
def model() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def reference(model: Path) -> list[tuple]:
    # fp32: verifying drafts in one step is exact only where rounding does not depend on the step's shape
    with BackgroundServer(local_loader(model, torch.float32, MAIN_SETTINGS)) as server:
        return run(server.address, requests())


@pytest.fixture(scope="module", params=[(1, 2, 2), (2, 1, 1)], ids=["A1-E2-K2", "A2-E1-K1"])
def server(request: pytest.FixtureRequest, model: Path) -> Iterator[BackgroundServer]:
    attention, expert, k = request.param
    settings = replace(MAIN_SETTINGS, speculative="mtp", num_speculative_tokens=k)
    ep = EPSettings(attention, expert, collective_timeout_s=TIMEOUT_S, startup_timeout_s=120)
    with BackgroundServer(ep_loader(model, torch.float32, settings, ep)) as s:
        yield s


def test_greedy_outputs_with_mtp_drafts_equal_plain_decoding(
    server: BackgroundServer, reference: list[tuple]
) -> None:
    assert run(server.address, requests()) == reference
    # a second round reuses the warm ranks (and their prefix caches) and still agrees
    assert run(server.address, requests()) == reference


def test_drafts_are_accepted_and_counted(server: BackgroundServer) -> None:
    run(server.address, requests()[:1])
    draft = 'moeserve_spec_draft_tokens_total{position="0"}'
    accepted = 'moeserve_spec_accepted_tokens_total{position="0"}'
    wait_until(lambda: scrape(server).get(draft, 0) > 0, METRICS_WAIT_S)
    values = scrape(server)
    # the embedded model's MTP layer was trained: most first drafts hold (0.9 here; 0.3 is a loose floor)
    assert values[accepted] >= 0.3 * values[draft], values
    # its MoE went through the expert ranks: the MTP layer (index num_hidden_layers) routed tokens
    mtp_layer = 4
    routed = sum(
        v
        for k, v in values.items()
        if k.startswith('moeserve_expert_tokens_total{expert="') and f'layer="{mtp_layer}"' in k
    )
    assert routed > 0, values
