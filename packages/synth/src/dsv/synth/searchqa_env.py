"""Search-QA over a local document collection: BM25 search and read tools, answers checked against verified ones.

Tasks of the ``search_qa`` family are made by ``dsv synth search-qa``
(``dsv.synth.pipeline.search_qa``): a question about long-tail entities of a corpus whose answer
a proposer claimed with evidence and a solver found independently. There is no seed-driven
generator. The task's state holds the answer, the evidence and the corpus (one
``{"id", "title", "text"}`` JSON line per document) with its sha256: embedded (gzip, base64), so
a task file works wherever it is moved, or, for collections too big to repeat in every task, the
path of the ``corpus.jsonl`` the pipeline wrote.

The corpus is indexed with Tantivy (a maintained Rust search engine; BM25 ranking over title and
text) in memory, once per corpus file and process. ``load_documents`` reads a folder of ``.txt``,
``.md`` and ``.html`` files (HTML reduced to its text with the standard library's parser).

Tools: ``search(query)`` (the top hits: id, title, snippet) and ``read(doc_id)``. The verifier
compares normalised answers (case, punctuation, articles and spacing ignored).

Needs the ``search`` extra (``tantivy``).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import html.parser
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord

__all__ = [
    "Document",
    "SearchIndex",
    "SearchQaEnv",
    "corpus_bytes",
    "embed_corpus",
    "load_corpus_file",
    "load_documents",
    "normalize_answer",
    "write_corpus_file",
]

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
_READ_CHARS = 8000


@dataclass(frozen=True)
class Document:
    """One document: its id (path relative to the collection), title and plain text."""

    id: str
    title: str
    text: str


class _TextOf(html.parser.HTMLParser):
    """The visible text and the <title> of an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def _document(doc_id: str, raw: str, suffix: str) -> Document:
    if suffix in (".html", ".htm"):
        parser = _TextOf()
        parser.feed(raw)
        text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
        text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
        title = parser.title.strip()
    else:
        text = raw.strip()
        title = ""
    if not title:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if first.startswith("#") or (len(first) <= 80 and not first.endswith((".", ":", "!", "?"))):
            title = first.lstrip("#").strip()  # a heading, or a short first line that reads as one
        else:
            title = Path(doc_id).stem.replace("_", " ")
    return Document(doc_id, title, text)


def load_documents(folder: str | Path) -> list[Document]:
    """Every ``.txt``/``.md``/``.html`` file under ``folder`` (sorted by path); ``ValueError`` when none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory (pass a folder of .txt, .md or .html documents)")
    docs = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in DOC_SUFFIXES:
            raw = path.read_text(encoding="utf-8", errors="replace")
            doc = _document(path.relative_to(root).as_posix(), raw, path.suffix.lower())
            if doc.text:
                docs.append(doc)
    if not docs:
        raise ValueError(f"{root} holds no non-empty {', '.join(DOC_SUFFIXES)} files")
    return docs


def corpus_bytes(docs: list[Document]) -> bytes:
    """The corpus as JSONL bytes (what ``corpus.jsonl`` holds and the sha256 is taken over)."""
    return "".join(
        json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False, sort_keys=True) + "\n"
        for d in docs
    ).encode("utf-8")


def write_corpus_file(path: str | Path, docs: list[Document]) -> str:
    """Write ``docs`` as JSONL atomically; returns the file's sha256 (tasks name the corpus by it)."""
    from dsv.synth.eval._io import atomic_write_bytes

    data = corpus_bytes(docs)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def embed_corpus(docs: list[Document]) -> str:
    """The corpus as a task embeds it: JSONL, gzipped (mtime 0, so the same corpus gives the same text), base64."""
    return base64.b64encode(gzip.compress(corpus_bytes(docs), mtime=0)).decode("ascii")


def _parse_corpus(data: bytes, where: str, sha256: str | None) -> list[Document]:
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"corpus {where} changed since the tasks were made (sha256 differs)")
    return [Document(**json.loads(line)) for line in data.decode("utf-8").splitlines() if line.strip()]


