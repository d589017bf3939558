"""Agent frameworks against a real ``dsv serve`` on loopback, unchanged.

The checkpoints are tiny: what is tested is the protocol, not the answers. Each agent has
one function tool whose arguments are bounded (a ``Literal``), the call is forced where the
framework allows it, and the run must end without a framework error:

- openai-agents with a Chat Completions model and with its default Responses model, each run
  whole and streamed: the forced call completes, the tool runs, its result goes back and the
  model's answer ends the run. These run against ``answering_ckpt``, a model trained to close a
  turn after a tool result: a random model's free answer always ends at ``max_tokens``, which the
  Responses API reports as ``incomplete`` and openai-agents treats as a failure (as with OpenAI).
  The other tests use random weights;
- pydantic-ai with a structured ``output_type`` (its output tool is forced; a random model choosing
  among it and a function tool could loop until the context is full, so the function tool is in
  its own test) and with a tool and text output (``auto``: pydantic-ai does not let an agent force
  a function tool for a whole run);
- the ``openai`` client's ``chat.completions.parse`` with a strict pydantic function tool, and its
  streaming helper accumulating tool-call deltas into the same call as the non-streamed request.

Run: ``pytest packages/serve/tests/test_serve_agents.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, live_server: Any) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="dsv-tiny", max_model_len=4096, engine_process=False)
    with live_server(app) as srv:
        yield srv


class Report(BaseModel):
    city: Literal["Paris", "Rome"]
    warm: bool


def _weather_tool(seen: list[str]) -> Any:
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    return get_weather


@pytest.fixture(scope="module")
def answering_server(answering_ckpt: Path, live_server: Any) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(answering_ckpt), model_name="dsv-tiny", max_model_len=4096, engine_process=False)
    with live_server(app) as srv:
        yield srv


@pytest.mark.parametrize(("api", "stream"), [("chat", False), ("responses", False), ("chat", True), ("responses", True)])
def test_openai_agents(answering_server: Any, api: str, stream: bool) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    seen: list[str] = []
    client = openai.AsyncOpenAI(base_url=answering_server.url + "/v1", api_key="none", max_retries=0)
    model: Any = (agents.OpenAIChatCompletionsModel if api == "chat" else agents.OpenAIResponsesModel)(
        model="dsv-tiny", openai_client=client)  # fmt: skip
    agent = agents.Agent(
        name="weather", instructions="Use the tool.", tools=[agents.function_tool(_weather_tool(seen))],
        model=model,
        # The first call is forced; openai-agents then resets tool_choice, so the answer is free.
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=64, temperature=0.0),
    )  # fmt: skip
    if stream:  # the streamed run reads every event the server sends (the Responses API's event sequence)

        async def streamed() -> Any:
            run = agents.Runner.run_streamed(agent, "Weather in Paris?", max_turns=4)
            events = [e async for e in run.stream_events()]
            assert any(e.type == "raw_response_event" for e in events)
            return run

        result = asyncio.run(streamed())
    else:
        result = agents.Runner.run_sync(agent, "Weather in Paris?", max_turns=4)
    assert len(seen) == 1 and set(seen) <= {"Paris", "Rome"}
    kinds = [i.type for i in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"], kinds
    assert result.final_output == "Done."
    if api == "responses":  # the run's last response was complete, with usage counted by the server
        last = result.raw_responses[-1]
        assert last.usage.output_tokens > 0 and last.usage.input_tokens > last.usage.output_tokens


def test_pydantic_ai_structured_output(server: Any) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("dsv-tiny", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="none"))
    # Text is not an allowed output: pydantic-ai forces a call of its output tool, which the
    # server's grammar keeps valid under Report's schema, so the first answer ends the run.
    agent = Agent(model, output_type=Report)
    for seed in range(3):
        result = agent.run_sync("Weather in Paris?", model_settings={"max_tokens": 200, "temperature": 1.0,
                                                                      "seed": seed})  # fmt: skip
        assert isinstance(result.output, Report)
        parts = [type(p).__name__ for m in result.all_messages() for p in m.parts]
        assert "RetryPromptPart" not in parts and parts.count("ToolCallPart") == 1, parts


def test_pydantic_ai_tool_with_text_output(server: Any) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    seen: list[str] = []
    model = OpenAIChatModel("dsv-tiny", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="none"))
    agent = Agent(model, tools=[_weather_tool(seen)])
    result = agent.run_sync("Weather in Paris?", model_settings={"max_tokens": 48, "temperature": 1.0, "seed": 2})
    assert isinstance(result.output, str)


def test_openai_parse_and_stream_helper_with_a_forced_tool(server: Any) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    tool = openai.pydantic_function_tool(Report, name="report")
    assert tool["function"].get("strict") is True
    kw: dict[str, Any] = {"model": "dsv-tiny", "messages": [{"role": "user", "content": "Report on Paris."}],
                          "tools": [tool], "tool_choice": "required", "temperature": 1.0, "max_tokens": 200}  # fmt: skip
    for seed in range(3):
        parsed = client.chat.completions.parse(seed=seed, **kw)
        (call,) = parsed.choices[0].message.tool_calls or []
        assert isinstance(call.function.parsed_arguments, Report)
        with client.chat.completions.stream(seed=seed, **kw) as stream:
            final = stream.get_final_completion()
        (streamed,) = final.choices[0].message.tool_calls or []
        assert streamed.function.name == call.function.name == "report"
        assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)
        assert streamed.function.parsed_arguments == call.function.parsed_arguments
        assert final.choices[0].finish_reason == "tool_calls"
