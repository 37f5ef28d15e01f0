"""DataFlow's own servings as the operator's engine: yes/no mode works, contrastive mode is refused.

The real `APIVLMServing_openai` (open-dataflow) talks to a real HTTP server on 127.0.0.1 that
speaks OpenAI's chat-completions API and answers from the deterministic scripted VLM (it decodes
the image it is sent, so "what the model sees" is the picture's colour). DataFlow-MM's message
interface (`generate_from_input_messages`) is exercised with a serving class written here to its
signature, on the same scripted VLM, since DataFlow-MM is not on PyPI.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from scalecap import FileStorage, ImageScaleCaptionGenerate, prompts
from scalecap.backends.base import GenerateRequest
from scalecap.backends.dataflow_serving import (
    DataFlowServingBackend,
    load_serving_class,
    serving_model_name,
)
from scalecap.errors import BackendError, ConfigError
from scalecap.runtime import BackgroundLoop
from tests.scripted_vlm import ScriptedVLM, solid_image

dataflow_core = pytest.importorskip("dataflow.core")
from dataflow.pipeline import PipelineABC  # noqa: E402

API_KEY = "test-key-for-the-local-server"
YESNO = {"sentence_filter": "yesno", "max_questions": 2}
SYSTEMS = sorted((v for k, v in vars(prompts).items() if "SYSTEM" in k and isinstance(v, str)), key=len)[::-1]


def scripted_reply(vlm: ScriptedVLM, text: str, image: Image.Image | None, system: str | None = None) -> str:
    return vlm._answer(GenerateRequest(prompt=text, image=image, system=system, max_tokens=4096)).text


class ChatServer:
    """OpenAI chat completions on 127.0.0.1, answered by the scripted VLM; records what it got."""

    def __init__(self) -> None:
        self.vlm = ScriptedVLM()
        self.seen: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = self.path.endswith("/chat/completions")
                ok = ok and self.headers.get("Authorization") == f"Bearer {API_KEY}"
                if not ok:
                    self.send_response(404 if "chat" not in self.path else 401)
                    self.end_headers()
                    return
                text = server.reply(body)
                out = {
                    "id": f"chatcmpl-{len(server.seen)}", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, body: dict) -> str:
        (turn,) = [m for m in body["messages"] if m["role"] == "user"]
        parts = turn["content"]
        if isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        image = None
        if urls:
            image = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))).convert("RGB")
        # APIVLMServing_openai sends "{system_prompt}\n{prompt}" as one text: take the system off.
        for system in SYSTEMS:
            if text.startswith(system):
                text = text[len(system):]
                break
        text = text.lstrip("\n")
        self.seen.append({"model": body["model"], "image": image is not None, "text": text})
        return scripted_reply(self.vlm, text, image)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def chat_server():
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture
def openai_serving(chat_server, monkeypatch):
    monkeypatch.setenv("SCALECAP_TEST_DF_KEY", API_KEY)
    cls = load_serving_class("APIVLMServing_openai")
    return cls(api_url=chat_server.base_url, key_name_of_api_key="SCALECAP_TEST_DF_KEY",
               model_name="scripted-over-http", max_workers=4)


@pytest.fixture
def colour_rows(tmp_path):
    rows = []
    for colour in ("red", "blue", "green"):
        path = tmp_path / f"{colour}.png"
        solid_image(colour).save(path)
        rows.append({"image": str(path), "colour": colour})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


class OnePipeline(PipelineABC):
    def __init__(self, storage, serving, config):
        super().__init__()
        self.storage = storage
        self.captioner = ImageScaleCaptionGenerate(serving, config)

    def forward(self):
        self.captioner.run(storage=self.storage.step(), input_image_key="image", output_key="scalecap_record")


def read_records(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["colour"]: r["scalecap_record"] for r in rows}


def check_yesno_records(recs: dict[str, dict]) -> None:
    for colour, rec in recs.items():
        assert "error" not in rec, rec
        assert rec["final_caption"], rec
        golden = " ".join(rec["golden_sentences"])
        assert colour in golden and "unicorn" not in golden, "yes/no on the answer text keeps what is seen"
        answers = rec["qa_answers_filtered"]
        assert all(colour in a for a in answers if "centre" not in a), answers


def test_api_vlm_serving_openai_in_yesno_mode_inside_a_pipeline(
    tmp_path, chat_server, openai_serving, colour_rows
):
    chat_server.seen.clear()
    storage = FileStorage(str(colour_rows), cache_path=str(tmp_path / "cache"), file_name_prefix="api")
    pipe = OnePipeline(storage, openai_serving, YESNO)
    assert pipe.captioner.vlm_serving is openai_serving, "the DataFlow serving itself is the attribute"
    pipe.compile()
    assert chat_server.seen == [], "compile() sends no request"
    pipe.forward()

    recs = read_records(tmp_path / "cache" / "api_step1.jsonl")
    assert set(recs) == {"red", "blue", "green"}
    check_yesno_records(recs)
    assert recs["red"]["meta"]["model"] == "scripted-over-http"
    seen = chat_server.seen
    assert {s["model"] for s in seen} == {"scripted-over-http"}
    assert any(s["image"] for s in seen) and any(not s["image"] for s in seen), "image and text-only turns"
    assert all(s["image"] for s in seen if s["text"] == prompts.INIT_CAPTION)
    assert openai_serving.client.is_closed(), "the pipeline called the serving's cleanup()"


def test_contrastive_mode_on_a_dataflow_serving_is_a_clear_error(chat_server, openai_serving):
    chat_server.seen.clear()
    with pytest.raises(ConfigError, match=r"APIVLMServing_openai .*token scores.*sentence_filter='yesno'"):
        ImageScaleCaptionGenerate(openai_serving, {"sentence_filter": "contrastive"})
    with pytest.raises(ConfigError, match="token scores"):
        ImageScaleCaptionGenerate(openai_serving)  # the default config is contrastive
    assert chat_server.seen == []
    loop = BackgroundLoop("df-score")
    try:
        backend = DataFlowServingBackend(openai_serving)
        assert backend.supports_scoring is False
        with pytest.raises(BackendError, match="token scores"):
            loop.run(backend.score([]))
    finally:
        loop.stop()


class MessagesServing(dataflow_core.LLMServingABC):
    """DataFlow-MM's `VLMServingABC.generate_from_input_messages` signature, over the scripted VLM.

    Reads a turn the way DataFlow-MM's local IO does ("from"/"value", "<image>" placeholder, paths
    in image_list). `fail`: "text" reports a failed request as "Error: ..." text (DataFlow-MM's API
    serving does that), "raise" raises out of the whole call.
    """

    def __init__(self, fail: str = "text", delay: float = 0.05) -> None:
        self.vlm = ScriptedVLM(fail_colour="red")
        self.delay = delay
        self.fail = fail
        self.batches: list[list[str | None]] = []
        self.cleaned = 0

    def generate_from_input_messages(self, conversations, image_list=None, video_list=None,
                                     audio_list=None, system_prompt="You are a helpful assistant."):
        time.sleep(self.delay)  # a model's cost: requests of other images arrive meanwhile
        out, paths_seen = [], []
        for i, conv in enumerate(conversations):
            turn = conv[-1]
            paths = image_list[i] if image_list else None
            assert turn["from"] == "human" and turn["role"] == "user"
            assert turn["value"].startswith("<image>\n") == bool(paths)
            prompt = turn["value"].removeprefix("<image>\n")
            assert turn["content"] == prompt
            image = Image.open(paths[0]).convert("RGB") if paths else None
            paths_seen.append(paths[0] if paths else None)
            try:
                out.append(scripted_reply(self.vlm, prompt, image, system_prompt))
            except RuntimeError as exc:
                if self.fail == "raise":
                    raise
                out.append(f"Error: {exc}")
        self.batches.append(paths_seen)
        return out

    def generate_from_input(self, user_inputs, system_prompt=""):
        raise AssertionError("the adapter uses generate_from_input_messages when a serving has it")

    def start_serving(self):
        pass

    def cleanup(self):
        self.cleaned += 1


@pytest.mark.parametrize("fail", ["text", "raise"])
def test_messages_serving_fails_only_the_failing_image(tmp_path, colour_rows, fail):
    serving = MessagesServing(fail)
    storage = FileStorage(str(colour_rows), cache_path=str(tmp_path / "cache"))
    pipe = OnePipeline(storage, serving, YESNO)
    pipe.compile()
    pipe.forward()
    recs = read_records(tmp_path / "cache" / "dataflow_cache_step_step1.jsonl")
    assert recs["red"]["error"]["message"], recs["red"]
    assert "scripted failure" in recs["red"]["error"]["message"]
    check_yesno_records({"blue": recs["blue"], "green": recs["green"]})
    assert serving.cleaned == 1
    merged = [b for b in serving.batches if len({p for p in b if p}) > 1]
    assert merged, "requests of concurrent images go to the serving in one call"


def test_serving_without_model_name_and_class_loading():
    class Unnamed:
        hf_model_name_or_path = "/models/Qwen2.5-VL-3B-Instruct"

        def generate_from_input_one_image(self, image_paths, text_prompts, system_prompt=""):
            return ["ok"] * len(image_paths)

    assert serving_model_name(Unnamed()) == "/models/Qwen2.5-VL-3B-Instruct"
    assert serving_model_name(object()) == "object"
    op = ImageScaleCaptionGenerate(Unnamed(), YESNO)
    assert op.chain.vlm.model_name == "/models/Qwen2.5-VL-3B-Instruct"
    op.close()
    assert load_serving_class("APIVLMServing_openai").__name__ == "APIVLMServing_openai"
    with pytest.raises(ConfigError, match="cannot load DataFlow serving"):
        load_serving_class("tests.scripted_vlm:NoSuchServing")


def test_dataflow_backend_alias_builds_the_serving(chat_server, monkeypatch):
    from scalecap.backends import create_backend

    monkeypatch.setenv("SCALECAP_TEST_DF_KEY", API_KEY)
    loop = BackgroundLoop("df-alias")
    try:
        backend = loop.run(create_backend(
            "dataflow", "scripted-alias", serving="APIVLMServing_openai", api_url=chat_server.base_url,
            key_name_of_api_key="SCALECAP_TEST_DF_KEY",
        ))
        assert backend.serving.model_name == "scripted-alias" and backend.owns_serving
        req = GenerateRequest(prompt=prompts.INIT_CAPTION, image=solid_image("green"))
        (res,) = loop.run(backend.generate([req]))
        assert "green" in res.text
        loop.run(backend.aclose())
        assert backend.serving.client.is_closed(), "a serving the backend built is cleaned up with it"
        with pytest.raises(ConfigError, match="needs serving="):
            loop.run(create_backend("dataflow", "no-serving-named"))
    finally:
        loop.stop()


def test_dataflow_spec_in_contrastive_mode_is_refused_before_starting_anything(chat_server):
    chat_server.seen.clear()
    spec = {"backend": "dataflow", "model": "m", "serving": "APIVLMServing_openai",
            "api_url": chat_server.base_url}
    with pytest.raises(ConfigError, match="APIVLMServing_openai is a DataFlow serving"):
        ImageScaleCaptionGenerate(spec)
    assert chat_server.seen == []
