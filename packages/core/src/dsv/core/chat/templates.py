"""The V3.2 prompt templates: special strings, message templates and the tools prose.

The structure (special strings, DSML tags, where ``<think>``/``</think>`` go) is fixed by the
V3.2 format and shared by every checkpoint. The *prose* of the "## Tools" and
"## Response Format:" sections is what a model was trained on, so it belongs to the checkpoint:

- dsv's own checkpoints use dsv's wording (``Templates.default()``), written for dsv with the same
  slots (``{dsml_token}``, ``{thinking_start_token}``, ``{thinking_end_token}``, ``{tool_schemas}``;
  ``{schema}`` for the response format) and the same layout as the official encoder.
- a checkpoint folder that ships the official ``encoding/encoding_dsv32.py`` (the Hub repo of
  DeepSeek-V3.2 does) gets that file's string constants, read with :mod:`ast` and never imported
  or executed (``Templates.from_checkpoint(dir)``), so real checkpoints see byte-identical prompts.

Run the checks: ``pytest packages/core/tests/test_chat_templates.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DSV_RESPONSE_FORMAT_TEMPLATE", "DSV_TOOLS_SYSTEM_TEMPLATE", "Templates"]

# dsv's own wording of the tools section. Same slots and the same order of parts as the official
# section: how to write a call, how parameters are typed, thinking after results, the schemas.
DSV_TOOLS_SYSTEM_TEMPLATE = """## Tools

The following tools are available to help with the user's request.
To call tools, write a "<{dsml_token}function_calls>" block in your reply, shaped like this:
<{dsml_token}function_calls>
<{dsml_token}invoke name="$TOOL_NAME">
<{dsml_token}parameter name="$ARGUMENT_NAME" string="true|false">$ARGUMENT_VALUE</{dsml_token}parameter>
...
</{dsml_token}invoke>
<{dsml_token}invoke name="$OTHER_TOOL_NAME">
...
</{dsml_token}invoke>
</{dsml_token}function_calls>

Write string values and plain scalars literally, with no quoting or escaping; write lists and objects as JSON. Set string="true" when the argument is a string and string="false" for every other type (numbers, booleans, null, lists, objects).

When thinking is on, think again once the function results come back before answering or calling more tools, for example:

<{dsml_token}function_calls>
...
</{dsml_token}function_calls>

<function_results>
...
</function_results>

{thinking_start_token}...reasoning about the results{thinking_end_token}

The tools, one JSONSchema object per line:
<functions>
{tool_schemas}
</functions>
"""

DSV_RESPONSE_FORMAT_TEMPLATE = (
    "## Response Format:\n\nReply with output that follows this schema exactly:\n{schema}"
)

# Official constant name -> (Templates field, slots that must be present).
_CONSTANTS: dict[str, tuple[str, frozenset[str]]] = {
    "TOOLS_SYSTEM_TEMPLATE": ("tools_system_template", frozenset({"tool_schemas"})),
    "response_format_template": ("response_format_template", frozenset({"schema"})),
    "bos_token": ("bos_token", frozenset()),
    "eos_token": ("eos_token", frozenset()),
    "thinking_start_token": ("thinking_start_token", frozenset()),
    "thinking_end_token": ("thinking_end_token", frozenset()),
    "dsml_token": ("dsml_token", frozenset()),
    "system_msg_template": ("system_msg_template", frozenset({"content"})),
    "user_msg_template": ("user_msg_template", frozenset({"content"})),
    "assistant_msg_template": ("assistant_msg_template", frozenset({"reasoning", "content", "tool_calls"})),
    "thinking_template": ("thinking_template", frozenset({"reasoning_content"})),
    "tool_call_template": ("tool_call_template", frozenset({"name", "arguments"})),
    "tool_calls_template": ("tool_calls_template", frozenset({"tool_calls"})),
    "tool_output_template": ("tool_output_template", frozenset({"content"})),
}


@dataclass(frozen=True, kw_only=True)
class Templates:
    """Every string the V3.2 encoder and parser use. ``Templates()`` is dsv's own set.

    ``source`` says where the prose came from: ``"dsv"`` or the path of the official encoder file.
    """

    bos_token: str = "<｜begin▁of▁sentence｜>"
    eos_token: str = "<｜end▁of▁sentence｜>"
    user_token: str = "<｜User｜>"
    assistant_token: str = "<｜Assistant｜>"
    thinking_start_token: str = "<think>"
    thinking_end_token: str = "</think>"
    dsml_token: str = "｜DSML｜"
    system_msg_template: str = "{content}"
    user_msg_template: str = "<｜User｜>{content}<｜Assistant｜>"
    assistant_msg_template: str = "{reasoning}{content}{tool_calls}<｜end▁of▁sentence｜>"
    thinking_template: str = "{reasoning_content}"
    tool_call_template: str = '<{dsml_token}invoke name="{name}">\n{arguments}\n</{dsml_token}invoke>'
    tool_calls_template: str = "<{dsml_token}function_calls>\n{tool_calls}\n</{dsml_token}function_calls>"
    tool_output_template: str = "\n<result>{content}</result>"
    tools_system_template: str = DSV_TOOLS_SYSTEM_TEMPLATE
    response_format_template: str = DSV_RESPONSE_FORMAT_TEMPLATE
    source: str = "dsv"

    @classmethod
    def default(cls) -> Templates:
        """dsv's own templates (the wording dsv checkpoints are trained on)."""
        return cls()

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Strings that never belong inside reasoning or content (the parser drops them there)."""
        return (
            self.bos_token,
            self.eos_token,
            self.user_token,
            self.assistant_token,
            self.thinking_start_token,
            self.thinking_end_token,
        )

    @property
    def tool_calls_start(self) -> str:
        """The split point between content and tool calls in generated text."""
        return f"\n\n<{self.dsml_token}function_calls"

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> Templates:
        """Templates for the checkpoint in ``directory``.

        When ``directory/encoding/encoding_dsv32.py`` exists, its module-level string constants
        (``TOOLS_SYSTEM_TEMPLATE``, ``response_format_template``, the message templates and special
        strings) are read with :func:`ast.parse` -- the file is never imported or executed -- and
        replace dsv's defaults. A constant that is missing, not a plain string, or lacks one of
        its slots keeps dsv's default. Without that file, dsv's own templates are returned.
        """
        path = Path(directory) / "encoding" / "encoding_dsv32.py"
        if not path.is_file():
            return cls()
        found = _read_string_constants(path.read_text(encoding="utf-8"))
        updates: dict[str, str] = {}
        for name, (field, slots) in _CONSTANTS.items():
            value = found.get(name)
            if value is None or not slots <= _slots(value):
                continue
            updates[field] = value
        if "user_msg_template" in updates:
            # The role tokens are the fixed parts around {content}.
            before, _, after = updates["user_msg_template"].partition("{content}")
            updates["user_token"], updates["assistant_token"] = before, after
        return dataclasses.replace(cls(), **updates, source=str(path))


def _read_string_constants(source: str) -> dict[str, str]:
    """Module-level ``NAME = "..."`` / ``NAME: str = "..."`` assignments of plain strings."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        # Implicit concatenation ("a" "b") is folded into one Constant by the parser already.
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
            out[target.id] = value.value
    return out


def _slots(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError:
        return set()
