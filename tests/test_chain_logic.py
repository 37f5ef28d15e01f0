"""The chain's decisions, on the deterministic scripted VLM (tests/scripted_vlm.py)."""

from __future__ import annotations

import asyncio

import pytest

from scalecap import prompts
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import ConfigError
from scalecap.record import DATAFLOW_FIELDS
from tests.scripted_vlm import BASE_P, ScriptedVLM, solid_image


def run(coro):
    return asyncio.run(coro)


def caption(vlm, colour="red", **cfg):
    chain = ScaleCapChain(vlm, ImageScaleCaptionGenerateConfig(**cfg))
    return run(chain.caption(ChainItem(source=solid_image(colour), ref=f"mem://{colour}")))


def test_unsupported_sentence_is_dropped_by_contrastive_rating():
    rec = caption(ScriptedVLM())
    assert rec["golden_sentences"] == [
        "A red square fills the picture.",
        "The red square has sharp corners.",
    ]
    assert "unicorn" not in " ".join(rec["golden_sentences"])
    # the unicorn sentence: every token as likely with the image as without -> delta 0
    assert rec["sentence_scores"][1] == pytest.approx(0.0)
    assert rec["sentence_scores"][0] == pytest.approx(0.9 - BASE_P)
    assert rec["sentence_scores"][2] == pytest.approx(0.9 - BASE_P)


def test_tau_sentence_moves_the_cut():
    # "corners" alone supports nothing once "red" and "square" are not visible: use a support map
    vlm = ScriptedVLM(caption="A {colour} square. The sharp corners gleam. A unicorn flies.")
    low = caption(vlm, tau_sentence=0.1)
    high = caption(ScriptedVLM(caption=vlm.caption), tau_sentence=0.65)
    # sentence 2's best content token is "corners": 0.5 - 0.2 = 0.3
    assert low["sentence_scores"][1] == pytest.approx(0.3)
    assert "The sharp corners gleam." in low["golden_sentences"]
    assert "The sharp corners gleam." not in high["golden_sentences"]
    assert high["golden_sentences"] == ["A red square."]


def test_function_words_and_punctuation_do_not_count():
    # "the" and "." are made very likely with the image; they must not make a sentence golden
    vlm = ScriptedVLM(caption="The unicorn flies. A {colour} square.", support={"the": 0.99, ".": 0.99})
    rec = caption(vlm)
    assert rec["golden_sentences"] == ["A red square."]


def test_no_golden_sentence_keeps_the_best_and_says_so():
    vlm = ScriptedVLM(caption="A unicorn flies. A dragon sleeps.")
    rec = caption(vlm)
    assert rec["golden_sentences"] == ["A unicorn flies."]
    assert rec["meta"]["golden_fallback"]["kept_index"] == 0


def test_questions_deduplicated_capped_and_twinned():
    reply = "\n".join(
        [
            "Describe more details about the square.",
            "1. Describe more details about the Square.",
            "- Describe more details about a cat.",
            "Describe more details about the position of the cat.",
            "lamp",
            "Here is a long sentence that is not an object name at all",
            "Describe more details about the table.",
        ]
    )
    rec = caption(ScriptedVLM(objects_reply=reply), max_questions=3)
    assert rec["object_questions"] == [
        prompts.OBJECT_QUESTION.format(object="square"),
        prompts.OBJECT_QUESTION.format(object="cat"),
        prompts.OBJECT_QUESTION.format(object="lamp"),
    ]
    assert rec["position_questions"] == [
        "Describe more details about the position of the square.",
        "Describe more details about the position of the cat.",
        "Describe more details about the position of the lamp.",
    ]
    assert len(rec["qa_pairs"]) == 6


def test_questions_come_from_golden_sentences_only():
    vlm = ScriptedVLM()
    caption(vlm)
    (list_prompt,) = [p for p in vlm.prompts_of() if p.startswith("The sentences below")]
    assert "square" in list_prompt and "unicorn" not in list_prompt


def test_answers_share_the_image_and_system_prefix():
    vlm = ScriptedVLM()
    caption(vlm)
    answer_calls = [reqs for kind, reqs in vlm.calls if kind == "generate"
                    and reqs[0].prompt.startswith("Describe more details")]
    assert len(answer_calls) == 1, "all questions of one image go in one engine call"
    reqs = answer_calls[0]
    assert all(r.image is not None for r in reqs)
    assert len({r.system for r in reqs}) == 1
    assert len({id(r.image) for r in reqs}) == 1


