"""A minimal JSON-over-HTTPS client for the Kubernetes API, and kubeconfig files.

The control plane uses this to wait for readiness, register fake nodes and request service-account
tokens, so starting a cluster needs only the standard library and `cryptography`. It is not a
general client: tests use the official `kubernetes` package or kubectl against the kubeconfig files
written here.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JsonObject = dict[str, Any]


class ApiError(RuntimeError):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Credentials:
    """Who the client is: a client certificate pair, or a bearer token."""

    cert: Path | None = None
    key: Path | None = None
    token: str | None = None


class ApiClient:
    """Sends JSON requests to one API server, trusting only the given CA."""

    def __init__(self, server: str, ca: Path, credentials: Credentials) -> None:
        self.server = server.rstrip("/")
        self._token = credentials.token
        self._context = ssl.create_default_context(cafile=str(ca))
        if credentials.cert and credentials.key:
            self._context.load_cert_chain(str(credentials.cert), str(credentials.key))

    def request(self, method: str, path: str, body: JsonObject | None = None, timeout_s: float = 10.0) -> Any:
        """Send one request; return the decoded JSON body (or text when it is not JSON)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._token:
            req.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(req, context=self._context, timeout=timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.read().decode(errors="replace")) from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def create(self, path: str, body: JsonObject) -> Any:
        return self.request("POST", path, body)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, credentials: Credentials, user: str) -> Path:
    """Write a self-contained kubeconfig (certificates inlined) with one context, `user`@moeserve-test.

    It is JSON, which every kubeconfig reader accepts as YAML.
    """
    if credentials.token:
        user_entry: JsonObject = {"token": credentials.token}
    elif credentials.cert and credentials.key:
        user_entry = {
            "client-certificate-data": _b64(credentials.cert),
            "client-key-data": _b64(credentials.key),
        }
    else:
        raise ValueError("credentials need a token or a certificate pair")
    context = f"{user}@moeserve-test"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "moeserve-test", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [{"name": context, "context": {"cluster": "moeserve-test", "user": user}}],
        "current-context": context,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path
