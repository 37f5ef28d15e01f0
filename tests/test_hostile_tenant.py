"""Tenant B against tenant A on the real stack (issue 14): redis-server, SeaweedFS, a scripted-VLM
worker, the I/O worker and the API process, with two keys scoped to their own directory and S3
prefix. Each test is one row of the issue's table (named in its docstring); every answer is a 4xx
problem or harmless, and A's private text reaches nothing B sees (`test_zz_...` checks last).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_support import IDLE_MODEL, MODEL, ApiProcess, ApiStack, Key, create_key
from tests.fleet_support import make_images

pytestmark = [pytest.mark.services, pytest.mark.slow]

SECRET_TEXT = "tenant-A-private-notes-7f3c"
"""In A's notes.txt (and A's S3 manifest): must appear in nothing B is shown."""


@dataclass
class Tenants:
    s: ApiStack
    a: Key
    b: Key
    a_dir: Path
    b_dir: Path
    bucket: str
    a_image: Path
    b_image: Path
    notes: Path
    seen_by_b: list[str] = field(default_factory=list)

    def as_b(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = getattr(self.s, method)(path, self.b, **kw)
        self.seen_by_b.append(r.text)
        return r


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["detail"]
    return body


@pytest.fixture(scope="module")
def tenants(api_stack: ApiStack, s3_server: Any) -> Tenants:
    s = api_stack
    root = Path(s.env["SCALECAP_ALLOWED_ROOTS"])
    a_dir, b_dir = root / "tenant-a-data", root / "tenant-b-data"
    a_img = make_images(a_dir, ["red"])[0]
    b_img = make_images(b_dir, ["blue"])[0]
    notes = a_dir / "notes.txt"
    notes.write_text(f"{SECRET_TEXT}\n" * 8)
    bucket = "hostile-tenants"
    c = s3_server.client()
    if bucket not in {b["Name"] for b in c.list_buckets()["Buckets"]}:
        c.create_bucket(Bucket=bucket)
    manifest = "\n".join(json.dumps({"image": f"https://signed.example/{SECRET_TEXT}/{i}.png?X-Amz-Signature=s"})
                         for i in range(3))
    c.put_object(Bucket=bucket, Key="a/manifest.jsonl", Body=manifest.encode())
    c.put_object(Bucket=bucket, Key="a/red.png", Body=a_img.read_bytes())
    c.put_object(Bucket=bucket, Key="b/blue.png", Body=b_img.read_bytes())
    a = create_key(s.env, "hostile-a", "--allowed-roots", str(a_dir), "--allowed-buckets", f"{bucket}/a")
    b = create_key(s.env, "hostile-b", "--allowed-roots", str(b_dir), "--allowed-buckets", f"{bucket}/b")
    return Tenants(s, a, b, a_dir, b_dir, bucket, a_img, b_img, notes)


def test_row1_a_local_path_to_as_file_is_403_naming_the_scope(tenants: Tenants):
    """Row 1: a local path to A's file (inside SCALECAP_ALLOWED_ROOTS)."""
    t = tenants
    own = t.as_b("post", "/v1/batches", json={"images": [str(t.b_image)], "model": MODEL})
    assert own.status_code == 202, own.text
    details = []
    for ref in (str(t.a_image), f"file://{t.a_image}", str(t.a_dir / "does-not-exist.png"),
                f"{t.b_dir}/../tenant-a-data/{t.a_image.name}"):
        body = _problem(t.as_b("post", "/v1/batches", json={"images": [ref], "model": MODEL}), 403)
        assert "the key's allowed roots" in body["detail"]
        details.append(body["detail"].replace(ref[:120], "REF"))
    assert len(set(details)) == 1, "an existing and a missing file are refused alike"
    _problem(t.as_b("post", "/v1/captions", json={"image": str(t.a_image), "model": MODEL}), 403)
    up = t.as_b("post", "/v1/batches", params={"model": MODEL}, content=json.dumps({"image": str(t.a_image)}),
                headers={"Content-Type": "application/x-ndjson"})
    assert up.status_code == 202 and up.json()["submission"]["failed"] == 1
    st = t.s.wait(up.json()["batch_id"], t.b)
    fails = t.as_b("get", f"/v1/batches/{up.json()['batch_id']}/failures").json()["failed"]
    assert st["done"] == 0 and fails[0]["error"]["type"] == "ImageAccessDenied"
    # A plain key (no scope) reads only http(s) and data:.
    plain = create_key(t.s.env, "plain")
    _problem(t.s.post("/v1/batches", plain, json={"images": [str(t.b_image)], "model": MODEL}), 403)
    assert t.s.wait(own.json()["batch_id"], t.b)["done"] == 1


