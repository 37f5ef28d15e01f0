"""The viewer's pure parts: session cookies and CSRF tokens, and what the pages compute from
records and batch status (no servers; the browser tests cover the pages themselves)."""

from __future__ import annotations

import pytest

from producer.api.session import SessionSigner, same_origin
from producer.api.web_views import error_types, progress, record_view, thresholds, throughput

# -- sessions -----------------------------------------------------------------------------------


def test_session_round_trip_and_tampering():
    signer = SessionSigner("s3cret", max_age=60)
    cookie = signer.issue("abcdef0123456789", now=1000.0)
    s = signer.read(cookie, now=1001.0)
    assert s is not None and s.key_id == "abcdef0123456789"
    assert "abcdef" not in signer.csrf_token(s)

    body, sig = cookie.split(".")
    forged_body = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    assert signer.read(forged_body + "." + sig, now=1001.0) is None
    assert signer.read(cookie + "x", now=1001.0) is None
    assert signer.read("", now=1001.0) is None and signer.read("a.b.c", now=1001.0) is None
    assert signer.read(cookie, now=1000.0 + 61) is None, "expired"
    assert SessionSigner("other").read(cookie, now=1001.0) is None, "another secret"


def test_csrf_token_is_per_session_and_checked_exactly():
    signer = SessionSigner("s3cret")
    a = signer.read(signer.issue("k1"))
    b = signer.read(signer.issue("k1"))
    assert a and b and a.nonce != b.nonce
    assert signer.check_csrf(a, signer.csrf_token(a))
    assert not signer.check_csrf(a, signer.csrf_token(b))
    assert not signer.check_csrf(a, "") and not signer.check_csrf(a, None)


def test_random_secret_when_unset_and_fingerprints_differ_per_secret():
    one, two = SessionSigner(None), SessionSigner("")
    assert two.read(one.issue("k")) is None
    assert one.fingerprint("sk_x") != two.fingerprint("sk_x")
    assert one.fingerprint("sk_x") != one.fingerprint("sk_y")


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({}, True),
        ({"origin": "http://127.0.0.1:8000"}, True),
        ({"origin": "http://evil.example"}, False),
        ({"origin": "null"}, False),
        ({"sec-fetch-site": "cross-site"}, False),
        ({"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8000"}, True),
    ],
)
def test_same_origin(headers, ok):
    assert same_origin(headers, "127.0.0.1:8000") is ok


# -- batch numbers ------------------------------------------------------------------------------


def test_progress_widths_add_up_and_throughput_from_timestamps():
    st = {"batch_id": "b", "state": "running", "total": 8, "queued": 2, "running": 1, "done": 4,
          "failed": 1, "cancelled": 0, "dead_lettered": 0, "started_at": 100.0, "finished_at": None}
    p = progress(st)
    assert p["finished"] == 5 and p["percent"] == 62.5 and p["live"] is True
    assert sum(p["widths"].values()) == pytest.approx(100.0)
    assert throughput(st, now=110.0) == pytest.approx(0.5)
    done = {**st, "state": "finished", "queued": 0, "running": 0, "done": 7, "finished_at": 104.0}
    assert progress(done)["live"] is False
    assert throughput(done) == pytest.approx(2.0)
    assert throughput({**st, "started_at": None}) is None
    assert progress({"batch_id": "e", "state": "finished", "total": 0})["percent"] == 100.0


def test_error_types_grouped():
    failed = [{"error": {"stage": "load", "type": "NotAnImage"}}, {"error": {"stage": "load",
              "type": "NotAnImage"}}, {"error": None}]
    assert error_types(failed) == [("load", "NotAnImage", 2), ("?", "Unknown", 1)]


# -- one record ---------------------------------------------------------------------------------

RECORD = {
    "init_caption": "A red square. A unicorn flies. A red square.",
    "sentences": ["A red square.", "A unicorn flies.", "A red square."],
    "sentence_scores": [0.7, 0.0, 0.1],
    "golden_sentences": ["A red square."],
    "object_questions": ["Describe the square."],
    "position_questions": ["Where is the square?"],
    "qa_pairs": [
        {"question": "Describe the square.", "answer": "It is red.", "kept": True, "score": 0.7},
        {"question": "Where is the square?", "answer": "Centre.", "kept": False, "score": -0.1},
    ],
    "final_caption": "FINAL",
    "meta": {"stage_seconds": {"caption": 0.5, "golden": 0.25}, "tokens": {"prompt": 10, "completion": 4},
             "config_hash": "abc", "model": "m", "sentence_filter": "contrastive", "job_id": "j"},
}


