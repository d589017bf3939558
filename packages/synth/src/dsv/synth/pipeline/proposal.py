"""The proposal format of ``dsv synth build``: the request sent to the model and how its reply is read.

The model answers with ONE fenced ``python`` block: a module that uses only the
standard library plus ``dsv.synth.env`` and defines ``class ProposedEnv(Environment)``
(see ``PROPOSAL_INSTRUCTIONS`` for the full contract, which is also documented in the
package README). The host only extracts and *parses* that text (``ast.parse``,
``tokenize``); it never imports or executes it. Everything that runs the code
happens in ``dsv.synth.sandbox`` through ``dsv.synth.pipeline.harness``.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass

__all__ = [
    "CLASS_NAME",
    "PROPOSAL_INSTRUCTIONS",
    "ProposalFormatError",
    "build_messages",
    "extract_code",
    "static_check",
]

CLASS_NAME = "ProposedEnv"
MAX_CODE_CHARS = 60_000

PROPOSAL_INSTRUCTIONS = f"""\
You design a new environment for training and evaluating tool-using language-model agents.
An environment is a family of tasks whose answers a program can check exactly.

Reply with exactly one fenced ```python code block (no other code blocks) containing a Python module that:
- imports only the Python standard library and, from dsv.synth.env, any of:
  Environment, Score, Task, ToolCallRecord;
- defines `class {CLASS_NAME}(Environment)` with class attributes
  `name` (new, lowercase snake_case), `domain` (a short word such as "math", "text", "planning"),
  `description` (one sentence);
- implements:
  - `generate(self, seed: int, difficulty: int = 2) -> Task`: deterministic for a given (seed, difficulty);
    draw randomness only from `rng = self._rng(seed, difficulty)` and build the task with
    `return self._task(seed, difficulty, prompt, state, answer_format)` where `state` is a JSON-serialisable
    dict of hidden facts the verifier needs and `answer_format` tells the solver how to write the answer
    (e.g. "Reply with <answer>INTEGER</answer>.");
  - `solve(self, task) -> answer`: a reference solution computed from `task.state`; it must be JSON-serialisable;
  - `verify(self, task, answer, trace=None) -> Score`: return `Score.ok()` for a correct answer and
    `Score.fail("why")` otherwise; it must reject wrong answers of any type without raising;
  - optionally `tools(self, task) -> list` of functions with type hints and a docstring (with an `Args:`
    section) that act on `task.state` (the agent calls them), `perturb(self, task, answer, rng) -> list`
    of plausible wrong answers, and `parse_answer(self, text)`.
- The default `parse_answer` reads `<answer>...</answer>` and decodes JSON.
Rules: no network, no files, no subprocesses, no threads; every method must finish in well under a second;
difficulty ranges over 1..5 and should change the task size or depth.
Checks run on your code: the reference solution must pass, perturbed and junk answers must fail, tasks must
be deterministic per seed, and the environment must not duplicate an existing one.
"""


class ProposalFormatError(ValueError):
    """The reply does not contain a usable proposal; the message is the rejection reason."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


def build_messages(index: int, existing: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The chat request for proposal number ``index``, listing ``existing`` (name, description) pairs."""
    listing = "\n".join(f"- {name}: {desc}" for name, desc in existing) or "- (none yet)"
    user = (
        f"Existing environments (do not duplicate them or reuse their names):\n{listing}\n\n"
        f"Propose environment number {index}: pick a domain and task type that differs from the list above."
    )
    return [{"role": "system", "content": PROPOSAL_INSTRUCTIONS}, {"role": "user", "content": user}]


_FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(reply: str) -> str:
    """The single python block of a reply; ``ProposalFormatError`` when there is none or several."""
    blocks = _FENCE_RE.findall(reply or "")
    if not blocks:
        raise ProposalFormatError("no_code", "reply contains no fenced python block")
    if len(blocks) > 1:
        raise ProposalFormatError(
            "no_code", f"reply contains {len(blocks)} code blocks; expected exactly one"
        )
    code = blocks[0]
    if len(code) > MAX_CODE_CHARS:
        raise ProposalFormatError(
            "too_large", f"code is {len(code)} characters; the limit is {MAX_CODE_CHARS}"
        )
    return code


@dataclass(frozen=True)
class StaticInfo:
    """What parsing (not running) the code tells: declared name, imported top-level modules."""

    declared_name: str | None
    imports: tuple[str, ...]


_ALLOWED_DSV = {"dsv.synth.env", "dsv"}


def static_check(code: str) -> StaticInfo:
    """Parse ``code`` and check the contract's static part: syntax, the class, stdlib-only imports.

    Raises ``ProposalFormatError`` with the rejection category. Network attempts are not
    screened here on purpose: they are stopped by the sandbox, which the tests exercise.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise ProposalFormatError("syntax_error", f"syntax error at line {exc.lineno}: {exc.msg}") from None
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imports.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ProposalFormatError("forbidden_import", "relative imports are not allowed")
            imports.add(node.module or "")
    for name in sorted(imports):
        top = name.split(".")[0]
        if name.startswith("dsv"):
            if name not in _ALLOWED_DSV:
                raise ProposalFormatError(
                    "forbidden_import", f"import of {name!r}: only dsv.synth.env is allowed"
                )
        elif top not in sys.stdlib_module_names:
            raise ProposalFormatError(
                "forbidden_import", f"import of {name!r}: only the standard library is allowed"
            )
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == CLASS_NAME]
    if not classes:
        raise ProposalFormatError("interface", f"no top-level class {CLASS_NAME}")
    declared: str | None = None
    for stmt in classes[0].body:
        targets = []
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "name" and isinstance(value, ast.Constant):
                declared = str(value.value)
    return StaticInfo(declared, tuple(sorted(imports)))
