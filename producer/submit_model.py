"""SubmitOptions: the one declaration of a submission's options.

`scalecap submit` flags, `FleetClient.submit`'s arguments, the HTTP API's JSON body
(`BatchRequest`) and its upload query parameters are all derived from the fields below and
their metadata, so the four cannot drift apart. A field's metadata says where it appears:
`cli` (a flag), `api` (the JSON body), `query` (a query parameter of a JSONL upload).
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import typing
from dataclasses import dataclass, field
from typing import Any

from scalecap.fleet.scope import Scope

BATCH_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
MODEL_PATTERN = r"^(?:[A-Za-z0-9._:@+-]*/)*[A-Za-z0-9._:@+-]*[A-Za-z0-9][A-Za-z0-9._:@+-]*/*$"
"""A hub id or a path whose last part names the model (it becomes the queue name)."""


def _meta(help: str, *, cli: bool = True, api: bool = True, query: bool = False, cli_help: str = "",
          max_length: int | None = None, pattern: str | None = None) -> dict[str, Any]:
    """Where a field appears (`cli`, `api`, `query`), its help, and the API's limits on it."""
    return {"help": help, "cli": cli, "api": api, "query": query, "cli_help": cli_help,
            "max_length": max_length, "pattern": pattern}


def new_session_id() -> str:
    return "s" + secrets.token_hex(8)


@dataclass(frozen=True)
class SubmitOptions:
    """Everything a submission says besides its source rows (see docs/api.md, `scalecap submit`)."""

    sink: str = field(default="redis", metadata=_meta(
        "Where records go: 'redis' or s3://bucket/prefix", query=True, max_length=2048))
    webhook: str | None = field(default=None, metadata=_meta(
        "URL that receives the signed batch.completed event", query=True, max_length=4096))
    webhook_jobs: bool = field(default=False, metadata=_meta(
        "Also send a signed job.completed event for every image (needs a webhook)", query=True))
    batch_id: str | None = field(default=None, metadata=_meta(
        "Id of the batch (default: a new random id); resubmitting to it adds only new images",
        query=True, pattern=BATCH_ID_PATTERN))
    model: str | None = field(default=None, metadata=_meta(
        "Model whose workers run the jobs (default: SCALECAP_MODEL)", query=True, max_length=512,
        pattern=MODEL_PATTERN))
    queue: str | None = field(default=None, metadata=_meta(
        "Queue to send to (default: scalecap.gpu.<model>)", api=False))
    image_key: str = field(default="image", metadata=_meta(
        "Field holding the image in a manifest's lines", query=True, max_length=128))
    image_column: str | None = field(default=None, metadata=_meta(
        "Parquet sources: the image column (URLs/paths, or bytes as HF's Image feature stores "
        "them); default: image_key", max_length=256))
    id_column: str | None = field(default=None, metadata=_meta(
        "Parquet sources: a column whose value each record keeps (meta.source.id, source_key)",
        max_length=256))
    chunk_size: int | None = field(default=None, metadata=_meta(
        "Images per task message", api=False, cli_help="env SCALECAP_CHUNK_SIZE, default 16"))
    config: Any = field(default=None, metadata=_meta(
        "ScaleCap config fields (a config object, dict or file)", cli=False))
    """CLI: the chain config flags (scalecap.cli.options); API: an object (query: JSON text)."""
    owner: str | None = field(default=None, metadata=_meta(
        "API key id owning the batch ('' or None: a direct producer)", cli=False, api=False))
    session: str | None = field(default=None, metadata=_meta(
        "This submission's session id (default: a new one)", cli=False, api=False))
    """Each submit opens a session on the batch; the batch completes when all have closed."""
    scope: Scope | None = field(default=None, metadata=_meta(
        "Data the batch may read (the key's scope); None: fleet-wide", cli=False, api=False))

    def with_defaults(self, model: str) -> SubmitOptions:
        """Model filled in and a session id drawn, so every later step sees the same values."""
        return dataclasses.replace(self, model=self.model or model,
                                   session=self.session or new_session_id())

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: Any = None) -> SubmitOptions:
        """The options of a parsed `scalecap submit` (flags from `add_submit_options`)."""
        kw = {f.name: getattr(args, f.name) for f in cli_fields() if hasattr(args, f.name)}
        return cls(**kw, config=config)


def _fields(where: str) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(SubmitOptions) if f.metadata[where]]


def cli_fields() -> list[dataclasses.Field[Any]]:
    return _fields("cli")


def api_fields() -> list[dataclasses.Field[Any]]:
    return _fields("api")


def query_fields() -> list[dataclasses.Field[Any]]:
    return _fields("query")


def value_type(f: dataclasses.Field[Any]) -> Any:
    """The field's type as declared (X | None included)."""
    return typing.get_type_hints(SubmitOptions)[f.name]


def add_submit_options(p: argparse.ArgumentParser) -> None:
    """One flag per `cli` field: --name-with-dashes, its help from the field."""
    for f in cli_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + (f" ({f.metadata['cli_help']})" if f.metadata["cli_help"] else "")
        typ = value_type(f)
        if typ is bool:
            p.add_argument(flag, action="store_true", help=help_text)
        else:
            base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
            p.add_argument(flag, type=base if base in (int, float) else str, default=f.default,
                           help=help_text)


__all__ = ["BATCH_ID_PATTERN", "MODEL_PATTERN", "SubmitOptions", "add_submit_options", "api_fields",
           "cli_fields", "new_session_id", "query_fields", "value_type"]
