"""``/v1/responses``: OpenAI's Responses API on the chat path.

A request becomes chat messages (``instructions`` the system message; input items: messages,
``function_call`` items as an assistant's ``tool_calls``, ``function_call_output`` items as tool
messages, ``reasoning`` items as the next assistant turn's ``reasoning_content``), then a
:class:`~dsv.serve.schemas.ChatCompletionRequest` that :func:`dsv.serve.routes.chat.prepare`
validates, encodes and generates like any chat request: forced tool calls, thinking and the rule
that keeps reasoning within a turn and drops it after a new user message are the chat path's
(:func:`dsv.core.chat.encode_messages`). Thinking is on for ``reasoning.effort`` low to xhigh, off
for none/minimal, else as the model alias says (``<name>-reasoner``).

The output items are a ``reasoning`` item (the reasoning text as ``reasoning_text`` content), a
``message`` with ``output_text`` and one ``function_call`` item per call; ``max_output_tokens``
ending the answer gives ``status: "incomplete"`` with reason ``max_output_tokens``. Streaming sends
the documented events in order: ``response.created``, ``response.in_progress``, per item
``response.output_item.added``, its deltas (``response.reasoning_text.delta``,
``response.content_part.added`` + ``response.output_text.delta``, or
``response.function_call_arguments.delta``), their ``.done`` events and
``response.output_item.done``, then ``response.completed`` (or ``response.incomplete``).

With ``store`` (the default) the response and its conversation are kept in memory
(:class:`~dsv.serve.state.ResponseStore`, bounded in number and age) so ``previous_response_id``
continues it and ``GET /v1/responses/{id}`` returns it; an unknown or expired id is a 404.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from dsv.serve.routes.chat import prepare
from dsv.serve.schemas import APIError, ChatCompletionRequest, ResponsesRequest
from dsv.serve.state import ServerState
from dsv.serve.streaming import ChoiceEvent, fan_in, tracked, usage

router = APIRouter()

_TEXT_PARTS = ("input_text", "output_text", "text")


def _text(content: Any, where: str) -> str:
    """A message's content as text; a 400 naming a part the model cannot take."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content",
                       code="invalid_value")  # fmt: skip
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.content part {j} is `{kind}`: this model takes text only (images, audio "
                           "and files are not supported); send text parts", param=f"{where}.content",
                           code="invalid_value")  # fmt: skip
        out.append(part["text"])
    return "".join(out)


def to_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages (without the instructions)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning: str | None = None

    def assistant() -> dict[str, Any]:
        # Calls and text of one assistant turn join the same message (items list them apart).
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or reasoning is not None:
            last = {"role": "assistant", "content": ""}
            if reasoning is not None:
                last["reasoning_content"] = reasoning
                reasoning = None
            messages.append(last)
        return last

    for k, item in enumerate(items):
        where = f"input.{k}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant", param=f"{where}.role",
                               code="invalid_value")  # fmt: skip
            text = _text(item.get("content", ""), where)
            if role == "assistant":
                msg = assistant()
                msg["content"] += text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            if not item.get("name") or not item.get("call_id"):
                raise APIError(400, f"{where}: a function_call item needs name and call_id", param=where,
                               code="invalid_value")  # fmt: skip
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}  # fmt: skip
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output, where)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise APIError(400, f"{where}: input items of type `{kind}` are not supported (dsv serve takes "
                           "message, function_call, function_call_output and reasoning items)", param=where,
                           code="invalid_value")  # fmt: skip
    return messages


def _thinking(req: ResponsesRequest) -> bool | None:
    effort = req.reasoning.effort if req.reasoning is not None else None
    return None if effort is None else effort not in ("none", "minimal")


def _chat_request(srv: ServerState, req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": req.model, "messages": messages, "temperature": req.temperature,
                            "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls}  # fmt: skip
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.seed is not None:
        body["seed"] = req.seed
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in req.tools]  # fmt: skip
    if isinstance(req.tool_choice, dict):
        if req.tool_choice.get("type") != "function" or not req.tool_choice.get("name"):
            raise APIError(400, "tool_choice: dsv serve takes none, auto, required or {type: function, name}",
                           param="tool_choice", code="invalid_value")  # fmt: skip
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice["name"]}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    thinking = _thinking(req)
    if thinking is not None:
        body["thinking"] = {"type": "enabled" if thinking else "disabled"}
    fmt = (req.text or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "output"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}  # fmt: skip
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        body["response_format"] = {"type": "json_object"}
    try:
        return ChatCompletionRequest.model_validate(body, context={"allow_unknown_fields": True})
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param or None,
                       code="invalid_value") from None  # fmt: skip


