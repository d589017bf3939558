"""Near-duplicate detection for proposed environments: code shingles and task-prompt similarity.

Two signals, each a Jaccard similarity of shingle sets:

- code: the module's Python tokens with comments, docstrings and layout dropped,
  string literals replaced by ``S`` and numbers by ``N`` (so renaming a constant or
  rewording a message does not hide a copy), then shingles of ``CODE_K`` consecutive
  tokens. Only ``tokenize`` is used: proposal code is never imported or executed here.
- prompts: task prompts lower-cased with digit runs replaced by ``0`` (so two seeds
  of one template look alike), shingles of ``PROMPT_K`` consecutive words; the score
  of two environments is the best match between any of their sample prompts.

Code is also compared by containment, ``|A ∩ B| / min(|A|, |B|)``: a proposal that
pastes a built-in family's class next to extra helpers has a diluted Jaccard but a
containment near 1. Among the built-in families containment stays below about 0.55.

A proposal is a near-duplicate of a reference (a built-in family or a previously
accepted environment) when any score reaches its threshold.
"""

from __future__ import annotations

import io
import keyword
import re
import token
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DuplicateMatch",
    "Fingerprint",
    "code_shingles",
    "containment",
    "find_duplicate",
    "jaccard",
    "prompt_shingles",
]

CODE_K = 6
PROMPT_K = 3


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


def containment(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / min(|a|, |b|): how much of the smaller set the larger one contains (0 if one is empty)."""
    if not a or not b:
        return 0.0
    return len(a & b) / min(len(a), len(b))


def _code_tokens(source: str) -> list[str]:
    out: list[str] = []
    prev_significant = token.NEWLINE
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in (
                token.COMMENT,
                token.NL,
                token.NEWLINE,
                token.INDENT,
                token.DEDENT,
                token.ENDMARKER,
            ):
                if tok.type in (token.NEWLINE, token.INDENT, token.DEDENT):
                    prev_significant = tok.type
                continue
            if tok.type == token.STRING:
                # a string that is a whole statement is a docstring: not code
                if prev_significant in (token.NEWLINE, token.INDENT, token.DEDENT):
                    prev_significant = token.STRING
                    continue
                out.append("S")
            elif tok.type == token.NUMBER:
                out.append("N")
            elif tok.type == token.NAME and not keyword.iskeyword(tok.string):
                out.append(tok.string.lower())
            else:
                out.append(tok.string)
            prev_significant = tok.type
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # keep what tokenized; unparsable code is rejected earlier anyway
    return out


def code_shingles(source: str, k: int = CODE_K) -> frozenset[str]:
    """Shingles of ``k`` normalised tokens of Python ``source``."""
    toks = _code_tokens(source)
    if len(toks) < k:
        return frozenset([" ".join(toks)]) if toks else frozenset()
    return frozenset(" ".join(toks[i : i + k]) for i in range(len(toks) - k + 1))


_WORD_RE = re.compile(r"[a-z0-9]+")


def prompt_shingles(prompt: str, k: int = PROMPT_K) -> frozenset[str]:
    """Shingles of ``k`` normalised words of a task prompt."""
    words = _WORD_RE.findall(re.sub(r"\d+", "0", prompt.lower()))
    if len(words) < k:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + k]) for i in range(len(words) - k + 1))


@dataclass(frozen=True)
class Fingerprint:
    """What a proposal is compared on: its code shingles and its sample prompts' shingles."""

    name: str
    kind: str  # "builtin" | "accepted"
    code: frozenset[str]
    prompts: tuple[frozenset[str], ...]

    @classmethod
    def build(cls, name: str, kind: str, source: str, prompts: Iterable[str]) -> Fingerprint:
        return cls(name, kind, code_shingles(source), tuple(prompt_shingles(p) for p in prompts))


@dataclass(frozen=True)
class DuplicateMatch:
    """The closest reference and both similarity scores."""

    name: str
    kind: str
    code_similarity: float
    code_containment: float
    prompt_similarity: float
    duplicate: bool


def _prompt_similarity(a: tuple[frozenset[str], ...], b: tuple[frozenset[str], ...]) -> float:
    return max((jaccard(x, y) for x in a for y in b), default=0.0)


def find_duplicate(
    candidate: Fingerprint,
    references: Iterable[Fingerprint],
    *,
    code_threshold: float,
    prompt_threshold: float,
    containment_threshold: float = 0.8,
) -> DuplicateMatch | None:
    """The most similar reference (duplicates first), or None when there are no references."""
    best: DuplicateMatch | None = None
    best_rank: tuple[bool, float] = (False, -1.0)
    for ref in references:
        code_sim = jaccard(candidate.code, ref.code)
        code_cont = containment(candidate.code, ref.code)
        prompt_sim = _prompt_similarity(candidate.prompts, ref.prompts)
        ratios = (code_sim / code_threshold, code_cont / containment_threshold, prompt_sim / prompt_threshold)
        rank = (max(ratios) >= 1.0, max(ratios))
        if best is None or rank > best_rank:
            best = DuplicateMatch(ref.name, ref.kind, code_sim, code_cont, prompt_sim, rank[0])
            best_rank = rank
    return best
