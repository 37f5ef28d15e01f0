"""The `openai` backend.

Two halves. Our own HTTP logic (retries, backoff, Retry-After, error messages, request shape,
concurrency bound, the non-vLLM fallback) runs against a small scripted HTTP server in a thread:
what is under test there is the client, not a model. Everything a model does (generation, logprobs,
images, teacher forcing) runs against a real vLLM OpenAI server process on the tiny Qwen2-VL
(marker `engine`, fixture `vllm_server` in tests/fixtures_openai.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from scalecap.backends import create_backend
from scalecap.backends.base import Backend, GenerateRequest, ScoreRequest
from scalecap.backends.openai import MAX_RETRY_AFTER, OpenAIBackend, _server_root
from scalecap.errors import BackendError, ConfigError, RetryableBackendError
from scalecap.retry import retry_after
from tests import backend_contract as contract

# --- a scripted HTTP server (tests our client logic, not a model) -------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    """Close the connection without answering (a crashed or restarted server)."""


def chat_body(text: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                **extra,
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
    }


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a dropped connection (Reply.drop) is on purpose


def echo(path: str, body: dict[str, Any]) -> Reply:
    """Answer a chat request with the text of its last message (so order can be checked)."""
    content = body.get("messages", [{}])[-1].get("content", "ok")
    return Reply(body=chat_body(content[-1]["text"] if isinstance(content, list) else content))


class FakeServer:
    """Answers each path from a queue of scripted replies, then from a default responder."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.default: Callable[[str, dict[str, Any]], Reply] = echo
        self.requests: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                with fake._lock:
                    fake.requests.append((self.command, self.path, body, dict(self.headers)))
                    queue = fake.script.get(self.path)
                    reply = queue.pop(0) if queue else None
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    reply = reply or fake.default(self.path, body)
                    if reply.delay:
                        time.sleep(reply.delay)
                    if reply.drop:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    data = json.dumps(reply.body if reply.body is not None else {}).encode()
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            do_GET = do_POST = _serve

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def paths(self) -> list[str]:
        return [p for _, p, _, _ in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Any:
    server = FakeServer()
    yield server
    server.close()


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


async def make(fake: FakeServer, **options: Any) -> OpenAIBackend:
    options = {"backoff_base": 0.01, "backoff_max": 0.05, "server_info": False, **options}
    backend = await OpenAIBackend.create("fake", base_url=fake.url, **options)
    return backend


def red(size: int = 56) -> Image.Image:
    return Image.new("RGB", (size, size), (220, 30, 30))


# --- construction ----------------------------------------------------------------------------


def test_create_rejects_unknown_and_bad_options() -> None:
    async def go() -> None:
        with pytest.raises(ConfigError, match="unknown options"):
            await OpenAIBackend.create("m", base_url="http://127.0.0.1:1/v1", temperature=0.3)
        with pytest.raises(ConfigError, match="image_format"):
            await OpenAIBackend.create("m", base_url="http://127.0.0.1:1/v1", image_format="GIF")
        with pytest.raises(ConfigError, match="base_url"):
            await OpenAIBackend.create("m", base_url="127.0.0.1:8000")
        with pytest.raises(ConfigError):
            await OpenAIBackend.create("m", base_url="http://h/v1", max_concurrency=0)
        b = await create_backend("openai", "m", base_url="http://127.0.0.1:1/v1/")
        assert isinstance(b, Backend) and b.model_name == "m" and b.supports_scoring
        assert b.base_url == "http://127.0.0.1:1/v1" and b.server_root == "http://127.0.0.1:1"
        await b.aclose()
        await b.aclose()  # idempotent

    run(go)


def test_helpers() -> None:
    assert _server_root("http://h:8000/v1") == "http://h:8000"
    assert _server_root("http://h:8000/api") == "http://h:8000/api"
    assert retry_after("2", cap=MAX_RETRY_AFTER) == 2.0
    assert retry_after("0", cap=MAX_RETRY_AFTER) == 0.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("100000", cap=MAX_RETRY_AFTER) == 60.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_empty_model_takes_the_served_name(fake: FakeServer) -> None:
    fake.script["/v1/models"] = [Reply(body={"object": "list", "data": [{"id": "served-x"}]})]

    async def go() -> None:
        b = await OpenAIBackend.create("", base_url=fake.url, api_key="sk-test")
        (r,) = await b.generate([GenerateRequest(prompt="hi")])
        await b.aclose()
        assert b.model_name == "served-x" and r.text == "hi"

    run(go)
    _, _, body, headers = fake.requests[-1]
    assert body["model"] == "served-x"
    assert headers.get("Authorization") == "Bearer sk-test"


# --- request shape ---------------------------------------------------------------------------


def test_request_layout_image_first_and_sampling_fields(fake: FakeServer) -> None:
    img = red()

    async def go() -> list[Any]:
        b = await make(fake, image_format="PNG")
        out = await b.generate(
            [
                GenerateRequest(
                    prompt="describe",
                    image=img,
                    system="sys",
                    max_tokens=9,
                    temperature=0.5,
                    top_p=0.9,
                    seed=3,
                ),
                GenerateRequest(prompt="plain"),
                GenerateRequest(prompt="by url", image="https://example.org/a.jpg"),  # type: ignore[arg-type]
            ]
        )
        await b.aclose()
        return out

    results = run(go)
    assert [r.text for r in results] == ["describe", "plain", "by url"]
    assert results[0].prompt_tokens == 7 and results[0].completion_tokens == 2
    assert results[0].finish_reason == "stop" and results[0].top_logprobs is None
    bodies = {echo("", b).body["choices"][0]["message"]["content"]: b for _, _, b, _ in fake.requests}
    first = bodies["describe"]
    assert first["messages"][0] == {"role": "system", "content": "sys"}
    content = first["messages"][1]["content"]
    assert content[0]["type"] == "image_url"
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "describe"}
    assert (first["max_tokens"], first["temperature"], first["top_p"], first["seed"]) == (
        9,
        0.5,
        0.9,
        3,
    )
    assert "logprobs" not in first
    plain = bodies["plain"]
    assert len(plain["messages"]) == 1 and "seed" not in plain
    assert plain["messages"][0]["content"] == "plain"  # text-only: a plain string
    url_part = bodies["by url"]["messages"][0]["content"][0]
    assert url_part == {"type": "image_url", "image_url": {"url": "https://example.org/a.jpg"}}