def load_corpus_file(path: str | Path, sha256: str | None = None) -> list[Document]:
    """The documents of a corpus file; ``ValueError`` when it is missing or not the one ``sha256`` names."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"corpus file {path} cannot be read ({exc.strerror or exc}); "
                         "tasks of search_qa need the corpus.jsonl `dsv synth search-qa` wrote") from None  # fmt: skip
    return _parse_corpus(data, f"file {path}", sha256)


def _tantivy() -> Any:
    try:
        import tantivy
    except ImportError:
        from dsv.cli.errors import install_hint

        raise ImportError(
            f"search-QA needs the tantivy search library: {install_hint('dsv-synth', 'search')}"
        ) from None
    return tantivy


class SearchIndex:
    """BM25 search over documents (Tantivy, in memory) plus reading by id."""

    def __init__(self, docs: list[Document]) -> None:
        tantivy = _tantivy()
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("id", stored=True, tokenizer_name="raw")
        builder.add_text_field("title", stored=True)
        builder.add_text_field("text", stored=True)
        self._index = tantivy.Index(builder.build())
        writer = self._index.writer(heap_size=50_000_000, num_threads=1)
        for d in docs:
            writer.add_document(tantivy.Document(id=d.id, title=d.title, text=d.text))
        writer.commit()
        writer.wait_merging_threads()
        self._index.reload()
        self.docs = {d.id: d for d in docs}

    def search(self, query: str, k: int = 5) -> list[Document]:
        """The ``k`` best documents for ``query`` by BM25 (query syntax errors are read leniently)."""
        words = " ".join(re.findall(r"\w+", query))
        if not words:
            return []
        parsed, _errors = self._index.parse_query_lenient(words, ["title", "text"])
        searcher = self._index.searcher()
        return [self.docs[searcher.doc(addr)["id"][0]] for _score, addr in searcher.search(parsed, k).hits]


@functools.lru_cache(maxsize=4)
def _index_for(path: str, sha256: str | None) -> SearchIndex:
    return SearchIndex(load_corpus_file(path, sha256))


# sha256 -> index of an embedded corpus: every task of a file carries the same text, decoded once.
_EMBEDDED: dict[str, SearchIndex] = {}
_EMBEDDED_KEEP = 4


def index_for(corpus: dict[str, Any]) -> SearchIndex:
    """The (cached) index of a task's ``corpus`` entry: ``{"data", "sha256"}`` embedded, else ``{"path"}``."""
    sha = corpus.get("sha256")
    data = corpus.get("data")
    if data is None:
        return _index_for(str(corpus["path"]), sha)
    if sha is not None and sha in _EMBEDDED:
        return _EMBEDDED[sha]
    try:
        raw = gzip.decompress(base64.b64decode(data, validate=True))
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"the task's embedded corpus cannot be decoded ({exc})") from None
    index = SearchIndex(_parse_corpus(raw, "embedded in the task", sha))
    if sha is not None:
        while len(_EMBEDDED) >= _EMBEDDED_KEEP:
            _EMBEDDED.pop(next(iter(_EMBEDDED)))
        _EMBEDDED[sha] = index
    return index


def snippet(doc: Document, query: str, width: int = 200) -> str:
    """A stretch of ``doc`` around the first query word it contains."""
    text = " ".join(doc.text.split())
    low = text.lower()
    pos = min((low.find(w) for w in re.findall(r"\w+", query.lower()) if len(w) > 2 and w in low), default=0)
    start = max(0, pos - width // 4)
    return (
        ("..." if start else "") + text[start : start + width] + ("..." if start + width < len(text) else "")
    )


def search_tools(index: SearchIndex) -> list[Callable[..., Any]]:
    """The agent's tools over ``index``: search and read (shared by the family, the proposer and the solver)."""

    def search(query: str) -> str:
        """Search the document collection (BM25); returns up to 5 hits with id, title and a snippet.

        Args:
            query: keywords to look for.
        """
        hits = index.search(query, 5)
        if not hits:
            return "no results"
        return json.dumps([{"id": d.id, "title": d.title, "snippet": snippet(d, query)} for d in hits])

    def read(doc_id: str) -> str:
        """Read a document of the collection.

        Args:
            doc_id: a document id returned by search.
        """
        doc = index.docs.get(doc_id)
        if doc is None:
            return f"error: no document {doc_id!r}; use search to find ids"
        return f"# {doc.title}\n\n{doc.text[:_READ_CHARS]}"

    return [search, read]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles (a, an, the) removed, spaces collapsed (SQuAD's normalisation)."""
    return " ".join(_ARTICLES.sub(" ", str(text).lower().translate(_PUNCT)).split())


class SearchQaEnv(Environment):
    """Tasks from ``dsv synth search-qa``: answer a multi-hop question with search and read tools."""

    name = "search_qa"
    domain = "search"
    description = "Multi-hop questions about long-tail entities of a document collection, with BM25 search."
    difficulty_knobs = "the number of documents the verified evidence spans (hops), 1..5"
    # For `dsv synth list`: the family has no generator, so it says which command makes its tasks.
    made_by: ClassVar[str] = "dsv synth search-qa DOCS_FOLDER --endpoint URL --model M -n 20"
    tool_names: ClassVar[tuple[str, ...]] = ("search", "read")
    _unavailable: ClassVar[str] = (
        "search_qa tasks are made from a document collection by `dsv synth search-qa`; "
        "use its task file (`dsv eval --tasks OUT/tasks.jsonl`)"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        raise ValueError(self._unavailable)

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        return search_tools(index_for(task.state["corpus"]))

    def solve(self, task: Task) -> Any:
        return task.state["answer"]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            return Score.fail(f"expected a short answer, got {type(answer).__name__}")
        got = normalize_answer(str(answer))
        if not got:
            return Score.fail("empty answer")
        accepted = [task.state["answer"], *task.state.get("aliases", [])]
        if got in {normalize_answer(a) for a in accepted}:
            return Score.ok()
        return Score.fail(f"{answer!r} is not the answer")

    def perturb(self, task: Task, answer: Any, rng: Any) -> list[Any]:
        titles = [e.get("title", "") for e in task.state.get("evidence", [])]
        return [t for t in titles if t and normalize_answer(t) != normalize_answer(str(answer))] + [
            "",
            "unknown",
        ]
