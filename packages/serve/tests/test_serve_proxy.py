"""``--engine vllm|sglang``: the engines' command lines, and dsv's API in front of an engine.

The engine is ``serve_scripted_engine.py`` (beside this file), a real HTTP server in a real
subprocess on 127.0.0.1 that records what it receives and streams scripted completions. The tests
check that the dsv-encoded prompt is what reaches the engine and that the engine's raw text comes
back to the ``openai`` client parsed into ``reasoning_content``, ``content`` and ``tool_calls``.
The last two tests run the whole ``dsv serve --engine vllm|sglang`` command with the scripted
engine standing in as the ``vllm`` executable and the ``sglang.launch_server`` module.

Run: ``pytest packages/serve/tests/test_serve_proxy.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from dsv.core.chat import Templates, encode_assistant_completion, encode_messages
from dsv.core.tokenizer import EOS
from dsv.serve.launch import engine_command

ENGINE = Path(__file__).with_name("serve_scripted_engine.py")


def test_engine_command_argv() -> None:
    assert engine_command("vllm", "/ckpt/v32", host="127.0.0.1", port=8123, model_name="dsv") == [
        "vllm", "serve", "/ckpt/v32",
        "--tokenizer-mode", "deepseek_v32",
        "--tool-call-parser", "deepseek_v32",
        "--enable-auto-tool-choice",
        "--reasoning-parser", "deepseek_v3",
        "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "dsv",
    ]  # fmt: skip
    assert engine_command(
        "sglang", "/ckpt/v32", host="0.0.0.0", port=30000, model_name="dsv", extra=["--tp", "8"]
    ) == [
        sys.executable, "-m", "sglang.launch_server",
        "--model", "/ckpt/v32",
        "--tool-call-parser", "deepseekv32",
        "--reasoning-parser", "deepseek-v3",
        "--host", "0.0.0.0", "--port", "30000",
        "--served-model-name", "dsv",
        "--tp", "8",
    ]  # fmt: skip
    # Each engine's own spelling of the context length; the dtype is --dtype for both.
    for engine, flag in (("vllm", "--max-model-len"), ("sglang", "--context-length")):
        cmd = engine_command(engine, "/c", host="h", port=1, model_name="m", max_model_len=4096, dtype="bfloat16",
                             extra=["--tp", "8"])  # fmt: skip
        assert cmd[-6:] == [flag, "4096", "--dtype", "bfloat16", "--tp", "8"]
    with pytest.raises(ValueError, match="unknown engine"):
        engine_command("tgi", "/ckpt", host="127.0.0.1", port=1, model_name="m")


def _replies(script: SimpleNamespace, templates: Templates) -> list[list[str]]:
    """(prompt substring, engine output) pairs: what a model would write, minus the EOS the engine
    strips. The tool-result turn comes first: its prompt also holds the weather question."""

    def out(answer: dict[str, Any], thinking: bool) -> str:
        return encode_assistant_completion(answer, thinking=thinking, templates=templates).removesuffix(EOS)

    # With two tools and tool_choice="required" the prompt ends in a forced `invoke name="`: the
    # engine writes the rest of the call (the name first).
    full_call = out({"content": "", "tool_calls": [script.CALL]}, False)
    rome = {**script.CALL, "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    return [
        ["Paris and Rome?", out({"content": "", "tool_calls": [script.CALL, rome]}, False)],
        ['"get_time"', full_call[full_call.index('invoke name="') + len('invoke name="') :]],
        ["sunny, 21 C", out({"content": "It is sunny in Paris."}, False)],
        ["Weather in Paris?", out({"content": "", "tool_calls": [script.CALL]}, False)],
        ["hi", out({"reasoning_content": "say hello", "content": "Hello there!"}, True)],
    ]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def engine_env(tmp_path: Path, script: SimpleNamespace, tiny_ckpt: Path) -> dict[str, str]:
    (tmp_path / "script.json").write_text(json.dumps(_replies(script, Templates.from_checkpoint(tiny_ckpt))))
    return {
        **os.environ,
        "DSV_TEST_ENGINE_SCRIPT": str(tmp_path / "script.json"),
        "DSV_TEST_ENGINE_RECORD": str(tmp_path / "record.jsonl"),
    }


@pytest.fixture
def engine_url(engine_env: dict[str, str], reserve_port: Callable[[], int]) -> Iterator[str]:
    port = reserve_port()
    cmd = [
        sys.executable,
        str(ENGINE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "inner",
    ]
    proc = subprocess.Popen(cmd, env=engine_env)
    try:
        from dsv.serve.launch import wait_ready

        wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, timeout_s=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _check_round_trip(client: openai.OpenAI, script: SimpleNamespace, model: str) -> None:
    """Non-streamed thinking, streamed tool call, non-streamed answer after the tool result."""
    greet = client.chat.completions.create(model=f"{model}-reasoner", messages=script.GREET, max_tokens=50)
    msg = greet.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("say hello", "Hello there!")  # type: ignore[attr-defined]
    assert greet.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=model, messages=script.ASK, tools=[script.WEATHER_TOOL], max_tokens=200, stream=True
    )
    calls, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert finish == "tool_calls"
    after = client.chat.completions.create(
        model=model, messages=script.AFTER_TOOL, tools=[script.WEATHER_TOOL], max_tokens=50
    )
    assert (
        after.choices[0].message.content == "It is sunny in Paris."
        and not after.choices[0].message.tool_calls
    )


def _check_prompts(
    records: list[dict[str, Any]], script: SimpleNamespace, templates: Templates, model: str
) -> None:
    sent = [r["request"] for r in records if "request" in r]
    expected = [
        encode_messages(script.GREET, thinking=True, templates=templates),
        encode_messages(script.ASK, thinking=False, tools=[script.WEATHER_TOOL], templates=templates),
        encode_messages(script.AFTER_TOOL, thinking=False, tools=[script.WEATHER_TOOL], templates=templates),
    ]
    assert [b["prompt"] for b in sent] == expected, "the engine got dsv's chat encoding, unchanged"
    assert [b["max_tokens"] for b in sent] == [50, 200, 50]
    for b in sent:
        assert b["model"] == model and b["stream"] is True
        assert b["skip_special_tokens"] is False and b["spaces_between_special_tokens"] is False
        assert not {"presence_penalty", "frequency_penalty", "logit_bias"} & set(b), "none asked for"


def test_proxy_forwards_encoded_prompts_and_parses_output(
    engine_url: str, engine_env: dict[str, str], tiny_ckpt: Path, script: SimpleNamespace, live_server: Any
) -> None:
    from dsv.serve import load_proxy_app

    app = load_proxy_app(str(tiny_ckpt), engine_url, model_name="dsv", engine_model="inner", api_key="k")
    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        _check_round_trip(client, script, "dsv")
        raw = client.completions.create(
            model="dsv", prompt="hi there", max_tokens=20, presence_penalty=0.5, frequency_penalty=0.25,
            logit_bias={"42": -100},
        )  # fmt: skip
        assert raw.choices[0].text.startswith("say hello</think>"), "completions pass the engine text as is"
    records = _records(Path(engine_env["DSV_TEST_ENGINE_RECORD"]))
    _check_prompts(records[:-1], script, Templates.from_checkpoint(tiny_ckpt), "inner")
    assert records[-1]["request"]["prompt"] == "hi there"
    penalties = {k: records[-1]["request"].get(k) for k in ("presence_penalty", "frequency_penalty")}
    assert penalties == {"presence_penalty": 0.5, "frequency_penalty": 0.25}
    assert records[-1]["request"]["logit_bias"] == {"42": -100.0}


def test_required_tool_choice_with_several_tools_forces_the_opening(
    engine_url: str, engine_env: dict[str, str], tiny_ckpt: Path, script: SimpleNamespace, live_server: Any
) -> None:
    from dsv.serve import load_proxy_app

    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    app = load_proxy_app(str(tiny_ckpt), engine_url, model_name="dsv", engine_model="inner")
    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="dsv", messages=script.ASK, tools=[script.WEATHER_TOOL, clock], tool_choice="required"
        )
    calls = out.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert out.choices[0].finish_reason == "tool_calls"
    (sent,) = [r["request"] for r in _records(Path(engine_env["DSV_TEST_ENGINE_RECORD"])) if "request" in r]
    templates = Templates.from_checkpoint(tiny_ckpt)
    prompt = encode_messages(
        script.ASK, thinking=False, tools=[script.WEATHER_TOOL, clock], templates=templates
    )
    opening = f'{templates.tool_calls_start}>\n<{templates.dsml_token}invoke name="'
    assert sent["prompt"] == prompt + opening


def test_parallel_tool_calls_false_keeps_the_first_call(
    engine_url: str, tiny_ckpt: Path, script: SimpleNamespace, live_server: Any
) -> None:
    from dsv.serve import load_proxy_app

    app = load_proxy_app(str(tiny_ckpt), engine_url, model_name="dsv", engine_model="inner")
    kw: dict[str, Any] = {"model": "dsv", "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
                          "tools": [script.WEATHER_TOOL]}  # fmt: skip

    def cities(calls: list[Any]) -> list[str]:
        return [json.loads(c.function.arguments)["city"] for c in calls]

    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        both = client.chat.completions.create(**kw)
        assert cities(both.choices[0].message.tool_calls or []) == ["Paris", "Rome"]
        one = client.chat.completions.create(parallel_tool_calls=False, **kw)
        assert cities(one.choices[0].message.tool_calls or []) == ["Paris"]
        assert one.choices[0].finish_reason == "tool_calls"
        assert one.usage is not None and both.usage is not None
        assert one.usage.completion_tokens < both.usage.completion_tokens, "generation ended after the call"
        chunks = list(client.chat.completions.create(parallel_tool_calls=False, stream=True, **kw))
        streamed = [tc for ch in chunks for c in ch.choices for tc in c.delta.tool_calls or []]
        assert cities(streamed) == ["Paris"] and [tc.index for tc in streamed] == [0]
        assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]


def test_proxy_reports_engine_errors(engine_url: str, tiny_ckpt: Path, live_server: Any) -> None:
    from dsv.serve import load_proxy_app

    app = load_proxy_app(str(tiny_ckpt), engine_url, model_name="dsv")
    with live_server(app) as server:
        r = httpx.post(
            server.url + "/v1/completions", json={"model": "dsv", "prompt": "no match", "max_tokens": 5}
        )
    assert r.status_code == 503 and "engine returned 400" in r.json()["error"]["message"]


def _dsv_serve(
    engine: str, ckpt: Path, env: dict[str, str], tmp: Path, port: int, *args: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``dsv serve CKPT --engine ENGINE`` with the scripted engine installed under the engine's name."""
    fake = tmp / "fake"
    if engine == "vllm":
        (fake / "bin").mkdir(parents=True)
        exe = fake / "bin" / "vllm"
        exe.write_text(f"#!{sys.executable}\n" + ENGINE.read_text())
        exe.chmod(0o755)
        env = {**env, "PATH": f"{fake / 'bin'}{os.pathsep}{env['PATH']}"}
    else:
        (fake / "sglang").mkdir(parents=True)
        (fake / "sglang" / "__init__.py").write_text("")
        shutil.copy(ENGINE, fake / "sglang" / "launch_server.py")
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), env.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv.cli.main", "serve", str(ckpt), "--engine", engine, "--port", str(port), *args], env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"dsv serve exited with {proc.returncode}"
        assert time.monotonic() < deadline, "dsv serve did not come up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_dsv_serve_with_engine(
    engine: str,
    engine_env: dict[str, str],
    tiny_ckpt: Path,
    script: SimpleNamespace,
    tmp_path: Path,
    reserve_port: Callable[[], int],
) -> None:
    # The context length and dtype become the engine's own flags; --engine-args go through as given.
    options = ("--max-model-len", "2048", "--dtype", "bf16", "--engine-args", "--tp 2 --trust-remote-code")
    proc, url = _dsv_serve(engine, tiny_ckpt, engine_env, tmp_path, reserve_port(), *options)
    try:
        name = tiny_ckpt.name
        _check_round_trip(openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), script, name)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) is not None
    records = _records(Path(engine_env["DSV_TEST_ENGINE_RECORD"]))
    (start,) = [r for r in records if "argv" in r]
    argv = start["argv"]
    port = int(argv[argv.index("--port") + 1])
    expected = engine_command(engine, str(tiny_ckpt), host="127.0.0.1", port=port, model_name=name,
                              extra=["--tp", "2", "--trust-remote-code"], max_model_len=2048, dtype="bfloat16")  # fmt: skip
    if engine == "vllm":
        assert start["executable"] == "vllm" and argv == expected[1:]
    else:
        assert start["executable"] == "launch_server.py" and argv == expected[3:]
    _check_prompts(records, script, Templates.from_checkpoint(tiny_ckpt), name)
    # The engine goes with its server: its port stops answering (a deadline, not a fixed sleep).
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "the engine outlived dsv serve"
        time.sleep(0.1)