def test_top_logprobs_become_token_dicts(fake: FakeServer) -> None:
    lp = {
        "content": [
            {
                "token": "Yes",
                "logprob": -0.1,
                "top_logprobs": [
                    {"token": "Yes", "logprob": -0.1},
                    {"token": "No", "logprob": -2.5},
                ],
            },
        ]
    }
    fake.script["/v1/chat/completions"] = [Reply(body=chat_body("Yes", logprobs=lp))]

    async def go() -> Any:
        b = await make(fake)
        (r,) = await b.generate([GenerateRequest(prompt="q", top_logprobs=2, max_tokens=1)])
        await b.aclose()
        return r

    r = run(go)
    assert r.top_logprobs == [{"Yes": -0.1, "No": -2.5}]
    body = fake.requests[-1][2]
    assert body["logprobs"] is True and body["top_logprobs"] == 2


def test_results_keep_input_order_and_concurrency_is_bounded(fake: FakeServer) -> None:
    # Earlier requests answer later, so completion order is the reverse of input order.
    def slow_first(path: str, body: dict[str, Any]) -> Reply:
        text = body["messages"][-1]["content"]
        return Reply(body=chat_body(text), delay=0.05 * (12 - int(text)) / 12 + 0.05)

    fake.default = slow_first

    async def go() -> list[str]:
        b = await make(fake, max_concurrency=3)
        # Two calls at once share one bound.
        r1, r2 = await asyncio.gather(
            b.generate([GenerateRequest(prompt=str(i)) for i in range(6)]),
            b.generate([GenerateRequest(prompt=str(i)) for i in range(6, 12)]),
        )
        await b.aclose()
        return [r.text for r in r1 + r2]

    assert run(go) == [str(i) for i in range(12)]
    assert 2 <= fake.max_in_flight <= 3


# --- retries ---------------------------------------------------------------------------------


def test_retries_429_and_503_then_succeeds(fake: FakeServer) -> None:
    fake.script["/v1/chat/completions"] = [
        Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "0"}),
        Reply(503, {"message": "overloaded"}),
        Reply(502, None),
    ]

    async def go() -> Any:
        b = await make(fake)
        (r,) = await b.generate([GenerateRequest(prompt="hello")])
        await b.aclose()
        return r

    assert run(go).text == "hello"
    assert fake.paths().count("/v1/chat/completions") == 4


