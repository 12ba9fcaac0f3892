"""A minimal Acme CRM on 127.0.0.1 (real HTTP, stdlib server in a thread): login, limits, users,
opportunities. Test-only; it imports nothing from core."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class AcmeState:
    users: dict[str, dict[str, str]] = field(default_factory=dict)  # username -> {password, id, name}
    opportunities: dict[str, dict[str, Any]] = field(default_factory=dict)
    licenses: tuple[int, int] = (10, 10)  # (total, used)
    api: list[int] = field(default_factory=lambda: [950, 1000])  # [used, limit]
    tokens: dict[str, str] = field(default_factory=dict)  # token -> user id
    requests: list[str] = field(default_factory=list)


def _handler(state: AcmeState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _user(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return state.tokens.get(auth.removeprefix("Bearer "))

        def _body(self) -> Any:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

        def do_POST(self) -> None:  # noqa: N802
            state.requests.append(f"POST {self.path}")
            if self.path == "/api/login":
                body = self._body()
                user = state.users.get(str(body.get("username")))
                if user is None or user["password"] != body.get("password"):
                    return self._send(401, {"error": "invalid_login", "message": "Wrong login or password."})
                token = f"tok-{len(state.tokens) + 1}"
                state.tokens[token] = user["id"]
                return self._send(200, {"token": token, "user_id": user["id"]})
            if self._user() is None:
                return self._send(401, {"error": "invalid_token"})
            if self.path == "/api/opportunities":
                state.api[0] += 1
                results = []
                for change in self._body()["changes"]:
                    crm_id = change.get("id") or f"OPP-{len(state.opportunities) + 1}"
                    created = crm_id not in state.opportunities
                    record = state.opportunities.setdefault(crm_id, {"id": crm_id, "name": "", "stage": None})
                    record.update(change["fields"], modified_at=change["at"], external_key=change["key"],
                                  last_modified_by=self._user())
                    results.append({"key": change["key"], "id": crm_id, "created": created})
                return self._send(200, {"results": results})
            return self._send(404, {"error": "not_found"})

        def do_GET(self) -> None:  # noqa: N802
            state.requests.append(f"GET {self.path}")
            if self.path == "/api/":
                return self._send(200, {"ok": True})
            if self._user() is None:
                return self._send(401, {"error": "invalid_token"})
            state.api[0] += 1
            if self.path == "/api/limits":
                total, used = state.licenses
                return self._send(200, {"licenses": {"total": total, "used": used},
                                        "api": {"used": state.api[0], "limit": state.api[1]}})
            if self.path == "/api/users":
                return self._send(200, [{"id": u["id"], "email": name, "name": u["name"]}
                                        for name, u in state.users.items()])
            if self.path.startswith("/api/opportunities"):
                return self._send(200, list(state.opportunities.values()))
            return self._send(404, {"error": "not_found"})

    return Handler


class AcmeDouble:
    def __init__(self) -> None:
        self.state = AcmeState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
