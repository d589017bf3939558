"""``/tokenizer_info`` as vLLM shapes it: what a client needs to tokenize like the server, with
``/tokenize`` and ``/detokenize``. lm-eval-harness asks for it first: when it answers, lm-eval's
``tokenizer_backend=auto`` tokenizes through the server (no local copy of the tokenizer needed).
The chat template is left out: dsv encodes chats in Python (:mod:`dsv.core.chat`), not Jinja."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dsv.serve.state import ServerState

router = APIRouter()


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    srv: ServerState = request.app.state.server
    tok = srv.backend.tokenizer  # type: ignore[attr-defined]
    special = {name: tok.decode([tid]) if tid is not None else None
               for name, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id))}  # fmt: skip
    return {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": srv.backend.max_model_len,
            "vocab_size": srv.backend.vocab_size}  # fmt: skip
