"""Tokenizer: a ``tokenizers`` byte-level BPE with the V3.2 special tokens as single added tokens.

The special strings (spec §6.1) use U+FF5C ``｜`` and U+2581 ``▁``; they are added tokens, so chat
prompts built by :mod:`dsv.core.chat` tokenise them to one id each. Real checkpoints bring their
own ``tokenizer.json``; the tiny presets train a small byte-level BPE (:func:`train_bpe`) on text
the caller supplies (``dsv model init`` uses :func:`default_corpus`, generated here, offline).

Files written: ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers'
``AutoTokenizer`` understands.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from dsv.core.errors import CheckpointError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
# Order fixes the ids of a freshly trained tokenizer: BOS 0, EOS 1 as in the V3 family's config.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END)


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the ids dsv needs."""

    def __init__(self, backend: object) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        assert isinstance(backend, HFTokenizer)
        self.backend = backend
        self.bos_id = self._require(BOS)
        self.eos_id = self._require(EOS)
        self.pad_id = backend.token_to_id(PAD)

    def _require(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise CheckpointError(
                f"tokenizer has no {token!r} token; it is not a DeepSeek-V3-family tokenizer"
            )
        return tid

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD if self.pad_id is not None else None,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1 << 20,
            "clean_up_tokenization_spaces": False,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(folder) / "tokenizer.json"
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None


class IncrementalDetokenizer:
    """Streamed text of generated ids, decoding only a short window per token.

    Decoding the whole output after every token costs O(n^2) over a generation. Here each step
    decodes ``ids[prefix:]``, where ``prefix`` is where the last emitted stretch started (a few
    tokens back), and emits what that window adds beyond its already-emitted part. The window
    starts at a token boundary where the text was complete, so byte-level merges (a UTF-8
    character split over tokens) and decoders that treat the first token specially both come out
    as in a one-shot decode. While the window ends in an incomplete UTF-8 sequence (U+FFFD) the
    text is held back until the next token completes it. ``skip_special_tokens`` leaves special
    tokens (BOS, EOS, ``</think>``...) out of the text.

    Used by the serve backend's streams and ``dsv generate``.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[prefix:read] are already emitted

    def push(self, token: int) -> str:
        """Add one id; return the new text it completes (possibly empty)."""
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD)."""
        return self._emit(final=True) if self._read < len(self.ids) else ""

    def _emit(self, final: bool) -> str:
        def decode(ids: list[int]) -> str:
            if self.skip_special_tokens:
                return self.tokenizer.decode(ids, skip_special_tokens=True)
            return self.tokenizer.decode(ids)

        done = decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        text = decode(self.ids[self._prefix :])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens included) on ``texts``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE (need >= {256 + len(SPECIAL_TOKENS)})"
        )
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


_WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "token",
    "and",
    "writes",
    "the",
    "next",
    "one",
    "attention",
    "selects",
    "keys",
    "from",
    "the",
    "past",
    "while",
    "the",
    "indexer",
    "scores",
    "every",
    "position",
    "cheaply",
    "experts",
    "share",
    "the",
    "work",
    "of",
    "each",
    "layer",
    "a",
    "router",
    "picks",
    "them",
    "by",
    "score",
    "plan",
    "a",
    "trip",
    "book",
    "a",
    "hotel",
    "check",
    "the",
    "budget",
    "answer",
    "the",
    "question",
    "call",
    "a",
    "tool",
    "read",
    "the",
    "result",
    "think",
    "step",
    "by",
    "step",
    "then",
    "reply",
    "compute",
    "the",
    "sum",
    "sort",
    "the",
    "list",
    "find",
    "the",
    "shortest",
    "path",
    "in",
    "the",
    "graph",
    "query",
    "the",
    "table",
]


def default_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic training text for toy tokenizers: words, numbers, code, JSON and chat markup."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            out.append(f"{a} + {b} = {a + b}; {a} * {b % 100} = {a * (b % 100)}")
        elif kind == 2:
            name = rng.choice(["search", "book_hotel", "run_sql", "read_file", "calculator"])
            out.append(
                json.dumps(
                    {"name": name, "arguments": {"query": rng.choice(_WORDS), "limit": rng.randint(1, 9)}}
                )
            )
        elif kind == 3:
            out.append(f"def f_{i}(x):\n    return x * {rng.randint(2, 9)} + {rng.randint(0, 99)}\n")
        else:
            q = " ".join(rng.choice(_WORDS) for _ in range(6))
            out.append(f"{USER}{q}?{ASSISTANT}{THINK_START}{q}{THINK_END}{q}.{EOS}")
    return out
