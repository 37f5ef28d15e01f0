"""WebDataset and Parquet inputs: indexing by the producer, one member or row read by a worker.

Shards are built here with the standard library, pyarrow and HF `datasets`; S3 tests use the real
SeaweedFS server. Damaged shards (cut, garbage headers, corrupt row groups, wrong columns) must give
error rows or error records for the damaged items only.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.sources import SourceRow, expand, expand_braces
from scalecap.errors import ImageAccessDenied, ImageError, NotAnImage, TruncatedImage
from scalecap.images import ImageLimits, load_image
from scalecap.images.refs import MemberRef, RowRef, Span, locations, parse_ref
from scalecap.images.shards import attach_source, source_meta
from tests.scripted_vlm import COLOURS

# --- builders (also used by the export tests) -----------------------------------------------------


def png(colour: str, n: int = 0, size: tuple[int, int] = (64, 48), noise: int = 0) -> bytes:
    """A PNG of one colour; `noise` rows at the top make it big and incompressible."""
    img = Image.new("RGB", size, COLOURS[colour])
    img.putpixel((0, 0), (n % 256, (n // 256) % 256, 9))
    if noise:
        img.paste(Image.frombytes("RGB", (size[0], noise), random.Random(n).randbytes(size[0] * noise * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def wds_samples(colours: list[str], start: int = 0) -> list[tuple[str, bytes]]:
    """img2dataset-style samples: `{key}.png`, `{key}.json` (with the old caption), `{key}.txt`."""
    out = []
    for i, colour in enumerate(colours, start):
        key = f"{i:06d}"
        out += [(f"{key}.png", png(colour, i)),
                (f"{key}.json", json.dumps({"key": key, "caption": f"old caption {colour}"}).encode()),
                (f"{key}.txt", f"alt text {colour}".encode())]
    return out


def limits(tmp: Path | None = None, **kw: Any) -> ImageLimits:
    return ImageLimits(allowed_roots=[str(tmp)] if tmp else None, **kw)


def good(rows: list[SourceRow]) -> list[str]:
    return [r.ref for r in rows if r.error is None]


def bad(rows: list[SourceRow]) -> list[dict[str, str]]:
    return [r.error for r in rows if r.error is not None]


# --- references ---------------------------------------------------------------------------------


def test_refs_round_trip_with_awkward_names() -> None:
    m = MemberRef("s3://b/dir with space/s#1.tar", "a/b&c=d", "jpg", Span(1536, 10), {"txt": Span(3, 4)})
    assert parse_ref(m.to_ref()) == m
    r = RowRef("/data/t rain.parquet", 3, 17, "image", id="k&1", url="https://x/a.jpg?q=1#f")
    assert parse_ref(r.to_ref()) == r
    assert locations(m.to_ref()) == ["s3://b/dir with space/s#1.tar"]
    assert locations(r.to_ref()) == ["/data/t rain.parquet", "https://x/a.jpg?q=1#f"]
    with pytest.raises(ImageError, match="malformed"):
        parse_ref("wds+file:///x.tar#key=a&offset=1")
    with pytest.raises(ImageError, match="malformed"):
        parse_ref("wds+relative/x.tar#key=a&offset=1&size=2")


def test_brace_patterns_keep_padding() -> None:
    assert list(expand_braces("s/{00008..00011}.tar")) == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert list(expand_braces("{a,b}/{1..2}.tar")) == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert list(expand_braces("x{y}.tar")) == ["x{y}.tar"]


# --- WebDataset, local ----------------------------------------------------------------------------


def test_wds_local_every_image_member_is_a_job_with_its_sidecars(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [
        *wds_samples(["red", "blue"]),
        ("d" * 120 + "/000002.jpg", png("green", 2)),  # a pax long name
        ("000003.json", b"{}"),  # a sample without an image
        ("000004.jpg", b"not an image at all"),
    ])
    rows = list(expand(str(shard)))
    refs = good(rows)
    assert len(refs) == 4 and all(r.startswith("wds+file://") for r in refs)
    assert [e["type"] for e in bad(rows)] == ["NoImageMember"]
    lim = limits(tmp_path)
    first = parse_ref(refs[0])
    assert isinstance(first, MemberRef) and first.key == "000000" and set(first.sidecars) == {"json", "txt"}
    raw = shard.read_bytes()
    assert raw[first.span.offset : first.span.offset + first.span.size] == png("red", 0)
    for ref, colour in zip(refs[:3], ["red", "blue", "green"], strict=True):
        img = load_image(ref, limits=lim)
        assert img.getpixel((img.width // 2, img.height // 2)) == COLOURS[colour]
    meta = source_meta(refs[1], lim)
    assert meta == {"format": "webdataset", "shard": str(shard), "key": "000001", "ext": "png",
                    "json": {"key": "000001", "caption": "old caption blue"}, "txt": "alt text blue"}
    assert source_meta(refs[2], lim)["key"] == "d" * 120 + "/000002"
    with pytest.raises(NotAnImage, match=r"000004\.jpg"):
        load_image(refs[3], limits=lim)
    record = attach_source({"error": {"type": "NotAnImage"}, "meta": {"job_id": "j"}}, refs[3], lim)
    assert record["meta"]["source"]["key"] == "000004" and record["meta"]["job_id"] == "j"
    assert attach_source({"meta": {}}, "/some/image.png", lim) == {"meta": {}}


class Store:
    """Where a damage test puts its shards: local files, or objects in the real SeaweedFS."""

    def __init__(self, tmp: Path, client: Any = None, bucket: str | None = None) -> None:
        self.tmp, self.client, self.bucket = tmp, client, bucket

    def put(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        if self.client is None:
            return str(path)
        self.client.put_object(Bucket=self.bucket, Key=f"d/{name}", Body=data)
        return f"s3://{self.bucket}/d/{name}"

    def expand(self, source: str, **kw: Any) -> list[SourceRow]:
        return list(expand(source, s3_client_factory=lambda: self.client, **kw))

    def limits(self) -> ImageLimits:
        return ImageLimits(allowed_roots=[str(self.tmp)], s3_client_factory=lambda: self.client)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(tmp_path)
    return Store(tmp_path, request.getfixturevalue("s3_server").client(),
                 request.getfixturevalue("s3_bucket"))


def test_wds_truncated_and_corrupt_shards_lose_only_the_damaged_part(store: Store) -> None:
    raw = write_tar(store.tmp / "src.tar", [*wds_samples(["red", "blue", "green"]),
                                            ("000003.jpg", b"not an image")]).read_bytes()
    full = store.put("full.tar", raw)
    refs = good(store.expand(full))
    assert len(refs) == 4
    with pytest.raises(NotAnImage, match=r"000003\.jpg"):  # a member that is not an image
        load_image(refs[3], limits=store.limits())
    second = parse_ref(refs[1])
    cuts = {
        "in-data": second.span.offset + 40,  # inside the second image
        "in-header": second.span.offset - 200,  # inside the second image's header
        "after-member": second.span.offset + 512,  # whole image, no end-of-archive marker
    }
    for name, cut in cuts.items():
        rows = store.expand(store.put(f"{name}.tar", raw[:cut]))
        assert parse_ref(good(rows)[0]).key == "000000", name
        errors = bad(rows)
        assert errors and errors[-1]["type"] == "TruncatedShard", (name, errors)
        assert len(good(rows)) == (2 if name == "after-member" else 1), name
    # Garbage in the third sample's header: the first two samples survive.
    third = parse_ref(refs[2])
    hdr = third.span.offset - 512
    rows = store.expand(store.put("garbled.tar", raw[:hdr] + b"\xff" * 512 + raw[hdr + 512 :]))
    assert len(good(rows)) == 2 and [e["type"] for e in bad(rows)] == ["CorruptShard"]
    # A shard rewritten shorter after indexing: the worker says so instead of decoding a stub.
    store.put("full.tar", raw[: third.span.offset + 10])
    with pytest.raises(TruncatedImage, match="truncated or rewritten"):
        load_image(refs[2], limits=store.limits())
    with pytest.raises(TruncatedImage, match="truncated or rewritten"):  # past the new end
        load_image(refs[3], limits=store.limits())


def test_wds_reads_stay_inside_allowed_roots(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a" / "s.tar", wds_samples(["red"]))
    ref = good(list(expand(str(shard))))[0]
    with pytest.raises(ImageAccessDenied, match="outside the allowed roots"):
        load_image(ref, limits=limits(tmp_path / "elsewhere"))
    with pytest.raises(ImageAccessDenied):
        load_image(ref, limits=ImageLimits(allowed_roots=[]))
    assert load_image(ref, limits=limits(tmp_path / "a")).size[0] > 0


def test_wds_brace_patterns_directories_and_missing_shards(tmp_path: Path) -> None:
    for n in range(3):
        write_tar(tmp_path / "shards" / f"{n:05d}.tar", wds_samples(["red", "blue"], start=10 * n))
    rows = list(expand(str(tmp_path / "shards" / "{00000..00003}.tar")))
    assert len(good(rows)) == 6
    assert [e["type"] for e in bad(rows)] == ["ShardNotFound"]
    assert len(good(list(expand(str(tmp_path / "shards"))))) == 6


# --- Parquet / HF datasets, local ---------------------------------------------------------------


def _hf_parquet(path: Path, colours: list[str]) -> Path:
    """A real HF datasets file: the Image feature stores {bytes, path} structs."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(c, i), "path": f"{i}.png"} for i, c in enumerate(colours)],
         "uid": [f"uid-{i}" for i in range(len(colours))], "caption": [f"old {c}" for c in colours]},
        features=datasets.Features({"image": datasets.Image(), "uid": datasets.Value("string"),
                                    "caption": datasets.Value("string")}),
    )
    ds.to_parquet(str(path))
    return path


