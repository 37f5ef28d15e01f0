"""Cost bounds of a tenant (issue 14, item 4): config fields over the operator's limits are
refused naming the field, the worker never scales an image beyond its decode cap, and the quota
admits concurrent submissions in one Redis script (a real redis-server), so they cannot all pass."""

from __future__ import annotations

import concurrent.futures
import math
from types import SimpleNamespace

import pytest

from producer.api.quota import Quota, QuotaExceeded
from scalecap.config import (
    ConfigFieldError,
    CostLimits,
    ImageScaleCaptionGenerateConfig,
    check_cost_limits,
)
from scalecap.fleet.keys import ApiKey
from scalecap.fleet.protocol import BatchStore
from scalecap.settings import Settings

Config = ImageScaleCaptionGenerateConfig


@pytest.mark.parametrize(("fields", "bad"), [
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": math.inf}, "top_p"),
    ({"tau_sentence": math.nan}, "tau_sentence"),
    ({"seed": {"a": 1}}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),
    ({"max_questions": 2.0}, "max_questions"),
    ({"min_pixels": 10, "max_pixels": 5}, "max_pixels"),
    ({"system_prompt": "x" * 40_000}, "system_prompt"),
])
def test_fields_of_the_wrong_type_are_refused_by_name(fields, bad):
    with pytest.raises(ConfigFieldError) as info:
        Config.from_dict(fields)
    assert info.value.field == bad and bad in str(info.value)


@pytest.mark.parametrize(("fields", "bad"), [
    ({"min_pixels": 150_000_000, "max_pixels": 150_000_000}, "min_pixels"),
    ({"max_pixels": 50_000_000}, "max_pixels"),
    ({"max_questions": 10**9}, "max_questions"),
    ({"max_questions": 65}, "max_questions"),
    ({"max_init_tokens": 10**9}, "max_init_tokens"),
    ({"max_final_tokens": 8193}, "max_final_tokens"),
    ({"preset": "authors"}, "max_questions"),  # no question cap at all
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
])
def test_cost_over_the_operators_limits_is_refused_by_name(fields, bad):
    limits = CostLimits.from_settings(Settings(max_model_len=8192))
    assert limits == CostLimits(max_pixels=40_000_000, max_questions=64, max_tokens=8192)
    with pytest.raises(ConfigFieldError) as info:
        check_cost_limits(Config.from_dict(fields), limits)
    assert info.value.field == bad


def test_limits_allow_what_is_within_them_and_the_defaults_always():
    check_cost_limits(Config(max_questions=64, max_pixels=40_000_000, seed=7), CostLimits())
    # A lowered cap never breaks the default config: the worker clamps instead.
    check_cost_limits(Config(), CostLimits(max_pixels=500_000, max_questions=5, max_tokens=512))
    with pytest.raises(ConfigFieldError):
        check_cost_limits(Config(max_pixels=1_000_000), CostLimits(max_pixels=500_000))


def test_the_worker_never_scales_beyond_the_decode_cap():
    """A config that reached a worker some other way (a direct producer) still cannot make a
    2x2 PNG 150 Mpx: the worker's limits stop at the decode cap, and so does the image."""
    import io

    from PIL import Image

    from scalecap.images.load import load_image
    from workers.engine import EngineRuntime

    engine = EngineRuntime.__new__(EngineRuntime)
    engine.settings = Settings(max_decode_pixels=1_000_000)
    limits = engine.limits(Config(min_pixels=150_000_000, max_pixels=150_000_000))
    assert limits.min_pixels == limits.max_pixels == 1_000_000
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), "red").save(buf, format="PNG")
    im = load_image(buf.getvalue(), limits=limits)
    assert im.width * im.height <= 1_000_000


# --- the quota: one script -------------------------------------------------------------------


@pytest.fixture
def quota(redis_url: str):
    import redis

    r = redis.Redis.from_url(redis_url)
    yield Quota(SimpleNamespace(redis=r, settings=Settings(default_max_queued=50)))
    r.close()


def _key(max_queued: int | None, kid: str = "0123456789abcdef") -> ApiKey:
    return ApiKey(kid, "t", frozenset({"submit", "read"}), max_queued, 0.0, False)


def test_concurrent_submits_cannot_pass_the_quota_together(quota: Quota):
    key = _key(3)

    def submit(i: int) -> int:
        try:
            return quota.admit(key, f"b{i}", 3) or 0
        except QuotaExceeded:
            return 0

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        admitted = list(pool.map(submit, range(6)))
    assert sorted(admitted) == [0, 0, 0, 0, 0, 3]
    assert quota.in_use(key) == 3


