"""Forced tool calls as a grammar: the whole DSML call, and what a call cut by the token limit says.

With ``tool_choice`` ``"required"`` or a named function the native engine decodes the call under a
Lark grammar (llguidance's dialect, :func:`dsv.serve.grammar.lark_grammar`) built here from the
request's tools: the block and invoke tags, a listed function name, the function's parameters as
the V3.2 encoding writes them (:func:`dsv.core.chat.encode_tool_calls`: a string parameter is raw
text marked ``string="true"``, every other value compact JSON marked ``string="false"``, checked
against the parameter's JSON schema with an embedded ``%json``), and the closing tags, after which
only EOS is allowed. So even a random-weight model returns a call that parses and validates, as
long as ``max_tokens`` leaves room for it. With ``tool_choice: "auto"`` and ``strict`` tools the same
grammar constrains a call the model chooses to start (``start="auto"``); text stays free.

Parameters follow the schema's ``properties`` in their declared order: required ones always,
optional ones present or not; properties outside ``properties`` are not written (a schema without
``properties`` takes any names; one without ``parameters`` any parameters). A string parameter with ``pattern`` or ``format`` is written as a
JSON string (``string="false"``), which the parser reads back as the same string. Root ``$defs``
travel into every embedded schema so ``$ref`` resolves.

:func:`dsv.core.chat.partial_call` is the other half: when ``max_tokens`` ends generation inside a
call, the parser drops the unterminated invoke; the API instead returns the call with what was
written (the complete parameters, and a string parameter's text so far) under
``finish_reason: "length"``, as OpenAI's API does for a call the limit cuts, so a client sees what
the model was doing.

Run the checks: ``pytest packages/serve/tests/test_serve_tool_calls.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from dsv.core.chat import Templates, forced_call_opening

__all__ = ["tool_call_grammar"]

# Where the grammar starts: at the block opening (thinking mode: after `</think>`), after
# `name="` (the prompt ends there when the model picks among several tools) or after the whole
# invoke opening of a named function.
# ``auto``: free text, or text and then calls (``tool_choice: auto`` with ``strict`` tools).
Start = Literal["block", "name", "params", "auto"]


def _lit(text: str) -> str:
    """A Lark string literal (JSON escaping is what Lark's strings take)."""
    return json.dumps(text, ensure_ascii=False)


def _with_defs(schema: Any, root: Mapping[str, Any]) -> Any:
    if not isinstance(schema, dict):
        return schema
    defs = {k: root[k] for k in ("$defs", "definitions") if k in root and k not in schema}
    return {**schema, **defs} if defs else schema


def _string_branch(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The string subschema a value could be written raw under, or None."""
    if not schema:
        return {}
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return schema
    enum = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if kind is None and enum and all(isinstance(v, str) for v in enum):
        return schema
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            if isinstance(sub, dict) and sub.get("type") == "string":
                return sub
    return None


class _Builder:
    def __init__(self, templates: Templates) -> None:
        self.t = templates
        self.rules: list[str] = []
        d = templates.dsml_token
        self.close_param = f"</{d}parameter>"
        self.n = 0

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def raw(self, sub: Mapping[str, Any]) -> str:
        """The expression of a raw (``string="true"``) value under the string schema ``sub`` and its
        closing tag (raw text never contains that tag: the parser ends the value at its first one)."""
        enum = sub.get("enum", [sub["const"]] if "const" in sub else None)
        if enum:
            return "(" + " | ".join(_lit(v) for v in enum if isinstance(v, str)) + f") {_lit(self.close_param)}"
        lo, hi = int(sub.get("minLength", 0)), sub.get("maxLength")
        span = f"{{{lo},{'' if hi is None else int(hi)}}}"
        # A lazy lexeme that ends at the first closing tag (its suffix): a greedy one would read
        # `</...parameter` as more value and refuse the final `>`.
        rule = self.name("raw")
        self.rules.append(f"{rule}[suffix={_lit(self.close_param)}]: /(?s:.{span})/")
        return rule

    def param(self, key: str, schema: Any, root: Mapping[str, Any]) -> str:
        d = self.t.dsml_token
        schema = schema if isinstance(schema, dict) else {}
        head = f'<{d}parameter name="{key}" string="'
        branches = []
        sub = _string_branch(schema)
        # Only strings fit (``type: string`` or an enum of strings): the raw form alone.
        typed_only = sub is schema and schema.get("type", "string") == "string" and bool(schema)
        if sub is not None and "pattern" not in sub and "format" not in sub:
            branches.append(f"{_lit(head + 'true' + chr(34) + '>')} {self.raw(sub)}")
        if not (typed_only and branches):
            embedded = json.dumps(_with_defs(schema, root), ensure_ascii=False)
            rule = self.name("value")
            self.rules.append(f"{rule}: %json {embedded}")
            branches.append(f"{_lit(head + 'false' + chr(34) + '>')} {rule} {_lit(self.close_param)}")
        rule = self.name("param")
        self.rules.append(f"{rule}: " + " | ".join(branches))
        return rule

    def params(self, parameters: Any) -> str:
        """The rule for an invoke's parameters, each followed by a newline."""
        root = parameters if isinstance(parameters, dict) else {}
        props = root.get("properties")
        rule = self.name("params")
        if not isinstance(props, dict) or not props:
            if props is None and root.get("additionalProperties", True) is not False and root.get("type") != "null":
                key = self.name("KEY").upper()
                self.rules.append(f'{key}: /[A-Za-z_][A-Za-z0-9_.-]*/')
                any_param = self.name("anyparam")
                d = self.t.dsml_token
                self.rules.append(
                    f'{any_param}: {_lit(f"<{d}parameter name=")} "\\"" {key} "\\" string=\\"true\\">" '
                    f'{self.raw({})}'
                    f' | {_lit(f"<{d}parameter name=")} "\\"" {key} "\\" string=\\"false\\">" '
                    f'{self.name_json({})} {_lit(self.close_param)}'
                )
                self.rules.append(f'{rule}: ({any_param} "\\n")*')
            else:
                self.rules.append(f'{rule}: ""')
            return rule
        required = set(root.get("required") or ())
        parts = []
        for key, schema in props.items():
            p = self.param(str(key), schema, root)
            parts.append(f'({p} "\\n")' + ("" if key in required else "?"))
        self.rules.append(f"{rule}: " + " ".join(parts))
        return rule

    def name_json(self, schema: Mapping[str, Any]) -> str:
        rule = self.name("value")
        self.rules.append(f"{rule}: %json {json.dumps(schema)}")
        return rule


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]], templates: Templates, *, name: str | None = None,
    start: Start = "block", several: bool = False,
) -> str:  # fmt: skip
    """The Lark grammar of a forced DSML call of ``name`` (any of ``tools`` when None), from
    ``start`` on; ``several`` lets more invokes follow the first (``parallel_tool_calls``). With
    ``start="auto"`` the call is not forced: the output is free text, or text and then calls.

    ``tools`` are OpenAI function tools (``{"type": "function", "function": {...}}``). The text
    goes through :func:`dsv.serve.grammar.lark_grammar` before the engine takes it.
    """
    t, b = templates, _Builder(templates)
    d = t.dsml_token
    fns = [tool["function"] for tool in tools if name is None or tool["function"]["name"] == name]
    if not fns:
        raise ValueError(f"no tool named {name!r}")
    invoke_close = _lit(f"</{d}invoke>")
    calls = []
    params_of: dict[str, str] = {}
    for fn in fns:
        params_of[fn["name"]] = b.params(fn.get("parameters"))
        calls.append(f'{_lit(fn["name"] + chr(34) + ">" + chr(10))} {params_of[fn["name"]]} {invoke_close}')
    b.rules.append("call: " + " | ".join(calls))
    b.rules.append(f"invoke: {_lit(f'<{d}invoke name=' + chr(34))} call")
    more = ' ("\\n" invoke)*' if several else ""
    tail = f'{more} {_lit(chr(10) + f"</{d}function_calls>")}'
    if start == "params":
        if name is None:
            raise ValueError("start='params' needs the function's name")
        head = f"{params_of[name]} {invoke_close}"
    elif start == "name":
        head = "call"
    elif start == "auto":
        # Text that never opens a call, or text up to the opening of one (a lazy lexeme that ends
        # there) and the call under the schemas.
        opening = forced_call_opening(None, t)
        b.rules += ["TEXT: /(?s:.*)/", f"prose[suffix={_lit(opening)}]: /(?s:.*)/"]
        return "\n".join([f"start: TEXT | prose call{tail}", *b.rules])
    else:
        head = f"{_lit(t.tool_calls_start + '>' + chr(10))} invoke"
    return "\n".join([f"start: {head}{tail}", *b.rules])