def test_hf_datasets_parquet_with_embedded_images(tmp_path: Path) -> None:
    path = _hf_parquet(tmp_path / "train.parquet", ["red", "blue", "green"])
    rows = list(expand(str(path), image_column="image", id_column="uid"))
    refs = good(rows)
    assert len(refs) == 3 and not bad(rows)
    lim = limits(tmp_path)
    for i, (ref, colour) in enumerate(zip(refs, ["red", "blue", "green"], strict=True)):
        assert parse_ref(ref).id == f"uid-{i}"
        img = load_image(ref, limits=lim)
        assert img.getpixel((img.width // 2, img.height // 2)) == COLOURS[colour]
        assert source_meta(ref, lim)["id"] == f"uid-{i}"


def test_parquet_url_column_relative_paths_and_ids(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    for i, c in enumerate(["red", "blue"]):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(c, i))
    table = pa.table({"url": ["img/0.png", str(tmp_path / "img" / "1.png"), None], "key": [7, 8, 9]})
    pq.write_table(table, tmp_path / "urls.parquet")
    rows = list(expand(str(tmp_path / "urls.parquet"), image_column="url", id_column="key"))
    refs = good(rows)
    assert [parse_ref(r).url for r in refs] == [str(tmp_path / "img" / f"{i}.png") for i in range(2)]
    assert [parse_ref(r).id for r in refs] == ["7", "8"]
    assert [e["type"] for e in bad(rows)] == ["MissingImage"]
    img = load_image(refs[1], limits=limits(tmp_path))
    assert img.getpixel((img.width // 2, img.height // 2)) == COLOURS["blue"]
    with pytest.raises(ImageAccessDenied):  # the inner path goes through the same guard
        load_image(refs[1], limits=limits(tmp_path / "img" / "none"))


def test_parquet_wrong_columns_are_one_error_each(store: Store) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = store.put("t.parquet", _hf_parquet(store.tmp / "src.parquet", ["red"]).read_bytes())
    assert [e["type"] for e in bad(store.expand(hf, image_column="picture"))] == ["MissingColumn"]
    assert [e["type"] for e in bad(store.expand(hf, id_column="nope"))] == ["MissingColumn"]
    assert len(good(store.expand(hf, id_column="uid"))) == 1
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [1, 2]}), buf)
    ints = store.put("ints.parquet", buf.getvalue())
    assert [e["type"] for e in bad(store.expand(ints))] == ["WrongColumnType"]
    junk = store.put("junk.parquet", b"PAR1 not really")
    assert [e["type"] for e in bad(store.expand(junk))] == ["UnreadableShard"]


def _corrupt_column_chunk(path: Path, row_group: int, column: str) -> None:
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    idx = next(i for i, n in enumerate(names) if n.split(".")[0] == column)
    col = md.row_group(row_group).column(idx)
    start = col.data_page_offset + 20
    data = bytearray(path.read_bytes())
    data[start : start + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))


