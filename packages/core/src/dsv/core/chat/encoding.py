"""Encode OpenAI-style chat messages into the DeepSeek-V3.2 prompt string.

The rendering follows the V3.2 encoder rule for rule (spec §6.2):

- BOS, then each message; a system message is its raw content plus optional "## Tools" and
  "## Response Format:" sections; a user turn is ``<｜User｜>{content}<｜Assistant｜>`` followed by
  ``<think>`` (the last user/developer turn in thinking mode) or ``</think>``;
- an assistant turn is ``{reasoning}{content}{tool_calls}<｜end▁of▁sentence｜>`` where the reasoning
  (``reasoning_content</think>``) appears only in thinking mode after the last user turn;
- tool results follow the assistant's EOS directly inside ``<function_results>`` and end with the
  think tag the model continues from. Results are matched to calls by order.

``tools``/``response_format`` given to :func:`encode_messages` go into the first system message
(an empty one is added at the front when there is none); a developer message carries its own
``tools``/``response_format`` keys, like the official encoder.

Two rules of the official encoder (``encoding_dsv32.py``) that are easy to miss, both matched:

- in thinking mode, an assistant message after the last user message must carry
  ``reasoning_content`` or ``tool_calls`` (the official encoder raises, and DeepSeek's API answers
  "Missing `reasoning_content` field in the assistant message at message index N";
  :class:`ChatFormatError` names the index the same way). An explicit ``reasoning_content: ""`` is
  accepted, where the official encoder refuses it too: it is what the parser gives for a
  generation that closed its ``<think>`` at once, and re-encoding a parsed turn must render it as
  generated (RL rollouts and in-process eval re-encode each step);
- in thinking mode with ``drop_thinking``, a developer message before the last user/developer
  message is removed from the history (the official ``drop_thinking_messages`` keeps only user,
  system, tool and stripped assistant turns there). dsv matches the output rather than keeping the
  message: a real checkpoint was trained on the official prompts, and the same history must give
  the same tokens on dsv and on the reference servers (vLLM, SGLang), or prefix caches and RL
  replays of a conversation would diverge. A developer message's instructions therefore hold for
  its own turn; repeat them (or use a system message) to keep them in force.

Run the checks: ``pytest packages/core/tests/test_chat_encoding.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dsv.core.chat.context import apply_thinking_context, last_user_index
from dsv.core.chat.templates import Templates

__all__ = [
    "ChatFormatError",
    "encode_assistant_completion",
    "encode_messages",
    "encode_tool_calls",
    "forced_call_name",
    "forced_call_opening",
    "normalize_tool_calls",
    "render_tools",
    "tool_schemas",
]

_ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatFormatError(ValueError):
    """The messages cannot be rendered (unknown role, orphan tool result, bad arguments...)."""


def _text(content: Any) -> str:
    """Message content as text: a string, None, or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ChatFormatError(f"unsupported content part {part!r}: only text parts can be encoded")
        return "".join(parts)
    raise ChatFormatError(
        f"message content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def tool_schemas(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``function`` objects of an OpenAI ``tools`` list (plain function dicts pass through)."""
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise ChatFormatError(f"a tool must be an object, got {tool!r}")
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ChatFormatError(
                f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}"
            )
        out.append(dict(function))
    return out


def render_tools(tools: Sequence[Mapping[str, Any]], templates: Templates | None = None) -> str:
    """The "## Tools" section: the prose with one JSON schema line per tool."""
    t = templates or Templates()
    return t.tools_system_template.format(
        tool_schemas="\n".join(_to_json(s) for s in tool_schemas(tools)),
        dsml_token=t.dsml_token,
        thinking_start_token=t.thinking_start_token,
        thinking_end_token=t.thinking_end_token,
    )


def _render_response_format(response_format: Any, t: Templates) -> str:
    return t.response_format_template.format(schema=_to_json(response_format))


