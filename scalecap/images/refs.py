"""Image references as text: which reader a reference goes to, a log-safe name for it, and the
`wds+`/`pq+` shard reference format.

A WebDataset tar shard or a Parquet file holds thousands of images; each becomes its own job whose
reference says exactly where its bytes are, so a worker reads one member or one row, never the
whole shard. Two forms (the fragment is form-encoded, the path percent-quoted):

    wds+s3://bucket/shards/00001.tar#key=000123&ext=jpg&offset=1536&size=4567&json=6656:312&txt=7168:45
    wds+file:///data/shards/00001.tar#key=000123&ext=jpg&offset=1536&size=4567
    pq+s3://bucket/data/train-00000.parquet#rg=3&row=17&col=image&id=abc
    pq+file:///data/train.parquet#rg=0&row=5&col=url&id=abc&url=https%3A%2F%2Fexample.com%2Fa.jpg

`offset`/`size` are the member's data in the tar (the producer reads them from the tar headers);
the sample's sidecars (`json`, `txt`) are recorded the same way as `offset:size` and read by range
on the worker, so the job (and Redis) never carries their text. A Parquet reference names the row
group, the row within it and the image column; `url` is set when that column holds a URL or path
(the worker then loads that URL with the usual guards), otherwise the cell holds the image bytes
(HF `Image` feature: a `{bytes, path}` struct, or plain binary). Reading them: shards.py.

Pure text work: nothing here opens a file or a socket.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from PIL import Image

from scalecap.errors import ImageError

__all__ = [
    "SCHEMES",
    "SIDECAR_EXTENSIONS",
    "MemberRef",
    "RowRef",
    "SourceKind",
    "Span",
    "describe_shard",
    "describe_source",
    "image_ref_kind",
    "is_shard_ref",
    "locations",
    "parse_ref",
    "shorten",
]

SourceKind = Literal["image", "bytes", "path", "file", "http", "s3", "data", "shard", "unsupported"]
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

SIDECAR_EXTENSIONS = ("json", "txt")
"""Sample members that travel into the record's meta.source (read by range at the worker)."""
SCHEMES = ("wds+", "pq+")


