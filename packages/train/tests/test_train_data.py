"""Data: sources, broken records, SFT target masks, packing, batch order, schedules.

Run: ``pytest packages/train/tests/test_train_data.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv.core.chat import encode_assistant_completion, encode_messages
from dsv.core.tokenizer import default_corpus, train_bpe
from dsv.train.data import (
    IGNORE_INDEX,
    BatchPlan,
    DataError,
    default_documents,
    encode_chat,
    load_documents,
    pack,
)
from dsv.train.schedule import lr_at


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return train_bpe(default_corpus(400), 1024)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "reasoning_content": "old thoughts", "content": "Hi."},
    {"role": "user", "content": "Add 2 and 3 with the tool."},
    {"role": "assistant", "reasoning_content": "Call add.", "content": "",
     "tool_calls": [{"id": "a", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "a", "content": "5"},
    {"role": "assistant", "reasoning_content": "It said 5.", "content": "The answer is 5."},
]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("thinking", [True, False])
def test_sft_mask_is_exactly_the_assistant_completions(tok, thinking: bool) -> None:  # type: ignore[no-untyped-def]
    ids, mask = encode_chat(tok, CONVERSATION, tools=TOOLS, thinking=thinking)
    full = encode_messages(CONVERSATION, tools=TOOLS, thinking=thinking)
    assert tok.decode(ids) == full
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    # earlier turns render without reasoning; turns after the last user keep it (thinking mode)
    expected = "".join(
        encode_assistant_completion(
            m if (thinking and i > 3) else {**m, "reasoning_content": None}, thinking=thinking and i > 3
        )
        for i, m in enumerate(CONVERSATION)
        if m["role"] == "assistant"
    )
    assert trained == expected
    assert "It said 5.</think>The answer is 5.<｜end▁of▁sentence｜>" in trained if thinking else True
    assert "function_calls" in trained and "old thoughts" not in trained
    untrained = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    for piece in (
        "Be brief.",
        "<｜User｜>Say hi.<｜Assistant｜>",
        "<function_results>",
        "<result>5</result>",
    ):
        assert piece in untrained
    assert "Hi." not in untrained and "The answer is 5." not in untrained


def test_pack_shifts_labels_and_masks_non_targets(tok) -> None:  # type: ignore[no-untyped-def]
    docs = default_documents(40, chat=True)
    packed = pack(tok, docs, 32)
    assert packed.input_ids.shape == packed.labels.shape and packed.input_ids.shape[1] == 32
    # labels are the next token wherever they are not ignored
    flat_in, flat_lab = packed.input_ids[:, 1:], packed.labels[:, :-1]
    keep = flat_lab != IGNORE_INDEX
    assert torch.equal(flat_in[keep], flat_lab[keep])
    assert 0 < keep.float().mean() < 1  # chat data: prompts are not targets


def test_bad_records_stop_or_skip_with_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "good one"}\n{"text": broken\n\n{"nope": 1}\n{"text": "good two"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_documents([str(f)], on_bad_record="stop")
    docs, problems = load_documents([str(f)], on_bad_record="skip")
    assert [d.text for d in docs] == ["good one", "good two"]
    assert len(problems) == 2 and problems[0].endswith(tuple("0123456789)")) and ":2:" in problems[0]
    assert ":4: record has neither 'text' nor 'messages'" in problems[1]


def test_cli_reports_bad_record_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\nnot json\n')
    proc = subprocess.run(
        [sys.executable, "-m", "dsv.train", "pretrain", "--out", str(tmp_path / "run"), "--data", str(f),
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.jsonl:2:" in lines[0]


def test_text_files_hf_dataset_and_task_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text file")
    docs, _ = load_documents([str(tmp_path / "a.txt")])
    assert docs[0].text == "plain text file"

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    docs, _ = load_documents([str(tmp_path / "ds")])
    assert [d.text for d in docs] == ["one", "two"]

    tasks_mod = pytest.importorskip("dsv.synth.tasks")
    from dsv.synth.env import Task

    task = Task(
        id="t-1-0",
        family="t",
        seed=0,
        difficulty=1,
        prompt="Compute 2+2.",
        tools=[],
        state={},
        answer_format="int",
    )
    tasks_mod.write_tasks(tmp_path / "tasks.jsonl", [task])
    docs, _ = load_documents([str(tmp_path / "tasks.jsonl")])
    assert "Compute 2+2." in docs[0].text and docs[0].text.startswith("<｜begin▁of▁sentence｜>")


def test_default_documents_are_deterministic() -> None:
    a, b = default_documents(50, seed=3), default_documents(50, seed=3)
    assert [d.text for d in a] == [d.text for d in b]
    assert any("pass key" in (d.text or "") for d in a)


def test_passkey_haystack_can_cycle_a_few_random_sentences() -> None:
    import random

    from dsv.train.data import passkey_document

    prompt, answer, full = passkey_document(random.Random(7), 10, distinct=3)
    key = answer.strip(" .")
    sentences = [x for x in prompt.split(". ") if not x.startswith(("The pass key", "Remember", "What"))]
    assert len(sentences) >= 9 and len(set(sentences)) == 3  # 10 fillers drawn from 3 sentences
    assert full.count(key) == 2  # stated once, answered once
    other, _, _ = passkey_document(random.Random(8), 10, distinct=3)
    assert set(other.split(". ")) != set(prompt.split(". "))  # the sentences are drawn per document
    with pytest.raises(ValueError, match="distinct"):
        passkey_document(random.Random(7), 10, distinct=0)
    docs = default_documents(40, seed=1, passkey_share=1.0, passkey_distinct=2)
    assert all(d.text and "pass key" in d.text for d in docs)


def test_batch_plan_same_global_batch_for_any_world_size() -> None:
    one = BatchPlan(n_rows=37, micro_batch=4, grad_accum=1, world=1, seed=5)
    two = BatchPlan(n_rows=37, micro_batch=2, grad_accum=1, world=2, seed=5)
    acc = BatchPlan(n_rows=37, micro_batch=1, grad_accum=2, world=2, seed=5)
    for step in range(12):  # crosses epoch boundaries (37 rows, 4 per step)
        want = one.micro_rows(step, 0, 0).tolist()
        assert two.micro_rows(step, 0, 0).tolist() + two.micro_rows(step, 0, 1).tolist() == want
        got = [acc.micro_rows(step, m, r).tolist()[0] for m in range(2) for r in range(2)]
        assert got == want
    epoch0 = [r for s in range(10) for r in one.step_rows(s).tolist()][:37]
    assert sorted(epoch0) == list(range(37))


def test_schedules() -> None:
    kw = {"lr": 1.0, "total_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="wsd", **kw) == 1.0 and lr_at(99, schedule="wsd", **kw) == pytest.approx(0.1)
    assert lr_at(90, schedule="wsd", **kw) < 1.0 and lr_at(79, schedule="wsd", **kw) == 1.0
    assert lr_at(77, schedule="constant", **kw) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, lr=1.0, total_steps=1, schedule="linear")


def test_jsonl_chat_records(tmp_path: Path) -> None:
    f = tmp_path / "chat.jsonl"
    f.write_text(
        json.dumps({"messages": CONVERSATION, "tools": TOOLS})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "x"}]})
        + "\n"
    )
    docs, problems = load_documents([str(f)], on_bad_record="skip")
    assert len(docs) == 1 and docs[0].is_chat and "no assistant turn" in problems[0]


def test_a_record_can_fix_its_own_thinking_mode(tmp_path: Path, tok) -> None:  # type: ignore[no-untyped-def]
    """One SFT mix teaching answers with and without reasoning: a record's own ``thinking`` wins over
    the run's, a record without one follows the run, a non-boolean one is a bad record."""
    from dsv.train.data import tokenize_document

    turn = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "reasoning_content": "Two and three.",
                                                     "content": "Answer: 5"}]  # fmt: skip
    f = tmp_path / "mix.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (
        {"messages": turn, "thinking": True}, {"messages": turn}, {"messages": turn, "thinking": "yes"},
    )) + "\n")  # fmt: skip
    docs, problems = load_documents([str(f)], on_bad_record="skip")
    assert [d.thinking for d in docs] == [True, None]
    assert len(problems) == 1 and ":3:" in problems[0] and "'thinking' must be true or false" in problems[0]

    def trained(doc, thinking: bool) -> str:  # type: ignore[no-untyped-def]
        ids, mask = tokenize_document(tok, doc, thinking=thinking)
        return tok.decode([t for t, m in zip(ids, mask, strict=True) if m])

    with_reasoning = encode_assistant_completion(turn[1], thinking=True)
    without = encode_assistant_completion({**turn[1], "reasoning_content": None}, thinking=False)
    assert "Two and three." in with_reasoning and "Two and three." not in without
    assert trained(docs[0], thinking=False) == with_reasoning  # the record's mode, not the run's
    assert trained(docs[1], thinking=False) == without
    assert trained(docs[1], thinking=True) == with_reasoning


def test_a_developer_message_before_the_last_user_trains_in_thinking_mode(tok) -> None:  # type: ignore[no-untyped-def]
    """The encoder drops it in thinking mode (as the official one does); SFT encodes what it renders."""
    conversation = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Salut."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "reasoning_content": "Five.", "content": "Cinq."},
    ]
    ids, mask = encode_chat(tok, conversation, thinking=True)
    assert tok.decode(ids) == encode_messages(conversation, thinking=True)
    assert "Answer in French." not in tok.decode(ids)
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "Salut." in trained and "Five.</think>Cinq." in trained
    ids, _ = encode_chat(tok, conversation, thinking=False)  # chat mode keeps it, as the encoder does
    assert "Answer in French." in tok.decode(ids)
