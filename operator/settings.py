"""The operator's settings: one dataclass, filled from the command line of `moeserve-operator`.

Only what an installation chooses (the Helm chart passes each as a flag). Kopf's own knobs that the
operator fixes (standalone, no cluster scanning, annotation storage) live in `main.py`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    """Namespaces whose MoEServices the operator serves (needs a Role in each). Default: none, which
    is only valid together with `cluster_wide`."""
    cluster_wide: bool = False
    """Serve MoEServices in every namespace (needs a ClusterRole). Default: False."""
    log_level: str = "INFO"
    """One of DEBUG, INFO, WARNING, ERROR. Default: INFO."""
    reconcile_interval_s: float = 30.0
    """Seconds between two level-based reconcile passes of one MoEService, on top of the passes that
    spec changes and pod events trigger. Default: 30."""
    dashboard_timeout_s: float = 5.0
    """Seconds for each request to a Ray dashboard (connecting included). Default: 5."""
    dashboard_retry_max_s: float = 60.0
    """Longest wait, in seconds, between attempts to reach a Ray dashboard that did not answer; the
    wait starts at 1 s and doubles. Default: 60."""
    dashboard_url_template: str = "http://{service}.{namespace}.svc:{port}"
    """Base URL of a head's Ray dashboard; `{service}` is the head Service, `{namespace}` and `{port}`
    (8265) as named. Override it to run the operator outside the cluster behind a port-forward or
    proxy. Default: the head Service's cluster DNS name."""
    model_retry_s: float = 60.0
    """Seconds a pod whose model check failed is kept (the status says ModelUnavailable and why)
    before its group restarts to check again. Default: 60."""
    liveness_endpoint: str | None = None
    """Kopf's liveness probe endpoint, e.g. http://0.0.0.0:8080/healthz. Default: none."""

    def __post_init__(self) -> None:
        if self.cluster_wide == bool(self.namespaces):
            raise ValueError("give either namespaces or cluster_wide, exactly one of them")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if (
            self.reconcile_interval_s <= 0
            or self.dashboard_timeout_s <= 0
            or self.dashboard_retry_max_s < 1
            or self.model_retry_s <= 0
        ):
            raise ValueError("intervals and timeouts must be positive (dashboard_retry_max_s >= 1)")

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> OperatorSettings:
        args = _parser().parse_args(argv)
        try:
            return cls(
                namespaces=tuple(args.namespace),
                cluster_wide=args.all_namespaces,
                log_level=args.log_level.upper(),
                reconcile_interval_s=args.reconcile_interval,
                dashboard_timeout_s=args.dashboard_timeout,
                dashboard_retry_max_s=args.dashboard_retry_max,
                dashboard_url_template=args.dashboard_url_template,
                model_retry_s=args.model_retry_interval,
                liveness_endpoint=args.liveness,
            )
        except ValueError as err:
            _parser().error(str(err))
            raise  # unreachable: error() exits


def _parser() -> argparse.ArgumentParser:
    d = OperatorSettings
    p = argparse.ArgumentParser(
        prog="moeserve-operator",
        description="Kubernetes operator for MoEService resources (moeserve.io/v1alpha1).",
    )
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace to serve (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    p.add_argument(
        "--log-level", default=d.log_level, choices=[*LOG_LEVELS, *(x.lower() for x in LOG_LEVELS)]
    )
    p.add_argument("--reconcile-interval", type=float, default=d.reconcile_interval_s, metavar="SECONDS")
    p.add_argument("--dashboard-timeout", type=float, default=d.dashboard_timeout_s, metavar="SECONDS")
    p.add_argument("--dashboard-retry-max", type=float, default=d.dashboard_retry_max_s, metavar="SECONDS")
    p.add_argument("--dashboard-url-template", default=d.dashboard_url_template, metavar="TEMPLATE")
    p.add_argument("--model-retry-interval", type=float, default=d.model_retry_s, metavar="SECONDS")
    p.add_argument("--liveness", default=None, metavar="URL", help="e.g. http://0.0.0.0:8080/healthz")
    return p