def shorten(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- any reference -----------------------------------------------------------------------------


def image_ref_kind(ref: Any) -> SourceKind:
    """Which loader a reference goes to (backends use it to pass URLs through untouched)."""
    if isinstance(ref, Image.Image):
        return "image"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(ref, os.PathLike):
        return "path"
    if not isinstance(ref, str):
        return "unsupported"
    head = ref[:10].lower()
    if head.startswith("data:"):
        return "data"
    if head.startswith(("http://", "https://")):
        return "http"
    if head.startswith("s3://"):
        return "s3"
    if head.startswith("file://"):
        return "file"
    if head.startswith(SCHEMES):  # one member/row of a shard
        return "shard"
    if _URI.match(ref):
        return "unsupported"
    return "path"


def describe_source(source: Any) -> str:
    """A short, log-safe name for a source: no URL credentials, no query strings, no payloads."""
    kind = image_ref_kind(source)
    if kind == "image":
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if kind == "bytes":
        return f"<{memoryview(source).nbytes} bytes>"
    if kind == "path":
        return shorten(os.fspath(source))
    if not isinstance(source, str):
        return f"<{type(source).__name__}>"
    if kind == "data":
        return f"{shorten(source.split(',', 1)[0], 60)},… ({len(source)} chars)"
    if kind == "shard":
        return describe_shard(source)
    if kind in ("http", "s3", "unsupported"):
        try:
            parts = urlsplit(source)
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port is not None:
                host += f":{parts.port}"
        except ValueError:
            return shorten(source.split("?", 1)[0])
        text = f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
        return shorten(text)
    return shorten(source)


# -- shard references --------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    offset: int
    size: int


@dataclass(frozen=True)
class MemberRef:
    """One image member of a WebDataset tar shard."""

    shard: str
    """`s3://bucket/key` or an absolute local path."""
    key: str
    ext: str
    span: Span
    sidecars: dict[str, Span] = field(default_factory=dict)

    def to_ref(self) -> str:
        q: list[tuple[str, str]] = [("key", self.key), ("ext", self.ext),
                                    ("offset", str(self.span.offset)), ("size", str(self.span.size))]
        q += [(ext, f"{s.offset}:{s.size}") for ext, s in sorted(self.sidecars.items())]
        return "wds+" + _location(self.shard) + "#" + urlencode(q)


@dataclass(frozen=True)
class RowRef:
    """One row of a Parquet (or HF datasets) file."""

    file: str
    row_group: int
    row: int
    column: str
    id: str | None = None
    url: str | None = None

    def to_ref(self) -> str:
        q: list[tuple[str, str]] = [("rg", str(self.row_group)), ("row", str(self.row)), ("col", self.column)]
        if self.id is not None:
            q.append(("id", self.id))
        if self.url is not None:
            q.append(("url", self.url))
        return "pq+" + _location(self.file) + "#" + urlencode(q)


def _location(where: str) -> str:
    if where.startswith("s3://"):
        bucket, _, key = where[5:].partition("/")
        return f"s3://{bucket}/{quote(key, safe='/')}"
    if not os.path.isabs(where):
        raise ValueError(f"a shard path must be absolute: {where!r}")
    return "file://" + quote(where, safe="/")


def _unlocation(text: str) -> str:
    if text.startswith("s3://"):
        bucket, _, key = text[5:].partition("/")
        if not bucket or not key:
            raise ValueError("expected s3://bucket/key")
        return f"s3://{bucket}/{unquote(key)}"
    if text.startswith("file://"):
        path = unquote(text[7:])
        if not path.startswith("/"):
            raise ValueError("expected file:///absolute/path")
        return path
    raise ValueError("the shard must be s3:// or file://")


def is_shard_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(SCHEMES)


def _span(text: str) -> Span:
    o, _, n = text.partition(":")
    span = Span(int(o), int(n))
    if span.offset < 0 or span.size < 0:
        raise ValueError("negative offset or size")
    return span


def parse_ref(ref: str) -> MemberRef | RowRef:
    """The parts of a `wds+`/`pq+` reference; ImageError if it is malformed."""
    scheme, _, rest = ref.partition("+")
    where, _, frag = rest.partition("#")
    try:
        q = dict(parse_qsl(frag, keep_blank_values=True, strict_parsing=bool(frag)))
        loc = _unlocation(where)
        if scheme == "wds":
            sidecars = {e: _span(q[e]) for e in SIDECAR_EXTENSIONS if e in q}
            return MemberRef(loc, q["key"], q.get("ext", ""), _span(f"{q['offset']}:{q['size']}"), sidecars)
        if scheme == "pq":
            rg, row = int(q["rg"]), int(q["row"])
            if rg < 0 or row < 0:
                raise ValueError("negative row group or row")
            return RowRef(loc, rg, row, q["col"], q.get("id"), q.get("url"))
    except KeyError as exc:
        raise ImageError(f"{shorten(ref)}: malformed shard reference: no {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise ImageError(f"{shorten(ref)}: malformed shard reference: {exc}") from exc
    raise ImageError(f"{shorten(ref)}: unknown shard reference scheme {scheme!r}")


def locations(ref: str) -> list[str]:
    """What a shard reference makes a worker open: the shard or file (s3:// URL or absolute path)
    and, for a URL column's row, that URL. A gate that vets references (the HTTP API) checks
    each of these as it would a plain image reference. ImageError if malformed."""
    p = parse_ref(ref)
    if isinstance(p, MemberRef):
        return [p.shard]
    return [p.file] + ([p.url] if p.url is not None else [])


def describe_shard(ref: str) -> str:
    """Log-safe name: the shard and the member key or row (no URL payloads)."""
    try:
        p = parse_ref(ref)
    except ImageError:
        return shorten(ref.split("#", 1)[0])
    if isinstance(p, MemberRef):
        return shorten(f"{p.shard}#{p.key}.{p.ext}")
    return shorten(f"{p.file}#rg={p.row_group}&row={p.row}")
