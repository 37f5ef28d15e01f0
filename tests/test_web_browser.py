"""The viewer in a real browser: Debian's Chromium driven by Playwright (pytest-playwright).

Everything is real: redis-server, a `scalecap worker` on the scripted VLM, the API process
(`scalecap api`: uvicorn in a subprocess) with batches submitted over HTTP with Bearer keys, and Chromium
reading the pages the API renders. Screenshots go to $SCALECAP_ARTIFACTS/viewer (default
tests/artifacts/viewer, git-ignored); with SCALECAP_UPDATE_SCREENSHOTS=1 the caption viewer's
one is also copied to docs/img/viewer.png for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures_services import _Process, free_ports
from tests.fleet_support import REPO, Fleet, wait_until
from tests.scripted_vlm import COLOURS, dominant_colour

pytestmark = [pytest.mark.services, pytest.mark.slow]

CHROMIUM = os.environ.get("SCALECAP_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SCALECAP_ARTIFACTS") or REPO / "tests" / "artifacts") / "viewer"
README_SHOT = REPO / "docs" / "img" / "viewer.png"


# -- pytest-playwright, pointed at the system Chromium (browser downloads are not reachable) -------


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (or set SCALECAP_CHROMIUM)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": ["--no-sandbox"]}


@pytest.fixture(scope="module")
def browser_context_args(site: Site) -> dict[str, Any]:
    return {"base_url": site.url, "viewport": {"width": 1280, "height": 900}, "device_scale_factor": 1}


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# -- the site: redis, a worker, the API, three keys and their batches ------------------------------


class ApiServer(_Process):
    """`scalecap api` (uvicorn) on a free port, with its own environment."""

    name = "scalecap api"

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["/usr/bin/env", *(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("SCALECAP_")),
                sys.executable, "-m", "producer.cli", "api",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        super().__init__(argv, workdir / "api.log", cwd=REPO)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


def picture(path: Path, colour: str, n: int, size: tuple[int, int] = (480, 360)) -> Path:
    """A rounded square of `colour` on a darker field of the same hue (what the scripted VLM
    'sees' is the dominant colour, so its captions talk about this square)."""
    from PIL import Image, ImageDraw

    rgb = COLOURS[colour]
    field_rgb = tuple(int(c * 0.82) for c in rgb)
    im = Image.new("RGB", size, field_rgb)
    d = ImageDraw.Draw(im)
    w, h = size
    d.rounded_rectangle((w * 0.12, h * 0.1, w * 0.88, h * 0.9), radius=28, fill=rgb)
    d.rounded_rectangle((w * 0.12 + 10, h * 0.1 + 10, w * 0.5, h * 0.35), radius=16,
                        fill=tuple(min(255, int(c * 1.12) + 18) for c in rgb))
    im.putpixel((0, 0), (n % 256, 3, 7))  # distinct bytes per file
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    assert dominant_colour(im) == colour
    return path


@dataclass
class Site:
    url: str
    raw: dict[str, str]
    key_ids: dict[str, str]
    batches: dict[str, str]
    images: dict[str, Path]
    fleet: Fleet
    keystore: Any
    outside: Path
    notes: dict[str, Any] = field(default_factory=dict)

    def submit(self, key: str, images: list[str], **body: Any) -> str:
        r = httpx.post(self.url + "/v1/batches", headers={"Authorization": f"Bearer {self.raw[key]}"},
                       json={"images": images, "model": "scripted", "sink": "redis", **body}, timeout=30)
        assert r.status_code == 202, r.text
        return r.json()["batch_id"]

    def status(self, key: str, batch_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/batches/{batch_id}",
                      headers={"Authorization": f"Bearer {self.raw[key]}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, key: str, batch_id: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(lambda: (s := self.status(key, batch_id))["finished_at"] and s,
                          timeout=timeout, interval=0.2, what=f"batch {batch_id} to finish")


@pytest.fixture(scope="module")
def site(redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    import redis

    from scalecap.api_keys import KeyStore

    tmp = tmp_path_factory.mktemp("viewer")
    redis_url = f"{redis_server.url}/{redis_server.fresh_db()}"
    fleet = Fleet(redis_url, tmp)
    api = ApiServer(tmp, {**fleet.env, "SCALECAP_MODEL": "scripted"})
    try:
        fleet.scripted(concurrency=4, slow_colour="yellow", slow_seconds=0.5)
        keystore = KeyStore(redis.Redis.from_url(redis_url))
        raw: dict[str, str] = {}
        ids: dict[str, str] = {}
        for name, scopes in (("team-a", ("submit", "read")), ("team-b", ("submit", "read")),
                             ("ops", ("admin",))):
            raw[name], key, _ = keystore.create(name, scopes=scopes)
            ids[name] = key.key_id
        imgs = tmp / "imgs"
        images = {c: picture(imgs / f"{i:02d}-{c}.png", c, i) for i, c in enumerate(("red", "green", "blue"))}
        images["bad"] = imgs / "03-bad.jpg"
        images["bad"].write_bytes(b"this is not an image")
        images["other"] = picture(imgs / "04-white.png", "white", 4)
        outside = tmp_path_factory.mktemp("outside") / "secret.png"
        picture(outside, "black", 5)
        api.start(timeout=60)
        s = Site(api.url, raw, ids, {}, images, fleet, keystore, outside)
        config = {"max_questions": 4, "second_filter": True, "answer_fallback": "drop"}
        s.batches["a"] = s.submit("team-a", [str(images[c]) for c in ("red", "green", "blue", "bad")],
                                  config=config)
        s.batches["b"] = s.submit("team-b", [str(images["other"])])
        for who, b in (("team-a", "a"), ("team-b", "b")):
            st = s.wait(who, s.batches[b])
            assert st["state"] == "finished", st
        yield s
    finally:
        api.stop()
        fleet.close()


def log_in(page: Any, site: Site, key: str) -> None:
    page.goto("/")
    assert page.url.endswith("/login?next=/")
    page.fill("input[name=key]", site.raw[key])
    page.click("button[type=submit]")
    page.wait_for_url(site.url + "/")


def job_of(site: Site, key: str, batch_id: str, image: Path) -> str:
    r = httpx.get(f"{site.url}/v1/batches/{batch_id}/jobs", params={"limit": 100},
                  headers={"Authorization": f"Bearer {site.raw[key]}"}, timeout=10)
    assert r.status_code == 200, r.text
    return next(j["job_id"] for j in r.json()["items"] if j["image"] == str(image))


# -- the tests ----------------------------------------------------------------------------------


def test_wrong_key_is_refused_and_pages_need_a_login(page, site: Site):
    page.goto(f"/batches/{site.batches['a']}")
    assert "/login?next=" in page.url
    page.fill("input[name=key]", "sk_0123456789abcdef_" + "x" * 43)
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as resp:
        page.click("button[type=submit]")
    assert resp.value.status == 401
    assert page.get_by_role("alert").inner_text() == "That key is not valid here."
    shot(page, "01-login-refused")
    # the JSON and image endpoints answer 401 without a session, and reveal nothing
    assert page.request.get(f"/batches/{site.batches['a']}/progress").status == 401


def test_log_in_open_batch_open_image_see_dropped_sentences(page, site: Site):
    a = site.batches["a"]
    log_in(page, site, "team-a")
    row = page.locator(f'li.batch-row[data-batch="{a}"]')
    assert row.count() == 1
    assert float(row.locator(".bar").get_attribute("aria-valuenow")) == 100
    assert site.batches["b"] not in page.content(), "another key's batch is not listed"
    shot(page, "02-batches")

    row.locator("a.batch-link").click()
    page.wait_for_url(f"{site.url}/batches/{a}")
    stats = {dt.inner_text().strip(): dd.inner_text().strip()
             for dt, dd in zip(page.locator(".stats dt").all(), page.locator(".stats dd").all(), strict=True)}
    assert (stats["IMAGES"], stats["DONE"], stats["FAILED"]) == ("4", "3", "1"), stats
    assert float(stats["IMAGES / S"]) > 0, stats
    failures = page.locator("table.compact tbody tr")
    assert failures.count() == 1 and "NotAnImage" in failures.inner_text() and "load" in failures.inner_text()
    tiles = page.locator(".image-grid .tile")
    assert tiles.count() == 4
    page.wait_for_function(
        "() => [...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, "03-batch")

    page.locator(".tile", has_text="00-red.png").locator("a").click()
    page.wait_for_url(f"{site.url}/batches/{a}/images/*")
    assert page.locator(".final-caption").inner_text().startswith("FINAL[A red square fills the picture.")
    golden = page.locator(".col.golden .sentence p").all_inner_texts()
    dropped = page.locator(".col.dropped .sentence p").all_inner_texts()
    assert "A unicorn flies over a rainbow." in dropped
    assert "A red square fills the picture." in golden and "A unicorn flies over a rainbow." not in golden
    # every sentence shows its score beside the threshold, and the split agrees with them
    tau = page.locator(".section-head .tau").first.inner_text()
    assert re.fullmatch(r"τ = [+-]\d+\.\d{3}", tau), tau
    threshold = float(tau.split("= ")[1])
    kept_scores = [float(x) for x in page.locator(".col.golden .score").all_inner_texts()]
    dropped_scores = [x for x in page.locator(".col.dropped .score").all_inner_texts()]
    assert kept_scores and all(x > threshold for x in kept_scores), (kept_scores, threshold)
    assert dropped_scores and all(x == "n/a" or float(x) <= threshold for x in dropped_scores)
    verdicts = page.locator("table.qa .verdict").all_inner_texts()
    assert set(verdicts) == {"kept", "dropped"}, verdicts  # position answers name nothing red
    kinds = set(page.locator("table.qa .pill").all_inner_texts())
    assert kinds == {"object", "position"}
    stages = page.locator("table.stages th").all_inner_texts()
    assert "caption" in stages and "golden" in stages
    img = page.locator("figure.picture img")
    assert img.evaluate("i => i.complete && i.naturalWidth") == 480
    path = shot(page, "04-caption-viewer")
    if os.environ.get("SCALECAP_UPDATE_SCREENSHOTS") == "1":
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_SHOT)

    # the bad image's page shows its error record
    page.go_back()
    page.locator(".tile", has_text="03-bad.jpg").locator("a").click()
    assert "NotAnImage" in page.locator(".alert").inner_text()


def test_another_keys_batch_is_not_found(page, site: Site):
    log_in(page, site, "team-a")
    b = site.batches["b"]
    job_b = job_of(site, "team-b", b, site.images["other"])
    resp = page.goto(f"/batches/{b}")
    assert resp.status == 404 and page.locator("h1").inner_text() == "Nothing here"
    shot(page, "05-other-key-404")
    assert page.goto("/batches/no-such-batch").status == 404
    # identical answers for "not yours" and "does not exist": nothing confirms the id
    foreign = page.request.get(f"/batches/{b}").text()
    missing = page.request.get("/batches/no-such-batch").text()
    assert _strip_nonce(foreign) == _strip_nonce(missing)
    for path in (f"/batches/{b}/images/{job_b}", f"/batches/{b}/images/{job_b}/thumbnail",
                 f"/batches/{b}/progress"):
        assert page.request.get(path).status == 404, path
    # a job id of another batch under one's own batch id is not found either
    assert page.request.get(f"/batches/{site.batches['a']}/images/{job_b}").status == 404
    assert page.request.get(f"/progress?ids={b}").json() == {"batches": []}
    # the admin key sees it
    page.context.clear_cookies()
    log_in(page, site, "ops")
    assert page.locator(f'li.batch-row[data-batch="{b}"]').count() == 1
    assert page.goto(f"/batches/{b}").status == 200


def _strip_nonce(html: str) -> str:
    return re.sub(r'nonce="[^"]+"', "", html)


def test_live_progress_bars_update_without_reload(page, site: Site):
    log_in(page, site, "team-a")
    imgs = [picture(site.fleet.tmp / "slow" / f"{i:02d}-yellow.png", "yellow", 40 + i) for i in range(6)]
    batch = site.submit("team-a", [str(p) for p in imgs])
    page.goto("/")
    bar = page.locator(f'.bar[data-batch="{batch}"]')
    assert float(bar.get_attribute("aria-valuenow")) < 100
    page.evaluate("window.__stillHere = true")
    shot(page, "06-live-progress")
    page.wait_for_function(
        "b => +document.querySelector(`.bar[data-batch='${b}']`).getAttribute('aria-valuenow') >= 100",
        arg=batch, timeout=30_000)
    assert page.evaluate("window.__stillHere") is True, "updated in place, not by reloading"
    row = page.locator(f'li.batch-row[data-batch="{batch}"]')
    assert row.locator('[data-field="done"]').inner_text() == "6"
    assert row.locator('[data-field="state"]').text_content() == "finished"


def test_thumbnails_use_the_guarded_loader(page, site: Site):
    """A reference that became a symlink out of the allowed roots after submission gets a
    placeholder from the worker's loader, never the file's bytes."""
    log_in(page, site, "team-a")
    link = site.fleet.tmp / "imgs" / "later-a-link.png"
    batch = site.submit("team-a", [str(link)])  # inside the roots, and not there yet
    site.wait("team-a", batch)
    link.symlink_to(site.outside)
    job = job_of(site, "team-a", batch, link)
    r = page.request.get(f"/batches/{batch}/images/{job}/thumbnail")
    assert r.status == 422 and r.headers["content-type"].startswith("image/svg+xml")
    assert b"ImageAccessDenied" in r.body()
    red = job_of(site, "team-a", site.batches["a"], site.images["red"])
    ok = page.request.get(f"/batches/{site.batches['a']}/images/{red}/thumbnail?size=160")
    assert ok.status == 200 and ok.headers["content-type"] == "image/jpeg" and ok.body()[:2] == b"\xff\xd8"


def test_forms_need_their_token_and_revoking_a_key_ends_its_session(page, site: Site):
    raw, key, _ = site.keystore.create("short-lived", scopes=("submit", "read"))
    site.raw["short-lived"] = raw
    log_in(page, site, "short-lived")
    imgs = [picture(site.fleet.tmp / "slow2" / f"{i:02d}-yellow.png", "yellow", 60 + i) for i in range(12)]
    batch = site.submit("short-lived", [str(p) for p in imgs])
    page.goto(f"/batches/{batch}")
    # a cancel without the form's token is refused, and nothing is cancelled
    assert page.request.post(f"/batches/{batch}/cancel", form={"csrf": "forged"}).status == 403
    assert site.status("short-lived", batch)["state"] in ("queued", "running")
    page.click("button.danger")  # the real form, with its token
    page.wait_for_url(f"{site.url}/batches/{batch}")
    st = site.wait("short-lived", batch)
    assert st["state"] == "cancelled" and st["cancelled"] >= 1
    shot(page, "07-cancelled")

    site.keystore.revoke(key.key_id)
    page.goto(f"/batches/{batch}")
    assert "/login?next=" in page.url, "a revoked key's session ends at once"

    log_in(page, site, "team-a")
    page.click("text=Log out")
    page.wait_for_url(f"{site.url}/login")
    page.goto("/")
    assert "/login" in page.url
