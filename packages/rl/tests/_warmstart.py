"""A tiny chat model briefly supervised on one exact-answer synth family (the tests' starting point).

The supervised warm start is a few hundred steps of next-token loss on ``prompt -> "Answer: N"``
turns in the V3.2 chat encoding (non-thinking), only on the assistant tokens: enough for the model
to answer in the family's format, not enough to be right often, so GRPO has something to learn.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F


def warm_start(out: Path, family: str, *, steps: int, difficulty: int = 1, seed: int = 0, n_tasks: int = 400,
               lr: float = 3e-3, batch: int = 16, unparseable_share: float = 0.0) -> Path:  # fmt: skip
    """Write a tiny checkpoint SFT'd for ``steps`` steps on ``n_tasks`` training tasks of ``family``.

    With ``unparseable_share``, that share of the supervised answers is written as ``Answer - N``:
    the right number in a form the verifier cannot read.
    """
    from dsv.core.chat import encode_messages
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe
    from dsv.synth import registry

    env = registry.get(family)
    tasks = [env.generate(s, difficulty) for s in range(n_tasks)]
    rows = []
    pick = random.Random(f"{seed}/style")
    for t in tasks:
        prompt = encode_messages([{"role": "user", "content": f"{t.prompt}\n\n{t.answer_format}".strip()}], thinking=False)
        answer = env.solve(t)
        rows.append((prompt, f"Answer - {answer}" if pick.random() < unparseable_share else f"Answer: {answer}"))
    torch.manual_seed(seed)
    tok = train_bpe(default_corpus(400, seed=seed) + [p + a for p, a in rows], 1024)
    # index_topk above the context: every query attends to every key (the DSA stages train the
    # indexer; an untrained one would hand attention arbitrary keys).
    model = DSVForCausalLM(tiny(index_topk=4096))
    enc = []
    for prompt, answer in rows:
        p = tok.encode(prompt)
        a = [*tok.encode(answer), tok.eos_id]
        enc.append((p + a, len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        pick = [enc[rng.randrange(len(enc))] for _ in range(batch)]
        T = max(len(ids) for ids, _ in pick)
        inputs = torch.zeros(batch, T - 1, dtype=torch.long)
        labels = torch.full((batch, T - 1), -100, dtype=torch.long)
        for b, (ids, p) in enumerate(pick):
            inputs[b, : len(ids) - 1] = torch.tensor(ids[:-1])
            labels[b, p - 1 : len(ids) - 1] = torch.tensor(ids[p:])
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        logits = model(inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return save_pretrained(model, tok, out)
