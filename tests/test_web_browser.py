"""The viewer in a real browser: Debian's Chromium driven by Playwright (pytest-playwright).

Everything is real and shared with the API tests (tests/api_support.py's session `api_stack`):
redis-server, a `scalecap worker` on the scripted VLM, the API process (`scalecap api`) with
batches submitted over HTTP with Bearer keys, and Chromium reading the pages the API renders.
Screenshots go to $SCALECAP_ARTIFACTS/viewer (default tests/artifacts/viewer, git-ignored); with
SCALECAP_UPDATE_SCREENSHOTS=1 the caption viewer's one is also copied to docs/img/viewer.png.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.api_support import IDLE_MODEL, MODEL, ApiStack
from tests.fleet_support import REPO, wait_until
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
def browser(launch_browser: Any) -> Any:
    """One Chromium for this module, closed with it (the plugin's own lives for the session)."""
    b = launch_browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def browser_context_args(site: Site) -> dict[str, Any]:
    return {"base_url": site.url, "viewport": {"width": 1280, "height": 900}, "device_scale_factor": 1}


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# -- the site: redis, a worker, the API, three keys and their batches ------------------------------


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
    """The shared API stack, seen by the viewer tests: keys by name, this module's batches."""

    stack: ApiStack
    raw: dict[str, str]
    batches: dict[str, str]
    images: dict[str, Path]
    tmp: Path
    outside: Path

    @property
    def url(self) -> str:
        return self.stack.url

    def keystore(self) -> Any:
        from scalecap.fleet.keys import KeyStore

        return KeyStore(self.stack.redis())

    def _headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.raw[key]}"}

    def submit(self, key: str, images: list[str], *, model: str = MODEL, **body: Any) -> str:
        r = self.stack.http.post("/v1/batches", headers=self._headers(key),
                                 json={"images": images, "model": model, "sink": "redis", **body})
        assert r.status_code == 202, r.text
        return r.json()["batch_id"]

    def status(self, key: str, batch_id: str) -> dict[str, Any]:
        r = self.stack.http.get(f"/v1/batches/{batch_id}", headers=self._headers(key))
        assert r.status_code == 200, r.text
        return r.json()

    def cancel(self, key: str, batch_id: str) -> None:
        r = self.stack.http.post(f"/v1/batches/{batch_id}/cancel", headers=self._headers(key))
        assert r.status_code == 200, r.text

    def wait(self, key: str, batch_id: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(lambda: (s := self.status(key, batch_id))["finished_at"] and s,
                          timeout=timeout, interval=0.2, what=f"batch {batch_id} to finish")


@pytest.fixture(scope="module")
def site(api_stack: ApiStack, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """Pictures inside the stack's allowed root, and one batch for each of two tenants."""
    tmp = api_stack.fleet.tmp / "viewer"
    imgs = tmp / "imgs"
    images = {c: picture(imgs / f"{i:02d}-{c}.png", c, i) for i, c in enumerate(("red", "green", "blue"))}
    images["bad"] = imgs / "03-bad.jpg"
    images["bad"].write_bytes(b"this is not an image")
    images["other"] = picture(imgs / "04-white.png", "white", 4)
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    picture(outside, "black", 5)
    raw = {"team-a": api_stack.tenant_a.raw, "team-b": api_stack.tenant_b.raw, "ops": api_stack.admin.raw}
    s = Site(api_stack, raw, {}, images, tmp, outside)
    config = {"max_questions": 4, "second_filter": True, "answer_fallback": "drop"}
    a_images = [str(images[c]) for c in ("red", "green", "blue", "bad")]
    s.batches["a"] = s.submit("team-a", a_images, config=config)
    s.batches["b"] = s.submit("team-b", [str(images["other"])])
    for who, b in (("team-a", "a"), ("team-b", "b")):
        st = s.wait(who, s.batches[b])
        assert st["state"] == "finished", st
    return s


def log_in(page: Any, site: Site, key: str) -> None:
    page.goto("/")
    assert page.url.endswith("/login?next=/")
    page.fill("input[name=key]", site.raw[key])
    page.click("button[type=submit]")
    page.wait_for_url(site.url + "/")


def job_of(site: Site, key: str, batch_id: str, image: Path) -> str:
    r = site.stack.http.get(f"/v1/batches/{batch_id}/jobs", params={"limit": 100},
                            headers=site._headers(key))
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
    page.emulate_media(color_scheme="dark")
    shot(page, "04-caption-viewer-dark")
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "04-caption-viewer-phone")
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth + 1"), "no sideways scroll"
    page.set_viewport_size({"width": 1280, "height": 900})
    path = shot(page, "04-caption-viewer")
    if os.environ.get("SCALECAP_UPDATE_SCREENSHOTS") == "1":
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_SHOT)

    # step through the batch: the arrow key goes to the next image, the last one is the bad image
    assert page.locator(".stepper").inner_text().startswith("image 1 of 4")
    page.keyboard.press("ArrowRight")
    page.wait_for_url("**?at=1")
    assert page.locator(".final-caption").inner_text().startswith("FINAL[A green square")
    page.goto(page.url.replace("?at=1", "?at=2"))  # a stale position: no stepper, the page still works
    assert page.locator(".stepper").count() == 0 and page.locator(".final-caption").count() == 1
    page.goto(f"/batches/{a}")
    page.locator(".tile", has_text="03-bad.jpg").locator("a").click()
    assert "NotAnImage" in page.locator(".alert").inner_text()
    assert page.locator("a[rel=prev]").count() == 1 and page.locator("a[rel=next]").count() == 0


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
    assert "owner tenant-b" in page.locator(f'li.batch-row[data-batch="{b}"]').inner_text()
    assert page.goto(f"/batches/{b}").status == 200