def normalize_tool_calls(tool_calls: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, arguments dict)`` for OpenAI tool calls, flat ``{name, arguments}`` dicts or ToolCall objects."""
    out = []
    for call in tool_calls:
        if isinstance(call, Mapping):
            function = call.get("function", call)
            name, arguments = function.get("name"), function.get("arguments", "{}")
        else:
            name, arguments = getattr(call, "name", None), getattr(call, "arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"tool call without a function name: {call!r}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"tool call {name!r} has arguments that are not JSON: {e}") from None
        if not isinstance(arguments, Mapping):
            raise ChatFormatError(f"tool call {name!r} arguments must be a JSON object, got {arguments!r}")
        out.append((name, dict(arguments)))
    return out


def encode_tool_calls(tool_calls: Sequence[Any], templates: Templates | None = None) -> str:
    """The DSML block for a list of tool calls, starting with its ``\\n\\n`` separator."""
    t = templates or Templates()
    invokes = []
    for name, arguments in normalize_tool_calls(tool_calls):
        params = "\n".join(
            f'<{t.dsml_token}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f"{value if isinstance(value, str) else _to_json(value)}</{t.dsml_token}parameter>"
            for key, value in arguments.items()
        )
        invokes.append(t.tool_call_template.format(dsml_token=t.dsml_token, name=name, arguments=params))
    return "\n\n" + t.tool_calls_template.format(dsml_token=t.dsml_token, tool_calls="\n".join(invokes))


def forced_call_name(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> str | None:
    """The function whose call an OpenAI ``tool_choice`` forces on the answer.

    Returns the function's name (a named choice, or ``"required"`` with a single tool), ``""`` when
    a call is forced but the model picks the function (``"required"`` with several tools), and None
    when no call is forced (``None``, ``"auto"``, ``"none"``). ``tool_choice`` is a string, an
    OpenAI ``{"type": "function", "function": {"name": ...}}`` object, or an object with a
    ``function`` mapping attribute (a parsed request). Raises :class:`ChatFormatError` when the
    named function is not among ``tools`` or ``"required"`` comes without tools.
    """
    names = [s["name"] for s in tool_schemas(tools)]
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if tool_choice == "required":
        if not names:
            raise ChatFormatError("tool_choice is `required` but no tools were given")
        return names[0] if len(names) == 1 else ""
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else getattr(tool_choice, "function", None)
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise ChatFormatError(
            f"tool_choice must be none, auto, required or {{'type': 'function', 'function': {{'name': ...}}}}, "
            f"got {tool_choice!r}"
        )
    if name not in names:
        raise ChatFormatError(f"tool_choice names `{name}`, which is not in tools")
    return name


def forced_call_opening(name: str | None = None, templates: Templates | None = None) -> str:
    """The DSML text a forced call starts with, as the model would have written it after its content.

    With a ``name``, the opening runs through the invoke's name (``\\n\\n<｜DSML｜function_calls>\\n
    <｜DSML｜invoke name="NAME">\\n``) and the model continues with the parameters; without one it
    stops after ``name="`` and the model writes the name. Servers append it to the prompt (or
    constrain the text after ``</think>`` to it in thinking mode); RL rollouts that force a call do
    the same, so both produce the tokens :func:`encode_tool_calls` renders for the finished call.
    """
    t = templates or Templates()
    opening = f'{t.tool_calls_start}>\n<{t.dsml_token}invoke name="'
    return opening + f'{name}">\n' if name else opening


def encode_assistant_completion(
    message: Mapping[str, Any], *, thinking: bool, templates: Templates | None = None
) -> str:
    """The text a model generates for ``message`` after the generation prompt (ends with EOS).

    In thinking mode that is ``reasoning</think>content[tool calls]<EOS>``, otherwise
    ``content[tool calls]<EOS>`` -- the inverse of :func:`dsv.core.chat.parse_assistant`.
    """
    t = templates or Templates()
    reasoning = ""
    if thinking:
        reasoning = (
            t.thinking_template.format(reasoning_content=message.get("reasoning_content") or "")
            + t.thinking_end_token
        )
    calls = message.get("tool_calls") or []
    return t.assistant_msg_template.format(
        reasoning=reasoning,
        content=_text(message.get("content")),
        tool_calls=encode_tool_calls(calls, t) if calls else "",
    )


def _original_index(messages: Sequence[Mapping[str, Any]], i: int, kept: int) -> int:
    """Index in the caller's list of message ``i`` of the rendered list (developer messages may have
    been removed before it; messages after the last user one keep their offset from the end)."""
    return len(messages) - (kept - i)


def encode_messages(
    messages: Sequence[Mapping[str, Any]],
    *,
    thinking: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    response_format: Mapping[str, Any] | None = None,
    drop_thinking: bool = True,
    add_bos: bool = True,
    templates: Templates | None = None,
) -> str:
    """Render ``messages`` as a V3.2 prompt ending with the generation prompt.

    Args:
        messages: OpenAI-style dicts with ``role`` (system/user/assistant/tool/developer),
            ``content``, and for assistants ``reasoning_content`` / ``tool_calls``.
        thinking: thinking mode (the prompt ends with ``<｜Assistant｜><think>``) or chat mode
            (``</think>``).
        tools: OpenAI ``tools`` list, rendered in the first system message.
        response_format: JSON schema object rendered as the "## Response Format:" section.
        drop_thinking: in thinking mode, drop ``reasoning_content`` of assistant turns before the
            last user message (:func:`apply_thinking_context`) and, as the official encoder does,
            developer messages before the last user/developer message.
        add_bos: start with the BOS string.
        templates: the checkpoint's templates (``Templates.from_checkpoint``); dsv's by default.

    Raises:
        ChatFormatError: an unknown role, a tool result with no matching call, unparsable tool
            arguments, unsupported content parts, or (thinking mode) an assistant message after the
            last user message with neither reasoning nor tool calls.
    """
    t = templates or Templates()
    msgs = [dict(m) for m in messages]
    for i, m in enumerate(msgs):
        if m.get("role") not in _ROLES:
            raise ChatFormatError(
                f"message {i} has role {m.get('role')!r}; expected one of {', '.join(_ROLES)}"
            )
    if tools or response_format:
        first_system = next((i for i, m in enumerate(msgs) if m["role"] == "system"), None)
        if first_system is None:
            msgs.insert(0, {"role": "system", "content": ""})
            first_system = 0
        if tools:
            msgs[first_system]["tools"] = list(tools)
        if response_format:
            msgs[first_system]["response_format"] = response_format
    if thinking and drop_thinking:
        last = last_user_index(msgs)
        msgs = [m for i, m in enumerate(msgs) if not (m["role"] == "developer" and i < last)]
        msgs = apply_thinking_context(msgs)
    last_user = last_user_index(msgs)
    if thinking:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > last_user and m.get("reasoning_content") is None and not m.get("tool_calls"):
                raise ChatFormatError(
                    f"missing reasoning_content in the assistant message at message index "
                    f"{_original_index(messages, i, len(msgs))}: in thinking mode an assistant message after the "
                    "last user message needs its reasoning_content or tool_calls; send the message back as "
                    "it was returned, or use chat mode"
                )

    out = [t.bos_token] if add_bos else []
    for i, m in enumerate(msgs):
        role, content = m["role"], _text(m.get("content"))
        if role == "system":
            out.append(t.system_msg_template.format(content=content))
            if m.get("tools"):
                out.append("\n\n" + render_tools(m["tools"], t))
            if m.get("response_format"):
                out.append("\n\n" + _render_response_format(m["response_format"], t))
        elif role in ("user", "developer"):
            if role == "developer":
                sections = ""
                if m.get("tools"):
                    sections += "\n\n" + render_tools(m["tools"], t)
                if m.get("response_format"):
                    sections += "\n\n" + _render_response_format(m["response_format"], t)
                content = f"{sections}\n\n# The user's message is: {content}"
            out.append(t.user_msg_template.format(content=content))
            out.append(t.thinking_start_token if thinking and i == last_user else t.thinking_end_token)
        elif role == "assistant":
            # Reasoning only for the current turn (after the last user message), in thinking mode.
            current = thinking and i > last_user
            out.append(
                encode_assistant_completion(
                    m if current else {**m, "reasoning_content": None}, thinking=current, templates=t
                )
            )
        else:  # tool
            j = i - 1
            while j >= 0 and msgs[j]["role"] == "tool":
                j -= 1
            calls = msgs[j].get("tool_calls") if j >= 0 and msgs[j]["role"] == "assistant" else None
            order = i - j
            if not calls or len(calls) < order:
                raise ChatFormatError(
                    f"message {i} is a tool result with no matching tool call in the assistant message before it"
                )
            if order == 1:
                out.append("\n\n<function_results>")
            out.append(t.tool_output_template.format(content=content))
            if order == len(calls):
                out.append("\n</function_results>")
                out.append(
                    "\n\n" + (t.thinking_start_token if thinking and i >= last_user else t.thinking_end_token)
                )
    return "".join(out)
