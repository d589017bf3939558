"""A real OpenAI-compatible HTTP endpoint on 127.0.0.1 whose replies come from a script.

Tests of `dsv synth build` and `dsv eval` (and the eval throughput benchmark) talk to
it with the official ``openai`` client over real sockets: the server implements
``POST /v1/chat/completions`` and ``GET /v1/models`` well enough for that client. A
request with ``"stream": true`` gets the same reply as server-sent events: one
``chat.completion.chunk`` per few characters of ``reasoning_content`` and ``content``,
tool calls split into a header delta (index, id, name) and argument-text deltas, a
final chunk with ``finish_reason``, a usage chunk when ``stream_options.include_usage``
is set, then ``data: [DONE]`` (chunked transfer encoding, keep-alive). It records every request body it received so a test can check what
was sent (thinking flag, tools, reasoning_content round-trips) and how many calls
were made (resumption must not repeat finished work).

Fault modes for clients that must survive a bad endpoint (``Reply`` fields): an error ``status``
with extra ``headers`` (401; 429 with ``Retry-After``), ``malformed`` (a ``data:`` line that is not
JSON in the middle of the stream), ``stall_s`` (the stream stops halfway for that long, as a hung
server does), ``cut`` (the connection closes halfway, without ``[DONE]``) and ``chunk_delay_s``
(a slow stream, for cancelling mid-answer).

A script is a callable ``script(request_body: dict) -> Reply`` run on the server's
handler thread; it may raise to produce an HTTP 500. Load it from a test file with
``load_scripted_endpoint()`` in the test modules (pytest runs in importlib mode, so
sibling modules are not importable by name).

Run a demo: ``python packages/synth/tests/scripted_endpoint.py`` (serves a reply that
echoes the last user message until Ctrl-C).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted assistant turn.

    ``tool_calls`` items are ``{"name": str, "arguments": dict | str}``. ``usage`` left
    as None is filled with whitespace-token counts; ``reasoning_tokens=None`` leaves
    ``completion_tokens_details`` out, as some servers do. ``status`` other than 200
    returns an OpenAI-style error body with that status.
    """

    content: str | None = ""
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (e.g. Retry-After)
    malformed: bool = False  # stream: a non-JSON data line halfway
    stall_s: float = 0.0  # stream: stop halfway for this long
    cut: bool = False  # stream: close the connection halfway
    chunk_delay_s: float = 0.0  # stream: pause before each chunk


Script = Callable[[dict[str, Any]], Reply]


def _words(text: str | None) -> int:
    return len((text or "").split())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    # headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK add ~40 ms per reply
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
        return

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        with self.server.lock:
            self.server.requests.append(body)
        try:
            reply = self.server.script(body)
        except Exception as exc:  # a script bug must show up as a server error, not a hung socket
            self._send(500, {"error": {"message": f"script raised {exc!r}", "type": "server_error"}})
            return
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            kind = {401: "authentication_error", 429: "rate_limit_error"}.get(reply.status, "server_error")
            error = {"error": {"message": reply.content or "error", "type": kind}}
            self._send(reply.status, error, reply.headers)
            return
        completion = self._completion(body, reply)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            try:
                self._send_stream(completion, include_usage, reply)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away (cancelled): not a server error
        else:
            self._send(200, completion)

    def _send_stream(
        self, completion: dict[str, Any], include_usage: bool, reply: Reply | None = None
    ) -> None:
        reply = reply or Reply()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        chunks = stream_chunks(completion, include_usage=include_usage)
        for i, chunk in enumerate(chunks):
            if i == len(chunks) // 2 and (reply.stall_s or reply.malformed or reply.cut):
                self.wfile.flush()
                if reply.stall_s:
                    time.sleep(reply.stall_s)
                if reply.malformed:
                    bad = b'data: {"id": "chatcmpl-x", "choices": [{"delta": {"content": "oops\n\n'
                    self.wfile.write(f"{len(bad):x}\r\n".encode() + bad + b"\r\n")
                if reply.cut:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
            if reply.chunk_delay_s:
                self.wfile.flush()
                time.sleep(reply.chunk_delay_s)
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        done = b"data: [DONE]\n\n"
        self.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        self.wfile.flush()

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning_content is not None:
            message["reasoning_content"] = reply.reasoning_content
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{uuid.uuid4().hex[:12]}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": call["arguments"]
                        if isinstance(call["arguments"], str)
                        else json.dumps(call["arguments"]),
                    },
                }
                for call in reply.tool_calls
            ]
        prompt_tokens = reply.prompt_tokens
        if prompt_tokens is None:
            prompt_tokens = sum(_words(str(m.get("content"))) for m in body.get("messages", []))
        completion_tokens = reply.completion_tokens
        if completion_tokens is None:
            completion_tokens = _words(reply.content) + _words(reply.reasoning_content)
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if reply.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.server.model),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage,
        }


def _pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream_chunks(completion: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    """A ``chat.completion`` body as the ``chat.completion.chunk`` events a streaming server sends."""
    choice = completion["choices"][0]
    message = choice["message"]
    head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"]}
    head["model"] = completion["model"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": p}) for p in _pieces(message.get("reasoning_content") or "")]
    out += [chunk({"content": p}) for p in _pieces(message.get("content") or "")]
    for index, call in enumerate(message.get("tool_calls") or []):
        fn = call["function"]
        header = {"index": index, "id": call["id"], "type": "function"}
        out.append(chunk({"tool_calls": [{**header, "function": {"name": fn["name"], "arguments": ""}}]}))
        out += [
            chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]})
            for p in _pieces(fn["arguments"])
        ]
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        out.append({**head, "choices": [], "usage": completion["usage"]})
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script, model: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.model = model
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []


class ScriptedEndpoint:
    """Serve ``script`` on a free 127.0.0.1 port until ``stop()`` (or the ``with`` block ends)."""

    def __init__(self, script: Script, *, model: str = "scripted") -> None:
        self._server = _Server(script, model)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="scripted-endpoint", daemon=True
        )
        self.model = model

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Bodies of every chat-completion request received so far (a copy)."""
        with self._server.lock:
            return list(self._server.requests)

    def start(self) -> ScriptedEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def last_user_text(body: dict[str, Any]) -> str:
    """The content of the last user message of a request body ('' when there is none)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


if __name__ == "__main__":
    with ScriptedEndpoint(lambda body: Reply(content=f"echo: {last_user_text(body)}")) as endpoint:
        print(f"serving on {endpoint.base_url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
