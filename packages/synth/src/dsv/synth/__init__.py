"""dsv.synth: agentic environments with tools and program-checked verifiers, and the sandbox.

Import cost is small and torch-free: environments, tools, verifiers and the
sandbox need only the standard library. See README.md for the public API.
"""

from dsv.synth.env import (
    DEFAULT_DIFFICULTY,
    AnswerFormatError,
    Environment,
    Score,
    Task,
    TaskFormatError,
    ToolCallRecord,
    safe_verify,
)
from dsv.synth.episode import EpisodeResult, run_episode
from dsv.synth.registry import UnknownFamilyError, families, get, register
from dsv.synth.sandbox import Limits, SandboxResult, run_command, run_python
from dsv.synth.tasks import TaskFileError, read_tasks, write_tasks
from dsv.synth.tools import call_tool, tool_schema

__all__ = [
    "DEFAULT_DIFFICULTY",
    "AnswerFormatError",
    "Environment",
    "EpisodeResult",
    "Limits",
    "SandboxResult",
    "Score",
    "Task",
    "TaskFileError",
    "TaskFormatError",
    "ToolCallRecord",
    "UnknownFamilyError",
    "call_tool",
    "families",
    "get",
    "read_tasks",
    "register",
    "run_command",
    "run_episode",
    "run_python",
    "safe_verify",
    "tool_schema",
    "write_tasks",
]
