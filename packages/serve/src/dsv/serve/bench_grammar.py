"""``dsv bench serve-grammar``: what structured outputs cost, on a random checkpoint on the CPU.

Two measurements, in one run:

- **engine tokens/s with and without a schema**: C requests of P random prompt tokens and N sampled
  output tokens (temperature 1) on an in-process :class:`~dsv.serve.engine.Engine`, once free and
  once under a JSON schema whose outputs cannot end before N tokens (an array of at least N
  bounded integers), so both waves generate exactly C x N tokens; the waves alternate and each
  figure is the median of ``--runs``, with the paired ratio (each schema wave against the free wave
  just before it), which a busy host disturbs less.
- **mask cost per token**: the time to compute one sequence's next-token mask, walking the same
  valid token sequence of that schema, for llguidance (the engine dsv uses) and, when installed,
  xgrammar (the one vLLM defaults to), both on the checkpoint's tokenizer.

Run: ``dsv bench serve-grammar --preset tiny --write tools/bench/results/serve-grammar.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

__all__ = ["bench_grammar"]

console = Console()


def _schema(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {"values": {"type": "array", "minItems": n,
            "items": {"type": "integer", "minimum": 0, "maximum": 999}}}, "required": ["values"],
            "additionalProperties": False}  # fmt: skip


def _wave(engine: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int]:
    t = time.perf_counter()
    outs = engine.generate_many(prompts, params)
    tokens = sum(len(o.tokens) for o in outs)
    return tokens / (time.perf_counter() - t), tokens


def _mask_costs(tokenizer: Any, vocab_size: int, schema: dict[str, Any], steps: int) -> dict[str, float]:
    """Microseconds per next-token mask for each grammar engine, on one valid walk of ``schema``."""
    import torch

    from dsv.serve.grammar import GrammarVocab, json_schema_grammar

    vocab = GrammarVocab.from_tokenizer(tokenizer, vocab_size)
    grammar = json_schema_grammar(schema)
    g = torch.Generator().manual_seed(0)
    walker, walk = vocab.matcher(grammar), []
    for _ in range(steps):  # a random valid token path
        allowed = walker.allowed().nonzero().squeeze(1)
        tok = int(allowed[torch.randint(len(allowed), (1,), generator=g)])
        walker.consume(tok)
        walk.append(tok)
    out: dict[str, float] = {}
    m = vocab.matcher(grammar)
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    bits = allocate_token_bitmask(1, vocab_size)
    t = time.perf_counter()
    for tok in walk:
        fill_next_token_bitmask(m.m, bits, 0)
        m.consume(tok)
    out["llguidance"] = (time.perf_counter() - t) / len(walk) * 1e6
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return out
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<｜end▁of▁sentence｜>")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    xm = xgr.GrammarMatcher(compiled)
    xbits = xgr.allocate_token_bitmask(1, vocab_size)
    t = time.perf_counter()
    for tok in walk:
        xm.fill_next_token_bitmask(xbits)
        if not xm.accept_token(tok):
            return out  # the two engines disagree on this path: no fair timing
    out["xgrammar"] = (time.perf_counter() - t) / len(walk) * 1e6
    return out


def bench_grammar(
    preset: str = typer.Option("tiny", help="model preset (random weights)"),
    clients: int = typer.Option(16, min=1, help="requests per wave"),
    prompt_tokens: int = typer.Option(64, min=1, help="prompt tokens per request"),
    output_tokens: int = typer.Option(128, min=8, help="output tokens per request"),
    runs: int = typer.Option(3, min=1, help="waves per side (median reported)"),
    threads: int = typer.Option(1, min=1, help="torch threads"),
    write: Path = typer.Option(None, help="write the Markdown section here (atomically)"),
) -> None:
    """Tokens/s with and without a JSON schema, and the per-token mask cost of the grammar engines."""
    import torch

    from dsv.core import presets
    from dsv.core.checkpoint import atomic_write_bytes
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import default_corpus, train_bpe
    from dsv.serve.engine import Engine, GenParams
    from dsv.serve.grammar import json_schema_grammar

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = getattr(presets, preset)()
    tok = train_bpe(default_corpus(), cfg.vocab_size)
    model = DSVForCausalLM(cfg).eval()
    engine = Engine.for_model(model, cfg, tokenizer=tok, num_blocks=clients * (-(-(prompt_tokens + output_tokens) // 16)) + 8)
    schema = _schema(output_tokens)
    grammar = json_schema_grammar(schema)
    g = torch.Generator().manual_seed(1)

    def params(constrained: bool) -> list[Any]:
        return [GenParams(temperature=1.0, seed=i, max_tokens=output_tokens, grammar=grammar if constrained else "")
                for i in range(clients)]  # fmt: skip

    free: list[float] = []
    constrained: list[float] = []
    with torch.inference_mode():
        _wave(engine, [[5] * prompt_tokens], params(True)[:1])  # warm-up (kernel build, first grammar)
        for _ in range(runs):
            for side, out in ((False, free), (True, constrained)):
                prompts = [torch.randint(10, cfg.vocab_size, (prompt_tokens,), generator=g).tolist() for _ in range(clients)]
                rate, tokens = _wave(engine, prompts, params(side))
                assert tokens == clients * output_tokens, "both waves must generate the same tokens"
                out.append(rate)
                console.print(f"{'schema' if side else 'free':>6}: {rate:,.1f} tok/s")
    costs = _mask_costs(tok, cfg.vocab_size, schema, steps=min(output_tokens, 200))
    f, c = statistics.median(free), statistics.median(constrained)
    lines = [
        "## Structured outputs: the cost of a JSON schema (issue 18)",
        "",
        f"- command: `dsv bench serve-grammar --preset {preset} --clients {clients} --prompt-tokens {prompt_tokens} "
        f"--output-tokens {output_tokens} --runs {runs} --threads {threads}`",
        f"- date: {datetime.date.today().isoformat()}, {os.cpu_count()}-core CPU shared with other jobs, "
        f"{threads} torch thread(s), vocabulary {cfg.vocab_size}",
        "",
        "| side | tokens/s (median) | per run |",
        "|---|---|---|",
        f"| free | {f:,.1f} | {', '.join(f'{x:,.0f}' for x in free)} |",
        f"| JSON schema (llguidance masks, batched) | {c:,.1f} | {', '.join(f'{x:,.0f}' for x in constrained)} |",
        f"| ratio schema / free | {c / f:.2f}x | paired (each schema wave against the free wave just before it): "
        f"{statistics.median(b / a for a, b in zip(free, constrained, strict=True)):.2f}x |",
        "",
        "Mask cost per token, one sequence, the same valid path through the schema:",
        "",
        "| grammar engine | microseconds per mask |",
        "|---|---|",
        *[f"| {name} | {us:,.1f} |" for name, us in costs.items()],
        "",
    ]
    text = "\n".join(lines)
    console.print(text)
    if write is not None:
        write.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(write, text.encode())
        console.print(f"wrote {write}")
