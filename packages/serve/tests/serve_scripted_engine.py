"""A scripted stand-in for a vLLM/SGLang server: ``/v1/models`` and streaming ``/v1/completions``.

It takes the engines' command lines (``vllm serve PATH ... --port N --served-model-name NAME`` or
``python -m sglang.launch_server --model PATH ... --port N``), writes its argv and every request
body as JSON lines to ``$DSV_TEST_ENGINE_RECORD``, and answers each prompt with the first reply of
``$DSV_TEST_ENGINE_SCRIPT`` (a JSON list of ``[substring, reply]``) whose substring the prompt
contains, streamed in 3-character server-sent events as the engines do, with a usage chunk.

The proxy tests run it as ``python serve_scripted_engine.py``, as an executable named ``vllm`` on
PATH, and as the module ``sglang.launch_server``. Standard library only, so it starts quickly.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _arg(name: str, default: str = "") -> str:
    argv = sys.argv
    return argv[argv.index(name) + 1] if name in argv else default


def _record(entry: dict[str, Any]) -> None:
    with open(os.environ["DSV_TEST_ENGINE_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep the test output quiet
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(
                200, {"object": "list", "data": [{"id": _arg("--served-model-name"), "object": "model"}]}
            )
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _record({"request": body})
        if self.path != "/v1/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        with open(os.environ["DSV_TEST_ENGINE_SCRIPT"], encoding="utf-8") as f:
            script = json.load(f)
        prompt = body["prompt"]
        reply = next((r for key, r in script if key in prompt), None)
        if reply is None:
            self._json(400, {"error": {"message": "no scripted reply for this prompt"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        pieces = [reply[i : i + 3] for i in range(0, len(reply), 3)]
        for i, piece in enumerate(pieces):
            finish = "stop" if i == len(pieces) - 1 else None
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}]}  # fmt: skip
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(pieces), "total_tokens": 0}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


def main() -> None:
    _record({"argv": sys.argv[1:], "executable": os.path.basename(sys.argv[0])})
    server = ThreadingHTTPServer((_arg("--host", "127.0.0.1"), int(_arg("--port"))), _Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
