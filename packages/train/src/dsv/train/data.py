"""Training data: sources -> documents -> tokens with a loss mask -> packed fixed-length rows.

Sources (``load_documents``):

- text files (``.txt``, ``.md``, anything not recognised below): one document per file;
- JSON Lines (``.jsonl``): one record per line, ``{"text": ...}`` or ``{"messages": [...], "tools": [...]}``;
  a conversation may add ``"thinking": true|false`` to be encoded in that mode whatever the run's
  ``--thinking`` (one SFT mix can then teach answers with and without reasoning);
- a local Hugging Face dataset folder (``datasets.load_from_disk``) with a ``text`` or ``messages`` column;
- a dsv-synth task file (JSONL whose records carry ``family`` and ``prompt``), read with
  ``dsv.synth.tasks.read_tasks``. For pretraining each task is its prompt rendered as a V3.2 user
  turn with its tool schemas (text: every token a target). For SFT (``chat=True``) each task is a
  conversation: the prompt as ``dsv eval`` asks it, and the family's reference answer (checked by its
  verifier) as the assistant turn, so only that answer is trained on. Tasks carry no reasoning and
  no tool calls: SFT on them needs ``--no-thinking`` (else it would teach empty reasoning), and tasks
  of tool-using families are refused (their answers would teach skipping the tools);
- ``default``: the embedded deterministic corpus (:func:`default_documents`), no download.

A broken record is reported as ``file:line: problem``; ``on_bad_record="stop"`` raises
:class:`DataError`, ``"skip"`` drops it and the caller gets the messages (never silent).

Tokens: text documents are ``BOS text EOS`` and every next token is a target. Chat documents are
encoded with :func:`dsv.core.chat.encode_messages`; only the assistant completions (reasoning,
``</think>``, content, DSML tool calls, EOS) are targets (:func:`encode_chat`).

Packing: all documents (in a seeded order) are concatenated into one stream and cut into rows of
``seq_len + 1`` tokens with a stride of ``seq_len``; ``labels[t] = ids[t+1]`` or ``-100`` where
that token is not a target. Attention is not masked at document boundaries (plain packing).

Order: :class:`BatchPlan` makes the rows of global step ``s`` a pure function of ``(seed, s)``, so
resuming at step ``s`` replays the identical data order with no sampler state to save.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dsv.core.errors import DSVError

IGNORE_INDEX = -100
OnBadRecord = Literal["skip", "stop"]


class DataError(DSVError):
    """A data source cannot be read (missing file, broken record with ``--on-bad-record stop``...)."""


@dataclass
class Document:
    """One training document: plain text, or a chat conversation (OpenAI-style messages)."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    # Where a conversation's assistant turns have no reasoning to train on (task files), this names
    # the source, and thinking-mode encoding is refused rather than training empty reasoning.
    no_reasoning_from: str | None = None
    # This conversation's encoding mode; None follows the run's ``thinking`` setting.
    thinking: bool | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


# ----------------------------------------------------------------------------- embedded default data

_NOUNS = ["river", "model", "garden", "token", "engine", "library", "window", "signal", "market", "planet",
          "teacher", "bridge", "kernel", "forest", "letter", "harbor", "circuit", "village", "compass", "lantern"]  # fmt: skip
_VERBS = ["reads", "moves", "builds", "finds", "keeps", "sends", "opens", "counts", "draws", "holds"]
_ADJS = ["quiet", "bright", "small", "distant", "careful", "old", "quick", "green", "heavy", "simple"]


def _sentence(rng: random.Random) -> str:
    return (
        f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
        f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}."
    )


def passkey_document(
    rng: random.Random, n_filler: int, depth: float | None = None, *, distinct: int | None = None
) -> tuple[str, str, str]:
    """A needle-in-a-haystack document: ``(prompt, answer, full_text)``.

    The pass key (5 digits) is stated once at a random depth inside ``n_filler`` filler sentences;
    the prompt ends with ``"The pass key is"`` and the answer is ``" NNNNN."``. With ``distinct``,
    the haystack cycles through that many random sentences, as the classic pass-key haystack
    repeats its filler (drawn per document, so repeats are predictable only by copying them).
    """
    if distinct is not None and distinct < 1:
        raise ValueError(f"distinct must be at least 1, got {distinct}")
    key = f"{rng.randint(10000, 99999)}"
    if distinct is None:
        filler = [_sentence(rng) for _ in range(n_filler)]
    else:
        pool = [_sentence(rng) for _ in range(distinct)]
        filler = [pool[i % distinct] for i in range(n_filler)]
    at = round((rng.random() if depth is None else depth) * n_filler)
    filler.insert(at, f"The pass key is {key}. Remember it.")
    prompt = " ".join(filler) + " What is the pass key? The pass key is"
    answer = f" {key}."
    return prompt, answer, prompt + answer


