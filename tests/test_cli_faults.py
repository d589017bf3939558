"""Every user-facing dsv command against every fault a user meets: it ends with its documented exit
code (dsv.cli.errors), one ``error:`` line naming the thing, and no traceback.

Faults: an output folder the user cannot write (run as ``nobody``: the suite runs as root, which
writes anywhere), an endpoint that is down, an endpoint that does not know the model (a real
HTTP server on loopback answering 404 as OpenAI does), a truncated ``optimizer.pt`` (resume falls
back), int32 and NaN weights, and Ctrl-C (SIGINT to the process group, as a terminal sends it).

Run: ``pytest tests/test_cli_faults.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DSV = [sys.executable, "-m", "dsv.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
# What a user with no special rights runs as: CAP_DAC_READ_SEARCH keeps the interpreter and the
# checkout readable (they may sit under root's home) without granting any write.
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
          "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]  # fmt: skip
TRAIN_FLAGS = ["--seq-len", "32", "--micro-batch-size", "2", "--default-data-size", "80", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dsv(*args: str, prefix: list[str] | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([*(prefix or []), *DSV, *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})})  # fmt: skip


def assert_clean_failure(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``error:`` line (containing ``needles``), no traceback; the line."""
    everything = r.stdout + r.stderr
    assert r.returncode == code, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, everything[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A folder every user can enter, holding ``RO`` (mode 555) and the fixtures' files."""
    base = Path(tempfile.mkdtemp(prefix="dsv-faults-"))
    base.chmod(0o777)
    ro = base / "RO"
    ro.mkdir()
    ro.chmod(0o555)
    yield base
    ro.chmod(0o755)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def as_user(shared_dir: Path) -> list[str]:
    """The command prefix that runs dsv as a non-root user, or a skip saying why it cannot."""
    ro = shared_dir / "RO"
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: cannot drop privileges")
    probe = subprocess.run([*NOBODY, sys.executable, "-c", f"open({str(ro / 'x')!r}, 'w')"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    if "PermissionError" not in probe.stderr:
        pytest.skip(f"could not run as an unprivileged user here: {probe.stderr.strip()[-300:]}")
    return NOBODY


@pytest.fixture(scope="module")
def ckpts(shared_dir: Path) -> dict[str, Path]:
    """A tiny checkpoint and two damaged copies: int32 embeddings, NaN LM head."""
    import torch
    from safetensors.torch import load_file, save_file

    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe

    torch.manual_seed(0)
    good = save_pretrained(DSVForCausalLM(tiny()), train_bpe(default_corpus(400), 1024), shared_dir / "good")
    out = {"good": good}
    damage = {
        "int32": ("model.embed_tokens.weight", lambda t: t.to(torch.int32)),
        "nan": ("lm_head.weight", lambda t: torch.full_like(t, float("nan"))),
    }
    for name, (key, fn) in damage.items():
        folder = shared_dir / name
        shutil.copytree(good, folder)
        for f in folder.glob("*.safetensors"):
            state = load_file(str(f))
            if key in state:
                state[key] = fn(state[key])
            save_file(state, str(f))
        out[name] = folder
    return out


class _Endpoint(BaseHTTPRequestHandler):
    """OpenAI's answers for a model it does not serve; ``/slow`` holds every request for a minute."""

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "other", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/slow"):
            self.server.requests += 1  # type: ignore[attr-defined]
            time.sleep(60)
        self._json(404, {"error": {"message": "The model `nope` does not exist.", "type": "invalid_request_error",
                                   "param": None, "code": "model_not_found"}})  # fmt: skip

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may have gone (Ctrl-C)
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    server.daemon_threads = True
    server.requests = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _url(endpoint: ThreadingHTTPServer, prefix: str = "") -> str:
    return f"http://127.0.0.1:{endpoint.server_address[1]}{prefix}/v1"


# --------------------------------------------------------------------------- unwritable output

UNWRITABLE = {
    "train-out": ["train", "pretrain", "--out", "{RO}", "--steps", "1"],
    "train-out-sub": ["train", "pretrain", "--out", "{RO}/sub", "--steps", "1"],
    "model-init": ["model", "init", "{RO}/m"],
    "eval": ["eval", "--model", "m", "--endpoint", "http://127.0.0.1:9/v1", "--family", "arithmetic", "--n", "1",
             "--out", "{RO}/ev"],
    "synth-build": ["synth", "build", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "-n", "1",
                    "--out", "{RO}/b"],
    "synth-generate": ["synth", "generate", "arithmetic", "--n", "1", "--out", "{RO}/t.jsonl"],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(UNWRITABLE))
def test_unwritable_output_folder(case: str, shared_dir: Path, as_user: list[str]) -> None:
    ro = str(shared_dir / "RO")
    args = [a.replace("{RO}", ro) for a in UNWRITABLE[case]]
    line = assert_clean_failure(dsv(*args, prefix=as_user, env={"HOME": str(shared_dir)}), 1, ro)
    assert "permission denied" in line.lower()


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize("command", ["eval", "synth-build"])
@pytest.mark.parametrize("fault", ["dead-endpoint", "unknown-model"])
def test_endpoint_faults_exit_3(command: str, fault: str, endpoint: ThreadingHTTPServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1" if fault == "dead-endpoint" else _url(endpoint)
    if command == "eval":
        r = dsv("eval", "--endpoint", url, "--model", "nope", "--family", "arithmetic", "--n", "2",
                "--timeout", "5", "--out", str(tmp_path / "ev"))  # fmt: skip
    else:
        r = dsv("synth", "build", "--endpoint", url, "--model", "nope", "-n", "2", "--timeout", "5",
                "--out", str(tmp_path / "b"))  # fmt: skip
    line = assert_clean_failure(r, 3, "2 of 2")
    assert ("Connection" in line) if fault == "dead-endpoint" else ("404" in line and "does not exist" in line)
    report = tmp_path / ("ev" if command == "eval" else "b") / "report.md"
    assert report.exists(), "the report is written even when everything failed"


def test_eval_fail_under_exits_4(ckpts: dict[str, Path], tmp_path: Path) -> None:
    r = dsv("eval", "--model", str(ckpts["good"]), "--family", "arithmetic", "--n", "1", "--max-tokens", "4",
            "--no-thinking", "--fail-under", "0.5", "--json", "--out", str(tmp_path / "ev"))  # fmt: skip
    assert_clean_failure(r, 4, "accuracy 0.000", "--fail-under 0.5")
    report = json.loads(r.stdout)  # --json: the report on stdout, for scripts
    assert report["meta"]["modes"] == ["no-thinking"] and report["results"]["no-thinking"]["overall"]["episodes"] == 1


@pytest.mark.parametrize("command", [["model", "info", "--preset", "tiny"], ["doctor"]], ids=["model-info", "doctor"])
def test_json_output_for_scripts(command: list[str]) -> None:
    r = dsv(*command, "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts.get("model_type") == "deepseek_v32" or "dsv-cli" in facts


# --------------------------------------------------------------------------- weights

WEIGHT_COMMANDS = {
    "generate": ["generate", "{CKPT}", "-p", "hi", "--temperature", "0"],
    "eval": ["eval", "--model", "{CKPT}", "--family", "arithmetic", "--n", "1", "--out", "{TMP}/ev"],
    "train": ["train", "pretrain", "--model", "{CKPT}", "--out", "{TMP}/run", "--steps", "1", *TRAIN_FLAGS],
    "serve": ["serve", "{CKPT}", "--port", "{PORT}", "--device", "cpu"],
}


@pytest.mark.parametrize("command", sorted(WEIGHT_COMMANDS))
@pytest.mark.parametrize("damage", ["int32", "nan"])
def test_bad_weights_are_refused_at_load(command: str, damage: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    subs = {"{CKPT}": str(ckpts[damage]), "{TMP}": str(tmp_path), "{PORT}": str(_free_port())}
    args = [subs.get(a, a) for a in WEIGHT_COMMANDS[command]]
    args = [a.replace("{TMP}", str(tmp_path)) for a in args]
    needle = "model.embed_tokens.weight (int32)" if damage == "int32" else "not finite"
    assert_clean_failure(dsv(*args), 1, str(ckpts[damage]), needle)


# --------------------------------------------------------------------------- resume


@pytest.mark.slow  # two training runs: ~30 s on a loaded CPU
def test_truncated_optimizer_state_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = ["--out", str(run), "--model", "tiny", "--steps", "4", "--save-every", "1", "--keep-last", "0",
             *TRAIN_FLAGS]  # fmt: skip
    first = dsv("train", "pretrain", *flags)
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(run / "final")
    opt = run / "checkpoint-0000003" / "train_state" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    r = dsv("train", "pretrain", *flags, "--resume")
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in said, said[-3000:]
    assert "skipping checkpoint-0000003" in said and "checkpoint-0000002 (step 2 of 4)" in said


# --------------------------------------------------------------------------- SIGINT


# A command started from a terminal gets SIGINT's default action; a suite started in the background
# of a non-interactive shell (``pytest ... &``, nohup, some CI runners) has SIGINT ignored, and a
# child inherits that, so it would never see the Ctrl-C. The shell resets it for a foreground job;
# this does the same before exec'ing dsv.
_AS_FOREGROUND = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]  # fmt: skip


def _interrupt(args: list[str], ready: object, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Start ``dsv ARGS`` in its own process group as a terminal's foreground job, wait until
    ``ready(stdout, stderr)`` (or, for a string, until stderr shows it), send SIGINT to the group as
    a terminal does, and collect what it printed."""
    proc = subprocess.Popen([*_AS_FOREGROUND, *DSV[1:], *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)  # fmt: skip
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read(1), "")), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]  # fmt: skip
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready("".join(out), "".join(err)) if callable(ready) else str(ready) in "".join(err):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "".join(err)[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    for r in readers:
        r.join(timeout=60)  # EOF comes once every holder of the pipes (engine processes too) has exited
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out), "".join(err))


def test_sigint_train(tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    r = _interrupt(["train", "pretrain", "--out", str(run), "--steps", "100000", "--save-every", "0", *TRAIN_FLAGS],
                   lambda _out, _err: metrics.exists() and metrics.stat().st_size > 0)  # fmt: skip
    assert_clean_failure(r, 130, "interrupted", "--resume")


def test_sigint_generate(ckpts: dict[str, Path]) -> None:
    # interrupted while it streams: the first text is out, thousands of tokens are to come
    r = _interrupt(["generate", str(ckpts["good"]), "-p", "hi", "--max-new-tokens", "4000"],
                   lambda out, _err: len(out) > 0)  # fmt: skip
    assert_clean_failure(r, 130, "interrupted")


@pytest.mark.parametrize("command", ["eval", "synth-build"])
def test_sigint_with_a_request_in_flight(command: str, endpoint: ThreadingHTTPServer, tmp_path: Path) -> None:
    url = _url(endpoint, "/slow")
    before = endpoint.requests  # type: ignore[attr-defined]
    if command == "eval":
        args = ["eval", "--endpoint", url, "--model", "m", "--family", "arithmetic", "--n", "1", "--concurrency", "1",
                "--out", str(tmp_path / "o")]  # fmt: skip
    else:
        args = ["synth", "build", "--endpoint", url, "--model", "m", "-n", "1", "--out", str(tmp_path / "o")]
    r = _interrupt(args, lambda _out, _err: endpoint.requests > before)  # type: ignore[attr-defined]
    line = assert_clean_failure(r, 130, "interrupted", "re-run the same command")
    if command == "synth-build":
        assert (tmp_path / "o" / "report.md").exists() and "report" in line


def test_sigint_serve(ckpts: dict[str, Path]) -> None:
    r = _interrupt(["serve", str(ckpts["good"]), "--port", str(_free_port()), "--device", "cpu"], "dsv serve on")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
    assert "stopped (interrupted)" in r.stderr


# --------------------------------------------------------------------------- install hints


def test_missing_extra_hint_keeps_its_extra(tmp_path: Path) -> None:
    # an interpreter where `import openai` fails: the hint must keep [eval] and work from a checkout
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "openai.py").write_text("raise ImportError('blocked for this test', name='openai')\n")
    r = dsv("eval", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--family", "arithmetic",
            "--out", str(tmp_path / "ev"), env={"PYTHONPATH": str(blocker)})  # fmt: skip
    line = assert_clean_failure(r, 2, "openai is missing")
    assert "pip install -e 'packages/synth[eval]'" in line and "'dsv-synth[eval]'" in line


# --------------------------------------------------------------------------- 80 columns

HELP = ["", "train pretrain", "train sft", "eval", "synth build", "synth generate", "synth list", "synth show",
        "serve", "generate", "model init", "model info", "model convert", "doctor"]  # fmt: skip


@pytest.mark.parametrize("command", HELP, ids=lambda c: c.replace(" ", "-") or "root")
def test_help_fits_80_columns(command: str) -> None:
    r = dsv(*command.split(), "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    for bad in ("…", "<bool>", "{"):
        assert bad not in r.stdout, [line for line in lines if bad in line]


def test_synth_list_fits_80_columns_and_has_json() -> None:
    r = dsv("synth", "list", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    listed = json.loads(dsv("synth", "list", "--json").stdout)
    families = [f["family"] for f in listed["families"]]
    assert len(families) >= 16
    for name in families:  # every family on a line of its own, its name whole
        assert sum(1 for line in lines if f"│ {name} " in line) == 1, name
    assert len(lines) < len(families) + 20, "descriptions wrapped over many lines"
    assert all(f["description"] for f in listed["families"])
