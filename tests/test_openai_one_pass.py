"""The OpenAI backend against vLLM's server: one scoring request per rated text, and fusion budgets
clamped to the context /v1/models reports.

The first tests use the scripted HTTP server of tests/test_backends_openai.py (request shapes);
the `engine` ones run the chain against a real vLLM server on the tiny model and count the HTTP
requests it makes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from scalecap.backends.base import GenerateRequest, ScoreRequest
from scalecap.backends.openai import OpenAIBackend
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from tests import backend_contract as contract
from tests.test_backends_openai import FakeServer, Reply, chat_body

VLLM_MODELS = {"object": "list", "data": [
    {"id": "fake", "object": "model", "owned_by": "vllm", "max_model_len": 200}]}


@pytest.fixture
def fake() -> Any:
    server = FakeServer()
    yield server
    server.close()


def run(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())


def test_server_info_finds_vllm_and_its_context(fake: FakeServer) -> None:
    fake.script["/v1/models"] = [Reply(body=VLLM_MODELS)]

    async def go() -> OpenAIBackend:
        b = await OpenAIBackend.create("fake", base_url=fake.url)
        await b.aclose()
        return b

    b = run(go)
    assert b.supports_generation_logprobs is True and b.max_model_len == 200
    fake.script["/v1/models"] = [Reply(body={"data": [{"id": "fake", "owned_by": "someone"}]})]
    b = run(go)
    assert b.supports_generation_logprobs is False and b.max_model_len is None
    fake.script["/v1/models"] = [Reply(status=404, body={"error": {"message": "no such route"}})]
    b = run(go)  # a server without /v1/models still works, in two passes
    assert b.supports_generation_logprobs is False


def test_one_pass_generation_and_scoring_requests(fake: FakeServer) -> None:
    fake.script["/v1/models"] = [Reply(body=VLLM_MODELS)]
    content = [{"token": "A", "logprob": -0.1}, {"token": " cat", "logprob": -0.7},
               {"token": ".", "logprob": -0.2}, {"token": "", "logprob": -0.01}]  # end of turn
    fake.script["/v1/chat/completions"] = [
        Reply(body=chat_body("A cat.", logprobs={"content": content}, token_ids=[5, 6, 7, 2]))]
    fake.script["/tokenize"] = [Reply(body={"count": 3, "tokens": [1, 2, 3], "max_model_len": 200})]
    entries = [None, *({str(t): {"logprob": -1.0, "decoded_token": "x"}} for t in (2, 3))]
    entries += [{"5": {"logprob": -2.0, "decoded_token": "A"}},
                {"6": {"logprob": -3.0, "decoded_token": " cat"}},
                {"7": {"logprob": -0.5, "decoded_token": "."}}]
    fake.default = lambda path, body: Reply(body={"choices": [{"text": "", "prompt_logprobs": entries}]})

    async def go() -> Any:
        b = await OpenAIBackend.create("fake", base_url=fake.url, backoff_base=0.01)
        try:
            image = contract.make_image()
            (gen,) = await b.generate([GenerateRequest("Say it.", image=image, token_scores=True)])
            scores = await b.score(
                [ScoreRequest("Say it.", gen.text, system="S", continuation_ids=gen.token_ids)] * 3)
            return gen, scores
        finally:
            await b.aclose()

    gen, scores = run(go)
    assert [(t.text, t.start, t.end, t.logprob) for t in gen.tokens] == [
        ("A", 0, 1, -0.1), (" cat", 1, 5, -0.7), (".", 5, 6, -0.2)]
    assert gen.token_ids == [5, 6, 7]
    assert [(t.text, t.logprob) for t in scores[0].tokens] == [("A", -2.0), (" cat", -3.0), (".", -0.5)]
    paths = Counter(fake.paths())
    assert paths == {"/v1/models": 1, "/v1/chat/completions": 1, "/tokenize": 1, "/v1/completions": 3}
    chat = next(b for _, p, b, _ in fake.requests if p == "/v1/chat/completions")
    assert chat["logprobs"] is True and chat["return_token_ids"] is True
    tok = next(b for _, p, b, _ in fake.requests if p == "/tokenize")
    assert tok["add_generation_prompt"] is True and tok["messages"][0] == {"role": "system", "content": "S"}
    completion = next(b for _, p, b, _ in fake.requests if p == "/v1/completions")
    assert completion["prompt"] == [1, 2, 3, 5, 6, 7] and completion["prompt_logprobs"] == 0


def test_fit_context_clamps_to_the_servers_context(fake: FakeServer) -> None:
    fake.script["/v1/models"] = [Reply(body=VLLM_MODELS)]
    fake.script["/tokenize"] = [Reply(body={"count": 150, "tokens": list(range(150))})]

    async def go() -> None:
        b = await OpenAIBackend.create("fake", base_url=fake.url)
        try:
            await b.generate([GenerateRequest("x " * 150, max_tokens=4096, fit_context=True),
                              GenerateRequest("short", max_tokens=50, fit_context=True),
                              GenerateRequest("x " * 150, max_tokens=4096)])
        finally:
            await b.aclose()

    run(go)
    budgets = [b["max_tokens"] for _, p, b, _ in fake.requests if p == "/v1/chat/completions"]
    assert sorted(budgets) == [50, 50, 4096]  # 200 - 150; a short prompt is not counted at all
    assert fake.paths().count("/tokenize") == 1


# --- against a real vLLM server on the tiny model ---------------------------------------------------

engine = pytest.mark.engine

SMALL = dict(max_init_tokens=32, max_answer_tokens=12, max_questions=2, max_question_tokens=24,
             max_object_summary_tokens=4096, max_position_summary_tokens=4096, max_final_tokens=4096)


@engine
def test_generated_ids_are_teacher_forced_in_one_request(openai_backend: Any, engine_loop: Any) -> None:
    b = openai_backend
    assert b.supports_generation_logprobs is True and b.max_model_len == 1024
    image = contract.make_image((30, 50, 220))
    (gen,) = engine_loop.run(b.generate([GenerateRequest(
        contract.PROMPT, image=image, system=contract.SYSTEM, max_tokens=16, token_scores=True)]))
    assert gen.tokens and len(gen.tokens) == len(gen.token_ids) <= gen.completion_tokens
    contract.assert_tokens_tile(gen.tokens, gen.text) if gen.text.strip() else None
    (without,) = engine_loop.run(b.score([ScoreRequest(
        contract.PROMPT, gen.text, system=contract.SYSTEM, continuation_ids=gen.token_ids)]))
    assert len(without.tokens) == len(gen.tokens)
    assert max(abs(a.logprob - w.logprob) for a, w in zip(gen.tokens, without.tokens, strict=True)) > 1e-4
    # the same ids with the image, teacher-forced the two-pass way, give the generation's values
    (forced,) = engine_loop.run(b.score([ScoreRequest(contract.PROMPT, gen.text, image=image,
                                                      system=contract.SYSTEM)]))
    if [t.text for t in forced.tokens] == [t.text for t in gen.tokens]:  # re-tokenised alike
        assert max(abs(a.logprob - f.logprob) for a, f in zip(gen.tokens, forced.tokens, strict=True)) < 0.05


@engine
def test_fit_context_clamps_to_the_real_servers_context(openai_backend: Any, engine_loop: Any) -> None:
    contract.check_fit_context(openai_backend, engine_loop)


@engine
def test_chain_makes_one_scoring_request_per_rated_text(vllm_server: Any, engine_loop: Any) -> None:
    paths: Counter[str] = Counter()
    colours = [(220, 30, 30), (30, 180, 40), (30, 50, 220)]

    async def go(config: ImageScaleCaptionGenerateConfig) -> list[dict[str, Any]]:
        b = await OpenAIBackend.create(vllm_server.model, base_url=vllm_server.base_url, timeout=120.0)

        async def sent(request: httpx.Request) -> None:
            paths[request.url.path] += 1

        b._client.event_hooks = {"request": [sent], "response": []}
        try:
            chain = ScaleCapChain(b, config)
            items = [ChainItem(source=contract.make_image(c), ref=str(c)) for c in colours]
            return await chain.caption_many(items)
        finally:
            await b.aclose()

    recs = engine_loop.run(go(ImageScaleCaptionGenerateConfig(**SMALL, second_filter=True)), timeout=600)
    assert all("error" not in r and r["meta"]["scoring_passes"] == 1 for r in recs), recs
    rated = sum(1 + sum(1 for p in r["qa_pairs"] if p["answer"].strip()) for r in recs)
    one = dict(paths)
    print(f"one-pass: {len(recs)} images, {rated} rated texts, requests {one}")
    assert paths["/v1/completions"] == rated  # one scoring request per rated text
    questions = {q for r in recs for q in r["object_questions"] + r["position_questions"]}
    assert paths["/tokenize"] <= 1 + len(questions)  # chat prefixes: the caption's once for all images
    paths.clear()
    recs = engine_loop.run(go(ImageScaleCaptionGenerateConfig(**SMALL, one_pass_scoring=False)), timeout=600)
    assert all("error" not in r and r["meta"]["scoring_passes"] == 2 for r in recs), recs
    print(f"two-pass: {len(recs)} images, requests {dict(paths)}")
    assert paths["/v1/completions"] == 0 and paths["/tokenize"] == 2 * len(recs)  # before: two of each
