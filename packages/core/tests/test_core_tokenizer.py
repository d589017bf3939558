"""Tokenizer: the V3.2 special strings are single ids, text round-trips, files load back."""

from __future__ import annotations

from pathlib import Path

from dsv.core.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    SPECIAL_TOKENS,
    THINK_END,
    USER,
    Tokenizer,
    default_corpus,
    train_bpe,
)


def test_special_tokens_are_single_ids(tmp_path: Path) -> None:
    tok = train_bpe(default_corpus(300), 600)
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.vocab_size == 600
    text = f"{BOS}{USER}hello｜▁ world{ASSISTANT}{THINK_END}Hi!{EOS}"
    ids = tok.encode(text)
    for s in (*SPECIAL_TOKENS[:2], USER, ASSISTANT, THINK_END):
        assert ids.count(tok.token_to_id(s)) == 1
    assert tok.decode(ids) == text
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == ids and again.encode("abc", add_bos=True)[0] == again.bos_id
