"""`preset = "authors"`: the authors' rule as their code runs, on hand-computed logits.

The scripted VLM (tests/scripted_vlm.py) returns raw logits = log p + an offset per position
without the image (the normaliser, log Z). Two words are set so that the raw logit difference
and the log ratio disagree, in both directions:

| word  | p with | p without | log ratio | log Z without | logit with | logit without | logit diff |
|-------|--------|-----------|-----------|---------------|------------|---------------|------------|
| kite  | 0.2e^-0.28 | 0.2   | -0.28     | -0.68         | -1.8894    | -2.2894       | +0.40      |
| bench | 0.2e^0.61  | 0.2   | +0.61     | +0.81         | -0.9994    | -0.7994       | -0.20      |
| on    | 0.5    | 0.2       | +0.92     | 0             | -0.6931    | -1.6094       | +0.92      |

(logit = ln p + log Z; ln 0.2 = -1.6094). The authors keep a clause whose largest difference
over all its tokens is above 0; the default keeps one whose largest log ratio over its content
words is above 0. "on" is a function word: it counts only when every token does.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import PRESETS, ImageScaleCaptionGenerateConfig
from scalecap.images.load import ImageLimits
from tests.scripted_vlm import BASE_P, ScriptedVLM, solid_image

CAPTION = (
    "The red square glows, a kite hangs above, a bench waits nearby. "
    "The cup sits on the table. A unicorn flies."
)
SUPPORT = {"kite": BASE_P * math.exp(-0.28), "bench": BASE_P * math.exp(0.61), "on": 0.5}
SHIFTS = {"kite": -0.68, "bench": 0.81}


def vlm(logits: bool, one_pass: bool, **kw) -> ScriptedVLM:
    return ScriptedVLM(
        caption=CAPTION,
        support=dict(SUPPORT),
        logit_shifts=dict(SHIFTS) if logits else {},
        score_values="logits" if logits else "logprobs",
        supports_generation_logprobs=one_pass,
        **kw,
    )


def caption(model: ScriptedVLM, config: ImageScaleCaptionGenerateConfig) -> dict:
    chain = ScaleCapChain(model, config)
    return asyncio.run(chain.caption(ChainItem(source=solid_image("red"), ref="mem://red")))


def test_the_scripted_logits_are_the_hand_computed_ones():
    model = vlm(True, False)
    img = solid_image("red")
    for word, with_image, without in (
        ("kite", -1.8894, -2.2894), ("bench", -0.9994, -0.7994), ("on", -0.6931, -1.6094)
    ):
        assert model._value(word, img) == pytest.approx(with_image, abs=1e-4)
        assert model._value(word, None) == pytest.approx(without, abs=1e-4)


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_preset_authors_keeps_the_units_the_authors_rule_keeps(one_pass):
    rec = caption(vlm(True, one_pass), ImageScaleCaptionGenerateConfig(preset="authors"))
    # kite: logit diff +0.40 > 0 kept (its log ratio -0.28 would drop it); bench: -0.20, pruned
    # (its log ratio +0.61 would keep it); "on" +0.92 keeps the cup sentence; the unicorn scores 0.
    assert rec["golden_sentences"] == [
        "The red square glows, a kite hangs above.", "The cup sits on the table."]
    assert rec["clause_scores"][0] == pytest.approx([math.log(4.5), 0.40, 0.0], abs=1e-6)
    assert rec["sentence_scores"] == pytest.approx([math.log(4.5), math.log(2.5), 0.0], abs=1e-6)
    assert rec["meta"]["preset"] == "authors"
    assert rec["meta"]["rule"] == {
        "sentence_filter": "contrastive", "score_mode": "logit_diff", "token_filter": "all",
        "filter_unit": "clause", "threshold": 0.0,
    }
    assert rec["meta"]["scoring_passes"] == (1 if one_pass else 2)


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_the_default_rule_keeps_the_other_units_on_the_same_probabilities(one_pass):
    rec = caption(vlm(False, one_pass), ImageScaleCaptionGenerateConfig())
    assert rec["golden_sentences"] == ["The red square glows, a bench waits nearby."]
    assert rec["clause_scores"][0] == pytest.approx([math.log(4.5), 0.0, 0.61], abs=1e-6)
    assert rec["meta"]["preset"] is None
    assert rec["meta"]["rule"]["score_mode"] == "log_ratio"
    assert rec["meta"]["rule"]["token_filter"] == "content"


def test_each_piece_of_the_preset_is_its_own_option():
    # logit_diff on content words only: the kite still passes (+0.40), the cup sentence does not
    cfg = ImageScaleCaptionGenerateConfig(preset="authors", token_filter="content")
    assert cfg.score_mode == "logit_diff" and cfg.token_filter == "content"
    rec = caption(vlm(True, False), cfg)
    assert rec["golden_sentences"] == ["The red square glows, a kite hangs above."]
    # every token counted under log_ratio: "on" keeps the cup sentence, the bench its clause
    rec = caption(vlm(False, False), ImageScaleCaptionGenerateConfig(token_filter="all"))
    assert rec["golden_sentences"] == [
        "The red square glows, a bench waits nearby.", "The cup sits on the table."]


def test_preset_sets_every_piece_and_survives_a_round_trip():
    cfg = ImageScaleCaptionGenerateConfig(preset="authors")
    for name, value in PRESETS["authors"].items():
        assert getattr(cfg, name) == value, name
    assert cfg.max_questions is None and cfg.repetition_penalty == 1.05 and cfg.max_pixels == 40_000_000
    # what a worker receives is every field, explicit: an override back to a default stays
    mixed = ImageScaleCaptionGenerateConfig(preset="authors", token_filter="content", max_questions=20)
    again = ImageScaleCaptionGenerateConfig.from_dict(mixed.to_dict())
    assert again == mixed and again.token_filter == "content" and again.max_questions == 20
    assert again.config_hash() == mixed.config_hash() != cfg.config_hash()
    assert ImageScaleCaptionGenerateConfig.from_dict({"preset": "authors"}) == cfg
    assert cfg.config_hash() != ImageScaleCaptionGenerateConfig().config_hash()


def test_preset_uncaps_questions_penalises_text_calls_and_keeps_the_image_size():
    objects = "\n".join(f"Describe more details about the thing{i}." for i in range(30))
    model = vlm(True, False, objects_reply=objects)
    chain = ScaleCapChain(model, ImageScaleCaptionGenerateConfig(preset="authors"))
    rec = asyncio.run(chain.caption(ChainItem(source=solid_image("red"), ref="mem://red")))
    assert len(rec["object_questions"]) == 30, "no cap on object questions"
    requests = [r for kind, reqs in model.calls if kind == "generate" for r in reqs]
    text_only = [r for r in requests if r.image is None]
    with_image = [r for r in requests if r.image is not None]
    assert text_only and with_image
    assert {r.repetition_penalty for r in text_only} == {1.05}
    assert {r.repetition_penalty for r in with_image} == {1.0}
    assert chain.image_limits.max_pixels == 40_000_000 == ImageLimits().max_decode_pixels
    default = asyncio.run(ScaleCapChain(vlm(False, False, objects_reply=objects)).caption(
        ChainItem(source=solid_image("red"), ref="mem://red")))
    assert len(default["object_questions"]) == 20


def test_unknown_preset_is_a_config_error():
    from scalecap.errors import ConfigError

    with pytest.raises(ConfigError, match="preset must be one of authors"):
        ImageScaleCaptionGenerateConfig(preset="paper")
