"""Ray's Serve REST API as the operator uses it, on 127.0.0.1: GET and PUT /api/serve/applications/.

Every PUT is validated with ServeAppConfig (what the Serve app builder runs first); the applications'
status is whatever the test sets. Used where no Ray runs: the operator's unit tests and the k8s tier
(kwok pods run nothing).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moeserve.serve_config import ServeAppConfig

Manifest = dict[str, Any]


class FakeDashboard:
    """Ray's Serve REST API: GET and PUT /api/serve/applications/ on 127.0.0.1."""

    def __init__(self) -> None:
        self.applications: dict[str, Manifest] = {}
        self.puts: list[Manifest] = []
        self.authorizations: list[str | None] = []  # the Authorization header of every request
        self.status_after_put = "DEPLOYING"
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                dashboard.authorizations.append(self.headers.get("Authorization"))
                self._answer(200, {"applications": dashboard.applications})

            def do_PUT(self) -> None:  # noqa: N802
                dashboard.authorizations.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                for app in body["applications"]:
                    ServeAppConfig.from_dict(app["args"])  # what build_app runs first
                dashboard.puts.append(body)
                dashboard.applications = {
                    app["name"]: {
                        "status": dashboard.status_after_put,
                        "message": "",
                        "deployed_app_config": app,
                    }
                    for app in body["applications"]
                }
                self._answer(200, None)

            def _answer(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