def _strip_nonce(html: str) -> str:
    return re.sub(r'nonce="[^"]+"', "", html)


def test_live_progress_bars_update_without_reload(page, site: Site):
    """A batch on a model no worker holds stays queued; cancelling it over the API finishes it,
    and the open page's bar and counts follow without a reload."""
    log_in(page, site, "team-a")
    imgs = [picture(site.tmp / "idle" / f"{i:02d}-yellow.png", "yellow", 40 + i) for i in range(6)]
    batch = site.submit("team-a", [str(p) for p in imgs], model=IDLE_MODEL)
    page.goto("/")
    bar = page.locator(f'.bar[data-batch="{batch}"]')
    assert float(bar.get_attribute("aria-valuenow")) == 0 and "live" in bar.get_attribute("class")
    page.evaluate("window.__stillHere = true")
    shot(page, "06-live-progress")
    site.cancel("team-a", batch)
    page.wait_for_function(
        "b => +document.querySelector(`.bar[data-batch='${b}']`).getAttribute('aria-valuenow') >= 100",
        arg=batch, timeout=30_000)
    assert page.evaluate("window.__stillHere") is True, "updated in place, not by reloading"
    row = page.locator(f'li.batch-row[data-batch="{batch}"]')
    assert row.locator('[data-field="cancelled"]').inner_text() == "6"
    assert row.locator('[data-field="cancelled"]').is_visible()
    assert row.locator('[data-field="state"]').text_content() == "cancelled"
    assert "live" not in bar.get_attribute("class")


def test_thumbnails_use_the_guarded_loader(page, site: Site):
    """A reference that became a symlink out of the allowed roots after submission gets a
    placeholder from the worker's loader, never the file's bytes."""
    log_in(page, site, "team-a")
    link = site.tmp / "imgs" / "later-a-link.png"
    batch = site.submit("team-a", [str(link)])  # inside the roots, and not there yet
    site.wait("team-a", batch)
    link.symlink_to(site.outside)
    job = job_of(site, "team-a", batch, link)
    r = page.request.get(f"/batches/{batch}/images/{job}/thumbnail")
    # The viewing key's scope check (symlinks resolved inside the roots) answers before any load.
    assert r.status == 403 and r.headers["content-type"].startswith("image/svg+xml")
    assert b"ImageAccessDenied" in r.body()
    red = job_of(site, "team-a", site.batches["a"], site.images["red"])
    ok = page.request.get(f"/batches/{site.batches['a']}/images/{red}/thumbnail?size=160")
    assert ok.status == 200 and ok.headers["content-type"] == "image/jpeg" and ok.body()[:2] == b"\xff\xd8"


def test_forms_need_their_token_and_revoking_a_key_ends_its_session(page, site: Site):
    keystore = site.keystore()
    raw, key, _ = keystore.create("short-lived", scopes=("submit", "read"), all_data=True)
    site.raw["short-lived"] = raw
    log_in(page, site, "short-lived")
    imgs = [picture(site.tmp / "idle2" / f"{i:02d}-yellow.png", "yellow", 60 + i) for i in range(3)]
    batch = site.submit("short-lived", [str(p) for p in imgs], model=IDLE_MODEL)
    page.goto(f"/batches/{batch}")
    # a cancel without the form's token is refused, and nothing is cancelled
    assert page.request.post(f"/batches/{batch}/cancel", form={"csrf": "forged"}).status == 403
    assert site.status("short-lived", batch)["state"] == "queued"
    page.click("button.danger")  # the real form, with its token
    page.wait_for_url(f"{site.url}/batches/{batch}")
    st = site.wait("short-lived", batch)
    assert st["state"] == "cancelled" and st["cancelled"] == 3
    assert page.locator(".state.big").text_content() == "cancelled"
    shot(page, "07-cancelled")

    keystore.revoke(key.key_id)
    page.goto(f"/batches/{batch}")
    assert "/login?next=" in page.url, "a revoked key's session ends at once"

    log_in(page, site, "team-a")
    page.click("text=Log out")
    page.wait_for_url(f"{site.url}/login")
    page.goto("/")
    assert "/login" in page.url