def test_registered_and_finished_images_move_the_quota(quota: Quota):
    store = BatchStore(quota.r)
    key = _key(4, "fedcba9876543210")
    assert quota.admit(key, "q1", 2) == 2
    store.create_batch("q1", config={}, config_hash="h", model="m", queue="q", sink="redis",
                       owner=key.key_id)
    store.register_jobs("q1", [("j1", "r1", None), ("j2", "r2", None)], queue="q")
    assert quota.in_use(key) == 2  # registered now: counted once, not twice
    assert quota.admit(key, "q2", None) == 2  # a stream takes the room left
    with pytest.raises(QuotaExceeded):
        quota.admit(key, "q3", 1)
    store.cancel_jobs("q1", ["j1", "j2"])
    store.close("q1")
    assert quota.in_use(key) == 2  # q1 finished and left the key's set; q2's reservation holds
    assert quota.admit(key, "q3", 2) == 2


def test_keys_without_max_queued_get_the_fleet_default(quota: Quota):
    key = _key(None, "00000000000000aa")
    assert quota.limit(key) == 50
    with pytest.raises(QuotaExceeded):
        quota.admit(key, "big", 51)
    assert quota.admit(key, "ok", 50) == 50


# --- clean errors: malformed input is a RefError or a 400, never an exception ------------------


def test_malformed_references_are_ref_errors_and_lengths_are_bounded():
    from producer.api.refs import MAX_REF_CHARS, RefError, check_ref, checked_rows
    from producer.sources import SourceRow

    for bad in ("http://[::1", "https://[::1/a.png", "file://[x/y", "http://" + "a" * MAX_REF_CHARS):
        with pytest.raises(RefError):
            check_ref(bad, [])
    rows = list(checked_rows([SourceRow("http://[::1"), SourceRow("https://x.example/a.png")], []))
    assert rows[0].error["type"] == "ImageAccessDenied" and rows[1].error is None
    refs = [SourceRow(f"https://x.example/{i}.png") for i in range(10)]
    out = list(checked_rows(refs, [], max_total_chars=60))
    assert [r.error is None for r in out] == [True, True] + [False] * 8
    assert out[-1].error["type"] == "SubmissionTooLarge"


def test_json_nesting_is_capped_before_parsing():
    from producer.api.limits import MAX_JSON_DEPTH, json_depth, loads_bounded
    from producer.api.problems import ApiProblem
    from producer.sources import manifest_rows

    assert json_depth(b'{"a": 1}') <= MAX_JSON_DEPTH
    assert json_depth(b'{"a": ["[[[[[\\"", {"b": 1}]}', limit=2) == 3  # brackets in strings skipped
    for depth in (MAX_JSON_DEPTH + 1, 1000, 100_000):
        with pytest.raises(ApiProblem) as info:
            loads_bounded(b"[" * depth + b"]" * depth)
        assert info.value.status == 400 and "nested" in info.value.detail
    assert loads_bounded(b'{"images": ["a"]}') == {"images": ["a"]}
    # An upload line nested 100,000 deep is that line's error, not the upload's end.
    rows = list(manifest_rows(["[" * 100_000 + "]" * 100_000, '{"image": "https://x.example/a.png"}'], "up"))
    assert rows[0].error["type"] == "MalformedLine" and rows[1].ref == "https://x.example/a.png"


# --- thumbnails: decoded once, cached per owner ----------------------------------------------------


def test_thumbnails_are_cached_once_per_owner_and_image():
    import base64
    import io
    import time

    from PIL import Image

    from producer.api import thumbnails

    buf = io.BytesIO()
    Image.new("RGB", (6300, 6300), "navy").save(buf, format="PNG")
    ref = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    settings = Settings()
    thumbnails.cache_clear()
    t0 = time.perf_counter()
    first = thumbnails.thumbnail(ref, settings, 640, owner="a")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = thumbnails.thumbnail(ref, settings, 700, owner="a")  # snaps to 640: the same entry
    warm = time.perf_counter() - t0
    assert again == first and Image.open(io.BytesIO(first)).size == (640, 640)
    assert warm < cold / 10, (cold, warm)
    assert ("a", __import__("hashlib").sha256(ref.encode()).hexdigest(), 640) in thumbnails._cache
    assert not any(k[0] == "b" for k in thumbnails._cache), "another owner has no entry to hit"
    # A broken image is remembered as its kind only, and not decoded again.
    with pytest.raises(Exception) as info:
        thumbnails.thumbnail("data:image/png;base64,AAAA", settings, 160, owner="a")
    assert type(info.value).__name__ == str(info.value)
