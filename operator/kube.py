"""A thin JSON client for the few Kubernetes API calls the operator makes, with failures classified.

It rides on the official `kubernetes` client's REST layer (kubeconfig or in-cluster config, TLS,
token refresh) and speaks plain dicts, so manifests from `builders.py` go out unchanged and objects
come back as the API server sent them. Every failure becomes one of two errors: `Retryable` (the API
server is unreachable, overloaded or raced us: try again after `delay_s`) or `Rejected` (the API
server refuses this request: admission, quota, RBAC, an invalid object; the message says why).
"Not found" and "already exists" are answers, not errors. It knows nothing about MoEServices beyond
their API path.
"""

from __future__ import annotations

import json
from typing import Any

import urllib3
from kubernetes import client, config

from moeserve import contract

Manifest = dict[str, Any]
PREFIXES = {
    "pods": "/api/v1",
    "services": "/api/v1",
    "configmaps": "/api/v1",
    "secrets": "/api/v1",
    "events": "/api/v1",
    contract.PLURAL: f"/apis/{contract.API_GROUP}/{contract.API_VERSION}",
}
MERGE_PATCH = "application/merge-patch+json"
RETRYABLE_STATUSES = (401, 409, 429, 500, 502, 503, 504)


class KubeError(Exception):
    """A failed API call; the message quotes the API server."""


class Retryable(KubeError):
    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class Rejected(KubeError):
    """The API server refused the request (4xx other than conflicts and throttling)."""


def load_api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api: client.ApiClient, timeout_s: float = 30.0) -> None:
        self._api = api
        self._timeout_s = timeout_s

    def find(self, kind: str, namespace: str | None, selector: str) -> list[Manifest]:
        """Objects of `kind` in `namespace` (None: every namespace) matching the label selector."""
        path = _path(kind, namespace) if namespace is not None else f"{PREFIXES[kind]}/{kind}"
        answer = self._request("GET", path, query=[("labelSelector", selector)] if selector else [])
        items: list[Manifest] = answer.get("items") or []
        return items

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            answer: Manifest = self._request("GET", _path(kind, namespace, name))
        except _NotFound:
            return None
        return answer

    def create(self, kind: str, namespace: str, body: Manifest) -> Manifest | None:
        """The created object, or None when one of that name exists already."""
        try:
            answer: Manifest = self._request("POST", _path(kind, namespace), body=body)
        except _AlreadyExists:
            return None
        except _NotFound as err:  # the namespace is gone
            raise Rejected(f"POST {_path(kind, namespace)}: HTTP 404: {err}") from None
        return answer

    def patch(self, kind: str, namespace: str, name: str, patch: Manifest, subresource: str = "") -> bool:
        """A JSON merge patch (lists are replaced whole); False when the object is gone."""
        path = _path(kind, namespace, name) + (f"/{subresource}" if subresource else "")
        try:
            self._request("PATCH", path, body=patch, content_type=MERGE_PATCH)
        except _NotFound:  # deleted meanwhile: a level-based caller sees that on its next pass
            return False
        return True

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        """Delete `name`, and with `uid` only that incarnation of it; gone already is fine."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            self._request("DELETE", _path(kind, namespace, name), body=body)
        except (_NotFound, _AlreadyExists):  # gone, or replaced by a new object of the same name
            pass

    def _request(
        self,
        method: str,
        path: str,
        body: Manifest | None = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(*request, _request_timeout=self._timeout_s)
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise Retryable(f"{method} {path}: API server unreachable: {err}", delay_s=5.0) from err
        if not 200 <= response.status <= 299:
            raise _classify(method, path, response.status, data, response.getheader("Retry-After"))
        return json.loads(data) if data else {}


class _NotFound(Exception):
    pass


class _AlreadyExists(Exception):
    pass


def _path(kind: str, namespace: str, name: str = "") -> str:
    path = f"{PREFIXES[kind]}/namespaces/{namespace}/{kind}"
    return f"{path}/{name}" if name else path


def _classify(method: str, path: str, status: int, data: bytes, retry_after: str | None) -> Exception:
    try:
        answer = json.loads(data)
        message, reason = str(answer.get("message", "")), str(answer.get("reason", ""))
    except (ValueError, AttributeError):
        message, reason = data.decode(errors="replace")[:500], ""
    if status == 404:
        return _NotFound(message)
    if status == 409 and (reason == "AlreadyExists" or method == "DELETE"):
        return _AlreadyExists(message)  # for DELETE: the uid precondition failed, a newer object
    if status in RETRYABLE_STATUSES:
        delay = float(retry_after) if retry_after and retry_after.isdigit() else 2.0
        return Retryable(f"{method} {path}: HTTP {status}: {message}", delay_s=delay)
    return Rejected(f"{method} {path}: HTTP {status}: {message}")
