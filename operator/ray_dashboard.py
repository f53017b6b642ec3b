"""Ray Serve's REST API on the Ray head's dashboard, as the operator uses it: deploy, read back.

`ServeClient.sync(base_url, document)` reads `GET /api/serve/applications/`, PUTs the deploy document
when the running application differs from it (or exists while none should), and reports what Ray
says about the application. Failures are `DashboardError`s naming the URL, with `reachable` telling
"nobody answered" from "Ray answered with an error". No retries here: the reconciler backs off.
Plain urllib, no ray import.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moeserve import contract

ABSENT = "ABSENT"
"""Status of an application that Ray does not know (the document asks for none)."""


class DashboardError(Exception):
    def __init__(self, message: str, reachable: bool) -> None:
        super().__init__(message)
        self.reachable = reachable


@dataclass(frozen=True)
class ServeState:
    status: str
    """Ray's ApplicationStatus (NOT_STARTED, DEPLOYING, DEPLOY_FAILED, RUNNING, UNHEALTHY, DELETING)
    or ABSENT."""
    message: str = ""
    deployed: bool = False
    """This call PUT the document."""


class ServeClient:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        """Seconds for each HTTP request, connecting included."""

    def applications(self, base_url: str, token: str | None = None) -> dict[str, Any]:
        answer = self._request("GET", base_url, token)
        apps: dict[str, Any] = (answer or {}).get("applications") or {}
        return apps

    def deploy(self, base_url: str, document: Mapping[str, Any], token: str | None = None) -> None:
        self._request("PUT", base_url, token, document)

    def sync(
        self, base_url: str, document: Mapping[str, Any], app_name: str, token: str | None = None
    ) -> ServeState:
        """Make Ray run exactly `document`'s applications; report the state of `app_name`.
        `token`: the cluster's Ray auth token, sent as a bearer token."""
        running = self.applications(base_url, token)
        wanted = document["applications"]
        if not wanted:
            if running:
                self.deploy(base_url, document, token)
                return ServeState("DELETING", "removing the Serve application", deployed=True)
            return ServeState(ABSENT)
        current = running.get(app_name)
        if current is None or not same_application(current.get("deployed_app_config"), wanted[0]):
            self.deploy(base_url, document, token)
            return ServeState("DEPLOYING", "Serve application submitted", deployed=True)
        return ServeState(str(current.get("status", "NOT_STARTED")), str(current.get("message", "")))

    def _request(
        self, method: str, base_url: str, token: str | None, body: Mapping[str, Any] | None = None
    ) -> Any:
        url = base_url.rstrip("/") + contract.RAY_SERVE_APPLICATIONS_PATH
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise DashboardError(f"{method} {url}: HTTP {err.code}: {detail}", reachable=True) from None
        except (urllib.error.URLError, OSError) as err:  # TimeoutError is an OSError
            reason = getattr(err, "reason", err)
            raise DashboardError(f"{url} is unreachable: {reason}", reachable=False) from None
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            raise DashboardError(
                f"{method} {url}: answer is not JSON: {text[:200]!r}", reachable=True
            ) from None


def same_application(deployed: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Whether Ray's `deployed_app_config` is the application `wanted` (Ray omits unset fields)."""
    if not deployed:
        return False
    return all(
        deployed.get(key) == wanted.get(key) for key in ("name", "import_path", "args", "route_prefix")
    )