def test_backoff_grows_with_jitter_and_honours_retry_after(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.script["/v1/chat/completions"] = [
        Reply(503, {}),
        Reply(503, {}),
        Reply(429, {}, {"retry-after": "7"}),
        Reply(503, {}),
    ]
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr("scalecap.backends.openai._sleep", record)

    async def go() -> None:
        b = await OpenAIBackend.create(
            "fake", base_url=fake.url, backoff_base=1.0, backoff_max=3.0, max_retries=4
        )
        await b.generate([GenerateRequest(prompt="x")])
        await b.aclose()

    run(go)
    assert len(waits) == 4
    assert 0 <= waits[0] <= 1.0  # ceiling 1, full jitter (scalecap.retry.backoff)
    assert 0 <= waits[1] <= 2.0  # ceiling 2
    assert waits[2] == 7.0  # Retry-After wins over the backoff
    assert 0 <= waits[3] <= 3.0  # ceiling capped at backoff_max


def test_gives_up_after_max_retries(fake: FakeServer) -> None:
    fake.default = lambda path, body: Reply(503, {"error": {"message": "engine dead"}})

    async def go() -> None:
        b = await make(fake, max_retries=2)
        try:
            await b.generate([GenerateRequest(prompt="x")])
        finally:
            await b.aclose()

    with pytest.raises(RetryableBackendError, match=r"3 attempts.*engine dead"):
        run(go)
    assert len(fake.requests) == 3


def test_client_errors_fail_at_once_with_the_servers_message(fake: FakeServer) -> None:
    fake.script["/v1/chat/completions"] = [
        Reply(400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}})
    ]

    async def go() -> None:
        b = await make(fake)
        try:
            await b.generate([GenerateRequest(prompt="x")])
        finally:
            await b.aclose()

    with pytest.raises(BackendError, match=r"HTTP 400.*max_tokens is too large") as info:
        run(go)
    assert not isinstance(info.value, RetryableBackendError)
    assert len(fake.requests) == 1


def test_dropped_connection_is_retried(fake: FakeServer) -> None:
    fake.script["/v1/chat/completions"] = [Reply(drop=True)]

    async def go() -> Any:
        b = await make(fake)
        (r,) = await b.generate([GenerateRequest(prompt="again")])
        await b.aclose()
        return r

    assert run(go).text == "again"
    assert len(fake.requests) == 2


def test_unreachable_server_is_a_retryable_error() -> None:
    with socket_free_port() as port:
        pass

    async def go() -> None:
        b = await OpenAIBackend.create(
            "m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.01
        )
        try:
            await b.generate([GenerateRequest(prompt="x")])
        finally:
            await b.aclose()

    with pytest.raises(RetryableBackendError, match=r"2 attempts.*Connect"):
        run(go)


def socket_free_port() -> Any:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))

    class Ctx:
        def __enter__(self) -> int:
            return s.getsockname()[1]

        def __exit__(self, *a: Any) -> None:
            s.close()

    return Ctx()


# --- scoring against servers with and without vLLM's extensions ------------------------------


def test_scoring_on_a_server_without_vllm_extensions(fake: FakeServer) -> None:
    # An OpenAI-style server: no /tokenize, chat completions without prompt_logprobs.
    fake.script["/tokenize"] = [Reply(404, {"detail": "Not Found"})]

    async def go() -> tuple[OpenAIBackend, list[Any]]:
        b = await make(fake)
        with pytest.raises(BackendError, match="yesno") as info:
            await b.score([ScoreRequest(prompt="p", continuation="a cat")])
        n = len(fake.requests)
        with pytest.raises(BackendError, match="yesno"):
            await b.score([ScoreRequest(prompt="p", continuation="a cat")])
        assert len(fake.requests) == n  # known now: no second round trip
        out = await b.generate([GenerateRequest(prompt="still works")])  # yesno mode needs only this
        await b.aclose()
        return b, [info.value, out]

    b, (err, out) = run(go)
    assert b.supports_scoring is False and out[0].text == "still works"
    assert "prompt_logprobs" in str(err)


