"""The chain's decisions, on the deterministic scripted VLM (tests/scripted_vlm.py)."""

from __future__ import annotations

import asyncio
import math

import pytest

from scalecap import prompts
from scalecap.chain import ChainItem, ScaleCapChain
from scalecap.config import ImageScaleCaptionGenerateConfig
from scalecap.errors import ConfigError
from scalecap.record import DATAFLOW_FIELDS
from tests.scripted_vlm import BASE_P, COLLECT_MARK, EXTRACT_MARK, ScriptedVLM, solid_image


def run(coro):
    return asyncio.run(coro)


def caption(vlm, colour="red", **cfg):
    chain = ScaleCapChain(vlm, ImageScaleCaptionGenerateConfig(**cfg))
    return run(chain.caption(ChainItem(source=solid_image(colour), ref=f"mem://{colour}")))


def generate_prompts(vlm, needle):
    return [r for kind, reqs in vlm.calls if kind == "generate" for r in reqs if needle in r.prompt]


def score_requests(vlm):
    return [reqs for kind, reqs in vlm.calls if kind == "score"]


# --- golden sentences -------------------------------------------------------------------------


def test_unsupported_sentence_is_dropped_by_contrastive_rating():
    rec = caption(ScriptedVLM())
    assert rec["golden_sentences"] == [
        "A red square fills the picture.",
        "The red square has sharp corners.",
    ]
    # the unicorn sentence: every token as likely with the image as without -> log ratio 0
    assert rec["sentence_scores"][1] == pytest.approx(0.0)
    assert rec["sentence_scores"][0] == pytest.approx(math.log(0.9 / BASE_P), abs=1e-6)
    assert rec["meta"]["score_mode"] == "log_ratio" and rec["meta"]["threshold"] == 0.0


def test_tau_sentence_moves_the_cut():
    vlm = ScriptedVLM(caption="A {colour} square. The sharp corners gleam. A unicorn flies.")
    low = caption(vlm, tau_sentence=0.5)
    high = caption(ScriptedVLM(caption=vlm.caption), tau_sentence=1.0)
    # sentence 2's best content token is "corners": log(0.5 / 0.2) = 0.916
    assert low["sentence_scores"][1] == pytest.approx(math.log(0.5 / BASE_P), abs=1e-6)
    assert "The sharp corners gleam." in low["golden_sentences"]
    assert high["golden_sentences"] == ["A red square."]


def test_function_words_and_punctuation_do_not_count():
    # "the" and "." are made very likely with the image; they must not make a sentence golden
    vlm = ScriptedVLM(caption="The unicorn flies. A {colour} square.", support={"the": 0.99, ".": 0.99})
    rec = caption(vlm)
    assert rec["golden_sentences"] == ["A red square."]


# The same caption and the same token distributions, rated under each score mode. Without the
# image every word has p = 0.2 except "kite" (a rare word: 0.01); with the image "red" is 0.9,
# "kite" 0.10 and "bench" 0.3. Raw logits without the image sit 1.0 higher (another normaliser).
MODES_CAPTION = "The {colour} square glows. A kite hangs above. A bench waits nearby. A unicorn flies."


def modes_vlm(**kw):
    return ScriptedVLM(caption=MODES_CAPTION, support={"kite": 0.10, "bench": 0.3}, prior={"kite": 0.01},
                       logit_shift=1.0, **kw)


def test_each_score_mode_keeps_its_own_units_on_the_same_distributions():
    s1, s2, s3, _ = ("The red square glows.", "A kite hangs above.", "A bench waits nearby.", "")
    prob = caption(modes_vlm(), score_mode="prob_diff", filter_unit="sentence")
    # 0.9-0.2 = 0.7 passes 0.15; the rare grounded kite scores only 0.10-0.01 = 0.09
    assert prob["golden_sentences"] == [s1]
    assert prob["sentence_scores"][:3] == pytest.approx([0.7, 0.09, 0.1])
    ratio = caption(modes_vlm(), score_mode="log_ratio", filter_unit="sentence")
    # every word more likely with the image passes 0: kite log(10) = 2.30, bench log(1.5) = 0.41
    assert ratio["golden_sentences"] == [s1, s2, s3]
    assert ratio["sentence_scores"] == pytest.approx(
        [math.log(4.5), math.log(10), math.log(1.5), 0.0], abs=1e-6)
    logits = caption(modes_vlm(score_values="logits"), score_mode="logit_diff", filter_unit="sentence")
    # raw logit differences = log ratio - 1.0 (the normaliser): the bench (0.41 - 1) drops out
    assert logits["golden_sentences"] == [s1, s2]
    assert logits["sentence_scores"] == pytest.approx(
        [math.log(4.5) - 1, math.log(10) - 1, math.log(1.5) - 1, -1.0], abs=1e-6)


