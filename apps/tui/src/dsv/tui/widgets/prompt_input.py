"""The prompt: Textual's Input without its ctrl+e / ctrl+k editing keys, which the chat uses
(export, context panel); home/end still move the cursor."""

from __future__ import annotations

import dataclasses

from textual.binding import Binding, BindingType
from textual.widgets import Input

_CHAT_KEYS = frozenset({"ctrl+e", "ctrl+k"})


def _without(bindings: list[BindingType], keys: frozenset[str]) -> list[BindingType]:
    out: list[BindingType] = []
    for b in bindings:
        assert isinstance(b, Binding), "Input's bindings are Binding objects"
        kept = [k for k in b.key.split(",") if k.strip() not in keys]
        if kept:
            out.append(dataclasses.replace(b, key=",".join(kept)))
    return out


class PromptInput(Input, inherit_bindings=False):
    """Single-line prompt; enter sends (see ChatScreen)."""

    BINDINGS = _without(Input.BINDINGS, _CHAT_KEYS)
