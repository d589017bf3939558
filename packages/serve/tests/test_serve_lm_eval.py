"""lm-eval-harness scores a real ``dsv serve`` as it scores vLLM: ``/v1/completions`` with token-id
prompts, batches of prompts and ``echo`` with prompt logprobs.

Against uvicorn on 127.0.0.1 with the random tiny checkpoint: the request shapes lm-eval sends give
the logprobs of dsv's own in-process forward, and lm-eval's ``local-completions`` model runs a
small loglikelihood task and a small generation task (their data are local JSON files written here,
nothing is downloaded) and gets the numbers dsv computes in process for the same token ids; its
``local-chat-completions`` model runs the generation task through ``/v1/chat/completions``.

Run: ``pytest packages/serve/tests/test_serve_lm_eval.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dsv.serve.engine import Engine, GenParams


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, live_server: Any) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=256, num_blocks=128,
                          engine_process=False)  # fmt: skip
    with live_server(app) as s:
        yield s


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Any:
    from dsv.core.checkpoint import load_pretrained

    m, _ = load_pretrained(str(tiny_ckpt), with_tokenizer=False)
    return m.eval()


def _prompt_logprobs(model: Any, ids: list[int]) -> list[float]:
    """dsv in process: log p(ids[i] | ids[:i]) for i >= 1, from one forward over the whole sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


def test_echo_logprobs_of_token_id_batches(server: Any, model: Any) -> None:
    prompts = [[5, 17, 200, 31, 9, 44], [300, 12, 7], list(range(40, 80))]
    body = {"model": "m", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # fmt: skip  (lm-eval's loglikelihood request)
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, out["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(lp["text_offset"]) == len(ids) + 1
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(_prompt_logprobs(model, ids), abs=1e-4)
        for got, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= got - 1e-6
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))
    # vLLM's prompt_logprobs field gives the same numbers in its own shape, for string prompts too.
    r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": ["hello there", "a b c"],
                                                         "max_tokens": 1, "prompt_logprobs": 0}, timeout=120)  # fmt: skip
    for choice in r.json()["choices"]:
        assert choice["prompt_logprobs"][0] is None
        assert all(len(entry) == 1 for entry in choice["prompt_logprobs"][1:])


def test_n_choices_per_prompt_of_a_batch(server: Any) -> None:
    body = {"model": "m", "prompt": ["one", "two"], "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 3}
    choices = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    single = httpx.post(server.url + "/v1/completions", json={**body, "prompt": "two"}, timeout=120).json()
    assert [c["text"] for c in choices[2:]] == [c["text"] for c in single["choices"]]


def _write_tasks(folder: Path) -> None:
    mc = [{"question": f"Item {i} is", "choices": [" red", " green", " blue"], "answer": i % 3} for i in range(6)]
    gen = [{"question": f"Count {i}:", "answer": " 1 2"} for i in range(4)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    (folder / "dsv_local_mc.yaml").write_text(
        "task: dsv_local_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "dsv_local_gen.yaml").write_text(
        "task: dsv_local_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.mark.parametrize("tokenizer", ["huggingface", "auto"])
def test_lm_eval_local_completions_matches_in_process_scoring(
    server: Any, model: Any, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``huggingface``: lm-eval tokenizes with the checkpoint's files; ``auto``: it finds the server's
    ``/tokenizer_info`` and tokenizes through ``/tokenize`` (no local tokenizer)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    caplog.set_level(logging.INFO)
    _write_tasks(tmp_path)
    local = f"tokenizer_backend=huggingface,tokenizer={tiny_ckpt}," if tokenizer == "huggingface" else ""
    args = (f"base_url={server.url}/v1/completions,model=m,{local}"
            "tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=256")  # fmt: skip
    res = simple_evaluate(model="local-completions", model_args=args, tasks=["dsv_local_mc", "dsv_local_gen"],
                          task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                          batch_size=4)  # fmt: skip
    assert res is not None
    if tokenizer == "auto":
        assert "Auto-detected remote tokenizer support" in caplog.text
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt))

    def enc(text: str) -> list[int]:
        return list(hf.encode(text, add_special_tokens=False))

    # Loglikelihood: lm-eval's context/continuation split (context encoded alone, the rest of the
    # whole string's tokens after it), scored by one in-process forward.
    correct = []
    assert len(res["samples"]["dsv_local_mc"]) == 6 and len(res["samples"]["dsv_local_gen"]) == 4
    for sample in res["samples"]["dsv_local_mc"]:
        lls = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            whole, ctx = enc(context + continuation), enc(context)
            cont = whole[len(ctx) :]
            ll = sum(_prompt_logprobs(model, whole)[len(ctx) - 1 :])
            assert len(cont) >= 1 and resp[0][0] == pytest.approx(ll, abs=1e-3)
            lls.append(ll)
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == sample["target"]))
    assert res["results"]["dsv_local_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    # Generation: greedy in process from the same ids, cut at lm-eval's stop string.
    from dsv.core.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_ckpt)
    engine = Engine.for_model(model, model.config, num_blocks=64)
    for sample in res["samples"]["dsv_local_gen"]:
        context = sample["arguments"][0][0]
        out = engine.generate_many([enc(context)], GenParams(temperature=0.0, max_tokens=8,
                                                             stop_token_ids=(tok.eos_id,)))[0]  # fmt: skip
        text = tok.decode([t for t in out.tokens if t != tok.eos_id]).split("\n")[0]
        assert sample["resps"][0][0] == text, (context, sample["resps"], text)


@pytest.mark.slow
def test_lm_eval_local_chat_completions(server: Any, model: Any, tiny_ckpt: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``local-chat-completions`` (lm-eval's chat model) runs the generation task; each answer is
    the greedy content dsv generates in process for the same encoded chat."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dsv.core.chat import Templates, encode_messages
    from dsv.core.tokenizer import Tokenizer

    _write_tasks(tmp_path)
    args = f"base_url={server.url}/v1/chat/completions,model=m,num_concurrent=1,max_retries=1"
    res = simple_evaluate(model="local-chat-completions", model_args=args, tasks=["dsv_local_gen"],
                          task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                          apply_chat_template=True)  # fmt: skip
    assert res is not None and len(res["samples"]["dsv_local_gen"]) == 4
    tok = Tokenizer.load(tiny_ckpt)
    templates = Templates.from_checkpoint(tiny_ckpt)
    engine = Engine.for_model(model, model.config, num_blocks=64)
    for sample in res["samples"]["dsv_local_gen"]:
        raw = sample["arguments"][0][0]  # lm-eval logs the chat as its JSON text (in a 1-tuple)
        messages = json.loads(raw[0] if isinstance(raw, tuple | list) else raw)
        prompt = encode_messages(messages, thinking=False, templates=templates)
        out = engine.generate_many([tok.encode(prompt)], GenParams(temperature=0.0, max_tokens=8,
                                                                    stop_token_ids=(tok.eos_id,)))[0]  # fmt: skip
        text = tok.decode([t for t in out.tokens if t != tok.eos_id]).split("\n")[0]
        assert sample["resps"][0][0] == text, (messages, sample["resps"], text)


def test_tokenizer_info_as_vllm_shapes_it(server: Any) -> None:
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert info["model_max_length"] == 256
    ids = httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert len(ids["tokens"]) == 1  # a special token is one id, with or without a model name
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back == {"prompt": info["eos_token"]}
