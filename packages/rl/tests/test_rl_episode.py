"""A multi-turn tool episode through the engine and into the update.

A tiny model is first fitted to two transcripts of one ``meeting`` task in thinking mode: it
reasons, calls ``get_calendar`` (DSML), reads the result and answers, right in one transcript and
wrong in the other, so sampled episodes differ in reward. Then one rollout group runs on the serve
engine: the calls are parsed and executed by the environment, the results fed back as tokens,
and the batch the update sees trains every assistant step's tokens and none of the tool result's.
A one-step GRPO run on the same model gets a nonzero policy-gradient term from those rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

FAMILY = "meeting"
THOUGHT = "Check Cy on the first day."


def _transcripts() -> tuple[list[dict], list[dict], list[list[dict]]]:
    from dsv.synth import registry
    from dsv.synth.tools import call_tool

    env = registry.get(FAMILY)
    task = env.generate(0, 1)
    day = task.state["days"][0]  # the task's week starts on a day of its own
    args = json.dumps({"person": "Cy", "day": day})
    result = call_tool(env.tools(task), "get_calendar", args)
    call = {"id": "call_0", "type": "function", "function": {"name": "get_calendar", "arguments": args}}
    user = {"role": "user", "content": f"{task.prompt}\n\n{task.answer_format}".strip()}
    first = {"role": "assistant", "content": "", "reasoning_content": THOUGHT, "tool_calls": [call]}
    tool = {"role": "tool", "tool_call_id": "call_0", "content": result}
    good, bad = env.solve(task), {"day": day, "start": "09:00"}
    assert good != bad
    endings = [
        {"role": "assistant", "content": f"Answer: {json.dumps(good)}", "reasoning_content": "Cy is free then."},
        {"role": "assistant", "content": f"Answer: {json.dumps(bad)}", "reasoning_content": "Cy is free then."},
    ]
    return [task.to_json()], task.tools, [[user, first, tool, end] for end in endings]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model fitted to the two transcripts (full-text loss; a few seconds)."""
    from dsv.core.chat import encode_messages
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe

    _, tools, convs = _transcripts()
    full = [encode_messages(c, thinking=True, tools=tools) for c in convs]
    torch.manual_seed(0)
    tok = train_bpe(default_corpus(300) + full * 20, 1024)
    # Token pieces as a rollout builds them: the prompt, each step's text, the tool-result text
    # between them; the loss is on the two assistant steps.
    rows = []
    for conv in convs:
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for end, trained in ((1, False), (2, True), (3, False), (4, True)):
            text = encode_messages(conv[:end], thinking=True, tools=tools)
            piece = tok.encode(text[len(done) :])
            ids += piece
            labels += piece if trained else [-100] * len(piece)
            done = text
        rows.append((ids, labels))
    T = max(len(i) for i, _ in rows)
    inputs = torch.tensor([i + [0] * (T - len(i)) for i, _ in rows])
    targets = torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in rows])
    # index_topk above the context: every query attends to every key (the DSA stages train the
    # indexer; an untrained one would hand attention arbitrary keys).
    model = DSVForCausalLM(tiny(index_topk=4096))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(inputs[:, :-1]).logits.flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return save_pretrained(model.eval(), tok, tmp_path_factory.mktemp("tool") / "model")


def test_tool_episode_through_the_engine_reaches_the_update(tool_model: Path, tmp_path: Path) -> None:
    from dsv.core.checkpoint import load_pretrained
    from dsv.rl import GRPOConfig, grpo
    from dsv.rl.data import TaskSource
    from dsv.rl.rollout import RolloutSettings, rollout
    from dsv.rl.trainer import build_engine, update_batch
    from dsv.synth.env import Task

    task_json, _, _ = _transcripts()
    task = Task.from_json(task_json[0])
    model, tok = load_pretrained(tool_model)
    engine = build_engine(model, blocks=256)
    settings = RolloutSettings(temperature=0.3, max_tokens=96, max_turns=3, max_len=2048, thinking=True)
    source = TaskSource([FAMILY])
    rolls = rollout(engine, tok, [task], [source.env_for(task)], group_size=4, settings=settings, seed=0, step=0)

    # The 4 samples share the prompt's prefill: its blocks came from the prefix cache for 3 of them.
    assert engine.stats().prefix_hit_blocks >= 3 * (len(rolls[0].tokens[: rolls[0].prompt_len]) - 1) // 16
    called = [r for r in rolls if r.result.tool_calls >= 1 and r.steps >= 2]
    assert called, [r.completion_text for r in rolls]
    for r in called:
        # The call was parsed from the model's DSML and executed by the environment.
        assert r.result.trace[0].name == "get_calendar" and r.result.trace[0].result.startswith("[[")
        msgs = r.result.messages
        assert msgs[1]["tool_calls"] and msgs[2]["role"] == "tool"
        # Thinking with tools: the first step's reasoning stays in the context of the second.
        assert msgs[1].get("reasoning_content") == THOUGHT
        text = tok.decode(r.tokens[r.prompt_len :])
        assert text.index(THOUGHT) < text.index("<function_results>") < text.index("Cy is free then.")
        # What the update trains: the sampled tokens of both steps; the tool result is masked out.
        pad = update_batch([r], torch.device("cpu"))
        targets, mask = pad.targets[0], pad.mask[0]
        trained = tok.decode(targets[mask].tolist())
        untrained = tok.decode(targets[~mask].tolist())
        assert THOUGHT in trained and "Cy is free then." in trained and "get_calendar" in trained
        assert msgs[2]["content"] in untrained and msgs[2]["content"] not in trained
        assert "<function_results>" in untrained
        # The engine's recorded routes cover every position the training forward sees.
        assert all(x is None or x.shape[0] == len(r.tokens) - 1 for x in r.routes)
    rewards = {r.score.reward for r in rolls}
    assert rewards == {0.0, 1.0}, [(r.score.reason, r.completion_text[-60:]) for r in rolls]

    records: list[dict] = []
    grpo(GRPOConfig(model=str(tool_model), out=tmp_path / "run", tasks=[FAMILY], steps=1, prompts=1, group_size=4,
                    temperature=0.3, max_tokens=96, max_turns=3, max_len=2048, thinking=True, save_every=0,
                    progress=False, tensorboard=False, plot=False), on_step=records.append)  # fmt: skip
    rec = records[0]
    assert rec["assistant_steps"] >= 2 and 0 < rec["accuracy"] < 1
    # The policy gradient is the only term (beta 0). Its value is ~0 at ratio 1 (the advantages of a
    # group sum to zero), its gradient is not: the rewards moved the weights.
    assert "loss/pg" in rec and "loss/kl" not in rec
    assert rec["grad_norm"] > 1e-6