def test_second_filter_drops_unsupported_answers():
    # answers say "The X is red." (supported) and "It sits in the centre..." (nothing visible)
    rec = caption(ScriptedVLM(), second_filter=True)
    kept = {p["question"]: p["kept"] for p in rec["qa_pairs"]}
    assert kept["Describe more details about the square."] is True
    assert kept["Describe more details about the position of the square."] is False
    assert all("score" in p for p in rec["qa_pairs"])
    assert rec["qa_answers_filtered"] == [p["answer"] for p in rec["qa_pairs"] if p["kept"]]
    without = caption(ScriptedVLM(), second_filter=False)
    assert all(p["kept"] for p in without["qa_pairs"])
    assert len(without["qa_answers_filtered"]) == len(without["qa_pairs"])


def test_fusion_sees_golden_sentences_and_kept_answers():
    vlm = ScriptedVLM()
    rec = caption(vlm, second_filter=True)
    assert rec["final_caption"] == "FINAL[" + " ".join(rec["golden_sentences"]) + "]"
    objects_prompt = next(p for p in vlm.prompts_of() if p.startswith("Below are answers about individual"))
    assert "The square is red." in objects_prompt
    positions_prompt = [p for p in vlm.prompts_of() if p.startswith("Below are answers about where")]
    assert positions_prompt == [], "every position answer was filtered out, so no position summary"


def test_yesno_mode_keeps_supported_sentences():
    vlm = ScriptedVLM()
    rec = caption(vlm, sentence_filter="yesno")
    assert rec["golden_sentences"] == ["A red square fills the picture.", "The red square has sharp corners."]
    assert rec["sentence_scores"][1] < 0 < rec["sentence_scores"][0]
    assert not [k for k, _ in vlm.calls if k == "score"], "yes/no mode needs no teacher forcing"


def test_record_has_the_dataflow_fields_and_meta():
    rec = caption(ScriptedVLM())
    for name in DATAFLOW_FIELDS:
        assert name in rec
    assert isinstance(rec["init_caption"], str)
    assert isinstance(rec["sentence_scores"], list)
    meta = rec["meta"]
    assert meta["config_hash"] == ImageScaleCaptionGenerateConfig().config_hash()
    assert meta["model"] == "scripted-vlm"
    assert set(meta["stage_seconds"]) >= {"load", "caption", "golden", "questions", "answers", "fusion"}
    assert meta["tokens"]["prompt"] > 0 and meta["tokens"]["completion"] > 0


def test_one_failing_image_does_not_stop_the_others():
    vlm = ScriptedVLM(fail_colour="blue")
    chain = ScaleCapChain(vlm)
    items = [ChainItem(source=solid_image(c), ref=c) for c in ("red", "blue", "green")]
    recs = run(chain.caption_many(items))
    assert "error" in recs[1] and recs[1]["error"]["stage"] == "caption"
    assert "final_caption" not in recs[1]
    assert recs[0]["final_caption"] and recs[2]["final_caption"]


def test_images_in_flight_overlap_up_to_concurrency():
    vlm = ScriptedVLM(delay=0.02)
    chain = ScaleCapChain(vlm, concurrency=8)
    items = [ChainItem(source=solid_image("red"), ref=f"r{i}") for i in range(20)]
    recs = run(chain.caption_many(items))
    assert all("final_caption" in r for r in recs)
    # 8 images in flight; an image has at most 2 calls of its own open (the two fusion summaries)
    assert 8 <= vlm.max_in_flight <= 16
    serial = ScriptedVLM(delay=0.001)
    run(ScaleCapChain(serial, concurrency=1).caption_many(items[:3]))
    assert serial.max_in_flight <= 2


def test_records_come_back_in_input_order():
    chain = ScaleCapChain(ScriptedVLM(delay=0.001), concurrency=4)
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    recs = run(chain.caption_many([ChainItem(source=solid_image(c), ref=c) for c in colours]))
    assert [r["init_caption"].split()[1] for r in recs] == colours


def test_contrastive_mode_needs_a_scoring_backend():
    vlm = ScriptedVLM()
    vlm.supports_scoring = False
    with pytest.raises(ConfigError):
        ScaleCapChain(vlm)
    ScaleCapChain(vlm, ImageScaleCaptionGenerateConfig(sentence_filter="yesno"))


def test_config_defaults_and_hash():
    c = ImageScaleCaptionGenerateConfig()
    assert (c.tau_sentence, c.max_questions, c.max_init_tokens, c.max_answer_tokens, c.second_filter) == (
        0.15, 20, 1024, 256, False)
    assert c.sentence_filter == "contrastive"
    assert c.config_hash() == ImageScaleCaptionGenerateConfig().config_hash()
    assert c.config_hash() != c.replace(tau_sentence=0.2).config_hash()
    assert c.config_hash() == c.replace(llm_base_url="http://x", llm_api_key="k").config_hash()
    with pytest.raises(ConfigError):
        ImageScaleCaptionGenerateConfig(sentence_filter="maybe")
    with pytest.raises(ConfigError):
        ImageScaleCaptionGenerateConfig.from_dict({"tau": 1})
