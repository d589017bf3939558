"""``/v1/completions``: a string, token ids, or a batch of either (choice ``k`` is prompt ``k // n``'s
``k % n``-th sample, as OpenAI and vLLM number them).

``logprobs`` reports the chosen token's logprob and that many alternatives; with ``echo`` the
prompt comes first in the text and, with ``logprobs``, in the logprobs too (its first token has
none: null), which is what lm-eval-harness's loglikelihood requests read. vLLM's
``prompt_logprobs`` gives the prompt's logprobs in vLLM's shape. Prompt logprobs need the native
engine: such a prompt is prefilled in full, without the prefix cache.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dsv.serve.backend import LocalBackend, TokenLogprob
from dsv.serve.schemas import APIError, CompletionRequest, error_body
from dsv.serve.state import ServerState
from dsv.serve.streaming import ChoiceEvent, fan_in, run_choice, tracked, usage, vllm_prompt_logprobs

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    srv: ServerState = request.app.state.server
    req: CompletionRequest = await srv.read_json(request, CompletionRequest)
    srv.resolve_model(req.model)
    srv.check_token_ids("logit_bias", (t for t, _ in req.bias()))
    srv.check_token_ids("stop_token_ids", req.stop_token_ids or ())
    prompts = CompletionRequest.batch(req.prompt)
    for p in prompts:
        if isinstance(p, list):
            srv.check_token_ids("prompt", p)
    counts = [srv.backend.count(p) for p in prompts]
    max_tokens = max(srv.budget(c, req.max_tokens) for c in counts)
    grammar = srv.output_grammar(req)
    top = req.logprobs if req.logprobs is not None else 0
    want_lp = req.logprobs is not None
    # Prompt logprobs: asked for (vLLM's prompt_logprobs) or part of an echo with logprobs (what
    # lm-eval's loglikelihood requests read).
    echo_lp = req.echo and want_lp
    prompt_top = req.prompt_logprobs if req.prompt_logprobs is not None else top if echo_lp else None
    if prompt_top is not None and not isinstance(srv.backend, LocalBackend):
        raise APIError(400, "prompt logprobs (echo with logprobs) need the native engine", param="echo",
                       code="invalid_value")  # fmt: skip
    srv.admit()
    prompt_tokens = sum(counts)
    srv.metrics.prompt(prompt_tokens)
    created, rid = int(time.time()), f"cmpl-{secrets.token_hex(12)}"
    n = req.n
    # Choice k is prompt k // n's (k % n)-th sample, as OpenAI and vLLM number a batch.
    choice_prompt = [prompts[k // n] for k in range(len(prompts) * n)]

    def job(k: int) -> Any:
        params = srv.sampling(req, max_tokens, k % n, max(top, 1) if want_lp else 0, grammar=grammar,
                          prompt_logprobs=prompt_top)  # fmt: skip
        return lambda out: run_choice(srv, k, choice_prompt[k], params, srv.extras(req), None, "", out)

    jobs = [job(k) for k in range(len(choice_prompt))]
    echoes = [("" if not req.echo else p if isinstance(p, str) else srv.backend.decode(p)) for p in prompts]
    srv.in_flight += 1

    def lp_obj(k: int, entries: list[TokenLogprob], prompt_lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's completion logprobs; with an echo, the prompt's entries first (its first token
        has none: null, as OpenAI gives it)."""
        if not want_lp:
            return None
        tokens = [e.token for e in entries]
        logprobs: list[float | None] = [e.logprob for e in entries]
        tops: list[dict[str, float] | None] = [dict(e.top[:top]) for e in entries]
        if prompt_lps is not None:
            p = choice_prompt[k]
            first = srv.backend.decode((p if isinstance(p, list) else srv.backend.encode(p))[:1])
            tokens = [first, *(e.token for e in prompt_lps), *tokens]
            logprobs = [None, *(e.logprob for e in prompt_lps), *logprobs]
            tops = [None, *(dict(e.top[: max(top, 1)]) for e in prompt_lps), *tops]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def batch_usage(finals: list[ChoiceEvent]) -> dict[str, Any]:
        totals = usage(prompt_tokens, finals)
        cached = [0] * len(prompts)  # per prompt, its best-served choice's prefix-cached tokens
        for ev in finals:
            cached[ev.index // n] = max(cached[ev.index // n], ev.cached_tokens)
        totals["prompt_tokens_details"]["cached_tokens"] = sum(cached)
        return totals

    if req.stream:

        async def gen() -> AsyncIterator[str]:
            finals: list[ChoiceEvent] = []
            first = dict.fromkeys(range(len(jobs)), True)
            plps: dict[int, list[TokenLogprob]] = {}
            try:
                async for ev in fan_in(srv, jobs, request, stream=True):
                    if ev.prompt_logprobs is not None:
                        plps[ev.index] = ev.prompt_logprobs
                        continue
                    text = (echoes[ev.index // n] if first[ev.index] else "") + ev.text
                    echoed = plps.pop(ev.index, None) if first[ev.index] and echo_lp else None
                    first[ev.index] = False
                    if ev.finish is not None:
                        finals.append(ev)
                    if ev.finish == "error":
                        err_body = error_body(ev.error or "generation failed", "server_error")
                        yield f"data: {json.dumps(err_body)}\n\n"
                    body = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                            "choices": [{"index": ev.index, "text": text, "logprobs": lp_obj(ev.index, ev.logprobs, echoed),
                                         "finish_reason": ev.finish}]}  # fmt: skip
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
            except APIError as e:  # headers are sent: the error travels as an event, then [DONE]
                yield f"data: {json.dumps(e.body())}\n\n"
            if req.stream_options is not None and req.stream_options.include_usage:
                body = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [], "usage": batch_usage(finals)}  # fmt: skip
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(tracked(srv, gen()), media_type="text/event-stream")
    try:
        acc: dict[int, dict[str, Any]] = {
            k: {"text": [echoes[k // n]], "lp": [], "plp": None, "finish": None} for k in range(len(jobs))
        }
        finals: list[ChoiceEvent] = []
        async for ev in fan_in(srv, jobs, request, stream=False):
            a = acc[ev.index]
            if ev.prompt_logprobs is not None:
                a["plp"] = ev.prompt_logprobs
                continue
            a["text"].append(ev.text)
            a["lp"] += ev.logprobs
            if ev.finish is not None:
                a["finish"] = ev.finish
                finals.append(ev)
                if ev.finish == "error":
                    raise APIError(
                        503, f"generation failed: {ev.error}", type="server_error", code="engine_error"
                    )
        choices = []
        for k, a in acc.items():
            choice = {"index": k, "text": "".join(a["text"]),
                      "logprobs": lp_obj(k, a["lp"], a["plp"] if echo_lp else None), "finish_reason": a["finish"]}  # fmt: skip
            if req.prompt_logprobs is not None:  # vLLM's shape: null, then {id: {logprob, rank, decoded_token}}
                choice["prompt_logprobs"] = vllm_prompt_logprobs(choice_prompt[k], a["plp"] or [], srv.backend)
            choices.append(choice)
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": batch_usage(finals)}  # fmt: skip
    finally:
        srv.in_flight -= 1
