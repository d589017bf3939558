"""Multi-turn episodes: a policy calls tools, the environment executes them, the final answer is verified.

`run_episode(env, task, policy)` drives the loop with OpenAI-style messages:
the policy gets `(messages, tools)` and returns an assistant message, possibly
with `tool_calls` `[{id, type: "function", function: {name, arguments}}]`. Each
call is executed with `dsv.synth.tools.call_tool` against `env.tools(task)` and
answered with `{"role": "tool", "tool_call_id": ..., "content": ...}`. When the
assistant answers without tool calls, its content is parsed with
`env.parse_answer` and scored with `env.verify`; a parse or verifier error is a
scored failure, never a crash. Running out of turns is a failure too.

The policy can be anything: a scripted function in tests, an in-process model,
or an OpenAI-compatible endpoint (the eval harness wraps those).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv.synth.env import AnswerFormatError, Environment, Score, Task, ToolCallRecord, safe_verify
from dsv.synth.tools import call_tool

__all__ = ["EpisodeResult", "Policy", "run_episode"]

Policy = Callable[[list[dict], list[dict]], dict]


@dataclass
class EpisodeResult:
    """Everything an episode produced: the transcript, the tool trace, the final answer text and its score."""

    messages: list[dict]
    trace: list[ToolCallRecord]
    answer_text: str | None
    score: Score
    tool_calls: int
    turns: int
    answer: Any = field(default=None)


def run_episode(env: Environment, task: Task, policy: Policy, *, max_turns: int = 16) -> EpisodeResult:
    """Run one episode of `task` under `policy` for at most `max_turns` assistant turns."""
    fns = env.tools(task)
    messages: list[dict] = [{"role": "user", "content": f"{task.prompt}\n\n{task.answer_format}".strip()}]
    trace: list[ToolCallRecord] = []
    n_calls = 0
    for turn in range(1, max_turns + 1):
        try:
            reply = policy(messages, task.tools)
        except Exception as exc:  # a failing policy (e.g. a dead endpoint) ends this episode only
            return EpisodeResult(
                messages, trace, None, Score.fail(f"policy raised {type(exc).__name__}: {exc}"), n_calls, turn
            )
        if not isinstance(reply, dict):
            reply = {"role": "assistant", "content": str(reply)}
        reply = {**reply, "role": "assistant"}
        messages.append(reply)
        calls = reply.get("tool_calls") or []
        if calls:
            for i, call in enumerate(calls):
                fn = (call or {}).get("function") or {}
                name = str(fn.get("name", ""))
                raw_args = fn.get("arguments", "{}")
                result = call_tool(fns, name, raw_args)
                n_calls += 1
                args = raw_args
                if isinstance(raw_args, str):
                    try:
                        args = json.loads(raw_args or "{}")
                    except json.JSONDecodeError:
                        args = {"_raw": raw_args}
                trace.append(ToolCallRecord(name, args if isinstance(args, dict) else {"_raw": args}, result))
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(call.get("id") or f"call_{turn}_{i}"),
                        "content": result,
                    }
                )
            continue
        text = reply.get("content") or ""
        try:
            answer = env.parse_answer(text)
        except AnswerFormatError as exc:
            return EpisodeResult(
                messages, trace, text, Score.fail(f"unparseable answer: {exc}"), n_calls, turn
            )
        except Exception as exc:
            return EpisodeResult(
                messages,
                trace,
                text,
                Score.fail(f"answer parser raised {type(exc).__name__}: {exc}"),
                n_calls,
                turn,
            )
        score = safe_verify(env, task, answer, trace)
        return EpisodeResult(messages, trace, text, score, n_calls, turn, answer)
    return EpisodeResult(
        messages, trace, None, Score.fail(f"no final answer within {max_turns} turns"), n_calls, max_turns
    )
