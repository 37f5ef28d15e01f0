"""`scalecap results`: a batch's records as JSONL, flat Parquet, or WebDataset tar shards.

Streaming in constant memory: job ids come from the batch's index a window at a time, that
window's records are fetched together (S3: many signed GETs in flight on keep-alive connections,
producer/s3_fetch.py; Redis: one pipelined round trip), the next window is already in flight
while this one is written, and each writer flushes as it goes (a Parquet row group, a tar member).
A record that cannot be read (expired, deleted) becomes an error row; nothing stops the export.
The Parquet schema is flat and documented in docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from scalecap.fleet.outcomes import JobState

FORMATS = ("jsonl", "parquet", "webdataset")
WINDOW = 500
"""Records fetched per round (and held in memory, twice: the one written, the next in flight)."""
CONNECTIONS = 32
"""S3 GETs in flight at once."""
ROW_GROUP_ROWS = 2000
SHARD_MEMBERS = 10_000
"""Samples per output tar shard."""


# --- reading ------------------------------------------------------------------------------------


def _error_row(ref: str | None, job_id: str, error: dict[str, Any]) -> dict[str, Any]:
    return {"image": ref, "scalecap_record": {"error": error, "meta": {"job_id": job_id}}}


class _Window:
    """One window of jobs: (job_id, ref, location, state, error) and, once fetched, bodies."""

    def __init__(self, jobs: list[tuple[str, list[str | None]]]) -> None:
        self.jobs = jobs
        self.locations = [loc for _, (_, _, loc, _) in jobs if loc]
        self.pending: Future[Any] | None = None
        self.bodies: list[Any] = []


def iter_rows(client: Any, batch_id: str, *, connections: int = CONNECTIONS, window: int = WINDOW,
              raw: bool = False) -> Iterator[Any]:
    """Rows ({"image", "scalecap_record"}) of every finished job of a batch, in the batch's order.

    Same rows as FleetClient.results (done and failed jobs; cancelled and unfinished skipped), but
    fetched a window at a time with the next window in flight. `raw=True` yields a stored record
    as its compact JSON bytes, unparsed (JSONL export: parsing and re-serialising would be half
    of its CPU); rows made here (errors) are still dicts."""
    sink_url = client._batch(batch_id)["sink"]
    fields = ("state", "ref", "location", "error")
    fetch = _S3Reader(client.settings, connections) if sink_url.startswith("s3://") else _RedisReader(
        client.sink(sink_url))
    try:
        ahead: _Window | None = None
        for chunk in _chunks(client._jobs(batch_id, fields, chunk=window), window):
            w = _Window(chunk)
            fetch.start(w)
            if ahead is not None:
                yield from _rows(ahead, fetch, raw)
            ahead = w
        if ahead is not None:
            yield from _rows(ahead, fetch, raw)
    finally:
        fetch.close()


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rows(w: _Window, fetch: Any, raw: bool) -> Iterator[Any]:
    bodies = iter(fetch.finish(w))
    for job_id, (state, ref, location, error) in w.jobs:
        if location:
            body = next(bodies)
            if isinstance(body, BaseException):
                yield _error_row(ref, job_id, {"stage": "sink", "type": type(body).__name__,
                                               "message": f"record {location} cannot be read: {body}"})
                continue
            if raw and body[:1] == b"{" and b"\n" not in body:  # one compact object: as stored
                yield body
                continue
            try:
                yield json.loads(body)
            except ValueError as exc:
                yield _error_row(ref, job_id, {"stage": "sink", "type": "MalformedRecord",
                                               "message": f"record {location}: {exc}"})
        elif state == JobState.FAILED:
            no_record = {"stage": "queue", "type": "Unknown", "message": "no record"}
            yield _error_row(ref, job_id, json.loads(error) if error else no_record)


class _S3Reader:
    def __init__(self, settings: Any, connections: int) -> None:
        from producer.s3_fetch import S3Fetcher

        self.fetcher = S3Fetcher(settings, connections=connections)

    def start(self, w: _Window) -> None:
        w.pending = self.fetcher.submit(w.locations)

    def finish(self, w: _Window) -> list[Any]:
        assert w.pending is not None
        return self.fetcher.collect(w.locations, w.pending)

    def close(self) -> None:
        self.fetcher.close()


class _RedisReader:
    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def start(self, w: _Window) -> None:
        pipe = self.sink.redis.pipeline(transaction=False)
        for loc in w.locations:
            pipe.get(self.sink._key_of(loc))
        w.bodies = pipe.execute()

    def finish(self, w: _Window) -> list[Any]:
        from scalecap.fleet.sinks import SinkError

        return [b if b is not None else SinkError(f"{loc} is gone (expired or never set)")
                for loc, b in zip(w.locations, w.bodies, strict=True)]

    def close(self) -> None:
        return None


# --- the flat row -------------------------------------------------------------------------------


def _floats(values: Any) -> list[float | None]:
    return [float(v) if isinstance(v, (int, float)) else None for v in (values or [])]


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """One record as the flat columns of docs/data.md (Parquet columns, WebDataset JSON fields)."""
    rec = row.get("scalecap_record") or {}
    meta = rec.get("meta") or {}
    src = meta.get("source") or _source_of(row.get("image"))
    err = rec.get("error") or {}
    qa = rec.get("qa_pairs") or []
    questions = [p.get("question") for p in qa] or [
        *(rec.get("object_questions") or []), *(rec.get("position_questions") or [])]
    key = src.get("key") if src.get("format") == "webdataset" else src.get("id")
    return {
        "job_id": meta.get("job_id"),
        "image": row.get("image"),
        "source_format": src.get("format"),
        "source_file": src.get("shard") or src.get("file"),
        "source_key": None if key is None else str(key),
        "source_text": src.get("txt"),
        "source_json": json.dumps(src["json"], ensure_ascii=False) if "json" in src else None,
        "final_caption": rec.get("final_caption"),
        "init_caption": rec.get("init_caption"),
        "golden_sentences": list(rec.get("golden_sentences") or []),
        "sentence_scores": _floats(rec.get("sentence_scores")),
        "questions": [str(q) for q in questions],
        "answers": [str(p.get("answer")) for p in qa],
        "answer_kept": [bool(p.get("kept")) for p in qa],
        "answer_scores": _floats([p.get("score") for p in qa]),
        "error_stage": err.get("stage"),
        "error_type": err.get("type"),
        "error_message": err.get("message"),
        "model": meta.get("model"),
        "config_hash": meta.get("config_hash"),
    }


def _source_of(ref: Any) -> dict[str, Any]:
    """Where a shard job came from, from its reference alone: for rows no worker made (a member
    cut short at submission, a lost job), which have no meta.source."""
    from scalecap.errors import ImageError
    from scalecap.images import is_shard_ref, parse_ref

    if not is_shard_ref(ref):
        return {}
    try:
        p = parse_ref(ref)
    except ImageError:
        return {}
    if hasattr(p, "key"):
        return {"format": "webdataset", "shard": p.shard, "key": p.key}
    return {"format": "parquet", "file": p.file, "id": p.id}


def parquet_schema() -> Any:
    pa = _pyarrow()
    s, f = pa.string(), pa.float64()
    return pa.schema([
        ("job_id", s), ("image", s), ("source_format", s), ("source_file", s), ("source_key", s),
        ("source_text", s), ("source_json", s), ("final_caption", s), ("init_caption", s),
        ("golden_sentences", pa.list_(s)), ("sentence_scores", pa.list_(f)),
        ("questions", pa.list_(s)), ("answers", pa.list_(s)), ("answer_kept", pa.list_(pa.bool_())),
        ("answer_scores", pa.list_(f)), ("error_stage", s), ("error_type", s), ("error_message", s),
        ("model", s), ("config_hash", s),
    ])  # fmt: skip


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError as exc:
        from scalecap.errors import ConfigError

        raise ConfigError("Parquet export needs pyarrow: pip install 'scalecap-fleet[data]'") from exc
    return pa


# --- writers ------------------------------------------------------------------------------------


def write_jsonl(rows: Iterator[Any], output: str) -> int:
    """One row per line; a row given as bytes (a stored record, see iter_rows) is written as is."""
    text_out = sys.stdout if output == "-" and not hasattr(sys.stdout, "buffer") else None  # captured
    out = text_out or (sys.stdout.buffer if output == "-" else open(output, "wb"))  # noqa: SIM115
    n = 0
    try:
        for row in rows:
            if not isinstance(row, bytes):
                row = json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()
            out.write(row.decode() + "\n" if text_out else row + b"\n")
            n += 1
    finally:
        if output == "-":
            out.flush()
        else:
            out.close()
    return n


def write_parquet(rows: Iterator[dict[str, Any]], output: str, *,
                  row_group_rows: int = ROW_GROUP_ROWS) -> int:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    schema = parquet_schema()
    n = 0
    buf: list[dict[str, Any]] = []
    with pq.ParquetWriter(output, schema) as writer:
        for row in rows:
            buf.append(flat_row(row))
            if len(buf) >= row_group_rows:
                writer.write_table(pa.Table.from_pylist(buf, schema))
                n += len(buf)
                buf.clear()
        if buf or n == 0:
            writer.write_table(pa.Table.from_pylist(buf, schema))
            n += len(buf)
    return n


def write_webdataset(rows: Iterator[dict[str, Any]], output: str, *, with_images: bool = False,
                     limits: Any = None, shard_members: int = SHARD_MEMBERS) -> int:
    """Tar shards `output/00000.tar`, ...: per image `{job_id}.json` (the flat row plus the whole
    record) and, with `with_images`, `{job_id}.{ext}`: the original image bytes, read with the
    same guards as a worker's (allowed roots, buckets, private addresses)."""
    os.makedirs(output, exist_ok=True)
    n, shard, tf = 0, 0, None
    try:
        for row in rows:
            if tf is None or n % shard_members == 0:
                if tf is not None:
                    tf.close()
                name = os.path.join(output, f"{shard:05d}.tar")
                tf = tarfile.open(name, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - one per shard
                shard += 1
            flat = flat_row(row)
            key = flat["job_id"] or f"row{n:09d}"
            doc = {**flat, "scalecap_record": row.get("scalecap_record")}
            if with_images and row.get("image"):
                try:
                    data, ext = original_image(row["image"], limits)
                    _add(tf, f"{key}.{ext}", data)
                except Exception as exc:  # the caption still ships; the JSON says why no image
                    doc["image_error"] = f"{type(exc).__name__}: {exc}"
            _add(tf, f"{key}.json", json.dumps(doc, ensure_ascii=False).encode())
            n += 1
    finally:
        if tf is not None:
            tf.close()
    return n


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tf.addfile(info, io.BytesIO(data))


def original_image(ref: str, limits: Any) -> tuple[bytes, str]:
    """The original bytes of an image reference and an extension for them (no decoding)."""
    from PIL import Image

    from scalecap.images import read_image_bytes

    got = read_image_bytes(ref, limits=limits)
    data, ext = got.data, got.ext
    if not ext or "." in ext:
        try:
            ext = (Image.open(io.BytesIO(data)).format or "bin").lower()
        except Exception:
            ext = "bin"
    return data, {"jpeg": "jpg"}.get(ext, ext)


def export(client: Any, batch_id: str, fmt: str, output: str, *, with_images: bool = False,
           connections: int = CONNECTIONS) -> int:
    """Write a batch in `fmt` to `output` (a file; a folder for webdataset); returns the row count."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if with_images and fmt != "webdataset":
        raise ValueError("--with-images needs --format webdataset")
    if fmt != "jsonl" and output == "-":
        raise ValueError(f"--format {fmt} needs -o PATH")
    if fmt == "parquet":
        _pyarrow()  # fail before fetching anything
    rows = iter_rows(client, batch_id, connections=connections, raw=fmt == "jsonl")
    if fmt == "jsonl":
        return write_jsonl(rows, output)
    if fmt == "parquet":
        return write_parquet(rows, output)
    limits = None
    if with_images:
        from scalecap.images import ImageLimits

        limits = ImageLimits.from_settings(client.settings)
    return write_webdataset(rows, output, with_images=with_images, limits=limits)
