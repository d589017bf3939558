"""Policies for ``dsv eval``: an OpenAI-compatible endpoint or an in-process dsv checkpoint.

A policy factory makes one ``EpisodePolicy`` per episode; the policy is the callable
``policy(messages, tools) -> assistant message dict`` that ``dsv.synth.episode``
drives, and it also counts the episode's output tokens, reasoning tokens (and where
the reasoning count came from) across all its turns:

- ``usage``: the server's ``usage.completion_tokens_details.reasoning_tokens``;
- ``tokenizer``: the checkpoint's tokenizer run on ``reasoning_content`` (in-process);
- ``approx``: ``ceil(len(reasoning_content) / 4)`` characters-per-token estimate, for
  endpoints that report no reasoning count;
- ``none``: the episode produced no reasoning.

The in-process policy needs dsv-core (an optional dependency of dsv-synth); it is
imported when the factory is built, with an install hint when missing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv.synth.eval.client import EndpointClient

__all__ = ["EndpointPolicyFactory", "EpisodePolicy", "LocalModelPolicyFactory", "ModelNotAvailableError"]


class ModelNotAvailableError(RuntimeError):
    """dsv-core is not installed or the checkpoint cannot be loaded; the message says what to do."""


def approx_tokens(text: str) -> int:
    """A rough token count for text without a tokenizer: one token per four characters."""
    return math.ceil(len(text) / 4)


class EpisodePolicy:
    """One episode's policy: forwards turns to ``complete`` and accumulates token counts."""

    def __init__(
        self,
        complete: Callable[[list[dict[str, Any]], list[dict[str, Any]]], tuple[dict, int, int | None, str]],
    ):
        self._complete = complete
        self.output_tokens = 0
        self.reasoning_tokens = 0
        self.reasoning_sources: set[str] = set()
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            message, out_tokens, reasoning_tokens, source = self._complete(messages, tools)
        except Exception as exc:
            # the episode loop turns this into a scored failure; keep it so the runner can tell
            # an unreachable endpoint (retry next run) from a model mistake
            self.error = exc
            raise
        self.calls += 1
        self.output_tokens += out_tokens
        if reasoning_tokens:
            self.reasoning_tokens += reasoning_tokens
            self.reasoning_sources.add(source)
        return message

    @property
    def reasoning_source(self) -> str:
        """How reasoning tokens were counted (``+``-joined when turns differed)."""
        return "+".join(sorted(self.reasoning_sources)) or "none"


class EndpointPolicyFactory:
    """Policies that call an OpenAI-compatible endpoint (thread-safe: one client for all episodes)."""

    concurrent = True

    def __init__(
        self,
        client: EndpointClient,
        *,
        thinking: bool,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool = False,
    ) -> None:
        self.client = client
        self.thinking = thinking
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stream = stream

    def describe(self) -> str:
        return f"endpoint {self.client.base_url} model={self.client.model}"

    def __call__(self, sample: int) -> EpisodePolicy:
        def complete(
            messages: list[dict[str, Any]], tools: list[dict[str, Any]]
        ) -> tuple[dict, int, int | None, str]:
            reply = self.client.chat(
                messages,
                tools=tools or None,
                thinking=self.thinking,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                stream=self.stream,
            )
            reasoning_text = reply.message.get("reasoning_content") or ""
            if reply.usage.reasoning_tokens is not None:
                return reply.message, reply.usage.completion_tokens, reply.usage.reasoning_tokens, "usage"
            return reply.message, reply.usage.completion_tokens, approx_tokens(reasoning_text), "approx"

        return EpisodePolicy(complete)


class LocalModelPolicyFactory:
    """Policies that run a dsv checkpoint in this process (dsv.core generate + the V3.2 chat encoding).

    One model is shared, so episodes run one at a time (``concurrent = False``).
    Sampling is seeded per (sample index, turn) so a re-run reproduces an episode.
    """

    concurrent = False

    def __init__(
        self,
        path: str | Path,
        *,
        thinking: bool,
        max_new_tokens: int = 512,
        temperature: float = 0.6,
        top_p: float = 0.95,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        try:
            import torch

            from dsv.core import chat, checkpoint, generate
            from dsv.core.errors import DSVError
        except ImportError as exc:
            from dsv.cli.errors import install_hint

            raise ModelNotAvailableError(
                f"evaluating a checkpoint in-process needs dsv-core ({exc}); install it with "
                f"{install_hint('dsv-synth', 'model')}, or use --endpoint to evaluate an endpoint"
            ) from None
        self._torch = torch
        self._chat = chat
        self._generate = generate
        self.path = str(path)
        try:
            self.model, tokenizer = checkpoint.load_pretrained(self.path, device=device, dtype=torch.float32)
        except (DSVError, OSError, ValueError) as exc:
            raise ModelNotAvailableError(f"cannot load checkpoint {self.path}: {exc}") from None
        if tokenizer is None:
            raise ModelNotAvailableError(
                f"checkpoint {self.path} has no tokenizer.json; add one to evaluate it"
            )
        self.tokenizer = tokenizer
        self.model.eval()
        self.device = device
        self.thinking = thinking
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"checkpoint {self.path}"

    def _reasoning_tokens(self, new_ids: list[int], reasoning: str | None) -> int:
        # exact when `</think>` is one token: everything sampled before it was reasoning
        end_think = self.tokenizer.token_to_id("</think>")
        if self.thinking and end_think is not None:
            if end_think in new_ids:
                return new_ids.index(end_think)
            return sum(1 for t in new_ids if t != self.tokenizer.eos_id)  # cut off while still thinking
        return len(self.tokenizer.encode(reasoning, add_bos=False)) if reasoning else 0

    def __call__(self, sample: int) -> EpisodePolicy:
        turn = [0]

        def complete(
            messages: list[dict[str, Any]], tools: list[dict[str, Any]]
        ) -> tuple[dict, int, int | None, str]:
            torch = self._torch
            prompt = self._chat.encode_messages(messages, thinking=self.thinking, tools=tools or None)
            ids = self.tokenizer.encode(prompt, add_bos=False)
            room = int(self.model.config.max_position_embeddings) - len(ids)
            if room <= 0:
                raise ValueError(f"the conversation ({len(ids)} tokens) fills the model's context")
            params = self._generate.SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=min(self.max_new_tokens, room),
                stop_token_ids=(self.tokenizer.eos_id,),
                seed=self.seed * 1_000_003 + sample * 1009 + turn[0],
            )
            turn[0] += 1
            with self._lock, torch.inference_mode():
                out = self._generate.generate(self.model, ids, params)
            new_ids = [int(t) for t in out.tokens]
            text = self.tokenizer.decode(new_ids, skip_special_tokens=False)
            parsed = self._chat.parse_assistant(text, thinking=self.thinking)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content or ""}
            if parsed.reasoning_content is not None:
                message["reasoning_content"] = parsed.reasoning_content
            if parsed.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in parsed.tool_calls
                ]
            n_reasoning = self._reasoning_tokens(new_ids, parsed.reasoning_content)
            return message, len(new_ids), n_reasoning, "tokenizer"

        return EpisodePolicy(complete)
