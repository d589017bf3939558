"""dsv.synth.eval: score a dsv checkpoint or any OpenAI-compatible endpoint on task sets.

Accuracy, unbiased pass@k, output and reasoning tokens, tool calls per episode, with
thinking on or off; resumable (``results.jsonl``), reported as JSON, Markdown and PNG.
CLI: ``dsv eval`` (or ``python -m dsv.synth.eval``). Nothing here imports torch or
openai at import time.
"""

from dsv.synth.eval.client import ChatReply, EndpointClient, EndpointError, Usage
from dsv.synth.eval.metrics import pass_at_k, percentile, summarize, summarize_groups
from dsv.synth.eval.policies import EndpointPolicyFactory, EpisodePolicy, LocalModelPolicyFactory
from dsv.synth.eval.report import write_report
from dsv.synth.eval.runner import EnvResolver, EvalConfig, TaskEntry, family_entries, load_task_file, run_eval

__all__ = [
    "ChatReply",
    "EndpointClient",
    "EndpointError",
    "EndpointPolicyFactory",
    "EnvResolver",
    "EpisodePolicy",
    "EvalConfig",
    "LocalModelPolicyFactory",
    "TaskEntry",
    "Usage",
    "family_entries",
    "load_task_file",
    "pass_at_k",
    "percentile",
    "run_eval",
    "summarize",
    "summarize_groups",
    "write_report",
]
