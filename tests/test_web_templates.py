"""The viewer's templates rendered with the branches the browser tests do not reach cheaply:
dead letters, error records, images without a record, fallbacks, hostile text (escaped)."""

from __future__ import annotations

from types import SimpleNamespace

from producer.api.web import _safe_next, templates
from producer.api.web_views import SEGMENTS, error_types, progress, record_view

KEY = SimpleNamespace(key_id="abcdef0123456789", name="team-a", is_admin=False)
VIEWER = SimpleNamespace(key=KEY, csrf="TOKEN123", can_cancel=True)
STATUS = {"batch_id": "b1", "state": "running", "owner": KEY.key_id, "total": 5, "queued": 1, "running": 1,
          "done": 1, "failed": 2, "cancelled": 0, "dead_lettered": 1, "model": "m", "sink": "redis",
          "created_at": 1.0, "started_at": 2.0, "finished_at": None, "webhook": None, "webhook_attempts": [],
          "config_hash": "h"}
EVIL = "<script>alert(1)</script>"


def render(name: str, **ctx) -> str:
    return templates.env.get_template(name).render(nonce="N", poll_ms=2000, **ctx)


def test_batch_page_with_failures_dead_letters_and_a_cancel_form():
    failed = [{"job_id": "j1", "image": "/data/" + EVIL + ".jpg",
               "error": {"stage": "load", "type": "NotAnImage", "message": EVIL}},
              {"job_id": "j2", "image": "/data/x.jpg", "error": None}]
    dead = [{"job_id": "j2", "ref": "/data/x.jpg", "attempts": 3,
             "error": {"stage": "queue", "type": "WorkerLost", "message": "lost 3 times"}}]
    html = render("batch.html", viewer=VIEWER, b=STATUS, bar=progress(STATUS), segments=SEGMENTS,
                  config={"tau_sentence": 0.2}, jobs=[], page=1, more=False, failed=failed, dead=dead,
                  error_types=error_types(failed), now=3.0)
    assert EVIL not in html and "&lt;script&gt;" in html
    assert "Dead letters" in html and "WorkerLost" in html and ">3<" in html
    assert 'name="csrf" value="TOKEN123"' in html and "Cancel batch" in html
    assert '<script nonce="N">' in html and "/batches/b1/progress" in html  # live polling
    finished = {**STATUS, "state": "finished", "queued": 0, "running": 0, "finished_at": 9.0}
    html = render("batch.html", viewer=VIEWER, b=finished, bar=progress(finished), segments=SEGMENTS,
                  config={}, jobs=[], page=2, more=True, failed=[], dead=[], error_types=[], now=9.0)
    assert "Cancel batch" not in html and "<script" not in html and "?page=3" in html and "?page=1" in html


def test_image_page_for_an_error_record_a_queued_job_and_a_fallback():
    b = {**STATUS, "batch_id": "b1"}
    err = record_view({"error": {"stage": "golden", "type": "UnusableText", "message": EVIL}, "meta": {}})
    html = render("image.html", viewer=VIEWER, b=b, job_id="j1", job={"state": "failed"}, ref="/d/a.png",
                  v=err, attempts=1)
    assert "UnusableText" in html and EVIL not in html and "Initial caption, sentence by sentence" not in html
    html = render("image.html", viewer=VIEWER, b=b, job_id="j1", job={"state": "queued"}, ref="/d/a.png",
                  v=None, attempts=0)
    assert "No record yet" in html
    fallback = {"reason": "no sentence passed the threshold", "threshold": 0.0, "kept": "best",
                "kept_index": 0}
    rec = {"sentences": [EVIL + ".", "Two."], "sentence_scores": [-0.5, -10000.0],
           "golden_sentences": [EVIL + "."], "final_caption": "F", "qa_pairs": [],
           "meta": {"sentence_filter": "yesno", "golden_fallback": fallback}}
    v = record_view(rec, {})
    html = render("image.html", viewer=VIEWER, b=b, job_id="j1", job={"state": "done"}, ref="/d/a.png",
                  v=v, attempts=1)
    assert "the best-scoring sentence was kept" in html and "kept as the best of none" in html
    assert EVIL not in html and "P(yes) − P(no)" in html and "n/a" in html
    assert "No questions were asked." in html


def test_batch_list_empty_and_not_found_pages():
    html = render("batches.html", viewer=VIEWER, rows=[], page=1, more=False, segments=SEGMENTS, live=[],
                  admin=False)
    assert "No batches yet" in html and "<script" not in html
    assert "that your key can see" in render("not_found.html", viewer=VIEWER, what="batch")


def test_post_login_destinations_stay_on_this_site():
    assert _safe_next("/batches/b1?page=2") == "/batches/b1?page=2"
    for bad in ("https://evil.example/", "//evil.example", "/\\evil.example", "/\t/evil.example",
                "javascript:alert(1)", "", None):
        assert _safe_next(bad) == "/", bad


def test_viewer_routes_are_mounted_and_stay_out_of_the_openapi_schema():
    """The API's schema (schemathesis, the auth matrix) covers /v1 only; the pages are cookie
    routes of their own. Building the app opens no connection, so no server is needed here."""
    from producer.api.app import create_app
    from scalecap.settings import Settings

    app = create_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    hidden = {r.path for r in app.routes if getattr(r, "include_in_schema", True) is False}
    pages = {"/", "/login", "/logout", "/progress", "/static/viewer.css", "/batches/{batch_id}",
             "/batches/{batch_id}/progress", "/batches/{batch_id}/cancel",
             "/batches/{batch_id}/images/{job_id}", "/batches/{batch_id}/images/{job_id}/thumbnail"}
    assert pages <= hidden
    assert not pages & set(app.openapi()["paths"])
