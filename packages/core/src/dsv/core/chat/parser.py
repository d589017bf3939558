"""Parse V3.2 model output back into reasoning, content and tool calls, incrementally.

Generated text (decoded with special tokens kept) looks like
``reasoning</think>content\\n\\n<｜DSML｜function_calls>...</｜DSML｜function_calls><｜end▁of▁sentence｜>``
in thinking mode and the same without ``reasoning</think>`` in chat mode. The split points are
those of the V3.2 parser: ``</think>``, then ``\\n\\n<｜DSML｜function_calls``, then EOS.

:class:`StreamParser` is a small state machine fed arbitrary text pieces: it emits reasoning and
content as soon as it is sure the text is not the start of a tag (a possible tag prefix is held
back), and a whole tool call once its ``</｜DSML｜invoke>`` arrives. :func:`parse_assistant` is the
same machine fed once, so streaming and one-shot parsing cannot disagree however the text is
split. Nothing raises on bad input: special tokens inside reasoning/content are dropped (the V3.2
parser refuses them), malformed or unterminated invokes produce no call, text after the tool
block or after EOS is ignored, and ``finished`` says whether EOS was seen.

Run the checks: ``pytest packages/core/tests/test_chat_parser.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dsv.core.chat.templates import Templates

__all__ = ["ChatDelta", "ParsedAssistant", "StreamParser", "ToolCall", "parse_assistant", "partial_call"]


@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call; ``arguments`` is a JSON object string."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ChatDelta:
    """One streaming event: a piece of reasoning or content text, or one complete tool call."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    index: int = -1
    id: str = ""
    name: str = ""
    arguments: str = ""

    def tool_call(self) -> ToolCall:
        """The tool call this delta carries (``kind == "tool_call"``)."""
        assert self.kind == "tool_call", f"delta of kind {self.kind!r} carries no tool call"
        return ToolCall(id=self.id, name=self.name, arguments=self.arguments)


@dataclass
class ParsedAssistant:
    """A parsed assistant turn. ``reasoning_content`` is ``""`` in chat mode, as the official
    parser (``parse_message_from_completion_text``) gives it."""

    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: bool = False

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style assistant message (round-trips through ``encode_messages``)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content, "reasoning_content": self.reasoning_content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


_State = Literal["reasoning", "content", "tools", "after_tools", "done"]


class StreamParser:
    """Incremental parser for one assistant turn.

    ``feed(delta)`` returns the events the new text completes; ``finish()`` flushes what was held
    back at the end of the stream. Tool-call ids are ``f"{id_prefix}_{index}"``.
    """

    def __init__(
        self, thinking: bool, *, templates: Templates | None = None, id_prefix: str = "call"
    ) -> None:
        t = templates or Templates()
        self.thinking = thinking
        self.id_prefix = id_prefix
        self.finished = False
        self._t = t
        self._state: _State = "reasoning" if thinking else "content"
        self._buf = ""
        self._n_calls = 0
        self._start = t.tool_calls_start
        self._invoke_open = f"<{t.dsml_token}invoke"
        self._invoke_close = f"</{t.dsml_token}invoke>"
        self._block_close = f"</{t.dsml_token}function_calls>"
        self._param_re = re.compile(
            rf'<{re.escape(t.dsml_token)}parameter name="(.*?)" string="(true|false)">(.*?)'
            rf"</{re.escape(t.dsml_token)}parameter>",
            re.DOTALL,
        )
        self._name_re = re.compile(r'^ name="([^"]*)">')
        # state -> (markers that change state, markers that are dropped)
        specials = t.special_tokens
        self._markers: dict[str, dict[str, str | None]] = {
            "reasoning": {t.thinking_end_token: "content", self._start: "tools", t.eos_token: "done"}
            | {s: None for s in specials if s not in (t.thinking_end_token, t.eos_token)},
            "content": {self._start: "tools", t.eos_token: "done"}
            | {s: None for s in specials if s != t.eos_token},
            "tools": {self._invoke_close: "tools", self._block_close: "after_tools", t.eos_token: "done"},
            "after_tools": {t.eos_token: "done"},
        }

    def feed(self, text: str) -> list[ChatDelta]:
        """Consume a piece of generated text; return the events it completes."""
        if self._state == "done" or not text:
            return []
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[ChatDelta]:
        """End of the stream: flush held-back reasoning/content text. An unterminated invoke is dropped."""
        if self._state == "done":
            return []
        out = self._drain(final=True)
        self._buf = ""
        return out

    def _drain(self, final: bool) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        while self._state != "done":
            markers = self._markers[self._state]
            hit = _earliest(self._buf, markers)
            if hit is None:
                if self._state in ("reasoning", "content"):
                    keep = 0 if final else _held_back(self._buf, markers)
                    self._emit_text(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep :]
                elif self._state == "after_tools":
                    self._buf = "" if final else self._buf[len(self._buf) - _held_back(self._buf, markers) :]
                return out
            pos, marker = hit
            before, self._buf = self._buf[:pos], self._buf[pos + len(marker) :]
            if self._state in ("reasoning", "content"):
                self._emit_text(before, out)
            elif self._state == "tools" and marker == self._invoke_close:
                self._emit_invoke(before, out)
            nxt = markers[marker]
            if nxt is not None:
                self._state = nxt  # type: ignore[assignment]
            if self._state == "done":
                self.finished = True
                self._buf = ""
        return out

    def _emit_text(self, text: str, out: list[ChatDelta]) -> None:
        if text:
            kind = "reasoning" if self._state == "reasoning" else "content"
            out.append(ChatDelta(kind=kind, text=text))

    def _emit_invoke(self, segment: str, out: list[ChatDelta]) -> None:
        start = segment.rfind(self._invoke_open)
        if start < 0:
            return
        body = segment[start + len(self._invoke_open) :]
        m = self._name_re.match(body)
        if m is None or not m.group(1):
            return
        args: dict[str, Any] = {}
        for key, is_str, value in self._param_re.findall(body[m.end() :]):
            if is_str == "true":
                args[key] = value
                continue
            try:
                args[key] = json.loads(value)
            except ValueError:
                args[key] = value  # not JSON although marked so: keep the text rather than lose it
        index = self._n_calls
        self._n_calls += 1
        out.append(
            ChatDelta(
                kind="tool_call",
                index=index,
                id=f"{self.id_prefix}_{index}",
                name=m.group(1),
                arguments=json.dumps(args, ensure_ascii=False),
            )
        )