@router.post("/v1/responses")
async def create(request: Request) -> Any:
    srv: ServerState = request.app.state.server
    req: ResponsesRequest = await srv.read_json(request, ResponsesRequest)
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        found = srv.responses.get(req.previous_response_id)
        if found is None:
            raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found (unknown, "
                           "expired or not stored).", param="previous_response_id",
                           code="previous_response_not_found")  # fmt: skip
        history = found[1]
    turn = history + to_messages(req.input)
    if not turn:
        raise APIError(400, "input is empty: send a string or a list of input items", param="input",
                       code="invalid_value")  # fmt: skip
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    chat_req = _chat_request(srv, req, system + turn)
    run = prepare(srv, chat_req)
    body = request_fields(req)
    body.update(id=f"resp_{secrets.token_hex(12)}", created_at=int(time.time()))
    store = req.store
    srv.in_flight += 1
    if req.stream:
        return StreamingResponse(tracked(srv, _stream(srv, request, run, body, turn, store)),
                                 media_type="text/event-stream")  # fmt: skip
    try:
        out = _Output(body["id"])
        finals: list[ChoiceEvent] = []
        async for ev in fan_in(srv, run.jobs, request, stream=False):
            for _ in out.feed(ev):
                pass
            if ev.finish is not None:
                finals.append(ev)
        return _finish(srv, body, out, finals, run.prompt_tokens, turn, store)
    finally:
        srv.in_flight -= 1


@router.get("/v1/responses/{rid}")
async def retrieve(rid: str, request: Request) -> Any:
    srv: ServerState = request.app.state.server
    found = srv.responses.get(rid)
    if found is None:
        raise APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")
    return found[0]


@router.delete("/v1/responses/{rid}")
async def delete(rid: str, request: Request) -> Any:
    srv: ServerState = request.app.state.server
    if not srv.responses.delete(rid):
        raise APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="not_found")
    return {"id": rid, "object": "response", "deleted": True}


