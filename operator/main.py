"""`moeserve-operator`: parse the settings, wire the reconciler to kopf, run until stopped.

Kopf runs standalone (no peering objects: one replica, `strategy: Recreate` in the chart) and without
cluster scanning (no CRD or Namespace watch), so the operator needs RBAC only for its own objects.
Kopf keeps its bookkeeping in `moeserve.io/` annotations, since the MoEService status schema is
structural and would prune kopf's status fields.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import kopf

from moeserve import contract
from moeserve.operator import handlers
from moeserve.operator.kube import Kube, load_api_client
from moeserve.operator.ray_dashboard import ServeClient
from moeserve.operator.reconcile import Reconciler
from moeserve.operator.settings import OperatorSettings


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    out = kopf.OperatorSettings()
    out.peering.standalone = True
    out.scanning.disabled = True
    out.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=contract.API_GROUP)
    out.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=contract.API_GROUP, key="last-handled-configuration"
    )
    out.posting.reporting_component = contract.MANAGED_BY
    out.posting.event_name_prefix = "moeserve-"
    # Watch only the operator's pods, not every pod of the watched namespaces.
    out.watching.label_selectors["v1", "pods"] = contract.LABEL_SERVICE
    return out


def main(argv: Sequence[str] | None = None) -> int:
    settings = OperatorSettings.from_argv(argv)
    logging.basicConfig(
        level=settings.log_level_number, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    if settings.log_level_number > logging.DEBUG:  # kopf reports every handler success at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    kube = Kube(load_api_client())
    serve = ServeClient(settings.dashboard_timeout_s)
    reconciler = Reconciler(kube, serve, settings, handlers.event_sink(kube))
    registry = kopf.OperatorRegistry()
    handlers.register(registry, reconciler, settings)
    kopf.run(
        registry=registry,
        settings=kopf_settings(settings),
        standalone=True,
        namespaces=settings.namespaces,
        clusterwide=settings.cluster_wide,
        liveness_endpoint=settings.liveness_endpoint,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
