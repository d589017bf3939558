"""How fast does a model preset learn to copy a number from its prompt? (the quickstart's bottleneck)

Every exact-answer family worth learning needs the answer built from the prompt's tokens. This
probe asks the simplest such question in the V3.2 chat encoding, "which number comes last in this
list?" (3 to 6 distinct two-digit numbers, each one token), and trains a fresh model of the preset on
the answer token alone (Adam, dense attention, batch 16). It prints the answer-token loss every
``--every`` steps against chance (ln 90: any two-digit number) and the held-out greedy accuracy at
the end, so a change to the preset, the optimiser or the recipe can be judged in a minute or two
before a ten-minute quickstart run.

    OMP_NUM_THREADS=1 python tools/bench/learnability.py --preset tiny --steps 300 --lr 3e-3
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from dsv.core.chat import encode_messages
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import PRESETS
from dsv.core.tokenizer import default_corpus, train_bpe


def _last(rng: random.Random) -> tuple[str, int]:
    nums = rng.sample(range(10, 100), rng.randint(3, 6))
    question = f"Numbers: {', '.join(map(str, nums))}\n\nWhich number comes last?\n\nFinish with one line `Answer: <number>`."
    return question, nums[-1]


def _lookup(rng: random.Random) -> tuple[str, int]:
    """dsv-synth's ``lookup`` family at level 1 (4 records, two-digit values)."""
    from dsv.synth import registry

    env = registry.get("lookup")
    task = env.generate(rng.randrange(10**9), 1)
    return f"{task.prompt}\n\n{task.answer_format}", int(env.solve(task))


def _largest(rng: random.Random) -> tuple[str, int]:
    nums = rng.sample(range(10, 100), 4)
    question = f"Numbers: {', '.join(map(str, nums))}\n\nWhich number is the largest?\n\nFinish with one line `Answer: <number>`."
    return question, max(nums)


TASKS = {"last": _last, "largest": _largest, "lookup": _lookup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=[p for p in PRESETS if p != "v32"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="last", choices=sorted(TASKS))
    args = ap.parse_args()

    rng = random.Random(args.seed)
    make = TASKS[args.task]
    train = [make(rng) for _ in range(4000)]
    held = [make(random.Random(f"held/{i}")) for i in range(100)]

    def prompt(q: str) -> str:
        return encode_messages([{"role": "user", "content": q}], thinking=False) + "Answer:"

    tok = train_bpe(default_corpus(400, seed=args.seed) + [prompt(q) + f" {a}" for q, a in train[:400]], 1024)
    assert all(len(tok.encode(f" {n}")) == 1 for n in range(10, 100)), "two-digit numbers must be one token"
    torch.manual_seed(args.seed)
    # index_topk above the prompt: dense attention, so the probe measures learning, not key selection.
    model = DSVForCausalLM(PRESETS[args.preset](index_topk=4096))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    enc = [(tok.encode(prompt(q)), tok.encode(f" {a}")[0]) for q, a in train]
    chance = math.log(90)
    print(f"{args.preset}, {args.task}: answer-token loss (chance ln 90 = {chance:.2f}), batch {args.batch}, lr {args.lr}")
    t0 = time.perf_counter()
    window: list[float] = []
    model.train()
    for step in range(1, args.steps + 1):
        batch = [enc[rng.randrange(len(enc))] for _ in range(args.batch)]
        width = max(len(ids) for ids, _ in batch)
        # Right-aligned (left padding with the BOS id) so every answer is read at the last position.
        x = torch.tensor([[tok.bos_id] * (width - len(ids)) + ids for ids, _ in batch])
        loss = F.cross_entropy(model(x).logits[:, -1].float(), torch.tensor([a for _, a in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if step % args.every == 0:
            print(f"  step {step:5d}  loss {sum(window) / len(window):.3f}  ({time.perf_counter() - t0:.0f} s)")
            window = []
    model.eval()
    right = 0
    with torch.no_grad():
        for q, a in held:
            right += int(model(torch.tensor([tok.encode(prompt(q))])).logits[0, -1].argmax()) == tok.encode(f" {a}")[0]
    print(f"held-out greedy accuracy {right / len(held):.2f} (a number of the prompt picked at random: ~0.22-0.25)")


if __name__ == "__main__":
    main()
