"""Typed Python callables as model tools: JSON schemas from type hints + docstrings, safe dispatch.

`tool_schema(fn)` builds an OpenAI `tools` entry: the function name, the first
docstring paragraph as the description, and a JSON schema of the parameters from
the type hints (str, int, float, bool, list[X], dict[str, X], Literal[...],
X | None) with per-argument descriptions from a Google-style `Args:` section.

`call_tool(fns, name, arguments)` validates the arguments against that schema and
calls the function. It never raises: unknown tools, malformed JSON, missing or
mistyped arguments and exceptions inside the tool all come back as an
`error: ...` string the model can read and act on.

Example::

    def search(query: str, limit: int = 5) -> str:
        '''Search the catalogue.

        Args:
            query: words to look for.
            limit: how many results to return.
        '''
    tool_schema(search)["function"]["parameters"]["required"] == ["query"]
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["ToolArgumentError", "call_tool", "tool_schema", "validate_arguments"]

MAX_RESULT_CHARS = 16_000


class ToolArgumentError(ValueError):
    """Arguments do not match a tool's schema."""


def _type_schema(tp: Any) -> dict:
    if tp is Any or tp is inspect.Parameter.empty:
        return {}
    origin = get_origin(tp)
    if origin is Literal:
        values = list(get_args(tp))
        schema: dict[str, Any] = {"enum": values}
        kinds = {type(v) for v in values}
        if kinds == {str}:
            schema["type"] = "string"
        elif kinds == {int}:
            schema["type"] = "integer"
        return schema
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            inner = _type_schema(args[0])
            if "type" in inner and isinstance(inner["type"], str):
                inner = {**inner, "type": [inner["type"], "null"]}
            return inner
        return {"anyOf": [_type_schema(a) for a in get_args(tp)]}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is type(None):
        return {"type": "null"}
    if tp in (list, tuple) or origin in (list, tuple, typing.Sequence):
        args = get_args(tp)
        schema = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = _type_schema(args[0])
        return schema
    if tp is dict or origin is dict:
        args = get_args(tp)
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = _type_schema(args[1])
        return schema
    raise TypeError(f"unsupported tool parameter type {tp!r}")


_ARG_LINE_RE = re.compile(r"^\s{2,}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    paragraphs = doc.split("\n\n")
    summary = " ".join(paragraphs[0].split())
    arg_docs: dict[str, str] = {}
    lines = doc.splitlines()
    in_args = False
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args, current = True, None
            continue
        if in_args:
            if stripped and not line.startswith(" "):  # next section (Returns:, Raises:, ...)
                in_args = False
                continue
            m = _ARG_LINE_RE.match(line)
            if m and line.startswith("    ") and not line.startswith("        "):
                current = m.group(1).lstrip("*")
                arg_docs[current] = m.group(2).strip()
            elif current and stripped:
                arg_docs[current] = (arg_docs[current] + " " + stripped).strip()
    return summary, arg_docs


def tool_schema(fn: Callable[..., Any]) -> dict:
    """The OpenAI tool entry `{"type": "function", "function": {name, description, parameters}}` for `fn`."""
    sig = inspect.signature(fn)
    hints = get_type_hints(fn)
    summary, arg_docs = _parse_docstring(fn.__doc__)
    properties: dict[str, dict] = {}
    required: list[str] = []
    for pname, param in sig.parameters.items():
        if pname in ("self", "cls") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = dict(_type_schema(hints.get(pname, Any)))
        if pname in arg_docs:
            schema["description"] = arg_docs[pname]
        if param.default is inspect.Parameter.empty:
            required.append(pname)
        elif param.default is not None:
            schema["default"] = param.default
        properties[pname] = schema
    name = getattr(fn, "__name__", type(fn).__name__)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": summary,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _check(value: Any, schema: dict, where: str) -> Any:
    """Validate (and lightly coerce: integral floats to int, numeric strings for numbers) one value."""
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return _check(value, sub, where)
            except ToolArgumentError as exc:
                errors.append(str(exc))
        raise ToolArgumentError(f"{where}: matches none of the allowed types")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolArgumentError(f"{where}: must be one of {schema['enum']}, got {value!r}")
    typ = schema.get("type")
    if typ is None:
        return value
    allowed = typ if isinstance(typ, list) else [typ]
    for t in allowed:
        if _JSON_TYPES[t](value):
            if t == "array" and "items" in schema:
                return [_check(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
            if t == "object" and isinstance(schema.get("additionalProperties"), dict):
                return {
                    k: _check(v, schema["additionalProperties"], f"{where}.{k}") for k, v in value.items()
                }
            return value
    # Models often send 3.0 for 3 or "3" for 3; accept exact conversions only.
    if "integer" in allowed:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
    if "number" in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    want = " or ".join(allowed)
    raise ToolArgumentError(f"{where}: expected {want}, got {type(value).__name__} {value!r}"[:300])


def validate_arguments(schema: dict, arguments: dict | str) -> dict:
    """Arguments (a dict or a JSON object string) checked against a tool entry's parameters."""
    if isinstance(arguments, str):
        text = arguments.strip() or "{}"
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ToolArgumentError(f"arguments are not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    params = schema["function"]["parameters"]
    props: dict[str, dict] = params.get("properties", {})
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        raise ToolArgumentError(f"unknown argument(s) {unknown}; allowed: {sorted(props)}")
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        raise ToolArgumentError(f"missing required argument(s) {missing}")
    return {k: _check(v, props[k], k) for k, v in arguments.items()}


def call_tool(fns: list[Callable[..., Any]], name: str, arguments: dict | str) -> str:
    """Run tool `name` from `fns` with `arguments`; the result (or an `error: ...` string) as text."""
    by_name = {getattr(fn, "__name__", ""): fn for fn in fns}
    fn = by_name.get(name)
    if fn is None:
        return f"error: unknown tool {name!r}; available tools: {sorted(by_name)}"
    try:
        kwargs = validate_arguments(tool_schema(fn), arguments)
    except ToolArgumentError as exc:
        return f"error: bad arguments for {name}: {exc}"
    try:
        result = fn(**kwargs)
    except Exception as exc:  # a tool failure is information for the model, not a crash
        return f"error: {name} failed: {type(exc).__name__}: {exc}"
    if not isinstance(result, str):
        try:
            result = json.dumps(result, ensure_ascii=False, sort_keys=False)
        except (TypeError, ValueError):
            result = str(result)
    if len(result) > MAX_RESULT_CHARS:
        result = result[:MAX_RESULT_CHARS] + f"\n... [truncated {len(result) - MAX_RESULT_CHARS} chars]"
    return result
