"""Grammar-constrained decoding: JSON schemas, regexes, choices and Lark grammars, token by token.

The engine is llguidance (``pip install llguidance``): a Rust matcher with no Python dependencies
that computes, per sequence and step, the bitmask of tokens that keep the output inside the
grammar, straight from the checkpoint's ``tokenizer.json``. Why llguidance and not xgrammar: both
run on CPU, but xgrammar's wheel pulls in transformers, triton and a TVM runtime, while llguidance
is one self-contained wheel; per token, a mask costs about 9 us against xgrammar's 3-4 us on the
tiny tokenizer (``dsv bench serve-grammar``, ``tools/bench/results/serve-grammar.md``), both small
next to a decode step; it covers the
JSON-schema features OpenAI's structured outputs use (objects, arrays, enums, ``anyOf``, ``$ref``,
string lengths and patterns, numeric bounds) and it refuses the rest by name, which becomes the
400 the API returns. A grammar is plain text (llguidance's JSON grammar format), so it travels in
:class:`~dsv.serve.engine.GenParams` to an engine in another process; forced tool calls can build
a Lark grammar for the whole DSML call with the same machinery.

JSON is compiled without free whitespace (``{"a":1,"b":[2,3]}``): with flexible whitespace a weak
model can emit blanks until ``max_tokens`` and never close the object.

- :func:`json_schema_grammar`, :func:`json_object_grammar`, :func:`regex_grammar`,
  :func:`choice_grammar`, :func:`lark_grammar` build grammars; :func:`check_grammar` refuses an
  unsupported one with :class:`GrammarError` naming what is wrong.
- :class:`GrammarVocab` is the tokenizer side (built once per tokenizer), :class:`Matcher` one
  sequence's state, :func:`fill_masks` the batched mask of one decode step (one bitmask for every
  constrained row, applied in one op).

Run the checks: ``pytest packages/serve/tests/test_serve_grammar.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "GrammarError",
    "GrammarVocab",
    "Matcher",
    "check_grammar",
    "choice_grammar",
    "fill_masks",
    "json_object_grammar",
    "json_schema_grammar",
    "lark_grammar",
    "regex_grammar",
]

# Compact JSON (see the module docstring).
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot enforce (the message names the feature)."""


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a declared dependency of dsv-serve
        raise GrammarError(
            "structured outputs need llguidance: pip install -e packages/serve (it declares it)"
        ) from e
    return llguidance


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """The grammar of JSON values valid under ``schema`` (``True``: any JSON value)."""
    if not isinstance(schema, dict | bool):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return str(_llg().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS))
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def json_object_grammar() -> str:
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> str:
    """Text matching ``pattern`` (whole output)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise GrammarError(f"invalid regular expression: {e}") from None
    return str(_llg().LLMatcher.grammar_from_regex(pattern))


def choice_grammar(choices: Sequence[str]) -> str:
    """Exactly one of ``choices``."""
    if not choices or any(not isinstance(c, str) or not c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return regex_grammar("|".join(re.escape(c) for c in choices))


def lark_grammar(text: str) -> str:
    """A Lark grammar (llguidance's dialect: ``start`` is the entry rule; ``%json {...}`` embeds a
    JSON schema)."""
    return str(_llg().LLMatcher.grammar_from_lark(text))


def check_grammar(grammar: str, vocab: GrammarVocab | None = None) -> None:
    """Raise :class:`GrammarError` with llguidance's reason when ``grammar`` cannot be enforced
    (unsupported schema keywords, formats, bad regexes)."""
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(
        grammar, None if vocab is None else vocab.tokenizer
    )
    if is_error:
        raise GrammarError(f"cannot be enforced: {_plain(messages[0] if messages else 'invalid grammar')}")


def _plain(message: str) -> str:
    # llguidance prefixes errors with its internal context ("json_schema: ..."); the first line is
    # the part a client can act on.
    first = message.strip().splitlines()[0] if message.strip() else message
    return first


class GrammarVocab:
    """The tokenizer as llguidance sees it: every model id 0..``vocab_size``-1 (ids the tokenizer
    lacks are never allowed) and ``eos_id``, which ends a complete output."""

    def __init__(self, tokenizer_json: str, *, vocab_size: int, eos_id: int) -> None:
        llg = _llg()
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)
        self._executor: Any = None
        # The step's packed bitmask (int32 [rows, ceil(V/32)]), kept between steps: every mask fill
        # writes all of its row, and allocating (llguidance's helper asks CUDA about pinned memory
        # each time) was a visible share of a constrained step.
        self._bits = torch.empty(0, (vocab_size + 31) // 32, dtype=torch.int32)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> GrammarVocab:
        """From a :class:`dsv.core.tokenizer.Tokenizer` (its ``tokenizers`` backend)."""
        return cls(
            tokenizer.backend.to_str(), vocab_size=vocab_size or tokenizer.vocab_size, eos_id=tokenizer.eos_id
        )

    def bitmask(self, rows: int) -> torch.Tensor:
        """A ``[rows, ceil(V/32)]`` int32 buffer for one step's masks (reused)."""
        if self._bits.shape[0] < rows:
            self._bits = torch.empty(max(rows, 2 * self._bits.shape[0]), self._bits.shape[1], dtype=torch.int32)
        return self._bits[:rows]

    @property
    def executor(self) -> Any:
        """llguidance's thread pool for batched masks (made on first use)."""
        if self._executor is None:
            self._executor = _llg().LLExecutor()
        return self._executor

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self, grammar)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, vocab: GrammarVocab, grammar: str) -> None:
        self.vocab = vocab
        self.m = _llg().LLMatcher(vocab.tokenizer, grammar, log_level=0)
        if self.m.is_error():
            raise GrammarError(_plain(self.m.get_error()))

    def consume(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar does not allow it (the matcher is then
        in an error state)."""
        return bool(self.m.consume_token(token))

    @property
    def error(self) -> str:
        return str(self.m.get_error()) if self.m.is_error() else ""

    @property
    def done(self) -> bool:
        """The output is complete: nothing but the end of sequence may follow."""
        return bool(self.m.is_stopped())

    def allowed(self) -> torch.Tensor:
        """Bool ``[vocab_size]`` of the tokens allowed next (the slow, obviously correct twin of
        :func:`fill_masks`)."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        bits = allocate_token_bitmask(1, self.vocab.vocab_size)
        fill_next_token_bitmask(self.m, bits, 0)
        return _unpack(bits, self.vocab.vocab_size)[0]


# llguidance's thread pool pays a wake-up per step: on a small machine it cost 2.7 ms for 16 rows
# whose masks take 9 us each one after another (tiny tokenizer, 2 busy cores). It pays off with many
# cores and many rows, or masks that take long (large vocabularies, complex grammars).
_PARALLEL_MIN_ROWS = 8
_PARALLEL_MIN_CORES = 8


def fill_masks(matchers: Sequence[Matcher], logits: torch.Tensor, rows: Sequence[int]) -> None:
    """Set ``logits[rows[i]]`` to ``-inf`` wherever ``matchers[i]`` forbids the token, for all of
    them at once (in place): one bitmask for the batch, filled on llguidance's thread pool when the
    machine and the batch are large enough, else row after row."""
    if not matchers:
        return
    vocab = matchers[0].vocab
    bits = vocab.bitmask(len(matchers))  # contiguous rows
    row_bytes = bits.shape[1] * 4
    if len(matchers) >= _PARALLEL_MIN_ROWS and (os.cpu_count() or 1) >= _PARALLEL_MIN_CORES:
        pairs = [(m.m, i) for i, m in enumerate(matchers)]
        vocab.executor.unsafe_compute_mask_ptr(pairs, bits.data_ptr(), row_bytes, len(matchers))
    else:
        # The raw pointer call: llguidance's per-row torch wrapper costs more than a small mask.
        base = bits.data_ptr()
        for i, m in enumerate(matchers):
            m.m.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
    allowed = _unpack(bits, logits.shape[-1]).to(logits.device)  # (B, V)
    if list(rows) == list(range(logits.shape[0])):  # every row constrained: in place
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)


def _unpack(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed int32 bitmask ``[B, ceil(V/32)]`` as bool ``[B, vocab_size]``."""
    words = bits.to(torch.int64) & 0xFFFFFFFF  # (B, W)
    flags = (words.unsqueeze(-1) & _BITS) != 0  # (B, W, 32)
    return flags.reshape(bits.shape[0], -1)[:, :vocab_size]


def schema_of(response_format: Any) -> dict[str, Any] | None:
    """The schema inside an OpenAI ``json_schema`` object (``{"name", "schema", "strict"}``), or
    the object itself when it already is a schema."""
    if response_format is None:
        return None
    inner = response_format.get("schema") if isinstance(response_format, dict) else None
    if isinstance(inner, dict | bool):
        return inner  # type: ignore[return-value]
    return response_format if isinstance(response_format, dict) else None


def parse_guided_json(value: Any) -> dict[str, Any] | bool:
    """vLLM's ``guided_json``: a schema object or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise GrammarError(f"guided_json is not valid JSON: {e}") from None
    if not isinstance(value, dict | bool):
        raise GrammarError("guided_json must be a JSON schema object")
    return value