def test_clause_unit_prunes_unsupported_clauses_inside_a_sentence():
    vlm_caption = "A {colour} square, a unicorn on a rainbow, and sharp corners. A dragon sleeps."
    clause = caption(ScriptedVLM(caption=vlm_caption))
    assert clause["meta"]["filter_unit"] == "clause"
    assert clause["golden_sentences"] == ["A red square, and sharp corners."]
    assert clause["clause_scores"][0] == pytest.approx([math.log(4.5), 0.0, math.log(2.5)], abs=1e-6)
    assert clause["sentence_scores"][0] == pytest.approx(math.log(4.5), abs=1e-6)
    sentence = caption(ScriptedVLM(caption=vlm_caption), filter_unit="sentence")
    assert sentence["golden_sentences"] == ["A red square, a unicorn on a rainbow, and sharp corners."]
    assert "clause_scores" not in sentence


def test_no_golden_sentence_falls_back_as_configured():
    text = "A unicorn flies. A dragon sleeps."
    whole = caption(ScriptedVLM(caption=text))
    assert whole["golden_sentences"] == [text]  # the authors' rule: the whole caption
    assert whole["meta"]["golden_fallback"]["kept"] == "caption"
    best = caption(ScriptedVLM(caption=text), golden_fallback="best")
    assert best["golden_sentences"] == ["A unicorn flies."]
    assert best["meta"]["golden_fallback"]["kept_index"] == 0
    vlm = ScriptedVLM(caption=text)
    err = caption(vlm, golden_fallback="error")
    assert err["error"]["stage"] == "golden" and "final_caption" not in err
    assert not generate_prompts(vlm, "Basic context"), "no fusion after a failed stage"


@pytest.mark.parametrize("text", ["", "   ", "...", "**"])
def test_empty_caption_is_an_error_record_and_nothing_is_invented(text):
    vlm = ScriptedVLM(caption=text)
    rec = caption(vlm)
    assert rec["error"]["stage"] == "caption" and rec["error"]["type"] == "UnusableText"
    assert "final_caption" not in rec
    assert [kind for kind, _ in vlm.calls] == ["generate"], "only the caption call ran"


def test_truncated_caption_loses_its_cut_sentence_before_scoring():
    vlm = ScriptedVLM(caption="A {colour} square fills the picture. The {colour} square has sharp corners.")
    rec = caption(vlm, max_init_tokens=9)  # the scripted model's tokens are words
    assert rec["init_caption"] == "A red square fills the picture. The red square"
    assert rec["sentences"] == ["A red square fills the picture."]
    assert rec["meta"]["truncated"] == ["caption"]
    (reqs,) = score_requests(vlm)
    assert all(r.continuation == rec["init_caption"] for r in reqs)
    # a cut caption with no complete sentence is rated as it is, and says so
    only = caption(ScriptedVLM(), max_init_tokens=3)
    assert only["sentences"] == ["A red square"] and only["meta"]["unterminated_caption_rated"] is True
    full = caption(ScriptedVLM())
    assert full["meta"]["truncated"] == []


def test_markdown_caption_is_rated_sentence_by_sentence():
    text = '## Scene\n- A {colour} square reads "STOP." A unicorn flies.\n**Details:**\n1. Sharp corners.'
    rec = caption(ScriptedVLM(caption=text))
    assert rec["sentences"] == ['A red square reads "STOP."', "A unicorn flies.", "Sharp corners."]
    assert rec["golden_sentences"] == ['A red square reads "STOP."', "Sharp corners."]


# --- questions --------------------------------------------------------------------------------