def request_fields(req: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as the response object echoes them."""
    return {
        "object": "response", "status": "in_progress", "error": None, "incomplete_details": None,
        "instructions": req.instructions, "model": req.model, "output": [],
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "parallel_tool_calls": req.parallel_tool_calls, "temperature": req.temperature, "top_p": req.top_p,
        "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled", "usage": None,
        "metadata": req.metadata or {}, "store": req.store,
    }  # fmt: skip


class _Output:
    """The output items of one response, built from the chat choice's events; ``feed`` yields the
    stream events (type, payload without ``type``/``sequence_number``) each event adds."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.reasoning, self.content = "", ""
        self.calls: list[dict[str, Any]] = []

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = self.items.index(item)
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            return [("response.reasoning_text.done", {"item_id": item["id"], "output_index": i, "content_index": 0,
                                                      "text": text}),
                    ("response.output_item.done", {"output_index": i, "item": item})]  # fmt: skip
        part = item["content"][0]
        item["status"] = "completed"
        return [("response.output_text.done", {"item_id": item["id"], "output_index": i, "content_index": 0,
                                               "text": part["text"], "logprobs": []}),
                ("response.content_part.done", {"item_id": item["id"], "output_index": i, "content_index": 0,
                                                "part": part}),
                ("response.output_item.done", {"output_index": i, "item": item})]  # fmt: skip

    def _start(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        events = self._close()
        if kind == "reasoning":
            item: dict[str, Any] = {"type": "reasoning", "id": f"rs_{secrets.token_hex(8)}", "summary": [],
                                    "content": [{"type": "reasoning_text", "text": ""}]}  # fmt: skip
            self.items.append(item)
            announced = {**item, "content": []}
            events.append(("response.output_item.added", {"output_index": len(self.items) - 1, "item": announced}))
        else:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item = {"type": "message", "id": f"msg_{secrets.token_hex(8)}", "status": "in_progress",
                    "role": "assistant", "content": [part]}  # fmt: skip
            self.items.append(item)
            i = len(self.items) - 1
            events += [("response.output_item.added", {"output_index": i, "item": {**item, "content": []}}),
                       ("response.content_part.added", {"item_id": item["id"], "output_index": i,
                                                        "content_index": 0, "part": dict(part)})]  # fmt: skip
        self.open = item
        return events

    def feed(self, ev: ChoiceEvent) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        for d in ev.deltas:
            if d.kind in ("reasoning", "content"):
                kind = "reasoning" if d.kind == "reasoning" else "message"
                if self.open is None or self.open["type"] != kind:
                    events += self._start(kind)
                assert self.open is not None
                self.open["content"][0]["text"] += d.text
                i = self.items.index(self.open)
                name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                extra = {} if kind == "reasoning" else {"logprobs": []}
                events.append((name, {"item_id": self.open["id"], "output_index": i, "content_index": 0,
                                      "delta": d.text, **extra}))  # fmt: skip
            else:
                events += self._close()
                item = {"type": "function_call", "id": f"fc_{secrets.token_hex(8)}", "call_id": d.id,
                        "name": d.name, "arguments": d.arguments, "status": "completed"}  # fmt: skip
                self.items.append(item)
                self.calls.append(item)
                i = len(self.items) - 1
                events += [
                    ("response.output_item.added", {"output_index": i,
                                                    "item": {**item, "arguments": "", "status": "in_progress"}}),
                    ("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": i,
                                                                 "delta": d.arguments}),
                    ("response.function_call_arguments.done", {"item_id": item["id"], "output_index": i,
                                                                "name": d.name, "arguments": d.arguments}),
                    ("response.output_item.done", {"output_index": i, "item": item}),
                ]  # fmt: skip
        if ev.finish is not None:
            events += self._close()
        return events

    def message(self) -> dict[str, Any]:
        """The assistant chat message this output is (for the stored conversation)."""
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(
            i["content"][0]["text"] for i in self.items if i["type"] == "message")}  # fmt: skip
        reasoning = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
        if reasoning:
            msg["reasoning_content"] = reasoning
        if self.calls:
            msg["tool_calls"] = [{"id": c["call_id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]  # fmt: skip
        return msg


def _finish(srv: ServerState, body: dict[str, Any], out: _Output, finals: list[ChoiceEvent], prompt_tokens: int,
            turn: list[dict[str, Any]], store: bool) -> dict[str, Any]:  # fmt: skip
    """The final response object (stored when asked); a 503 when generation failed."""
    ev = finals[-1] if finals else None
    if ev is not None and ev.finish == "error":
        raise APIError(503, f"generation failed: {ev.error}", type="server_error", code="engine_error")
    u = usage(prompt_tokens, finals)
    body = {**body, "output": out.items, "store": store, "usage": {
        "input_tokens": u["prompt_tokens"], "input_tokens_details": u["prompt_tokens_details"],
        "output_tokens": u["completion_tokens"], "output_tokens_details": u["completion_tokens_details"],
        "total_tokens": u["total_tokens"]}}  # fmt: skip
    if ev is not None and ev.finish == "length":
        body.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    else:
        body["status"] = "completed"
    if store:
        srv.responses.put(body, [*turn, out.message()])
    return body


async def _stream(srv: ServerState, request: Request, run: Any, body: dict[str, Any], turn: list[dict[str, Any]],
                  store: bool) -> AsyncIterator[str]:  # fmt: skip
    seq = 0

    def event(kind: str, payload: dict[str, Any]) -> str:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **payload}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield event("response.created", {"response": body})
    yield event("response.in_progress", {"response": body})
    out = _Output(body["id"])
    finals: list[ChoiceEvent] = []
    try:
        async for ev in fan_in(srv, run.jobs, request, stream=True):
            for kind, payload in out.feed(ev):
                yield event(kind, payload)
            if ev.finish is not None:
                finals.append(ev)
        final = _finish(srv, body, out, finals, run.prompt_tokens, turn, store)
    except APIError as e:
        failed = {**body, "status": "failed", "error": {"code": e.code or "server_error", "message": e.message}}
        yield event("response.failed", {"response": failed})
        return
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    yield event(kind, {"response": final})