def partial_call(
    text: str, templates: Templates | None = None, *, index: int, id_prefix: str = "call"
) -> ChatDelta | None:
    """The call an unterminated last invoke of ``text`` (the whole generated turn, forced opening
    included) was writing, or None when ``text`` does not end inside a named invoke.

    Complete parameters are kept as :class:`StreamParser` reads them; a string parameter cut
    mid-value keeps its text so far, a cut JSON value is left out (it does not parse). The parser
    itself drops such an invoke: this is what an API returns for a call the token limit cut.
    """
    templates = templates or Templates()
    d = templates.dsml_token
    block = text.rfind(templates.tool_calls_start)
    if block < 0 or f"</{d}function_calls>" in text[block:]:
        return None
    opening = f"<{d}invoke"
    start = text.rfind(opening, block)
    if start < 0 or f"</{d}invoke>" in text[start:]:
        return None
    body = text[start + len(opening) :]
    m = re.match(r' name="([^"]+)">', body)
    if m is None:
        return None
    rest = body[m.end() :]
    args: dict[str, Any] = {}
    close = f"</{d}parameter>"
    param = re.compile(rf'<{re.escape(d)}parameter name="(.*?)" string="(true|false)">', re.DOTALL)
    pos = 0
    while (p := param.search(rest, pos)) is not None:
        end = rest.find(close, p.end())
        value = rest[p.end() :] if end < 0 else rest[p.end() : end]
        key, is_str = p.group(1), p.group(2) == "true"
        if is_str:
            # A cut value may end in part of the closing tag: that is not the model's text.
            args[key] = value if end >= 0 else _strip_partial(value, close)
        else:
            try:
                args[key] = json.loads(value)
            except ValueError:
                if end >= 0:
                    args[key] = value
        if end < 0:
            break
        pos = end + len(close)
    return ChatDelta(kind="tool_call", index=index, id=f"{id_prefix}_{index}", name=m.group(1),
                     arguments=json.dumps(args, ensure_ascii=False))  # fmt: skip


def _strip_partial(value: str, marker: str) -> str:
    for n in range(min(len(marker) - 1, len(value)), 0, -1):
        if value.endswith(marker[:n]):
            return value[:-n]
    return value


def _earliest(buf: str, markers: dict[str, str | None]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for marker in markers:
        pos = buf.find(marker)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(marker) > len(best[1]))):
            best = (pos, marker)
    return best


def _held_back(buf: str, markers: dict[str, str | None]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of a marker."""
    keep = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), keep, -1):
            if buf.endswith(marker[:n]):
                keep = n
                break
    return keep


def parse_assistant(
    text: str, *, thinking: bool, templates: Templates | None = None, id_prefix: str = "call"
) -> ParsedAssistant:
    """Parse a complete (or truncated) generated assistant turn. Never raises."""
    parser = StreamParser(thinking, templates=templates, id_prefix=id_prefix)
    return collect(parser.feed(text) + parser.finish(), thinking=thinking, finished=parser.finished)


def collect(deltas: list[ChatDelta], *, thinking: bool, finished: bool) -> ParsedAssistant:
    """Aggregate stream events into a :class:`ParsedAssistant`."""
    reasoning = [d.text for d in deltas if d.kind == "reasoning"]
    return ParsedAssistant(
        content="".join(d.text for d in deltas if d.kind == "content"),
        reasoning_content="".join(reasoning) if thinking else "",
        tool_calls=[d.tool_call() for d in deltas if d.kind == "tool_call"],
        finished=finished,
    )
