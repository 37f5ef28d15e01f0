"""Shard references are the fleet's word (issue 14, item 2): a member is read with its own tar
header, so a hand-written range on another file, or a sidecar range off its member, reads nothing."""

from __future__ import annotations

import io
import tarfile

import pytest

from scalecap.images.members import NotThisMember, check_header, read_member


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _offsets(blob: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def test_members_are_read_only_with_their_own_header():
    long_key = "d/" + "k" * 120
    blob = _tar({"s1.png": b"PNGDATA", "s1.txt": b"alt text", "s2.txt": b"other sample",
                 f"{long_key}.txt": b"long"})
    where = _offsets(blob)

    def read(offset: int, size: int) -> bytes:
        return blob[offset:offset + size]

    assert read_member(read, "s1", "png", *where["s1.png"], "d") == b"PNGDATA"
    assert read_member(read, "s1", "txt", *where["s1.txt"], "d") == b"alt text"
    assert read_member(read, long_key, "txt", *where[f"{long_key}.txt"], "d") == b"long"
    bad = [
        ("s1", "txt", *where["s2.txt"]),  # another sample's sidecar
        ("s1", "txt", where["s1.txt"][0], 3),  # part of the member
        ("s1", "txt", where["s1.txt"][0] + 512, 8),  # off the member
        ("s1", "png", 0, 93),  # the hand-written offset=0 of issue 14
        ("s1", "txt", 512, 512),  # a header block read as data
    ]
    for key, ext, offset, size in bad:
        with pytest.raises(NotThisMember):
            read_member(read, key, ext, offset, size, "d")


def test_a_plain_file_is_no_shard():
    notes = b"tenant A's private notes\n" * 40
    with pytest.raises(NotThisMember):
        check_header(notes[:512], "x", "txt", 93, "notes.txt")
    with pytest.raises(NotThisMember):
        read_member(lambda o, n: notes[o:o + n], "x", "png", 512, 4, "notes.txt")


def test_the_api_re_derives_a_clients_reference_from_the_shard(tmp_path):
    from scalecap.errors import ImageError
    from scalecap.images.load import ImageLimits
    from scalecap.images.shards import verify_shard_ref

    blob = _tar({"s1.png": b"PNGDATA", "s1.txt": b"alt text", "s2.txt": b"other"})
    shard = tmp_path / "s.tar"
    shard.write_bytes(blob)
    notes = tmp_path / "notes.txt"
    notes.write_text("private " * 100)
    where = _offsets(blob)
    limits = ImageLimits(allowed_roots=[str(tmp_path)])
    (po, ps), (to, ts), (oo, os_) = where["s1.png"], where["s1.txt"], where["s2.txt"]
    verify_shard_ref(f"wds+file://{shard}#key=s1&ext=png&offset={po}&size={ps}&txt={to}:{ts}", limits, "d")
    for bad in (f"wds+file://{shard}#key=s1&ext=png&offset={po}&size={ps}&txt={oo}:{os_}",
                f"wds+file://{shard}#key=s2&ext=png&offset={po}&size={ps}",
                f"wds+file://{notes}#key=x&ext=png&offset=0&size=4&txt=0:93",
                f"wds+file://{notes}#key=x&ext=png&offset=512&size=4"):
        with pytest.raises(ImageError):
            verify_shard_ref(bad, limits, "d")

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"image": [b"a", b"b"], "uid": ["x", "y"]})
    pq.write_table(table, tmp_path / "t.parquet")
    verify_shard_ref(f"pq+file://{tmp_path}/t.parquet#rg=0&row=1&col=image", limits, "d")
    for bad in ("rg=0&row=2&col=image", "rg=1&row=0&col=image", "rg=0&row=0&col=nope"):
        with pytest.raises(ImageError):
            verify_shard_ref(f"pq+file://{tmp_path}/t.parquet#{bad}", limits, "d")
    with pytest.raises(ImageError):
        verify_shard_ref(f"pq+file://{notes}#rg=0&row=0&col=image", limits, "d")