def _kv_document(rng: random.Random) -> str:
    keys = rng.sample(_NOUNS, 6)
    pairs = {k: rng.randint(10, 99) for k in keys}
    ask = rng.choice(keys)
    body = " ".join(f"{k} is {v}." for k, v in pairs.items())
    return f"{body} Question: what is {ask}? Answer: {ask} is {pairs[ask]}."


def _arith_document(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} plus {b} is {a + b}. {a} times 2 is {2 * a}."


def _chat_document(rng: random.Random, i: int) -> Document:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if i % 3 == 0:
        messages = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "reasoning_content": f"{a} plus {b} is {a + b}.", "content": f"{a + b}"},
        ]
        return Document(messages=messages)
    if i % 3 == 1:
        tools = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                  "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]  # fmt: skip
        call = {
            "id": "c0",
            "type": "function",
            "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})},
        }
        messages = [
            {"role": "user", "content": f"Use the tool to add {a} and {b}."},
            {
                "role": "assistant",
                "reasoning_content": "I should call add.",
                "content": "",
                "tool_calls": [call],
            },
            {"role": "tool", "tool_call_id": "c0", "content": str(a + b)},
            {
                "role": "assistant",
                "reasoning_content": "The tool answered.",
                "content": f"The sum is {a + b}.",
            },
        ]
        return Document(messages=messages, tools=tools)
    noun = rng.choice(_NOUNS)
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": f"Name a word that rhymes with {noun}?"},
        {"role": "assistant", "content": f"I do not know one for {noun}."},
        {"role": "user", "content": f"Then double {a}."},
        {"role": "assistant", "reasoning_content": f"Two times {a} is {2 * a}.", "content": f"{2 * a}"},
    ]
    return Document(messages=messages)


