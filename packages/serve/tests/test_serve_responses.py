"""``POST /v1/responses`` through the official ``openai`` client (``client.responses``).

- The fixture model (trained on a fixed script, see conftest) answers through the Responses API
  as through chat completions: the tool call as a ``function_call`` item, the answer after a
  ``function_call_output`` item, the thinking greeting as a ``reasoning`` item and a message.
- Streaming: the events come in the documented order and add up to the non-streamed response.
- ``previous_response_id`` continues a stored conversation: the prompt it gives equals the chat
  encoding of the whole conversation, reasoning kept within the turn and dropped after a new user
  message; an unknown id is a 404 in OpenAI's error shape; ``store: false`` keeps nothing.
- A forced call on a random-weight model completes (``tool_choice`` ``required``).

Run: ``pytest packages/serve/tests/test_serve_responses.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from dsv.core.chat import Templates, encode_messages

TOOL = {"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}  # fmt: skip


@pytest.fixture(scope="module")
def client(trained_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=trained_server.url + "/v1", api_key="sk-test", max_retries=0)


def _count(server: Any, text: str) -> int:
    r = httpx.post(server.url + "/tokenize", json={"model": "dsv-tiny", "prompt": text, "add_special_tokens": False},
                   headers={"Authorization": "Bearer sk-test"}, timeout=30)  # fmt: skip
    return int(r.json()["count"])


def test_a_tool_turn_through_responses(script: SimpleNamespace, client: openai.OpenAI) -> None:
    first = client.responses.create(model="dsv-tiny", input=script.ASK[0]["content"], tools=[TOOL],
                                    temperature=0)  # type: ignore[list-item]  # fmt: skip
    assert first.status == "completed"
    (call,) = [i for i in first.output if i.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    # The tool result goes back as an item, the whole turn as input.
    second = client.responses.create(
        model="dsv-tiny", tools=[TOOL], temperature=0,  # type: ignore[list-item]
        input=[{"role": "user", "content": script.ASK[0]["content"]},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
    )  # fmt: skip
    assert second.output_text == "It is sunny in Paris."
    # The same through previous_response_id (the call is in the stored conversation).
    third = client.responses.create(
        model="dsv-tiny", tools=[TOOL], temperature=0, previous_response_id=first.id,  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
    )  # fmt: skip
    assert third.output_text == "It is sunny in Paris."
    assert third.usage is not None and second.usage is not None
    assert third.usage.input_tokens == second.usage.input_tokens
    assert client.responses.retrieve(third.id).output_text == "It is sunny in Paris."


def test_reasoning_item_and_stream_events_in_order(script: SimpleNamespace, client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "dsv-tiny-reasoner", "input": "hi", "temperature": 0}
    full = client.responses.create(**kw)
    assert [i.type for i in full.output] == ["reasoning", "message"]
    assert full.output[0].content[0].text == "say hello"  # type: ignore[union-attr,index]
    assert full.output_text == "Hello there!"
    assert full.usage is not None and full.usage.output_tokens_details.reasoning_tokens > 0
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    r0, r1 = kinds.index("response.reasoning_text.done"), kinds.index("response.output_text.done")
    assert set(kinds[3:r0]) == {"response.reasoning_text.delta"}
    assert kinds[r0 + 1 : r0 + 4] == ["response.output_item.done", "response.output_item.added",
                                      "response.content_part.added"]  # fmt: skip
    assert set(kinds[r0 + 4 : r1]) == {"response.output_text.delta"}
    assert kinds[r1 + 1 : -1] == ["response.content_part.done", "response.output_item.done"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert text == "Hello there!"
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == full.output_text and done.output[0].content[0].text == "say hello"


def test_previous_response_keeps_reasoning_within_the_turn(
    script: SimpleNamespace, client: openai.OpenAI, trained_server: Any, trained_ckpt: Path
) -> None:
    t = Templates.from_checkpoint(trained_ckpt)
    first = client.responses.create(model="dsv-tiny-reasoner", input="hi", temperature=0, max_output_tokens=30)
    said = {"role": "assistant", "content": first.output_text, "reasoning_content": "say hello"}
    # A tool result continues the turn: the reasoning stays in the prompt. A new user message
    # starts a new turn: it goes. The prompt is the chat encoding of the conversation either way.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": TOOL["parameters"]}}]
    for new in ([{"role": "user", "content": "and again?"}],):
        out = client.responses.create(model="dsv-tiny-reasoner", previous_response_id=first.id, input=new,
                                      temperature=0, max_output_tokens=1)  # fmt: skip
        expected = encode_messages([*script.GREET, said, *new], thinking=True, templates=t)
        assert out.usage is not None and out.usage.input_tokens == _count(trained_server, expected)
        assert "say hello" not in expected
    # Within a turn: an assistant turn with a call and its result, continued by id.
    call = client.responses.create(
        model="dsv-tiny-reasoner", tools=[TOOL], temperature=0, max_output_tokens=1,  # type: ignore[list-item]
        input=[{"role": "user", "content": "hi"},
               {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                           "text": "call it"}]},
               {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "c1", "output": "rain"}],
    )  # fmt: skip
    within = [*script.GREET, {"role": "assistant", "content": "", "reasoning_content": "call it", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}]  # fmt: skip
    expected = encode_messages(within, thinking=True, tools=tools, templates=t)
    assert "call it" in expected
    assert call.usage is not None and call.usage.input_tokens == _count(trained_server, expected)


def test_unknown_previous_id_is_a_404_and_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="dsv-tiny", input="hi", previous_response_id="resp_nope")
    assert e.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    kept = client.responses.create(model="dsv-tiny", input="hi", max_output_tokens=2, store=False)
    assert kept.status == "incomplete" and kept.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="dsv-tiny", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])  # fmt: skip
    assert "text only" in bad.value.message and "input.0.content part 0 is `input_image`" in bad.value.message


def test_the_store_is_bounded_in_number_and_age() -> None:
    from dsv.serve.state import ResponseStore

    store = ResponseStore(2, 3600.0)
    for k in range(3):
        store.put({"id": f"r{k}"}, [])
    assert store.get("r0") is None and store.get("r2") is not None
    old = ResponseStore(4, 0.0)
    old.put({"id": "r"}, [])
    assert old.get("r") is None


def test_forced_call_on_random_weights(tiny_ckpt: Path, live_server: Any) -> None:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="dsv-tiny", max_model_len=4096, engine_process=False)
    tool = {"type": "function", "name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["n", "unit"]}}  # fmt: skip
    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        for seed in range(4):
            out = client.responses.create(model="dsv-tiny", input="pick", tools=[tool], tool_choice="required",
                                          extra_body={"seed": seed}, max_output_tokens=400)  # type: ignore[list-item]  # fmt: skip
            (call,) = [i for i in out.output if i.type == "function_call"]
            args = json.loads(call.arguments)
            assert set(args) == {"n", "unit"} and 0 <= args["n"] <= 9 and args["unit"] in ("c", "f")
            streamed = list(client.responses.create(model="dsv-tiny", input="pick", tools=[tool],  # type: ignore[list-item]
                                                    tool_choice="required", extra_body={"seed": seed},
                                                    max_output_tokens=400, stream=True))  # fmt: skip
            done = streamed[-1].response  # type: ignore[union-attr]
            (scall,) = [i for i in done.output if i.type == "function_call"]
            assert (scall.name, json.loads(scall.arguments)) == (call.name, args)
            assert [e.type for e in streamed] == [
                "response.created", "response.in_progress", "response.output_item.added",
                "response.function_call_arguments.delta", "response.function_call_arguments.done",
                "response.output_item.done", "response.completed"]  # fmt: skip
            assert streamed[2].item.type == "function_call" and streamed[2].item.arguments == ""  # type: ignore[union-attr]


def test_named_tool_choice_and_text_format(tiny_ckpt: Path, live_server: Any) -> None:
    import jsonschema

    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="dsv-tiny", max_model_len=4096, engine_process=False)
    pick = {"type": "function", "name": "pick", "parameters": {"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"]}}  # fmt: skip
    other = {"type": "function", "name": "other", "parameters": {"type": "object", "properties": {}}}
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 5}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        out = client.responses.create(model="dsv-tiny", input="go", tools=[other, pick],  # type: ignore[list-item]
                                      tool_choice={"type": "function", "name": "pick"}, max_output_tokens=300)  # fmt: skip
        assert [(i.name, json.loads(i.arguments)["ok"] in (True, False)) for i in out.output
                if i.type == "function_call"] == [("pick", True)]  # fmt: skip
        js = client.responses.create(model="dsv-tiny", input="a number", max_output_tokens=100,
                                     text={"format": {"type": "json_schema", "name": "n", "schema": schema}})  # fmt: skip
        jsonschema.validate(json.loads(js.output_text), schema)
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.responses.create(model="dsv-tiny", input="x", tools=[{"type": "web_search"}])  # type: ignore[list-item]
