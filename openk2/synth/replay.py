"""An OpenAI-compatible HTTP server that answers from recorded replies (for tests and demos of the pipeline
without a strong model at hand).

A script is a list of rules; the first rule whose conditions hold answers the request::

    {"system": "substring of the system message", "last": "substring of the last message",
     "has_tools": true, "schema": "a property name of the demanded JSON schema",
     "reply": {"content": "..."} | {"tool_calls": [{"name": "...", "arguments": {...}}]} | [reply, reply, ...]
              | a function of the request body that returns a reply}

A list of replies is indexed by the number of assistant messages already in the request (the turn), so
a multi-turn dialogue replays the same way at any concurrency. An unmatched request gets an empty reply.
``server.requests`` keeps every request body.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _matches(rule: dict[str, Any], body: dict[str, Any]) -> bool:
    msgs = body.get("messages") or []
    system = next((m.get("content") or "" for m in msgs if m.get("role") == "system"), "")
    last = (msgs[-1].get("content") or "") if msgs else ""
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
    if "system" in rule and rule["system"] not in system:
        return False
    if "last" in rule and rule["last"] not in (last if isinstance(last, str) else json.dumps(last)):
        return False
    if "has_tools" in rule and bool(body.get("tools")) != rule["has_tools"]:
        return False
    if "schema" in rule and rule["schema"] not in (schema.get("properties") or {}):
        return False
    return True


def reply_for(script: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    for rule in script:
        if _matches(rule, body):
            r = rule["reply"]
            if callable(r):  # a reply computed from the request (tests)
                return r(body)
            if isinstance(r, list):
                turn = sum(1 for m in body.get("messages") or [] if m.get("role") == "assistant")
                r = r[min(turn, len(r) - 1)]
            return r
    return {"content": ""}


def completion(body: dict[str, Any], reply: dict[str, Any], n: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    finish = "stop"
    if reply.get("tool_calls"):
        msg["tool_calls"] = [{"id": f"call_{n}_{i}", "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"] if isinstance(c["arguments"], str)
                                           else json.dumps(c["arguments"])}} for i, c in enumerate(reply["tool_calls"])]
        finish = "tool_calls"
    elif isinstance(msg["content"], (dict, list)):
        msg["content"] = json.dumps(msg["content"])
    return {"id": f"chatcmpl-replay-{n}", "object": "chat.completion", "created": 0, "model": body.get("model") or "replay",
            "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class ReplayServer:
    """``with ReplayServer(script) as srv: make_client(srv.url)``: serves on 127.0.0.1 (a free port)."""

    def __init__(self, script: list[dict[str, Any]], model: str = "replay", port: int = 0) -> None:
        self.script, self.model = script, model
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:  # quiet
                pass

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model", "owned_by": "replay"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with outer._lock:
                    outer.requests.append(body)
                    k = len(outer.requests)
                self._send(200, completion(body, reply_for(outer.script, body), k))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ReplayServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
