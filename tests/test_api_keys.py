"""API keys against a real redis-server: only hashes are stored, revoked and wrong keys fail, and
`scalecap keys create` prints what the scripts parse. Plus the API's reference guard and its
streamed line reader (no server needed)."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from producer.api.refs import RefError, RefRefused, check_ref, checked_rows
from producer.api.submission import MAX_LINE_BYTES, UploadTooLarge, body_lines
from producer.sources import SourceRow
from scalecap.errors import ConfigError
from scalecap.fleet.keys import ApiKey, KeyStore, parse_scopes
from scalecap.fleet.scope import Scope


@pytest.fixture
def keys(redis_url: str):
    import redis

    r = redis.Redis.from_url(redis_url)
    yield KeyStore(r)
    r.close()


def test_create_verify_revoke_and_only_a_hash_is_stored(keys: KeyStore):
    raw, key, secret = keys.create("team-a", max_queued=5)
    assert raw.startswith(f"sk_{key.key_id}_") and secret.startswith("whsec_")
    assert key == ApiKey(key.key_id, "team-a", frozenset({"submit", "read"}), 5, key.created_at, False)
    assert keys.verify(raw) == key and keys.get(key.key_id) == key
    for wrong in (raw[:-1] + ("x" if raw[-1] != "x" else "y"), raw + "a", "", None, "sk_x_y",
                  f"sk_{'0' * 16}_{raw.split('_', 2)[2]}"):
        assert keys.verify(wrong) is None
    assert keys.webhook_secret(key.key_id) == secret and keys.webhook_secret("nope") is None

    # Neither the key nor its secret part is anywhere in Redis; its SHA-256 is.
    dump = b"".join(keys.r.dump(k) or b"" for k in keys.r.scan_iter())
    assert raw.encode() not in dump and raw.split("_", 2)[2].encode() not in dump
    assert hashlib.sha256(raw.encode()).hexdigest().encode() in dump

    assert keys.revoke(key.key_id) and keys.verify(raw) is None
    assert keys.get(key.key_id).revoked and not keys.revoke("0" * 16)
    assert [k.key_id for k in keys.list()] == [key.key_id]
    assert keys.webhook_secret(key.key_id) == secret  # a revoked key's batches still sign


def test_scopes(keys: KeyStore):
    _, admin, _ = keys.create("ops", scopes="admin")
    _, reader, _ = keys.create("dash", scopes=["read"])
    assert admin.is_admin and admin.can("submit") and admin.can("read")
    assert reader.can("read") and not reader.can("submit") and not reader.is_admin
    with pytest.raises(ConfigError):
        parse_scopes("read,root")
    with pytest.raises(ConfigError):
        parse_scopes("")
    with pytest.raises(ConfigError):
        keys.create(" ")


def test_cli_prints_the_key_once_in_lines_scripts_parse(redis_url: str, capsys):
    from scalecap_command import main

    broker = ["--broker-url", redis_url]
    assert main(["keys", "create", "--name", "demo", "--scopes", "submit,read", *broker]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(": ", 1) for line in out.splitlines() if not line.startswith("#"))
    assert lines["key"].startswith("sk_") and lines["webhook_secret"].startswith("whsec_")
    assert main(["keys", "list", *broker]) == 0
    listed = capsys.readouterr().out
    assert lines["key_id"] in listed and lines["key"] not in listed and '"revoked": false' in listed
    assert main(["keys", "revoke", lines["key_id"], *broker]) == 0
    assert main(["keys", "list", *broker]) == 0
    assert '"revoked": true' in capsys.readouterr().out


def test_references_outside_the_roots_are_refused(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (root / "out.png").symlink_to("/etc/hostname")
    roots = [str(root)]
    for ok in (f"{root}/a.png", f"file://{root}/a.png", f"{root}/missing/b.png", "https://x.example/a.jpg",
               "s3://bucket/key.png", "data:image/png;base64,AAAA"):
        assert check_ref(ok, roots)
    for bad in ("/etc/passwd", f"{root}/../x.png", f"{root}/out.png", "a.png", "file:///etc/passwd",
                "ftp://x/y", "s3://bucket", "https://", "", "   ", f"file://host{root}/a.png"):
        with pytest.raises(RefError):
            check_ref(bad, roots)
    with pytest.raises(RefRefused, match="the fleet's SCALECAP_ALLOWED_ROOTS"):
        check_ref(f"{root}/a.png", [])
    with pytest.raises(RefRefused, match="the key's allowed roots"):  # a key scoped elsewhere
        check_ref(f"{root}/a.png", roots, scope=Scope.of([str(tmp_path / "other")]))
    with pytest.raises(RefRefused, match="the key's allowed buckets"):  # a key without buckets
        check_ref("s3://bucket/key.png", roots, scope=Scope.of([str(root)]))
    rows = list(checked_rows([SourceRow(f"{root}/a.png"), SourceRow("/etc/passwd")], roots))
    assert rows[0].error is None and rows[1].error["type"] == "ImageAccessDenied"


def _lines(chunks: list[bytes], limit: int = 10**9) -> list[str]:
    """body_lines over `chunks`, consumed in a thread as the API consumes it."""
    loop = asyncio.new_event_loop()
    out: list[str] = []
    error: list[BaseException] = []

    async def stream():
        for c in chunks:
            yield c

    def consume() -> None:
        try:
            out.extend(body_lines(stream(), loop, limit, threading.Event()))
        except BaseException as exc:
            error.append(exc)
        finally:
            loop.call_soon_threadsafe(loop.stop)

    t = threading.Thread(target=consume)
    t.start()
    loop.run_forever()
    t.join()
    loop.close()
    if error:
        raise error[0]
    return out


def test_streamed_lines_split_across_chunks_and_long_lines_become_one_bad_line():
    assert _lines([b'{"image": "a', b'"}\n"b"\n', "é".encode()[:1], "é".encode()[1:] + b"\nlast"]) == [
        '{"image": "a"}', '"b"', "é", "last"]
    long = [b"x" * (MAX_LINE_BYTES // 2)] * 3 + [b"tail\nnext\n"]
    got = _lines(long)
    assert len(got) == 2 and got[1] == "next" and len(got[0]) < 100  # marker, not the line
    with pytest.raises(UploadTooLarge):
        _lines([b"a\n" * 100] * 3, limit=500)


def test_keys_carry_their_data_scope(keys: KeyStore):
    _, plain, _ = keys.create("plain")
    assert (plain.roots, plain.buckets, plain.fleet_wide) == ((), (), False)
    _, scoped, _ = keys.create("scoped", roots="/data/a/,/data/b", buckets="s3://team-a/in/,shared")
    assert keys.get(scoped.key_id) == scoped
    assert scoped.roots == ("/data/a", "/data/b") and scoped.buckets == ("team-a/in", "shared")
    _, wide, _ = keys.create("demo", all_data=True)
    assert keys.get(wide.key_id).fleet_wide and wide.to_dict()["all_data"] is True
    for bad in ({"roots": "relative/dir"}, {"buckets": "Bad_Bucket"}, {"buckets": "b1/../x"},
                {"roots": "/x", "all_data": True}):
        with pytest.raises(ConfigError):
            keys.create("bad", **bad)