def test_row1_the_worker_checks_the_batch_scope_again(tenants: Tenants):
    """Row 1, second fence: a batch whose reference slipped past submit (a direct producer that
    carries B's scope) still cannot make a worker open A's file."""
    from producer.client import FleetClient
    from scalecap.fleet.scope import Scope
    from scalecap.settings import Settings

    t = tenants
    client = FleetClient(Settings.from_env(t.s.env))
    res = client.submit([str(t.a_image), str(t.b_image)], model=MODEL, owner=t.b.key_id,
                        scope=Scope.of([str(t.b_dir)], [f"{t.bucket}/b"]))
    st = t.s.wait(res.batch_id, t.b)
    assert (st["done"], st["failed"]) == (1, 1)
    fails = t.as_b("get", f"/v1/batches/{res.batch_id}/failures").json()["failed"]
    assert fails[0]["image"] == str(t.a_image) and fails[0]["error"]["type"] == "ImageAccessDenied"
    assert "the key's allowed roots" in fails[0]["error"]["message"]


def test_row2_a_hand_written_shard_reference_reads_nothing(tenants: Tenants):
    """Row 2: `wds+file://…/notes.txt#key=x&ext=png&offset=0&size=4&txt=0:93`."""
    t = tenants
    forged = f"wds+file://{t.notes}#key=x&ext=png&offset=0&size=4&txt=0:93"
    body = _problem(t.as_b("post", "/v1/batches", json={"images": [forged], "model": MODEL}), 403)
    assert "the key's allowed roots" in body["detail"]
    # Even A, whose scope holds the file, cannot read it as a shard: the API re-derives the
    # member from the tar header before that range, and there is none.
    r = t.s.post("/v1/batches", t.a, json={"images": [forged], "model": MODEL})
    assert r.status_code == 400 and "not a member the fleet would index" in r.json()["detail"], r.text
    # A real shard in B's scope: a sidecar range moved onto another member is refused too.
    shard = t.b_dir / "shard.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("s1.png", t.b_image.read_bytes()), ("s1.txt", b"alt of s1"),
                           ("s2.txt", b"alt of s2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    with tarfile.open(shard) as tf:
        m = {x.name: x for x in tf.getmembers()}
    good = (f"wds+file://{shard}#key=s1&ext=png&offset={m['s1.png'].offset_data}&size={m['s1.png'].size}"
            f"&txt={m['s1.txt'].offset_data}:{m['s1.txt'].size}")
    moved = good.replace(f"txt={m['s1.txt'].offset_data}:{m['s1.txt'].size}",
                         f"txt={m['s2.txt'].offset_data}:{m['s2.txt'].size}")
    _problem(t.as_b("post", "/v1/batches", json={"images": [moved], "model": MODEL}), 400)
    bid = t.s.submit(t.b, images=[good])
    assert t.s.wait(bid, t.b)["done"] == 1
    rec = json.loads(t.as_b("get", f"/v1/batches/{bid}/results").text.splitlines()[0])["scalecap_record"]
    assert rec["meta"]["source"]["txt"] == "alt of s1"


def test_row3_another_tenants_manifest_or_bucket_is_403_alike(tenants: Tenants):
    """Row 3: `source` naming another tenant's S3 manifest, or a JSON object; NoSuchBucket."""
    t = tenants
    details = set()
    for src in (f"s3://{t.bucket}/a/manifest.jsonl", f"s3://{t.bucket}/a/", f"s3://{t.bucket}/",
                "s3://no-such-bucket-zz/x/", f"s3://{t.bucket}/bb/"):
        body = _problem(t.as_b("post", "/v1/batches", json={"source": src, "model": MODEL}), 403)
        assert "the key's allowed buckets" in body["detail"]
        details.add(body["detail"].replace(src[:120], "SRC"))
    assert len(details) == 1, "an existing bucket and a missing one are refused alike"
    for bad in ({"a": 1}, [f"s3://{t.bucket}/a/"], 7):
        _problem(t.as_b("post", "/v1/batches", json={"source": bad, "model": MODEL}), 400)
    bid = t.s.submit(t.b, source=f"s3://{t.bucket}/b")  # its own prefix lists and runs
    assert t.s.wait(bid, t.b)["done"] == 1


def test_row4_records_are_not_shared_across_owners(tenants: Tenants):
    """Row 4: A's image reference under the same config gives B its own job, not A's record."""
    t = tenants
    ref = "data:image/png;base64," + base64.b64encode(t.a_image.read_bytes()).decode()
    a_bid = t.s.submit(t.a, images=[ref])
    t.s.wait(a_bid, t.a)
    a_job = t.s.get(f"/v1/batches/{a_bid}/jobs", t.a).json()["items"][0]
    b_bid = t.s.submit(t.b, images=[ref])
    t.s.wait(b_bid, t.b)
    b_job = t.as_b("get", f"/v1/batches/{b_bid}/jobs").json()["items"][0]
    assert b_job["job_id"] != a_job["job_id"]
    a_rec = t.s.get(f"/v1/batches/{a_bid}/results/{a_job['job_id']}", t.a).json()
    b_rec = t.as_b("get", f"/v1/batches/{b_bid}/results/{b_job['job_id']}").json()
    assert b_rec["scalecap_record"]["meta"] != a_rec["scalecap_record"]["meta"], "B's own run"
    # The same owner still reuses its own record.
    again = t.s.submit(t.a, images=[ref])
    t.s.wait(again, t.a)
    assert t.s.get(f"/v1/batches/{again}/jobs", t.a).json()["items"][0]["job_id"] == a_job["job_id"]


@pytest.mark.parametrize(("config", "field_name"), [
    ({"min_pixels": 150_000_000, "max_pixels": 150_000_000}, "min_pixels"),  # row 5
    ({"max_pixels": 150_000_000}, "max_pixels"),
    ({"max_questions": 10**9}, "max_questions"),  # row 6
    ({"max_init_tokens": 10**9}, "max_init_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"seed": {"an": "object"}}, "seed"),
])
def test_rows5_6_cost_over_the_limits_is_422_naming_the_field(tenants: Tenants, config, field_name):
    """Rows 5-6: pixels past the decode cap; questions, token budgets, NaN, an object seed."""
    t = tenants
    body = json.dumps({"images": [str(t.b_image)], "model": MODEL, "config": config})  # NaN as JSON allows
    r = t.as_b("post", "/v1/batches", content=body, headers={"Content-Type": "application/json"})
    problem = _problem(r, 422)
    assert problem["errors"][0]["loc"] == ["config", field_name] and field_name in problem["detail"]
    up = t.as_b("post", "/v1/batches", params={"model": MODEL, "config": json.dumps(config)},
                content=json.dumps({"image": str(t.b_image)}),
                headers={"Content-Type": "application/x-ndjson"})
    assert _problem(up, 422)["errors"][0]["loc"] == ["config", field_name]
    cap = t.as_b("post", "/v1/captions", content=json.dumps({"image": str(t.b_image), "model": MODEL,
                                                              "config": config}),
                 headers={"Content-Type": "application/json"})
    _problem(cap, 422)


def test_row7_malformed_input_is_4xx_and_a_bad_upload_line_is_its_own(tenants: Tenants):
    """Row 7: `{"images": ["http://[::1"]}`, JSON nested 1,000 deep, and both in an upload."""
    t = tenants
    _problem(t.as_b("post", "/v1/batches", json={"images": ["http://[::1"], "model": MODEL}), 400)
    deep = '{"images": ["https://x.example/a.png"], "config": {"extra": ' + "[" * 1000 + "]" * 1000 + "}}"
    _problem(t.as_b("post", "/v1/batches", content=deep, headers={"Content-Type": "application/json"}), 400)
    _problem(t.as_b("post", "/v1/captions", content='{"image": ' + "[" * 1000 + "]" * 1000 + "}",
                    headers={"Content-Type": "application/json"}), 400)
    lines = [json.dumps({"image": "http://[::1"}), "[" * 1000 + "]" * 1000,
             json.dumps({"image": str(t.b_image)})]
    up = t.as_b("post", "/v1/batches", params={"model": MODEL}, content="\n".join(lines),
                headers={"Content-Type": "application/x-ndjson"})
    assert up.status_code == 202, up.text
    assert up.json()["submission"] == {"submitted": 1, "failed": 2, "duplicates": 0}
    st = t.s.wait(up.json()["batch_id"], t.b)
    assert st["state"] != "submitting" and (st["done"], st["failed"]) == (1, 2)
    states = {b["state"] for b in t.as_b("get", "/v1/batches", params={"limit": 500}).json()["items"]
              if b["finished_at"] is not None or b["state"] == "submitting"}
    assert "submitting" not in states


def test_row8_concurrent_submits_cannot_pass_the_quota_together(tenants: Tenants):
    """Row 8: six submits of 3 images at once against `--max-queued 3`."""
    t = tenants
    q = create_key(t.s.env, "racer", "--max-queued", "3", "--allowed-roots", str(t.b_dir))
    imgs = make_images(t.b_dir / "race", ["red", "green", "blue"])

    def submit(i: int) -> int:
        refs = [str(p) for p in imgs]
        return t.s.post("/v1/batches", q, json={"images": refs, "model": IDLE_MODEL,
                                                "batch_id": f"race-{q.key_id}-{i}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(submit, range(6)))
    assert codes == [202, 429, 429, 429, 429, 429], codes
    listed = t.s.get("/v1/batches", q, params={"limit": 50}).json()["items"]
    assert sum(b["queued"] + b["running"] for b in listed) == 3
    for b in listed:
        t.s.post(f"/v1/batches/{b['batch_id']}/cancel", q)


@pytest.fixture(scope="module")
def small_api(tenants: Tenants, tmp_path_factory: pytest.TempPathFactory):
    """A second API process on the same fleet with a small default quota (row 9), its own log
    (row 10) and a fresh memory high-water mark (row 12)."""
    env = {**tenants.s.env, "SCALECAP_DEFAULT_MAX_QUEUED": "5"}
    api = ApiProcess(env, tmp_path_factory.mktemp("small-api") / "api.log").start()
    try:
        with httpx.Client(base_url=api.url, timeout=60) as http:
            yield api, http
    finally:
        api.stop()


def test_row9_keys_without_max_queued_get_the_default_quota(tenants: Tenants, small_api):
    """Row 9: keys with no `--max-queued` (SCALECAP_DEFAULT_MAX_QUEUED, 5 on this API)."""
    _, http = small_api
    k = create_key(tenants.s.env, "no-quota-given")
    refs = [f"https://x.example/{i}.png" for i in range(6)]
    r = http.post("/v1/batches", headers=k.headers, json={"images": refs, "model": IDLE_MODEL})
    _problem(r, 429)
    ok = http.post("/v1/batches", headers=k.headers, json={"images": refs[:5], "model": IDLE_MODEL})
    assert ok.status_code == 202
    _problem(http.post("/v1/batches", headers=k.headers, json={"images": refs[5:], "model": IDLE_MODEL}), 429)
    http.post(f"/v1/batches/{ok.json()['batch_id']}/cancel", headers=k.headers)
    again = http.post("/v1/batches", headers=k.headers, json={"images": refs[5:], "model": IDLE_MODEL})
    assert again.status_code == 202, "cancelling frees the quota"
    http.post(f"/v1/batches/{again.json()['batch_id']}/cancel", headers=k.headers)
    long_ref = "https://x.example/" + "a" * 9000
    too_long = http.post("/v1/batches", headers=k.headers, json={"images": [long_ref], "model": IDLE_MODEL})
    _problem(too_long, 400)


def test_row10_no_secret_in_the_access_log(tenants: Tenants, small_api):
    """Row 10: an upload with `?webhook=https://…?token=SECRET` or `llm_api_key` in its config,
    and a key sent as `?api_key=`."""
    api, http = small_api
    t = tenants
    secret = "SECRETTOKEN" + "9" * 8
    http.post("/v1/batches", headers={**t.b.headers, "Content-Type": "application/x-ndjson"},
              params={"model": IDLE_MODEL, "webhook": f"https://hooks.example/x?token={secret}"},
              content=json.dumps({"image": "https://x.example/1.png"}))
    r = http.post("/v1/batches", headers={**t.b.headers, "Content-Type": "application/x-ndjson"},
                  params={"model": IDLE_MODEL, "config": json.dumps({"llm_api_key": secret})},
                  content=json.dumps({"image": "https://x.example/1.png"}))
    assert 400 <= r.status_code < 500
    refused = http.get("/v1/batches", params={"api_key": t.b.raw})
    assert refused.status_code in (400, 401), refused.text
    time.sleep(0.5)
    log = api.log()
    assert "/v1/batches" in log
    assert secret not in log and t.b.raw not in log and t.b.raw.split("_")[-1] not in log
    for b in t.as_b("get", "/v1/batches", params={"limit": 500}).json()["items"]:
        if b.get("finished_at") is None:
            t.as_b("post", f"/v1/batches/{b['batch_id']}/cancel")


def _login(http: httpx.Client, key: Key) -> str:
    r = http.post("/login", data={"key": key.raw, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.cookies["scalecap_session"]


def test_row11_logout_ends_the_session_on_the_server(tenants: Tenants):
    """Row 11: the session cookie after logout."""
    t = tenants
    with httpx.Client(base_url=t.s.url, timeout=30) as http:
        cookie = _login(http, t.b)
        page = http.get("/")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        assert http.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    with httpx.Client(base_url=t.s.url, timeout=30, cookies={"scalecap_session": cookie}) as stolen:
        r = stolen.get("/", follow_redirects=False)
        assert r.status_code == 303 and "/login" in r.headers["location"], "the old cookie is dead"


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_row12_thumbnails_decode_once_and_stay_bounded(tenants: Tenants, small_api):
    """Row 12: a 175 KB data: PNG of 6300x6300 px, thumbnailed, four at once and again."""
    from PIL import Image

    api, http = small_api
    t = tenants
    refs = []
    for colour in ("navy", "olive", "teal", "maroon"):
        buf = io.BytesIO()
        Image.new("RGB", (6300, 6300), colour).save(buf, format="PNG")
        refs.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    assert all(len(r) < 250_000 for r in refs)  # about 175 KB of PNG each
    jobs = []
    for ref in refs:  # one per request: the stack's JSON body limit is 256 KiB
        bid = t.s.submit(t.b, images=[ref], model=IDLE_MODEL)
        jobs += [(bid, j) for j in t.as_b("get", f"/v1/batches/{bid}/jobs").json()["items"]]
    http.cookies.set("scalecap_session", _login(http, t.b))
    base = _vm_hwm_mib(api.pid)

    def thumb(job: tuple[str, dict[str, Any]]) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = http.get(f"/batches/{job[0]}/images/{job[1]['job_id']}/thumbnail", params={"size": 640})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.status_code
        return r.status_code, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        cold = [d for _, d in pool.map(thumb, jobs)]
    grown = _vm_hwm_mib(api.pid) - base
    full = 6300 * 6300 * 3 / 2**20  # one decoded bitmap, MiB
    assert grown < 2.5 * full, f"peak grew {grown:.0f} MiB for four {full:.0f} MiB decodes at once"
    warm = [thumb(j)[1] for j in jobs]
    assert max(warm) < min(cold) / 5, (cold, warm)
    for bid, _ in jobs:
        t.as_b("post", f"/v1/batches/{bid}/cancel")
    # Another key never hits B's cache: it cannot even see the job.
    with httpx.Client(base_url=api.url, timeout=30) as anonymous:
        other = anonymous.get(f"/batches/{jobs[0][0]}/images/{jobs[0][1]['job_id']}/thumbnail",
                              follow_redirects=False)
    assert other.status_code in (401, 303)


def test_zz_tenant_as_text_reached_nothing_b_saw(tenants: Tenants):
    """Done-when: A's text appears in no response, record, viewer page or log seen by tenant B."""
    t = tenants
    for b in t.as_b("get", "/v1/batches", params={"limit": 500}).json()["items"]:
        bid = b["batch_id"]
        t.as_b("get", f"/v1/batches/{bid}/results")
        t.as_b("get", f"/v1/batches/{bid}/failures")
        t.as_b("get", f"/v1/batches/{bid}/jobs")
    with httpx.Client(base_url=t.s.url, timeout=30) as http:
        _login(http, t.b)
        t.seen_by_b.append(http.get("/").text)
    leaked = [text[:200] for text in t.seen_by_b if SECRET_TEXT in text]
    assert not leaked, leaked
