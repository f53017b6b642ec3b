"""`POST /admin/experts/rebalance` and `GET /admin/experts/map` over real HTTP on a server with two
local expert-rank processes (gloo).

The server starts on a map that is badly unbalanced for any spread-out load (seven experts on one
expert rank, one on the other), so the EPLB check the request runs strictly lowers the predicted
imbalance and the map changes; greedy fp32 outputs before, across (a rebalance requested while
requests stream) and after equal the single-process server's; the map endpoint shows the new map.
A server without expert ranks answers both routes 404 in OpenAI's error shape, and bad bodies 400
naming the parameter.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MAIN_SETTINGS

from moeserve.workers.model.config import ModelConfig
from moeserve.workers.parallel.settings import EPSettings
from moeserve.workers.server.app import BackgroundServer, local_loader
from moeserve.workers.server.local_ranks import ep_loader
from moeserve.workers.server.openai_api.routes import HTTPOptions

pytestmark = pytest.mark.integration
PROMPTS = [list(range(3, 8)), list(range(20, 37)), list(range(40, 73)), [9], list(range(100, 120))]
HTTP_TIMEOUT_S = 300.0  # generous: a busy 2-core machine, and a check waits for the step in flight
CHECK_TIMEOUT_S = 240.0


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def rebalance(port: int) -> dict[str, Any]:
    status, answer = call(
        port, "POST", "/admin/experts/rebalance", json.dumps({"timeout_s": CHECK_TIMEOUT_S}).encode()
    )
    assert status == 200, answer
    (instance,) = answer["instances"]
    return instance  # type: ignore[no-any-return]


def completions(port: int) -> list[str]:
    def one(prompt: list[int]) -> str:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0}
        status, answer = call(port, "POST", "/v1/completions", json.dumps(body).encode())
        assert status == 200, answer
        return answer["choices"][0]["text"]  # type: ignore[no-any-return]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def http_port(server: BackgroundServer) -> int:
    assert server.server is not None and server.server.http_port
    return server.server.http_port


@pytest.fixture(scope="module")
def reference(serving_checkpoint: Path) -> list[str]:
    loader = local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)
    with BackgroundServer(loader, http=HTTPOptions(0)) as server:
        return completions(http_port(server))


def test_a_requested_rebalance_changes_a_skewed_map_and_keeps_outputs(
    serving_checkpoint: Path, reference: list[str]
) -> None:
    n = ModelConfig.from_file(serving_checkpoint).n_routed_experts
    skewed = (tuple(range(n - 1)), (n - 1,))  # 7 of 8 experts on expert rank 0
    ep = EPSettings(1, 2, 10.0, startup_timeout_s=120, placement=skewed, rebalance_min_gain=0.0)
    with BackgroundServer(
        ep_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS, ep), http=HTTPOptions(0)
    ) as s:
        port = http_port(s)
        status, answer = call(port, "GET", "/admin/experts/map")
        assert status == 200, answer
        (start,) = answer["instances"]
        assert start["instance"] == "local" and start["checks"] == 0 and start["interval"] == 0
        assert all(layer["ranks"] == [list(r) for r in skewed] for layer in start["layers"])
        assert all(layer["imbalance"] is None for layer in start["layers"])  # no check yet

        assert completions(port) == reference
        done = rebalance(port)  # the window: every token routed above
        assert done["changed"] is True and done["rebalances"] == 1 and done["checks"] == 1
        moved = [layer for layer in done["layers"] if layer["ranks"] != [list(r) for r in skewed]]
        assert moved, done
        for layer in moved:  # taken only because it predicts less imbalance over the same window
            assert layer["imbalance"] < layer["imbalance_before"], layer
        idle = rebalance(port)  # nothing routed since: an empty window, no gain, no change
        assert idle["changed"] is False and (idle["rebalances"], idle["checks"]) == (1, 2)

        assert completions(port) == reference  # on the new map
        status, answer = call(port, "GET", "/admin/experts/map")
        assert status == 200, answer
        assert [layer["ranks"] for layer in answer["instances"][0]["layers"]] == [
            layer["ranks"] for layer in done["layers"]
        ]

        with ThreadPoolExecutor(1) as pool:  # a check between two steps of streaming requests
            during = pool.submit(rebalance, port)
            assert completions(port) == reference
            assert during.result()["checks"] == 3


def test_bad_rebalance_bodies_are_400s_naming_the_parameter(serving_checkpoint: Path) -> None:
    ep = EPSettings(1, 2, 10.0, startup_timeout_s=120)
    with BackgroundServer(
        ep_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS, ep), http=HTTPOptions(0)
    ) as s:
        port = http_port(s)
        for body, param in [
            (b'{"timeout_s": 0}', "timeout_s"),
            (b'{"timeout_s": true}', "timeout_s"),
            (b'{"timeout_s": 601}', "timeout_s"),
            (b'{"wait": 1}', "wait"),
            (b"[1]", None),
            (b"{not json", None),
        ]:
            status, answer = call(port, "POST", "/admin/experts/rebalance", body)
            assert status == 400, (body, answer)
            assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
        status, answer = call(port, "POST", "/admin/experts/rebalance", b"")  # no body: the default wait
        assert status == 200 and answer["instances"][0]["checks"] == 1, answer


def test_a_server_without_expert_ranks_says_the_routes_need_them(serving_checkpoint: Path) -> None:
    loader = local_loader(serving_checkpoint, torch.float32, MAIN_SETTINGS)
    with BackgroundServer(loader, http=HTTPOptions(0)) as server:
        port = http_port(server)
        for method, path in [("GET", "/admin/experts/map"), ("POST", "/admin/experts/rebalance")]:
            status, answer = call(port, method, path, b"{}" if method == "POST" else None)
            assert status == 404, answer
            error = answer["error"]
            assert error["code"] == "no_expert_ranks" and error["type"] == "not_found_error"
            assert "--expert-ranks" in error["message"]