def test_parquet_corrupt_row_group_fails_its_rows_only(store: Store) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = ["red", "blue", "green", "yellow"]
    table = pa.table({"img": [png(c, i) for i, c in enumerate(colours)], "uid": ["a", "b", "c", "d"]})
    src = store.tmp / "src.parquet"
    pq.write_table(table, src, row_group_size=2)
    _corrupt_column_chunk(src, 1, "img")  # worker side: rows 2 and 3 fail, 0 and 1 load
    where = store.put("rg.parquet", src.read_bytes())
    refs = good(store.expand(where, image_column="img", id_column="uid"))
    assert len(refs) == 4
    lim = store.limits()
    assert load_image(refs[0], limits=lim).size[0] > 0 and load_image(refs[1], limits=lim).size[0] > 0
    for ref in refs[2:]:
        with pytest.raises(ImageError):
            load_image(ref, limits=lim)
    pq.write_table(table, src, row_group_size=2)
    _corrupt_column_chunk(src, 0, "uid")  # producer side: the id column of row group 0 is damaged
    rows = store.expand(store.put("rg-id.parquet", src.read_bytes()), image_column="img", id_column="uid")
    assert [e["type"] for e in bad(rows)] == ["CorruptRowGroup", "CorruptRowGroup"]
    assert [parse_ref(r).row_group for r in good(rows)] == [1, 1]


# --- S3 (SeaweedFS) -------------------------------------------------------------------------------


