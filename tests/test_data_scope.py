"""Data scopes (issue 14, item 1): what a key may read, decided from the reference's text alone,
inside the fleet's allow-lists; symlinks resolved only inside both scopes."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from scalecap.fleet.access import (
    FLEET_BUCKETS,
    FLEET_ROOTS,
    KEY_BUCKETS,
    KEY_ROOTS,
    ScopeRefused,
    check,
    check_listing,
)


def scope(roots=(), buckets=()):
    return SimpleNamespace(roots=tuple(roots), buckets=tuple(buckets))


@pytest.fixture
def tree(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x.png").write_bytes(b"a")
    (b / "secret.txt").write_text("b's")
    os.symlink(b / "secret.txt", a / "link.png")
    return tmp_path, a, b


def refused_by(ref, sc, roots, buckets=()):
    with pytest.raises(ScopeRefused) as info:
        check(ref, sc, roots, buckets)
    return info.value.scope


def test_a_key_without_scopes_reads_only_http_and_data(tree):
    root, a, _ = tree
    none = scope()
    for ok in ("https://x.example/a.png", "http://h/a.png", "data:image/png;base64,AA"):
        check(ok, none, [str(root)], [])
    assert refused_by(str(a / "x.png"), none, [str(root)]) == KEY_ROOTS
    assert refused_by("s3://bucket/a.png", none, [str(root)]) == KEY_BUCKETS
    assert refused_by(f"wds+file://{a}/s.tar#key=k&ext=png&offset=512&size=4", none, [str(root)]) == KEY_ROOTS
    assert refused_by("pq+s3://bucket/t.parquet#rg=0&row=0&col=image", none, []) == KEY_BUCKETS


def test_roots_of_the_key_inside_the_fleets(tree):
    root, a, b = tree
    sa = scope(roots=[str(a)])
    check(str(a / "x.png"), sa, [str(root)])
    check(f"file://{a}/x.png", sa, [str(root)])
    check(str(a / "missing.png"), sa, [str(root)])  # inside: whether it exists is the key's business
    assert refused_by(str(b / "secret.txt"), sa, [str(root)]) == KEY_ROOTS
    assert refused_by(str(b / "nothing-here"), sa, [str(root)]) == KEY_ROOTS  # same answer: no leak
    assert refused_by(f"{a}/../b/secret.txt", sa, [str(root)]) == KEY_ROOTS
    assert refused_by(str(a / "link.png"), sa, [str(root)]) == KEY_ROOTS  # a symlink out
    assert refused_by(str(a / "x.png"), sa, [str(b)]) == FLEET_ROOTS  # the fleet's bound first
    assert refused_by(str(a / "x.png"), None, []) == FLEET_ROOTS
    check(str(b / "secret.txt"), None, [str(root)])  # fleet-wide (--all-data)
    assert refused_by(f"pq+file://{a}/t.parquet#rg=0&row=0&col=u&url=file%3A%2F%2F{b}%2Fsecret.txt",
                      sa, [str(root)]) == KEY_ROOTS  # what a URL column would open


def test_buckets_and_prefixes():
    sb = scope(buckets=["team-a/in", "shared"])
    check("s3://team-a/in/x.png", sb, [], [])
    check("s3://team-a/in", sb, [], [])
    check("s3://shared/any/thing.png", sb, [], [])
    assert refused_by("s3://team-a/inside/x.png", sb, []) == KEY_BUCKETS  # a sibling, not below
    assert refused_by("s3://team-b/x.png", sb, []) == KEY_BUCKETS
    assert refused_by("s3://no-such-bucket/x.png", sb, []) == KEY_BUCKETS  # same answer
    assert refused_by("s3://shared/x.png", sb, [], ["team-a"]) == FLEET_BUCKETS
    assert check_listing("s3://team-a/in", sb, []) == "s3://team-a/in/"
    assert check_listing("s3://team-a/in/2024/", sb, []) == "s3://team-a/in/2024/"
    assert check_listing("s3://shared/", sb, []) == "s3://shared/"
    for bad in ("s3://team-a/", "s3://team-a/i", "s3://team-b/in"):
        with pytest.raises(ScopeRefused):
            check_listing(bad, sb, [])
