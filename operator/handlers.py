"""Kopf handlers of the operator: small, typed and idempotent; the work is `Reconciler.reconcile`.

- A timer per MoEService runs the level-based pass every `reconcile_interval_s`. Kopf starts it as
  soon as it sees the object, so creation and operator restarts need no handler of their own.
- A spec change (`kubectl apply`, `kubectl scale`) runs a pass at once.
- An event of a pod labelled `moeserve.io/service` runs a pass of its owner, so a lost pod restarts
  its group without waiting for the timer (bursts of pod events are coalesced).
- A deleted MoEService is forgotten; its children go by garbage collection (owner references), so no
  finalizer holds deletion up while the operator is down.

Failures are classified: an API server that cannot be reached raises `kopf.TemporaryError` with a
delay (kopf retries); a spec that cannot be realised raises `kopf.PermanentError` from the spec-change
handler (the status says Degraded and why; the next spec change tries again).
Handlers are synchronous: kopf runs them in its thread pool, and the Kubernetes client blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kopf

from moeserve import contract
from moeserve.operator.kube import Retryable
from moeserve.operator.reconcile import Reconciler
from moeserve.operator.settings import OperatorSettings

RESOURCE = (contract.API_GROUP, contract.API_VERSION, contract.PLURAL)


def post_event(body: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
    """The reconciler's event sink: a Kubernetes Event on the MoEService."""
    kopf.event(dict(body), type=event_type, reason=reason, message=message)  # type: ignore[arg-type]


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, settings: OperatorSettings) -> None:
    """Register the operator's handlers in `registry` (no module-level registration)."""

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the reconciler's client: in-cluster, else the kubeconfig.
        return kopf.login_via_client(**kwargs)

    @kopf.timer(*RESOURCE, id="reconcile", interval=settings.reconcile_interval_s, registry=registry)
    def reconcile_periodically(body: kopf.Body, **_: Any) -> None:
        _reconcile(reconciler, body, permanent=False)

    @kopf.on.update(*RESOURCE, id="spec-changed", field="spec", registry=registry)
    def reconcile_spec_change(body: kopf.Body, **_: Any) -> None:
        _reconcile(reconciler, body, permanent=True)

    @kopf.on.event(
        "v1", "pods", id="pod-changed", labels={contract.LABEL_SERVICE: kopf.PRESENT}, registry=registry
    )
    def reconcile_owner_of_pod(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        owner = _controller_name(body)
        if owner is None:
            return
        try:
            reconciler.reconcile_soon(str(body["metadata"]["namespace"]), owner)
        except Retryable as err:  # event handlers are not retried; the timer's next pass is the retry
            logger.warning("reconciling %s after a pod event failed: %s", owner, err)

    @kopf.on.event(*RESOURCE, id="deleted", when=lambda type, **_: type == "DELETED", registry=registry)
    def forget_deleted(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        reconciler.forget(meta["namespace"], meta["name"], meta["uid"])


def _reconcile(reconciler: Reconciler, body: kopf.Body, permanent: bool) -> None:
    # A plain copy: kopf updates `body` in place while this thread runs.
    snapshot: dict[str, Any] = copy.deepcopy(dict(body))
    try:
        outcome = reconciler.reconcile(snapshot)
    except Retryable as err:
        raise kopf.TemporaryError(str(err), delay=err.delay_s) from err
    if outcome.invalid_spec and permanent:
        raise kopf.PermanentError(outcome.invalid_spec)


def _controller_name(pod: Mapping[str, Any]) -> str | None:
    for ref in pod["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == contract.KIND and ref.get("controller"):
            return str(ref["name"])
    return None