def _recording_client(s3_server: Any) -> tuple[Any, list[dict[str, Any]]]:
    client = s3_server.client()
    calls: list[dict[str, Any]] = []
    client.meta.events.register("provide-client-params.s3.GetObject",
                                lambda params, **_: calls.append(dict(params)))
    return client, calls


@pytest.mark.services
def test_wds_on_s3_pattern_prefix_and_ranged_reads(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    client, calls = _recording_client(s3_server)
    for n in range(2):
        body = write_tar(tmp_path / f"{n}.tar", wds_samples(["red", "blue"], start=10 * n)).read_bytes()
        client.put_object(Bucket=s3_bucket, Key=f"shards/{n:05d}.tar", Body=body)
    full = (tmp_path / "0.tar").read_bytes()
    client.put_object(Bucket=s3_bucket, Key="cut/00000.tar", Body=full[:1000])
    rows = list(expand(f"s3://{s3_bucket}/shards/{{00000..00001}}.tar", s3_client_factory=lambda: client))
    assert len(good(rows)) == 4 and not bad(rows)
    assert len(good(list(expand(f"s3://{s3_bucket}/shards", s3_client_factory=lambda: client)))) == 4
    cut = list(expand(f"s3://{s3_bucket}/cut/00000.tar", s3_client_factory=lambda: client))
    assert [e["type"] for e in bad(cut)] == ["TruncatedShard"] and len(good(cut)) == 1  # 000000.png
    lim = ImageLimits(s3_client_factory=lambda: client)
    calls.clear()
    ref = good(rows)[3]
    img = load_image(ref, limits=lim)
    assert img.getpixel((img.width // 2, img.height // 2)) == COLOURS["blue"]
    span = parse_ref(ref).span
    # One ranged read: the member's data and the 512-byte tar header before it (members.py).
    assert calls == [{"Bucket": s3_bucket, "Key": "shards/00001.tar",
                      "Range": f"bytes={span.offset - 512}-{span.offset + span.size - 1}"}]
    assert source_meta(ref, lim)["json"]["caption"] == "old caption blue"
    assert all("Range" in c for c in calls)
    with pytest.raises(ImageAccessDenied, match="allowed_buckets"):
        load_image(ref, limits=ImageLimits(s3_client_factory=lambda: client, allowed_buckets=["other"]))


@pytest.mark.services
def test_parquet_on_s3_reads_one_row_group_column(s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    client, calls = _recording_client(s3_server)
    colours = ["red", "blue", "green", "yellow"] * 8
    cells = [{"bytes": png(c, i, (128, 128), noise=32), "path": None} for i, c in enumerate(colours)]
    table = pa.table({"img": cells, "uid": [f"u{i}" for i in range(len(colours))]})
    path = tmp_path / "s3.parquet"
    pq.write_table(table, path, row_group_size=4)
    body = path.read_bytes()
    client.put_object(Bucket=s3_bucket, Key="d/train.parquet", Body=body)
    rows = list(expand(f"s3://{s3_bucket}/d/train.parquet", image_column="img", id_column="uid",
                       s3_client_factory=lambda: client))
    refs = good(rows)
    assert len(refs) == 32 and parse_ref(refs[13]).id == "u13"
    calls.clear()
    img = load_image(refs[13], limits=ImageLimits(s3_client_factory=lambda: client))
    assert img.getpixel((img.width // 2, img.height // 2)) == COLOURS["blue"]
    fetched = sum(int(c["Range"].split("-")[1]) - int(c["Range"][6:].split("-")[0]) + 1 for c in calls)
    assert calls and all("Range" in c for c in calls) and len(calls) < 8
    one_chunk = pq.ParquetFile(path).metadata.row_group(3).column(0).total_compressed_size
    # pyarrow's speculative 64 KiB footer read, then this row group's image column only
    assert fetched <= 64 * 1024 + one_chunk + 4096 < len(body), (fetched, one_chunk, len(body))


@pytest.mark.services
def test_indexing_a_large_shard_holds_neither_the_shard_nor_a_member(
        s3_server: Any, s3_bucket: str, tmp_path: Path) -> None:
    """24 MiB of 1 MiB members: the producer's peak allocation stays far below one member."""
    import tracemalloc

    blob = random.Random(1).randbytes(1 << 20)
    shard = write_tar(tmp_path / "big.tar", [(f"{i:06d}.jpg", blob) for i in range(24)])
    client = s3_server.client()
    client.upload_file(str(shard), s3_bucket, "big/00000.tar")
    for source in (str(shard), f"s3://{s3_bucket}/big/00000.tar"):
        tracemalloc.start()
        try:
            n = sum(1 for r in expand(source, s3_client_factory=lambda: client) if r.error is None)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 24
        # The S3 stream is read through in 256 KiB chunks and dropped; a local file is seeked over.
        assert peak < 1 << 20, (source, peak)
