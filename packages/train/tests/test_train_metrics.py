"""Recall (indexer and oracle) and the pass-key data/measure on real tiny models.

Run: ``pytest packages/train/tests/test_train_metrics.py``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import load_pretrained
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny
from dsv.train.data import default_documents, passkey_document
from dsv.train.metrics import indexer_recall, passkey_filler_for, recall_stats


def _model(topk: int) -> DSVForCausalLM:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny(index_topk=topk))
    return model.eval()


def test_oracle_recall_bounds_the_indexer() -> None:
    S, topk = 40, 8
    ids = torch.randint(3, 1000, (3, S), generator=torch.Generator().manual_seed(1))
    stats = recall_stats(_model(topk), ids, batch_size=2)
    assert len(stats.per_layer) == 2
    for ind, orc in stats.per_layer:
        assert 0.0 < ind <= orc + 1e-9 <= 1.0 + 1e-9
    assert stats.indexer == pytest.approx(sum(a for a, _ in stats.per_layer) / 2)
    assert stats.oracle == pytest.approx(sum(b for _, b in stats.per_layer) / 2)
    assert stats.ratio == pytest.approx(stats.indexer / stats.oracle) and stats.ratio <= 1.0 + 1e-9
    # the best top-k of a distribution over n keys holds at least k/n of its mass
    floor = sum(topk / (s + 1) for s in range(topk, S)) / (S - topk)
    assert stats.oracle >= floor - 1e-9
    assert indexer_recall(_model(topk), ids) == pytest.approx(stats.indexer)
    # a larger k can only capture more (same weights: index_topk changes no parameter)
    assert recall_stats(_model(2 * topk), ids).oracle > stats.oracle


def test_recall_refuses_sequences_within_top_k() -> None:
    with pytest.raises(ValueError, match="longer than index_topk"):
        recall_stats(_model(32), torch.zeros(1, 32, dtype=torch.long))


def test_default_passkey_documents_match_the_measure(pretrained: Path) -> None:
    _, tok = load_pretrained(pretrained / "final")
    assert tok is not None
    docs = [d.text or "" for d in default_documents(400, seed=5)]
    keyed = [t for t in docs if "The pass key is" in t]
    assert len(keyed) == 200  # passkey_share 0.5, interleaved
    assert all(re.search(r"What is the pass key\? The pass key is \d{5}\.$", t) for t in keyed)
    lengths = [1 + len(tok.encode(t)) + 1 for t in keyed]  # BOS text EOS as packed
    assert max(lengths) <= 128 and min(lengths) < 40  # whole examples of short and long distances
    # needle depth is spread over the document
    rel = [t.index("The pass key is") / max(1, t.index(" What is the pass key")) for t in keyed]
    assert min(rel) < 0.2 and max(rel) > 0.8
    # the measure's prompt + answer fills the context: one more sentence would not fit
    n = passkey_filler_for(tok, 128)
    prompt, answer, _ = passkey_document(random.Random(1234), n)
    assert 1 + len(tok.encode(prompt)) + len(tok.encode(answer)) <= 128
    longer, ans2, _ = passkey_document(random.Random(1234), n + 1)
    assert 1 + len(tok.encode(longer)) + len(tok.encode(ans2)) > 128
    with pytest.raises(ValueError, match="without filler"):
        passkey_filler_for(tok, 8)


def test_passkey_scores_share_the_prompts_of_the_accuracy(pretrained: Path) -> None:
    from dsv.train.metrics import _passkey_prompts, passkey_accuracy, passkey_scores

    model, tok = load_pretrained(pretrained / "final")
    assert tok is not None
    prompts = _passkey_prompts(tok, 96, 6, 1234)
    for ids, key_ids, key in prompts:
        assert ids[0] == tok.bos_id and tok.decode(key_ids).strip() == key and len(key) == 5
        assert len(ids) + len(key_ids) + 1 <= 96  # "." after the key
    assert len({key for _, _, key in prompts}) == 6
    model.eval()
    scores = passkey_scores(model, tok, context_tokens=96, n=6, use_sparse=False)
    assert scores.exact == passkey_accuracy(model, tok, context_tokens=96, n=6, use_sparse=False)
    # The three numbers recomputed one forward per prediction: the first and each teacher-forced key
    # token against the argmax after the prompt, exact match against core's greedy generate.
    from dsv.core.generate import SamplingParams, generate

    first = hits = total = exact = 0
    with torch.no_grad():
        for ids, key_ids, key in prompts:
            pred = [int(model(torch.tensor([ids + key_ids[:j]]), use_sparse=False).logits[0, -1].argmax())
                    for j in range(len(key_ids))]  # fmt: skip
            first += pred[0] == key_ids[0]
            hits += sum(a == b for a, b in zip(pred, key_ids, strict=True))
            total += len(key_ids)
            out = generate(model, ids, SamplingParams(temperature=0, max_new_tokens=max(4, len(key_ids) + 1)),
                           use_sparse=False).tokens  # fmt: skip
            text = tok.decode(out).lstrip()
            exact += text.startswith(key) and not text[len(key) : len(key) + 1].isdigit()
    assert (scores.exact, scores.first_token, scores.token) == (exact / 6, first / 6, hits / total)
