"""``lorakit serve``'s HTTP API through the real ``openai`` client (and httpx for the non-OpenAI routes).

A tiny random Llama with two LoRA adapters (``alpha``, ``beta``, ``init_lora_weights=False``) is served by uvicorn
in a background thread (tests/serve/conftest.py); greedy outputs are compared with ``PeftModel.generate`` of the
adapter the ``model`` field names. The SIGTERM test runs ``lorakit serve`` as a subprocess.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache

import httpx
import openai
import pytest
import torch

from lorakit.serve.app import TextStream
from tests.serve.conftest import BASE_NAME
from tests.train.subprocess_utils import child_env

EOS = 2
PROMPTS = ["hello", "the quick brown fox", "Reverse apple3", "xyz 123", "What is 2+2?"]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def reference(reference_model, live):
    """``reference(prompt_ids, model_name, max_tokens) -> (text, finish_reason)`` by greedy ``generate``."""

    @cache
    def run(prompt_ids: tuple[int, ...], model: str, max_tokens: int) -> tuple[str, str]:
        x = torch.tensor([prompt_ids])
        options = dict(
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )
        with torch.no_grad():
            if model == BASE_NAME:
                with reference_model.disable_adapter():
                    out = reference_model.generate(input_ids=x, **options)
            else:
                reference_model.set_adapter(model)
                out = reference_model.generate(input_ids=x, **options)
        new = out[0, len(prompt_ids) :].tolist()
        finish = "stop" if new and new[-1] == EOS else "length"
        return live.tokenizer.decode(new, skip_special_tokens=True), finish

    return lambda prompt_ids, model, max_tokens: run(tuple(prompt_ids), model, max_tokens)


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@contextmanager
def slowed(engine, seconds: float = 0.02):
    """Every forward of the served model takes at least ``seconds`` longer (a request stays in flight)."""
    embeddings = engine.model.get_base_model().get_input_embeddings()
    hook = embeddings.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    try:
        yield
    finally:
        hook.remove()


def wait_idle(engine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats
        if stats["active"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"the engine still has requests: {engine.stats}")


def sse_lines(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


# ------------------------------------------------------------------------------------------- happy paths
def test_models_list_and_health(live):
    client = live.client()
    assert [model.id for model in client.models.list().data] == [BASE_NAME, "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"
    health = httpx.get(f"{live.root}/health").json()
    assert health["status"] == "ok" and health["models"] == [BASE_NAME, "alpha", "beta"]


def test_chat_model_field_picks_the_adapter(live, reference):
    client = live.client()
    prompt_ids = chat_ids(live.tokenizer, "hello there")
    texts = {}
    for model in (BASE_NAME, "alpha", "beta"):
        reply = client.chat.completions.create(
            model=model, messages=user("hello there"), max_tokens=12, temperature=0
        )
        text, finish = reference(prompt_ids, model, 12)
        assert reply.model == model and reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (text, finish)
        assert reply.usage.prompt_tokens == len(prompt_ids)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        texts[model] = text
    assert len(set(texts.values())) == 3  # each adapter changes the output


def test_chat_stream_equals_the_whole_reply(live, reference):
    client = live.client()
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=user("stream me"),
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == "alpha" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    expected = reference(chat_ids(live.tokenizer, "stream me"), "alpha", 15)
    assert (text, finishes[-1]) == expected and finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert (
        sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) > 5
    )  # token by token


def test_completions_stream_and_not(live, reference):
    client = live.client()
    prompt = "the quick brown fox"
    expected = reference(live.tokenizer(prompt)["input_ids"], "beta", 10)
    reply = client.completions.create(model="beta", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == expected
    chunks = list(
        client.completions.create(model="beta", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected[0]
    assert chunks[-1].choices[0].finish_reason == expected[1]
    # token ids as the prompt
    by_ids = client.completions.create(
        model="beta", prompt=live.tokenizer(prompt)["input_ids"], max_tokens=10, temperature=0
    )
    assert by_ids.choices[0].text == expected[0]


def test_stop_strings_cut_the_text_and_free_the_slot(live, reference):
    client = live.client()
    prompt_ids = chat_ids(live.tokenizer, "hello")
    full, _ = reference(prompt_ids, "alpha", 30)
    stop = full[5:7]
    expected = full[: full.index(stop)]
    before = live.engine.stats["generated_tokens"]
    reply = client.chat.completions.create(
        model="alpha", messages=user("hello"), max_tokens=30, temperature=0, stop=[stop, "never seen"]
    )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    streamed = client.chat.completions.create(
        model="alpha", messages=user("hello"), max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = [chunk for chunk in streamed if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(live.engine)
    assert live.engine.stats["generated_tokens"] - before < 2 * 30  # cancelled at the stop string


def test_sampling_with_a_seed_is_reproducible(live):
    client = live.client()
    options = dict(model="alpha", prompt="abc", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first, second = (client.completions.create(**options).choices[0].text for _ in range(2))
    assert first == second


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_model_is_404(live):
    with pytest.raises(openai.NotFoundError) as caught:
        live.client().chat.completions.create(model="nope", messages=user("hi"), max_tokens=4)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="nope", prompt="hi", max_tokens=4)


@pytest.mark.parametrize(
    "options, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"n": 2}, "n"),
        ({"max_tokens": 1000}, "messages"),  # beyond the 256-token context
        ({"extra_body": {"foo": 1}}, "foo"),
        ({"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "messages.0.mood"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": 3.0}, "temperature"),
    ],
)
def test_bad_chat_requests_are_400(live, options, param):
    request = dict(model="alpha", messages=user("hi"), max_tokens=4) | options
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().chat.completions.create(**request)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if options.get("max_tokens") == 1000:
        assert error["code"] == "context_length_exceeded" and "256" in error["message"]


def test_bad_completion_requests_are_400(live):
    client = live.client()
    for options in ({"prompt": ["a", "b"]}, {"prompt": 5}, {"echo": True}, {"max_tokens": 300}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**({"model": "beta", "prompt": "hi", "max_tokens": 4} | options))


def test_malformed_bodies_and_routes_get_openai_errors(live):
    url = f"{live.root}/v1/chat/completions"
    broken = httpx.post(
        url, content=b'{"model": "alpha", "messages": [', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    not_an_object = httpx.post(url, json=[1, 2])
    assert not_an_object.status_code == 400 and "error" in not_an_object.json()
    missing = httpx.post(url, json={"messages": user("hi")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    nowhere = httpx.get(f"{live.root}/v1/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"


# -------------------------------------------------------------------------------------- runtime adapters
@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory):
    """An adapter of a wider tiny Llama: it does not fit the served base."""
    from lorakit import LoraConfig, get_peft_model
    from tests.conftest import tiny_llama

    folder = tmp_path_factory.mktemp("wide") / "adapter"
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(0, hidden_size=64, max_position_embeddings=256), config).save_pretrained(folder)
    return folder


def test_adapters_load_and_unload_at_runtime(live, serve_files, reference, wide_adapter):
    client, adapters = live.client(), f"{live.root}/v1/adapters"
    loaded = httpx.post(
        adapters, json={"name": "gamma", "path": str(serve_files.adapters["alpha"])}, timeout=60
    )
    assert loaded.status_code == 200 and loaded.json()["id"] == "gamma"
    assert "gamma" in [model.id for model in client.models.list().data]
    reply = client.chat.completions.create(
        model="gamma", messages=user("hello"), max_tokens=10, temperature=0
    )
    assert reply.choices[0].message.content == reference(chat_ids(live.tokenizer, "hello"), "alpha", 10)[0]

    again = httpx.post(adapters, json={"name": "gamma", "path": str(serve_files.adapters["beta"])})
    assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_exists"
    assert (
        httpx.post(adapters, json={"name": BASE_NAME, "path": str(serve_files.adapters["beta"])}).status_code
        == 400
    )
    missing = httpx.post(adapters, json={"name": "delta", "path": str(serve_files.base / "nothing")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "path"
    assert httpx.post(adapters, json={"name": "delta"}).status_code == 400
    other_base = httpx.post(adapters, json={"name": "delta", "path": str(wide_adapter)})
    assert other_base.status_code == 400 and "Shape mismatch" in other_base.json()["error"]["message"]
    assert "delta" not in [model.id for model in client.models.list().data]

    with slowed(live.engine), httpx.Client(timeout=60) as http:
        body = {
            "model": "gamma",
            "messages": user("busy"),
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        with http.stream("POST", f"{live.url}/chat/completions", json=body) as response:
            next(sse_lines(response))
            busy = http.delete(f"{adapters}/gamma")
            assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_busy"
    # the disconnected stream is cancelled; the adapter can go once its request has left the engine
    deadline = time.monotonic() + 5
    while (gone := httpx.delete(f"{adapters}/gamma")).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert "gamma" not in [model.id for model in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=user("hello"), max_tokens=4)
    assert httpx.delete(f"{adapters}/gamma").status_code == 404
    assert httpx.delete(f"{adapters}/{BASE_NAME}").status_code == 400


# ----------------------------------------------------------------------------------- disconnects, load
def test_a_client_that_disconnects_frees_its_slot(live):
    engine = live.engine
    before = engine.stats["generated_tokens"]
    with slowed(engine):
        body = {
            "model": "beta",
            "messages": user("go on"),
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{live.url}/chat/completions", json=body) as r,
        ):
            lines = sse_lines(r)
            for _ in range(4):
                next(lines)
            assert engine.stats["active"] == 1
        # the stream is closed mid-way: the server cancels the request
        wait_idle(engine, timeout=5)
        streamed = engine.stats["generated_tokens"] - before
        assert streamed < 100

        # a non-streaming client that gives up (a timeout) is cancelled too, and the loop stays responsive
        with pytest.raises(httpx.ReadTimeout):
            body = {"model": "beta", "prompt": "go on", "max_tokens": 200, "temperature": 0}
            httpx.post(f"{live.url}/completions", json=body, timeout=0.5)
        wait_idle(engine, timeout=5)
        assert engine.stats["generated_tokens"] - before - streamed < 100

        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{live.url}/completions", json=body | {"stream": True}) as r,
        ):
            next(sse_lines(r))
            started = time.monotonic()
            assert http.get(f"{live.root}/health").status_code == 200  # while a request generates
            assert time.monotonic() - started < 1.0
    wait_idle(engine)


def test_forty_requests_from_eight_threads(live, reference):
    client = live.client()
    models = [BASE_NAME, "alpha", "beta"]
    jobs = [(PROMPTS[i % len(PROMPTS)], models[i % 3], 8 + (i * 7) % 17, i % 4) for i in range(40)]
    before = live.engine.stats

    def call(job):
        prompt, model, max_tokens, kind = job
        chat, stream = kind in (0, 1), kind in (1, 3)
        if chat:
            response = client.chat.completions.create(
                model=model, messages=user(prompt), max_tokens=max_tokens, temperature=0, stream=stream
            )
        else:
            response = client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=stream
            )
        if not stream:
            choice = response.choices[0]
            return (choice.message.content if chat else choice.text), choice.finish_reason
        pieces, finish = [], None
        for chunk in response:
            if chunk.choices:
                pieces.append((chunk.choices[0].delta.content if chat else chunk.choices[0].text) or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    elapsed = time.monotonic() - started
    for (prompt, model, max_tokens, kind), result in zip(jobs, results):
        prompt_ids = (
            chat_ids(live.tokenizer, prompt) if kind in (0, 1) else live.tokenizer(prompt)["input_ids"]
        )
        assert result == reference(prompt_ids, model, max_tokens), (prompt, model, max_tokens, kind)
    after = wait_idle(live.engine)
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert after["steps"] - before["steps"] < generated  # requests shared decode steps
    assert elapsed < 60


# ---------------------------------------------------------------------------------------- text stream
class ByteTokenizer:
    """ids are UTF-8 bytes; decoding an incomplete sequence ends in U+FFFD, as byte-level BPE does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_incomplete_characters_and_stop_prefixes():
    stream = TextStream(ByteTokenizer())
    deltas = [stream.add(byte) for byte in "aé€!".encode()]
    assert deltas == ["a", "", "é", "", "", "€", "!"] and stream.finish() == ""

    stream = TextStream(ByteTokenizer(), stops=["STOP"])
    deltas = [stream.add(byte) for byte in b"xSTy STOz"]
    assert "".join(deltas) + stream.finish() == "xSTy STOz" and not stream.stopped
    assert deltas[2] == "" and deltas[3] == "STy"  # "ST" waited until it could not start "STOP"

    stream = TextStream(ByteTokenizer(), stops=["STOP"])
    deltas = [stream.add(byte) for byte in b"ab STOP cd"]
    assert stream.stopped and "".join(deltas) == "ab " and stream.finish() == ""
    assert stream.add(ord("x")) == ""