def test_probe_at_create_finds_a_server_that_cannot_score(fake: FakeServer) -> None:
    """With probe_scoring the chain learns at start-up, so contrastive mode is refused up front."""
    from scalecap.chain import ScaleCapChain
    from scalecap.config import ImageScaleCaptionGenerateConfig
    from scalecap.errors import ConfigError

    fake.script["/tokenize"] = [Reply(404, {"detail": "Not Found"})]

    async def go() -> OpenAIBackend:
        b = await make(fake, probe_scoring=True)
        await b.aclose()
        return b

    b = run(go)
    assert b.supports_scoring is False
    with pytest.raises(ConfigError, match="yesno"):
        ScaleCapChain(b)
    ScaleCapChain(b, ImageScaleCaptionGenerateConfig(sentence_filter="yesno"))


def test_probe_does_not_fail_create_when_the_server_is_busy(fake: FakeServer) -> None:
    fake.script["/tokenize"] = [Reply(503, {"detail": "busy"})] * 10

    async def go() -> OpenAIBackend:
        b = await make(fake, probe_scoring=True, max_retries=0)
        await b.aclose()
        return b

    assert run(go).supports_scoring is True


def test_scoring_without_prompt_logprobs_in_the_answer(fake: FakeServer) -> None:
    fake.script["/tokenize"] = [Reply(body={"count": 2, "tokens": [1, 2], "max_model_len": 10})]

    async def go() -> OpenAIBackend:
        b = await make(fake)
        with pytest.raises(BackendError, match="no prompt_logprobs"):
            await b.score([ScoreRequest(prompt="p", continuation="a cat")])
        await b.aclose()
        return b

    assert run(go).supports_scoring is False


def test_unknown_model_on_tokenize_is_not_mistaken_for_missing_support(fake: FakeServer) -> None:
    fake.script["/tokenize"] = [Reply(404, {"error": {"message": "The model `nope` does not exist."}})]

    async def go() -> OpenAIBackend:
        b = await make(fake)
        with pytest.raises(BackendError, match="does not exist"):
            await b.score([ScoreRequest(prompt="p", continuation="a cat")])
        await b.aclose()
        return b

    assert run(go).supports_scoring is True


def test_score_aligns_from_the_end_of_a_vllm_style_answer(fake: FakeServer) -> None:
    # Prompt tokens 10..13 are the template; the continuation "a cat" is tokens 20, 21.
    entries = [None] + [{str(t): {"logprob": -1.0, "rank": 1, "decoded_token": "x"}} for t in (11, 12, 13)]
    entries += [
        {"20": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}},
        {"21": {"logprob": -2.0, "rank": 3, "decoded_token": " cat"}},
    ]
    fake.script["/tokenize"] = [Reply(body={"count": 2, "tokens": [20, 21]})]
    fake.script["/v1/chat/completions"] = [
        Reply(
            body=chat_body("", prompt_logprobs=None)
            | {"prompt_logprobs": entries, "prompt_token_ids": [10, 11, 12, 13, 20, 21]}
        )
    ]

    async def go() -> Any:
        b = await make(fake)
        (r,) = await b.score([ScoreRequest(prompt="p", continuation="a cat", image=red())])
        await b.aclose()
        return r

    r = run(go)
    assert [(t.text, t.start, t.end, t.logprob) for t in r.tokens] == [
        ("a", 0, 1, -0.5),
        (" cat", 1, 5, -2.0),
    ]
    assert r.prompt_tokens == 7
    chat = next(b for _, p, b, _ in fake.requests if p == "/v1/chat/completions")
    assert chat["messages"][-1] == {"role": "assistant", "content": "a cat"}
    assert chat["add_generation_prompt"] is False and chat["continue_final_message"] is True
    assert chat["prompt_logprobs"] == 0 and chat["max_tokens"] == 1
    assert chat["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg")
    tok = next(b for _, p, b, _ in fake.requests if p == "/tokenize")
    assert tok == {"model": "fake", "prompt": "a cat", "add_special_tokens": False}


def test_closed_backend_refuses_work(fake: FakeServer) -> None:
    async def go() -> None:
        b = await make(fake)
        await b.aclose()
        await b.generate([GenerateRequest(prompt="x")])

    with pytest.raises(BackendError, match="closed"):
        run(go)