def test_questions_refuse_chat_merge_plurals_and_cap():
    reply = "\n".join(
        [
            "Sure, here is the list.",
            "Describe more details about the square.",
            "1. Describe more details about the Squares.",
            "- Describe more details about a cat.",
            "Describe more details about the position of the cats.",
            "Note: skip the sky",
            "lamp",
            "- lamp",
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


def test_truncated_object_list_is_not_parsed_past_the_cut():
    from scalecap.stages.questions import parse_objects

    text = "Describe more details about the cat.\nDescribe more details about the red ca"
    assert parse_objects(text, truncated=True) == ["cat"]
    assert parse_objects(text, truncated=False) == ["cat", "red ca"]
    # through the chain: the scripted model cuts the list at the word limit
    reply = "Describe more details about the square.\nDescribe more details about the lamp post."
    rec = caption(ScriptedVLM(objects_reply=reply), max_question_tokens=8)
    assert rec["object_questions"] == [prompts.OBJECT_QUESTION.format(object="square")]
    assert "questions" in rec["meta"]["truncated"]


def test_each_golden_sentence_gets_its_own_text_only_instruction_call():
    vlm = ScriptedVLM()
    rec = caption(vlm)
    calls = [reqs for kind, reqs in vlm.calls if kind == "generate"
             and reqs[0].prompt.startswith(prompts.SENTENCE_TO_INSTRUCTIONS[:30])]
    assert len(calls) == 1, "all of an image's sentences go to the engine together"
    (reqs,) = calls
    assert [r.prompt.rsplit("Sentence:\n", 1)[1].split("\n")[0] for r in reqs] == rec["golden_sentences"]
    assert all(r.image is None and r.system == prompts.TEXT_SYSTEM for r in reqs)
    assert "unicorn" not in " ".join(r.prompt.rsplit("Sentence:", 1)[1] for r in reqs)


def test_text_calls_get_the_text_system_prompt_and_image_calls_the_image_one():
    vlm = ScriptedVLM()
    caption(vlm, text_system_prompt="TEXT ONLY.")
    for kind, reqs in vlm.calls:
        for r in reqs:
            if kind == "generate" and r.image is None:
                assert r.system == "TEXT ONLY.", r.prompt[:40]
            else:
                assert r.system == prompts.DEFAULT_SYSTEM, r.prompt[:40]


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


# --- second filter ----------------------------------------------------------------------------

HALLUCINATING = {"square": "The square is {colour}. A unicorn hides behind it."}


def test_second_filter_keeps_supported_sentences_of_each_answer_given_its_question():
    vlm = ScriptedVLM(answers=HALLUCINATING)
    rec = caption(vlm, second_filter=True, max_questions=1)
    pairs = {p["question"]: p for p in rec["qa_pairs"]}
    square = pairs["Describe more details about the square."]
    assert square["kept"] is True and square["kept_text"] == "The square is red."
    assert square["answer"] == "The square is red. A unicorn hides behind it."
    assert rec["qa_answers_filtered"][0] == "The square is red."
    # the answers were scored under their own questions, with and without the image
    second = score_requests(vlm)[1]
    assert {r.prompt for r in second} == {p["question"] for p in rec["qa_pairs"]}
    # "It sits in the centre of the frame." has no supported sentence: kept whole by default
    position = pairs["Describe more details about the position of the square."]
    assert position["kept"] is True and rec["meta"]["answer_fallback"]["kept_whole"] == 1
    objects_prompt = generate_prompts(vlm, COLLECT_MARK)[0].prompt
    assert "unicorn" not in objects_prompt and "The square is red." in objects_prompt


def test_second_filter_can_drop_answers_without_a_supported_sentence():
    vlm = ScriptedVLM(answers=HALLUCINATING)
    rec = caption(vlm, second_filter=True, answer_fallback="drop")
    kept = {p["question"]: p["kept"] for p in rec["qa_pairs"]}
    assert kept["Describe more details about the square."] is True
    assert kept["Describe more details about the position of the square."] is False
    assert rec["qa_answers_filtered"] == [p["kept_text"] for p in rec["qa_pairs"] if p["kept"]]
    # no position survived: no extraction call, and no empty section or "(none)" in the final prompt
    assert generate_prompts(vlm, EXTRACT_MARK) == []
    (final,) = generate_prompts(vlm, "Basic context:")
    assert "Position details" not in final.prompt and "(none)" not in final.prompt
    without = caption(ScriptedVLM(), second_filter=False)
    assert all(p["kept"] for p in without["qa_pairs"]) and "kept_text" not in without["qa_pairs"][0]
    assert len(without["qa_answers_filtered"]) == len(without["qa_pairs"])


# --- fusion -----------------------------------------------------------------------------------


def test_fusion_groups_answers_under_their_golden_sentence():
    vlm = ScriptedVLM()
    rec = caption(vlm)
    assert rec["final_caption"] == "FINAL[" + " ".join(rec["golden_sentences"]) + "]"
    (collect,) = generate_prompts(vlm, COLLECT_MARK)
    assert (
        "Sentence: A red square fills the picture.\nDetails about the square: The square is red.\n\n"
        "Sentence: The red square has sharp corners.\nDetails about the corners: The corners is red."
    ) in collect.prompt
    (extract,) = generate_prompts(vlm, EXTRACT_MARK)
    assert "Position of the square: It sits in the centre of the frame." in extract.prompt
    for r in [collect, extract, *generate_prompts(vlm, "Basic context:")]:
        assert r.fit_context and r.image is None and r.max_tokens == 4096
        assert "(none)" not in r.prompt


def test_fusion_never_runs_without_details():
    vlm = ScriptedVLM(objects_reply="Sure, nothing to list here.")
    rec = caption(vlm)
    assert rec["object_questions"] == []
    assert rec["final_caption"] == " ".join(rec["golden_sentences"])
    assert rec["meta"]["fusion"].startswith("skipped")
    assert not generate_prompts(vlm, "Descriptions:") and not generate_prompts(vlm, "Basic context:")


def test_a_failing_call_cancels_the_images_other_requests():
    vlm = ScriptedVLM(fail_prompt=COLLECT_MARK, slow_prompt=EXTRACT_MARK, slow_seconds=30)
    rec = caption(vlm)
    assert rec["error"]["stage"] == "fusion"
    assert vlm.cancelled == 1, "the position extraction still in flight was cancelled"


# --- one scoring pass -------------------------------------------------------------------------


def test_one_pass_scores_only_without_the_image_and_equals_two_passes():
    one = ScriptedVLM(supports_generation_logprobs=True, answers=HALLUCINATING)
    rec1 = caption(one, second_filter=True)
    two = ScriptedVLM(supports_generation_logprobs=True, answers=HALLUCINATING)
    rec2 = caption(two, second_filter=True, one_pass_scoring=False)
    assert rec1["meta"]["scoring_passes"] == 1 and rec2["meta"]["scoring_passes"] == 2
    golden1, second1 = score_requests(one)
    assert len(golden1) == 1 and golden1[0].image is None and golden1[0].continuation_ids
    assert all(r.image is None and r.continuation_ids for r in second1)
    golden2, second2 = score_requests(two)
    assert len(golden2) == 2 and len(second2) == 2 * len(second1)
    for key in ("sentence_scores", "golden_sentences", "qa_answers_filtered", "final_caption"):
        assert rec1[key] == rec2[key], key
    assert [p.get("score") for p in rec1["qa_pairs"]] == [p.get("score") for p in rec2["qa_pairs"]]


def test_sampling_and_backends_without_generation_logprobs_score_twice():
    sampled = ScriptedVLM(supports_generation_logprobs=True)
    assert caption(sampled, temperature=0.7)["meta"]["scoring_passes"] == 2
    assert len(score_requests(sampled)[0]) == 2
    plain = ScriptedVLM()
    assert caption(plain)["meta"]["scoring_passes"] == 2
    generate_reqs = [r for kind, reqs in plain.calls if kind == "generate" for r in reqs]
    assert generate_reqs[0].token_scores is False


# --- modes, records, isolation ---------------------------------------------------------------


def test_yesno_mode_keeps_supported_sentences():
    vlm = ScriptedVLM()
    rec = caption(vlm, sentence_filter="yesno")
    assert rec["golden_sentences"] == ["A red square fills the picture.", "The red square has sharp corners."]
    assert rec["sentence_scores"][1] < 0 < rec["sentence_scores"][0]
    assert not [k for k, _ in vlm.calls if k == "score"], "yes/no mode needs no teacher forcing"
    assert rec["meta"]["truncated"] == [], "a one-token verdict is not a truncated generation"


def test_score_mode_must_match_what_the_backend_returns():
    with pytest.raises(ConfigError, match="raw_logits"):
        ScaleCapChain(ScriptedVLM(), ImageScaleCaptionGenerateConfig(score_mode="logit_diff"))
    with pytest.raises(ConfigError, match="logit_diff"):
        ScaleCapChain(ScriptedVLM(score_values="logits"), ImageScaleCaptionGenerateConfig())
    yesno = ImageScaleCaptionGenerateConfig(sentence_filter="yesno")
    ScaleCapChain(ScriptedVLM(), yesno)
    ScaleCapChain(ScriptedVLM(score_values="logits"), yesno)  # yes/no works on raw logits too


def test_yesno_on_a_raw_logits_engine_keeps_what_it_keeps_on_logprobs():
    plain = caption(ScriptedVLM(), sentence_filter="yesno")
    logits = caption(ScriptedVLM(score_values="logits", logit_shift=3.0), sentence_filter="yesno")
    assert logits["golden_sentences"] == plain["golden_sentences"]
    # logits 0.8 vs 0.1 at one position: tanh(ln(8) / 2) = 0.777..., not P(yes) - P(no) = 0.7
    assert logits["sentence_scores"][0] == pytest.approx(math.tanh(math.log(8) / 2), abs=1e-6)
    assert logits["sentence_scores"][1] == pytest.approx(-math.tanh(math.log(8) / 2), abs=1e-6)
    assert logits["meta"]["rule"] == {"sentence_filter": "yesno", "threshold": 0.0}


def test_record_has_the_dataflow_fields_and_meta():
    rec = caption(ScriptedVLM())
    for name in DATAFLOW_FIELDS:
        assert name in rec
    assert isinstance(rec["init_caption"], str) and isinstance(rec["final_caption"], str)
    for name in ("golden_sentences", "object_questions", "position_questions", "qa_answers_filtered"):
        assert all(isinstance(x, str) for x in rec[name]), name
    assert all(isinstance(x, float) for x in rec["sentence_scores"])
    meta = rec["meta"]
    assert meta["config_hash"] == ImageScaleCaptionGenerateConfig().config_hash()
    assert meta["model"] == "scripted-vlm"
    assert set(meta["stage_seconds"]) >= {"load", "caption", "golden", "questions", "answers", "fusion"}
    assert meta["tokens"]["prompt"] > 0 and meta["tokens"]["completion"] > 0
    assert meta["truncated"] == []


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
    assert (c.score_mode, c.filter_unit, c.sentence_threshold, c.golden_fallback) == (
        "log_ratio", "clause", 0.0, "caption")
    assert (c.max_questions, c.max_init_tokens, c.max_answer_tokens) == (20, 1024, 512)
    assert c.second_filter is False
    assert (c.max_object_summary_tokens, c.max_position_summary_tokens, c.max_final_tokens) == (4096,) * 3
    assert c.answer_fallback == "keep_all" and c.one_pass_scoring is True
    assert c.replace(score_mode="prob_diff").sentence_threshold == 0.15
    assert c.replace(tau_sentence=0.3).answer_threshold == 0.3
    assert c.sentence_filter == "contrastive"
    assert c.config_hash() == ImageScaleCaptionGenerateConfig().config_hash()
    assert c.config_hash() != c.replace(tau_sentence=0.2).config_hash()
    assert c.config_hash() == c.replace(llm_base_url="http://x", llm_api_key="k").config_hash()
    for bad in ({"sentence_filter": "maybe"}, {"score_mode": "vibes"}, {"filter_unit": "word"},
                {"answer_fallback": "keep"}, {"score_mode": "prob_diff", "tau_sentence": 2.0},
                {"tau_sentence": float("nan")}):
        with pytest.raises(ConfigError):
            ImageScaleCaptionGenerateConfig(**bad)
    ImageScaleCaptionGenerateConfig(score_mode="log_ratio", tau_sentence=2.0)  # nats: no [-1, 1] bound
    with pytest.raises(ConfigError):
        ImageScaleCaptionGenerateConfig.from_dict({"tau": 1})
