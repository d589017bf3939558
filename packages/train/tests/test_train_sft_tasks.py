"""SFT on dsv-synth task files: each task is a conversation whose only targets are the verified
reference answer (checked token by token), thinking mode and tool-using families are refused with
the fix, and the held-out loss of a short run falls.

Run: ``pytest packages/train/tests/test_train_sft_tasks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv.core.chat import encode_messages
from dsv.core.tokenizer import default_corpus, train_bpe
from dsv.train.data import DataError, answer_text, load_documents, pack, tokenize_document

pytest.importorskip("dsv.synth")

from dsv.synth import registry
from dsv.synth.tasks import generate_tasks, write_tasks


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "arith.jsonl"
    write_tasks(path, generate_tasks(["arithmetic"], 160, seed=0, difficulty=1))
    return path


def test_task_becomes_a_conversation_trained_only_on_the_reference_answer(task_file: Path) -> None:
    tok = train_bpe(default_corpus(400), 1024)
    docs, problems = load_documents([str(task_file)], chat=True)
    assert len(docs) == 160 and problems == []
    doc = docs[0]
    assert doc.messages is not None and [m["role"] for m in doc.messages] == ["user", "assistant"]
    task = json.loads(task_file.read_text().splitlines()[0])
    env = registry.get("arithmetic")
    from dsv.synth.env import Task

    reference = answer_text(env.solve(Task.from_json(task)))
    assert doc.messages[1]["content"] == reference
    assert doc.messages[0]["content"] == f"{task['prompt']}\n\n{task['answer_format']}"

    ids, mask = tokenize_document(tok, doc, thinking=False)
    full = encode_messages(doc.messages, thinking=False)
    assert tok.decode(ids) == full
    # token by token: the targets are one contiguous run at the end, exactly the answer and EOS
    first = mask.index(True)
    assert all(mask[first:]) and not any(mask[:first])
    assert tok.decode(ids[first:]) == reference + "<｜end▁of▁sentence｜>"
    assert tok.decode(ids[:first]).endswith("<｜Assistant｜></think>")
    assert task["prompt"].splitlines()[0] in tok.decode(ids[:first])


def test_thinking_mode_is_refused_with_the_fix(task_file: Path) -> None:
    tok = train_bpe(default_corpus(400), 1024)
    docs, _ = load_documents([str(task_file)], chat=True)
    with pytest.raises(DataError, match=r"no reasoning.*pass --no-thinking"):
        pack(tok, docs[:4], 32, thinking=True)


def test_tool_families_are_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    write_tasks(path, generate_tasks(["arithmetic", "kb_qa"], 2, seed=0))
    with pytest.raises(DataError, match=r"tool-using families \(kb_qa\).*'messages' and 'tools'"):
        load_documents([str(path)], chat=True)
    # pretraining still reads them as text
    docs, _ = load_documents([str(path)], chat=False)
    assert len(docs) == 4 and all(not d.is_chat for d in docs)


def test_sft_on_a_task_file_lowers_the_held_out_loss(task_file: Path, tmp_path: Path) -> None:
    from dsv.train import TrainConfig, train

    out = tmp_path / "sft"
    summary = train(TrainConfig(stage="sft", model="tiny", out=out, data=[str(task_file)], thinking=False,
                                steps=30, seq_len=64, micro_batch_size=4, lr=3e-3, val_fraction=0.2,
                                eval_every=5, save_every=0, progress=False, tensorboard=False))  # fmt: skip
    vals = [m["val_loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m]
    assert len(vals) >= 5
    assert summary.val_loss is not None and summary.val_loss < vals[0] * 0.8, vals
