"""Helpers for serving tests: scrape a server's metrics, wait for a condition, slow an engine down."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterable

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeserve.workers.model.batch import SequenceStep
from moeserve.workers.server.app import BackgroundServer, Loader
from moeserve.workers.server.metrics import ServingMetrics
from moeserve.workers.server.servicer import Backend


def scrape(server: BackgroundServer) -> dict[str, float]:
    """name{label="v",...} -> value, from the server's /metrics."""
    assert server.server is not None and server.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def drain_in_background(call: Iterable[object]) -> tuple[threading.Thread, list[grpc.RpcError]]:
    """Read a streaming call to its end on a started thread; the RpcError that ended it, if any,
    lands in the returned list."""
    errors: list[grpc.RpcError] = []

    def drain() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            errors.append(e)

    reader = threading.Thread(target=drain)
    reader.start()
    return reader, errors


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def slowed(loader: Loader, seconds_per_step: float) -> Loader:
    """A loader whose engine sleeps before every step, so tests can act while a request runs."""

    def load(metrics: ServingMetrics, on_failure: Callable[[BaseException], None]) -> Backend:
        backend = loader(metrics, on_failure)
        runner = backend.loop.engine.runner
        step = runner.step

        def slow_step(steps: list[SequenceStep]) -> torch.Tensor:
            time.sleep(seconds_per_step)
            return step(steps)

        runner.step = slow_step  # type: ignore[method-assign]
        return backend

    return load