# --- against a real vLLM OpenAI server on the tiny model ------------------------------------

engine = pytest.mark.engine


@engine
@pytest.mark.parametrize(
    "check", [*contract.ALL_CHECKS, contract.check_score_matches_generate], ids=lambda c: c.__name__
)
def test_contract(check: Callable[..., None], openai_backend: Any, engine_loop: Any) -> None:
    check(openai_backend, engine_loop)


@engine
def test_model_name_is_the_served_name(vllm_server: Any, engine_loop: Any) -> None:
    async def go() -> str:
        b = await OpenAIBackend.create("", base_url=vllm_server.base_url)
        await b.aclose()
        return b.model_name

    assert engine_loop.run(go()) == vllm_server.model == "tiny-qwen2vl"


@engine
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_image_data_url_reaches_the_server(fmt: str, vllm_server: Any, engine_loop: Any) -> None:
    image = contract.make_image((30, 50, 220))

    async def go() -> list[Any]:
        b = await OpenAIBackend.create(vllm_server.model, base_url=vllm_server.base_url, image_format=fmt)
        try:
            return await b.generate(
                [
                    GenerateRequest(prompt="What is this?", image=image, max_tokens=2),
                    GenerateRequest(prompt="What is this?", max_tokens=2),
                    GenerateRequest(prompt="What is this?", image=image.convert("RGBA"), max_tokens=2),
                ]
            )
        finally:
            await b.aclose()

    with_image, without, rgba = engine_loop.run(go())
    # The tiny model's processor gives a picture 4-16 placeholder tokens (plus vision markers).
    assert 4 + 2 <= with_image.prompt_tokens - without.prompt_tokens <= 16 + 2
    assert rgba.prompt_tokens == with_image.prompt_tokens


@engine
def test_score_aligns_with_the_servers_tokenizer(
    openai_backend: Any, vllm_server: Any, engine_loop: Any
) -> None:
    continuation = "A red square sits in the center, next to a small dog."
    image = contract.make_image()
    requests = [
        ScoreRequest(prompt="Describe it.", continuation=continuation, image=image, system="S."),
        ScoreRequest(prompt="Describe it.", continuation=continuation),
    ]
    with_image, without = engine_loop.run(openai_backend.score(requests))
    root = vllm_server.base_url.removesuffix("/v1")
    tok = httpx.post(
        f"{root}/tokenize",
        json={"model": vllm_server.model, "prompt": continuation, "add_special_tokens": False},
    ).json()
    # The continuation's tokens sit at the very end of the teacher-forced prompt: the last n
    # prompt token ids are the ids /tokenize gives for the continuation alone.
    body = {
        "model": vllm_server.model,
        "messages": [
            {"role": "user", "content": "Describe it."},
            {"role": "assistant", "content": continuation},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "prompt_logprobs": 0,
        "return_token_ids": True,
        "max_tokens": 1,
    }
    raw = httpx.post(f"{vllm_server.base_url}/chat/completions", json=body, timeout=60).json()
    assert raw["prompt_token_ids"][-tok["count"] :] == tok["tokens"]
    for result in (with_image, without):
        assert len(result.tokens) == tok["count"]
        contract.assert_tokens_tile(result.tokens, continuation)
    assert with_image.prompt_tokens > without.prompt_tokens
    assert openai_backend.supports_scoring is True


@engine
def test_concurrency_bound_is_respected(vllm_server: Any, engine_loop: Any) -> None:
    async def peak(limit: int, n: int) -> int:
        b = await OpenAIBackend.create(
            vllm_server.model, base_url=vllm_server.base_url, max_concurrency=limit
        )
        state = {"now": 0, "max": 0}

        async def sent(request: httpx.Request) -> None:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])

        async def answered(response: httpx.Response) -> None:
            state["now"] -= 1

        b._client.event_hooks = {"request": [sent], "response": [answered]}
        try:
            results = await b.generate(
                [GenerateRequest(prompt=f"Count {i}.", max_tokens=8) for i in range(n)]
            )
        finally:
            await b.aclose()
        assert len(results) == n and all(r.completion_tokens > 0 for r in results)
        return state["max"]

    assert engine_loop.run(peak(2, 8)) == 2
    assert engine_loop.run(peak(16, 12)) > 2  # unbounded enough: the requests really overlap
