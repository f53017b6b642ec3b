"""Kopf handlers of the operator: small, typed and idempotent; the work is `Reconciler.reconcile`.

- Every event of a MoEService (the watch's initial listing included, so creation and operator
  restarts need nothing else) runs a pass of it, and a resync task runs a pass of every MoEService of
  the watched namespaces every `reconcile_interval_s`: what the Ray dashboard says changes without a
  Kubernetes event. No Kopf timer: Kopf gives every object with a timer a finalizer, so `kubectl
  delete` would hang while the operator is down.
- A spec change (`kubectl apply`, `kubectl scale`) runs a pass at once.
- An event of a pod labelled `moeserve.io/service` runs a pass of its owner, so a lost pod restarts
  its group at once (bursts of events are coalesced).
- A deleted MoEService is forgotten; its children go by garbage collection (owner references), so no
  finalizer holds deletion up while the operator is down.

Failures are classified: an API server that cannot be reached raises `kopf.TemporaryError` with a
delay (kopf retries); a spec that cannot be realised raises `kopf.PermanentError` from the spec-change
handler (the status says Degraded and why; the next spec change tries again).
Handlers are synchronous: kopf runs them in its thread pool, and the Kubernetes client blocks.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

import kopf

from moeserve import contract
from moeserve.operator import builders
from moeserve.operator.kube import Kube, KubeError, Retryable
from moeserve.operator.reconcile import Reconciler
from moeserve.operator.settings import OperatorSettings

RESOURCE = (contract.API_GROUP, contract.API_VERSION, contract.PLURAL)
log = logging.getLogger(__name__)
T = TypeVar("T")


def event_sink(kube: Kube) -> Callable[[Mapping[str, Any], str, str, str], None]:
    """The reconciler's event sink: a Kubernetes Event on the MoEService, posted with the operator's
    own client (kopf.event would need Kopf's handler context, which the resync task lacks). A failed
    post is logged, never raised: Events are for people, the status is the record."""

    def post(body: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = builders.event(body, event_type, reason, message, now)
        try:
            kube.create("events", str(body["metadata"]["namespace"]), event)
        except KubeError as err:
            log.warning("posting Event %s failed: %s", reason, err)

    return post


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, settings: OperatorSettings) -> None:
    """Register the operator's handlers in `registry` (no module-level registration)."""

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the reconciler's client: in-cluster, else the kubeconfig.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="resync", registry=registry)
    async def start_resync(memo: kopf.Memo, **_: Any) -> None:
        memo["resync"] = asyncio.create_task(_resync_forever(reconciler, settings))

    @kopf.on.cleanup(id="stop-resync", registry=registry)
    async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("resync")
        if task is not None:
            task.cancel()

    @kopf.on.event(*RESOURCE, id="moeservice-changed", registry=registry)
    def reconcile_moeservice(body: kopf.Body, type: str | None, logger: kopf.Logger, **_: Any) -> None:  # noqa: A002
        meta = body["metadata"]
        if type == "DELETED" or meta.get("deletionTimestamp"):
            return
        try:
            reconciler.reconcile_soon(str(meta["namespace"]), str(meta["name"]))
        except Retryable as err:  # event handlers are not retried; the resync is the retry
            logger.warning("reconciling after an event failed: %s", err)

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


async def _resync_forever(reconciler: Reconciler, settings: OperatorSettings) -> None:
    """A pass of every MoEService of the watched namespaces every `reconcile_interval_s`.

    Each pass runs in a thread (the Kubernetes client blocks), as Kopf runs its sync handlers."""
    loop = asyncio.get_running_loop()

    def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return loop.run_in_executor(None, fn, *args)

    while True:
        await asyncio.sleep(settings.reconcile_interval_s)
        try:
            keys = await in_thread(_moeservices, reconciler, settings)
        except Retryable as err:
            log.warning("listing MoEServices failed: %s", err)
            continue
        await asyncio.gather(*(in_thread(_resync_one, reconciler, ns, name) for ns, name in keys))


def _moeservices(reconciler: Reconciler, settings: OperatorSettings) -> list[tuple[str, str]]:
    scopes = [None] if settings.cluster_wide else list(settings.namespaces)
    return [
        (str(item["metadata"]["namespace"]), str(item["metadata"]["name"]))
        for scope in scopes
        for item in reconciler.kube.find(contract.PLURAL, scope, "")
    ]


def _resync_one(reconciler: Reconciler, namespace: str, name: str) -> None:
    try:
        reconciler.reconcile_soon(namespace, name)
    except Retryable as err:
        log.warning("%s/%s: periodic pass failed: %s", namespace, name, err)
    except Exception:  # noqa: BLE001 - one MoEService's bug must not end the resync of the others
        log.exception("%s/%s: periodic pass failed", namespace, name)


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