def default_documents(
    n: int = 2000,
    seed: int = 0,
    *,
    chat: bool = False,
    passkey_filler: int = 12,
    passkey_share: float = 0.5,
    passkey_distinct: int | None = None,
) -> list[Document]:
    """The embedded deterministic corpus (no download).

    Text mode mixes needle-in-a-haystack pass-key documents (long-range retrieval, what sparse
    attention must keep; ``passkey_share`` of the documents), key-value lookups, arithmetic and
    filler prose; chat mode gives short conversations with reasoning, tool calls and tool results in
    the V3.2 format.

    Pass-key documents are exactly :func:`passkey_document`, the format
    :func:`dsv.train.metrics.passkey_accuracy` asks about, with 0 to ``passkey_filler`` filler
    sentences (uniform) and the needle at a uniformly random depth. Rows are cut from a packed stream
    at arbitrary offsets, so a short document usually lands whole in one row while one as long as the
    row rarely does; the uniform length keeps whole examples of every retrieval distance. With the
    tiny preset's tokenizer (8 tokens per filler sentence) the default, 12, makes the longest
    documents 125 tokens, the length :func:`~dsv.train.metrics.passkey_accuracy` tests at
    ``4 x index_topk`` = 128. ``passkey_distinct`` makes the haystacks repeat that many sentences
    (see :func:`passkey_document`).
    """
    if not 0.0 <= passkey_share <= 1.0:
        raise ValueError(f"passkey_share must be in [0, 1], got {passkey_share}")
    rng = random.Random(seed)
    docs: list[Document] = []
    others = 0
    for i in range(n):
        if chat:
            docs.append(_chat_document(rng, i))
            continue
        # Deterministic interleaving with the requested share (no clustering of one kind in the order).
        if int((i + 1) * passkey_share) > int(i * passkey_share):
            docs.append(
                Document(
                    text=passkey_document(rng, rng.randint(0, passkey_filler), distinct=passkey_distinct)[2]
                )
            )
            continue
        kind = others % 3
        others += 1
        if kind == 0:
            docs.append(Document(text=_kv_document(rng)))
        elif kind == 1:
            docs.append(Document(text=_arith_document(rng)))
        else:
            docs.append(Document(text=" ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))))
    return docs


# ----------------------------------------------------------------------------- reading sources


def _record_to_document(record: Any) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("'messages' must be a list of objects with a 'role'")
        if not any(m.get("role") == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn to train on")
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ValueError("'tools' must be a list")
        thinking = record.get("thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise ValueError(f"'thinking' must be true or false, got {thinking!r}")
        return Document(messages=messages, tools=tools, thinking=thinking)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError("'text' must be a string")
        return Document(text=record["text"])
    raise ValueError(
        f"record has neither 'text' nor 'messages' (keys: {', '.join(sorted(record)) or 'none'})"
    )


def _is_task_file(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(rec, dict) and "family" in rec and "prompt" in rec
    return False


def _read_jsonl(path: Path, on_bad_record: OnBadRecord, problems: list[str]) -> list[Document]:
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            docs.append(_record_to_document(json.loads(line)))
            continue
        except json.JSONDecodeError as exc:
            problem = f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        except ValueError as exc:
            problem = f"{path}:{lineno}: {exc}"
        if on_bad_record == "stop":
            raise DataError(problem + " (pass --on-bad-record skip to drop broken records)")
        problems.append(problem)
    return docs


def _read_tasks(path: Path, on_bad_record: OnBadRecord, problems: list[str], chat: bool = False) -> list[Document]:
    try:
        from dsv.synth.tasks import TaskFileError, read_tasks_report
    except ImportError:
        from dsv.cli.errors import install_hint

        raise DataError(
            f"{path} is a dsv-synth task file; install dsv-synth to read it: {install_hint('dsv-train', 'synth')}"
        ) from None
    from dsv.core.chat import encode_messages

    try:
        tasks, errors = read_tasks_report(path, on_bad_record=on_bad_record)
    except TaskFileError as exc:
        raise DataError(f"{exc} (pass --on-bad-record skip to drop broken records)") from None
    problems.extend(errors)
    if chat:
        return _task_conversations(path, tasks, on_bad_record, problems)
    return [
        Document(
            text=encode_messages(
                [{"role": "user", "content": t.prompt}], tools=t.tools or None, thinking=True
            )
        )
        for t in tasks
    ]


def answer_text(answer: Any) -> str:
    """A reference answer written the way the verifiers read a final answer: an ``Answer:`` line for a
    scalar, a fenced JSON block for structured answers (see ``dsv.synth.env.extract_answer_text``)."""
    if isinstance(answer, str) and "\n" not in answer:
        return f"Answer: {answer}"
    if isinstance(answer, (int, float, bool)):
        return f"Answer: {json.dumps(answer)}"
    return "```json\n" + json.dumps(answer, ensure_ascii=False) + "\n```"


def _task_conversations(
    path: Path, tasks: Sequence[Any], on_bad_record: OnBadRecord, problems: list[str]
) -> list[Document]:
    """SFT conversations from tasks: the prompt as an episode asks it, the verified reference answer."""
    from dsv.synth import registry, safe_verify

    with_tools = sorted({t.family for t in tasks if t.tools})
    if with_tools:
        raise DataError(
            f"{path}: SFT on tasks of tool-using families ({', '.join(with_tools)}) would train answers "
            "without the tool calls that find them (tasks carry none); leave those families out of the "
            "task file, or give conversations with tool calls as JSONL records with 'messages' and 'tools'"
        )
    docs: list[Document] = []
    for t in tasks:
        try:
            env = registry.get(t.family)
            text = answer_text(env.solve(t))
            score = safe_verify(env, t, env.parse_answer(text))
            if not score.passed:
                raise ValueError(f"the reference answer, written out, fails its verifier ({score.reason})")
        except Exception as exc:  # an unknown family or a solver bug: this task's problem
            problem = f"{path}: task {t.id}: cannot build an SFT example ({type(exc).__name__}: {exc})"
            if on_bad_record == "stop":
                raise DataError(problem + " (pass --on-bad-record skip to drop it)") from None
            problems.append(problem)
            continue
        # the first message of dsv.synth.episode.run_episode: what the model is asked at eval time
        user = f"{t.prompt}\n\n{t.answer_format}".strip()
        docs.append(Document(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": text}],
                             no_reasoning_from=str(path)))  # fmt: skip
    return docs


def _read_hf_dataset(path: Path, on_bad_record: OnBadRecord, problems: list[str]) -> list[Document]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset folder; install `datasets` to read it") from None
    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    docs = []
    for i, record in enumerate(ds):
        try:
            docs.append(_record_to_document(dict(record)))
            continue
        except ValueError as exc:
            problem = f"{path}:row {i}: {exc}"
        if on_bad_record == "stop":
            raise DataError(problem + " (pass --on-bad-record skip to drop broken records)")
        problems.append(problem)
    return docs


def load_documents(
    sources: Sequence[str],
    *,
    on_bad_record: OnBadRecord = "stop",
    chat: bool = False,
    default_size: int = 2000,
    seed: int = 0,
) -> tuple[list[Document], list[str]]:
    """Read every source (see the module docstring) -> ``(documents, skipped-record messages)``."""
    if on_bad_record not in ("skip", "stop"):
        raise DataError(f"--on-bad-record must be 'skip' or 'stop', got {on_bad_record!r}")
    docs: list[Document] = []
    problems: list[str] = []
    for source in sources or ["default"]:
        if source == "default":
            docs += default_documents(default_size, seed, chat=chat)
            continue
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"{path}: no such file or folder (give text/JSONL files, a dataset folder or 'default')"
            )
        if path.is_dir():
            if (
                (path / "dataset_info.json").exists()
                or (path / "dataset_dict.json").exists()
                or (path / "state.json").exists()
            ):
                docs += _read_hf_dataset(path, on_bad_record, problems)
            else:
                files = sorted(
                    p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".jsonl")
                )
                if not files:
                    raise DataError(f"{path}: folder has no .txt/.md/.jsonl files and is not a saved dataset")
                for f in files:
                    docs += _read_file(f, on_bad_record, problems, chat=chat)
        else:
            docs += _read_file(path, on_bad_record, problems, chat=chat)
    if not docs:
        raise DataError("no usable documents in " + ", ".join(sources))
    return docs, problems


def _read_file(path: Path, on_bad_record: OnBadRecord, problems: list[str], chat: bool = False) -> list[Document]:
    if path.suffix in (".jsonl", ".json"):
        if _is_task_file(path):
            return _read_tasks(path, on_bad_record, problems, chat=chat)
        return _read_jsonl(path, on_bad_record, problems)
    try:
        return [Document(text=path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# ----------------------------------------------------------------------------- tokenising


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    thinking: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the V3.2 encoding and, per token, whether it is trained on.

    Targets are exactly the assistant completions as :func:`dsv.core.chat.encode_assistant_completion`
    renders them inside the full prompt. Each one is located by rendering the conversation up to that
    message: turns before the last user message render as in chat mode (no reasoning, ``</think>``
    after the user turn), later ones in the requested mode, which is what makes that rendering a prefix
    of the full one; a mismatch raises ``ValueError`` instead of guessing.
    """
    from dsv.core.chat import encode_assistant_completion, encode_messages, last_user_index

    if thinking:
        # Thinking mode drops developer messages before the last user/developer message (as the
        # official encoder does); dropping them first makes every prefix below render that history.
        last = last_user_index([dict(m) for m in messages])
        messages = [m for i, m in enumerate(messages) if not (m.get("role") == "developer" and i < last)]
    full = encode_messages(messages, thinking=thinking, tools=tools)
    last_user = last_user_index([dict(m) for m in messages])
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        current = thinking and i > last_user
        prefix = encode_messages(messages[:i], thinking=current, tools=tools) if i else ""
        body = encode_assistant_completion(
            m if current else {**m, "reasoning_content": None}, thinking=current
        )
        if not full.startswith(prefix + body):
            raise ValueError(f"assistant message {i} does not render as a prefix of the conversation")
        spans.append((len(prefix), len(prefix) + len(body)))
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return ids, mask


def tokenize_document(
    tokenizer: Any, doc: Document, *, thinking: bool = True
) -> tuple[list[int], list[bool]]:
    """``(ids, target mask)``: text -> BOS text EOS, all targets; chat -> :func:`encode_chat` in the
    document's own mode when it has one (:attr:`Document.thinking`), else in ``thinking``."""
    if doc.is_chat:
        assert doc.messages is not None
        if doc.thinking is not None:
            thinking = doc.thinking
        if thinking and doc.no_reasoning_from is not None:
            raise DataError(
                f"{doc.no_reasoning_from}: its tasks have reference answers but no reasoning, so SFT in "
                "thinking mode would train empty reasoning; pass --no-thinking"
            )
        return encode_chat(tokenizer, doc.messages, tools=doc.tools, thinking=thinking)
    assert doc.text is not None
    ids = [tokenizer.bos_id, *tokenizer.encode(doc.text), tokenizer.eos_id]
    return ids, [True] * len(ids)


@dataclass
class PackedData:
    """Rows of ``input_ids [N, S]`` and ``labels [N, S]`` (``-100`` = not a target)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def fingerprint(self) -> str:
        """A hash of the rows (refuses a resume on different data)."""
        h = hashlib.sha256(self.input_ids.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    def split(self, val_fraction: float, seed: int) -> tuple[PackedData, PackedData]:
        """A seeded train/validation split of the rows (validation gets at least one row)."""
        n = len(self)
        n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
        if n - n_val < 1:
            raise DataError(
                f"only {n} packed rows: too few to hold out {n_val} for validation; add data or lower --val-fraction"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
        tr, va = perm[: n - n_val].sort().values, perm[n - n_val :].sort().values
        return PackedData(self.input_ids[tr], self.labels[tr]), PackedData(
            self.input_ids[va], self.labels[va]
        )


def pack(
    tokenizer: Any,
    docs: Sequence[Document],
    seq_len: int,
    *,
    seed: int = 0,
    thinking: bool = True,
    on_bad_record: OnBadRecord = "stop",
    problems: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> PackedData:
    """Tokenise ``docs`` (shuffled with ``seed``) into one stream and cut rows of ``seq_len`` (+1 for labels)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    mask: list[bool] = []
    for n, i in enumerate(order):
        try:
            d_ids, d_mask = tokenize_document(tokenizer, docs[i], thinking=thinking)
        except ValueError as exc:  # includes ChatFormatError
            problem = f"document {i}: cannot encode ({exc})"
            if on_bad_record == "stop":
                raise DataError(problem + " (pass --on-bad-record skip to drop it)") from None
            if problems is not None:
                problems.append(problem)
            continue
        ids += d_ids
        mask += d_mask
        if progress is not None and n % 256 == 0:
            progress(n)
    rows = (len(ids) - 1) // seq_len
    if rows < 1:
        raise DataError(
            f"the data has {len(ids)} tokens, fewer than --seq-len + 1 = {seq_len + 1}; add data or lower --seq-len"
        )
    t_ids = torch.tensor(ids[: rows * seq_len + 1], dtype=torch.long)
    t_mask = torch.tensor(mask[: rows * seq_len + 1], dtype=torch.bool)
    idx = torch.arange(rows).view(-1, 1) * seq_len + torch.arange(seq_len + 1).view(1, -1)  # (N, S+1)
    windows, wmask = t_ids[idx], t_mask[idx]
    labels = windows[:, 1:].masked_fill(~wmask[:, 1:], IGNORE_INDEX)
    return PackedData(windows[:, :-1].contiguous(), labels.contiguous())


# ----------------------------------------------------------------------------- batch order


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each process uses at each step: a pure function of ``(seed, step)``.

    Global sample ``g`` is row ``perm_e[g % N]`` of epoch ``e = g // N`` (a fresh seeded permutation
    per epoch). Step ``s`` uses samples ``[s*G, (s+1)*G)`` with ``G = micro_batch * grad_accum *
    world``; micro-step ``m`` of process ``r`` takes the ``(m * world + r)``-th slice of
    ``micro_batch`` samples, so one process with a 2x micro-batch sees the same global batch as two.
    """

    n_rows: int
    micro_batch: int
    grad_accum: int
    world: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _perm(self, epoch: int) -> torch.Tensor:
        return _epoch_permutation(self.n_rows, self.seed, epoch)

    def rows(self, step: int, start: int, count: int) -> torch.Tensor:
        out = []
        g = step * self.global_batch + start
        for gi in range(g, g + count):
            epoch, pos = divmod(gi, self.n_rows)
            out.append(int(self._perm(epoch)[pos]))
        return torch.tensor(out, dtype=torch.long)

    def micro_rows(self, step: int, micro: int, rank: int) -> torch.Tensor:
        return self.rows(step, (micro * self.world + rank) * self.micro_batch, self.micro_batch)

    def step_rows(self, step: int) -> torch.Tensor:
        """Every row of the global batch of ``step`` (to count its target tokens on every process)."""
        return self.rows(step, 0, self.global_batch)