def test_record_view_splits_golden_and_dropped_by_position():
    v = record_view(RECORD, {"tau_sentence": 0.15, "second_filter": True, "tau_answer": 0.05})
    # the repeated sentence counts once as golden (its first copy), once as dropped
    assert [(s.text, s.score) for s in v.golden] == [("A red square.", 0.7)]
    assert [(s.text, s.score) for s in v.dropped] == [("A unicorn flies.", 0.0), ("A red square.", 0.1)]
    assert (v.sentence_threshold, v.answer_threshold, v.sentence_mode) == (0.15, 0.05, "contrastive")
    assert [(q.kind, q.kept) for q in v.qa] == [("object", True), ("position", False)]
    assert v.stages[0] == ("caption", 0.5, 100.0) and v.stages[1][2] == 50.0
    assert v.total_seconds == 0.75 and v.tokens == {"completion": 4, "prompt": 10}
    assert "stage_seconds" not in v.extra_meta and "job_id" not in v.extra_meta
    assert v.golden[0].gauge == 85.0 and v.scale == 1.0  # prob_diff-like scores: a [-1, 1] gauge


def test_thresholds_prefer_the_record_then_the_mode_then_the_config():
    yesno = {"meta": {"sentence_filter": "yesno"}}
    assert thresholds(yesno, {"tau_sentence": 0.3}) == ("yesno", 0.0, 0.0)
    fb = {"meta": {"golden_fallback": {"threshold": 0.4, "kept_index": 1}}}
    assert thresholds(fb, {"tau_sentence": 0.3})[1] == 0.4
    assert thresholds({"meta": {"threshold": 0.2}}, {"tau_sentence": 0.3})[1:] == (0.2, 0.2)
    assert thresholds({}, {"tau_sentence": 0.3, "tau_answer": 0.1})[1:] == (0.3, 0.1)
    assert thresholds({}, {}) == ("contrastive", None, None)


def test_log_ratio_clause_record_with_pruned_sentence_and_fallbacks():
    """Clause mode: a golden sentence may be a pruned copy of its sentence; log-ratio scores are
    nats, so the gauge scales to the record's largest score; -10000 means 'no content word'."""
    rec = {
        "sentences": ["A red square, with a unicorn.", "A rainbow.", "Hm."],
        "sentence_scores": [2.5, -0.7, -10000.0],
        "clause_scores": [[2.5, -1.2], [-0.7], [-10000.0]],
        "golden_sentences": ["A red square."],
        "qa_pairs": [{"question": "q", "answer": "It is red. It flies.", "kept": True, "score": 1.0,
                      "kept_text": "It is red."}],
        "meta": {"sentence_filter": "contrastive", "score_mode": "log_ratio", "filter_unit": "clause",
                 "threshold": 0.0, "scoring_passes": 1},
    }
    v = record_view(rec, {})
    assert [(s.text, s.pruned) for s in v.golden] == [("A red square, with a unicorn.", "A red square.")]
    assert [s.text for s in v.dropped] == ["A rainbow.", "Hm."] and v.dropped[1].score is None
    assert v.golden[0].unit_scores == [2.5, -1.2] and v.dropped[0].unit_scores == []
    assert (v.score_mode, v.filter_unit, v.scale, v.threshold_gauge) == ("log_ratio", "clause", 2.5, 50.0)
    assert v.golden[0].gauge == 100.0 and v.dropped[0].gauge == 36.0
    assert v.qa[0].kept_text == "It is red." and v.mode_details == {"scoring passes": 1}
    assert not v.qa[0].fallback
    kept_whole = {"kept_whole": 1, "threshold": 0}
    whole_answer = record_view({**rec, "qa_pairs": [{"question": "q", "answer": "It flies.", "kept": True,
                                                     "score": -0.5}],
                                "meta": {**rec["meta"], "answer_fallback": kept_whole}})
    assert whole_answer.qa[0].fallback and "kept whole" in whole_answer.answer_fallback
    assert "answer_fallback" not in whole_answer.extra_meta
    whole = record_view({**rec, "golden_sentences": ["A red square, with a unicorn. A rainbow. Hm."],
                         "sentence_scores": [-1.0, -0.7, -2.0],
                         "meta": {**rec["meta"], "golden_fallback": {"reason": "no sentence passed the "
                                  "threshold", "threshold": 0.0, "kept": "caption"}}})
    assert whole.golden == [] and len(whole.dropped) == 3 and "whole caption" in whole.fallback


def test_error_and_old_records_do_not_break_the_view():
    v = record_view({"error": {"stage": "load", "type": "NotAnImage", "message": "x"}, "meta": {}})
    assert v.error["type"] == "NotAnImage" and v.golden == [] and v.stages == []
    old = record_view({"golden_sentences": ["Only this."], "sentence_scores": ["bad"], "qa_pairs": [None]})
    assert [s.text for s in old.golden] == ["Only this."] and old.qa == []
    dicts = record_view({"sentences": ["a", "b"], "sentence_scores": [{"score": 0.2, "kept": False},
                        {"score": 0.9, "kept": True}], "golden_sentences": ["b"]})
    assert [s.text for s in dicts.golden] == ["b"] and dicts.dropped[0].score == 0.2