# --------------------------------------------------------------------------------------------- the CLI
def test_cli_adapter_arguments_and_defaults(tmp_path, monkeypatch, serve_files):
    import shutil

    from lorakit.cli import build_parser
    from lorakit.cli.serve import UsageError, parse_adapters, plan, served_base_name

    alpha = str(serve_files.adapters["alpha"])
    assert parse_adapters([f"a={alpha}", f"{tmp_path}/runs/exp/adapter"]) == [
        ("a", alpha),
        ("exp", f"{tmp_path}/runs/exp/adapter"),
    ]
    for bad in ([f"a={alpha}", f"a={alpha}"], [f"={alpha}"], ["a="]):
        with pytest.raises(UsageError):
            parse_adapters(bad)

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve"])
    assert plan(args) == (None, []) and served_base_name(None, None) == "smollm2"
    shutil.copytree(alpha, tmp_path / "runs" / "lorakit" / "adapter")
    base, adapters = plan(args)  # the default training run's adapter, on the base it records
    assert adapters == [("lorakit", "runs/lorakit/adapter")]
    assert base == str(serve_files.base.resolve()) and served_base_name(base, "mine") == "mine"
    assert plan(build_parser().parse_args(["serve", "--model", str(serve_files.base)]))[1] == []


def test_cli_refuses_bad_adapters_in_one_line(serve_files, wide_adapter, tmp_path, capsys):
    from lorakit.cli import main

    base = ["serve", "--model", str(serve_files.base), "--port", "0"]
    assert main([*base, "--adapter", f"wide={wide_adapter}"]) == 1
    assert "cannot load adapter 'wide'" in capsys.readouterr().err
    assert main([*base, "--adapter", f"x={tmp_path}"]) == 1
    assert "not an adapter folder" in capsys.readouterr().err
    assert main([*base, "--base_name", "a", "--adapter", f"a={serve_files.adapters['alpha']}"]) == 2
    assert main([*base, "--max_tokens", "0"]) == 2


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_sigterm_lets_the_request_in_flight_finish(serve_files):
    command = [
        sys.executable,
        "-m",
        "lorakit",
        "serve",
        "--model",
        str(serve_files.base),
        "--base-name",
        "base",
        "--adapter",
        f"alpha={serve_files.adapters['alpha']}",
        "--port",
        "0",
        "--max-batch-size",
        "4",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(
        command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        banner = lines.get(timeout=90)
        assert banner and banner.startswith("lorakit serve: http://127.0.0.1:"), banner
        assert "(models: base, alpha)" in banner
        url = banner.split()[2]
        body = {
            "model": "alpha",
            "messages": user("keep going"),
            "max_tokens": 220,
            "temperature": 0,
            "stream": True,
        }
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/chat/completions", json=body) as r:
            events = sse_lines(r)
            next(events)
            process.send_signal(signal.SIGTERM)
            after = list(events)
        assert after[-1] == "[DONE]"
        chunks = [json.loads(data) for data in after[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for chunk in chunks if chunk["choices"][0]["delta"].get("content")) > 10
        assert process.wait(timeout=60) == 0, process.stderr.read()
        rest = []
        while (line := lines.get(timeout=10)) is not None:
            rest.append(line)
        assert "lorakit serve: stopped." in "".join(rest)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
