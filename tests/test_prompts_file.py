"""Prompts from a file: every stage's text can be replaced, and a bad file is one clear line."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import pytest

from scalecap.backends.base import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import ConfigError
from scalecap.templates import NAMES, Templates, load_prompts, validate_prompts
from scalecap_command import main
from tests.scripted_vlm import ScriptedVLM, solid_image

_MARK = re.compile(r"\[T:(\w+)\] ")


class MarkedVLM(ScriptedVLM):
    """The scripted VLM, reading prompts whose templates carry a `[T:name] ` mark: it notes each
    mark it sees (prompt or system) and answers the unmarked text as usual."""

    seen: set[str]

    def _strip(self, text: str | None) -> str | None:
        if text is None:
            return None
        self.seen.update(_MARK.findall(text))
        return _MARK.sub("", text)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        for r in requests:
            r.prompt, r.system = self._strip(r.prompt), self._strip(r.system)  # type: ignore[assignment]
        return await super().generate(requests)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        for r in requests:
            r.prompt, r.system = self._strip(r.prompt), self._strip(r.system)  # type: ignore[assignment]
        return await super().score(requests)


def marked_file(tmp_path) -> str:
    """A TOML file with every template: ours, each behind its own mark."""
    lines = ["[prompts]"]
    for name in NAMES:
        text = f"[T:{name}] " + getattr(Templates(), name)
        lines.append(f"{name} = {_toml_string(text)}")
    path = tmp_path / "prompts.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def run(vlm: ScriptedVLM, config: ImageScaleCaptionGenerateConfig) -> dict:
    chain = ScaleCapChain(vlm, config)
    return asyncio.run(chain.caption(ChainItem(source=solid_image("red"), ref="mem://red")))


def test_a_prompts_file_changes_every_stage_text(tmp_path):
    templates = load_prompts(marked_file(tmp_path))
    vlm = MarkedVLM()
    vlm.seen = set()
    rec = run(vlm, ImageScaleCaptionGenerateConfig(prompts=templates, second_filter=True))
    assert rec["final_caption"].startswith("FINAL["), rec
    assert rec["object_questions"][0].startswith("[T:object_question] ")
    run(vlm, ImageScaleCaptionGenerateConfig(prompts=templates, sentence_filter="yesno"))
    assert vlm.seen == set(NAMES)
    # and nothing reached the model unmarked: the defaults were all replaced
    plain = MarkedVLM()
    plain.seen = set()
    run(plain, ImageScaleCaptionGenerateConfig(second_filter=True))
    assert plain.seen == set()


def test_prompts_are_hashed_and_travel_inside_the_config(tmp_path):
    templates = load_prompts(marked_file(tmp_path))
    cfg = ImageScaleCaptionGenerateConfig(prompts=templates)
    assert cfg.config_hash() != ImageScaleCaptionGenerateConfig().config_hash()
    other = ImageScaleCaptionGenerateConfig(prompts={**templates, "caption": "Describe it."})
    assert other.config_hash() != cfg.config_hash()
    assert ImageScaleCaptionGenerateConfig.from_dict(cfg.to_dict()) == cfg  # what a worker receives
    config_file = tmp_path / "sub" / "c.toml"
    config_file.parent.mkdir()
    config_file.write_text('[scalecap]\nprompts = "../prompts.toml"\nmax_questions = 3\n')
    assert ImageScaleCaptionGenerateConfig.from_file(config_file) == cfg.replace(max_questions=3)
    with pytest.raises(ConfigError, match="a file path is read only from a config file or --prompts"):
        ImageScaleCaptionGenerateConfig.from_dict({"prompts": "/etc/passwd"})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('questions = "List the objects."', "template 'questions' lacks the placeholder(s) {sentence}"),
        ('yesno = "Is {statement} true?"', "template 'yesno' lacks the placeholder(s) {sentence}"),
        ('caption = "Describe {image}."',
         "template 'caption' has unknown placeholder(s) {image}; it takes none"),
        ('final_caption = "{golden}"', "'final_caption' needs {sections}, or both {objects} and {positions}"),
        ('collect_objects = "{details"', "template 'collect_objects'"),
        ('object_question = "{object!r}"', "placeholder {object} must be a plain name"),
        ('captions = "x"', "unknown template(s) captions; known: system, text_system, caption"),
        ('caption = ""', "template 'caption' must be non-empty text"),
        ('caption = "unterminated', "invalid TOML"),
    ],
)
def test_a_bad_prompts_file_is_one_clear_error_line(tmp_path, capsys, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        load_prompts(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"prompts file {path}")
    images = tmp_path / "in.jsonl"
    images.write_text('{"image": "x.png"}\n')
    rc = main(["caption", str(images), "-o", str(tmp_path / "out.jsonl"), "--prompts", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and message in err and len(err.splitlines()) == 1, err


def test_final_caption_may_take_the_collected_texts_apart():
    validate_prompts({"final_caption": "Context: {golden}\nObjects: {objects}\nPlaces: {positions}"})
    vlm = ScriptedVLM()
    rec = run(vlm, ImageScaleCaptionGenerateConfig(prompts={
        "final_caption": "Basic context:\n{golden}\n\nObjects: {objects}\nPlaces: {positions}"}))
    final = next(p for p in vlm.prompts_of() if p.startswith("Basic context:"))
    assert "Objects: OBJECTS: " in final and "Places: POSITIONS: " in final
    assert rec["final_caption"].startswith("FINAL[")
