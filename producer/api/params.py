"""Unknown query parameters are an error (400), not silently ignored: `?limt=10` is a typo the
caller should hear about, and a parameter the route does not declare cannot change what it does."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import Query, Request

from producer.api.problems import ApiProblem
from producer.submit_model import query_fields, value_type


def _query_names(dependant: Any) -> set[str]:
    names = {getattr(p, "alias", None) or p.name for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def no_unknown_query(request: Request) -> None:
    """Router dependency: 400 when the query string holds a parameter the route does not declare."""
    if not request.query_params:
        return
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return
    unknown = sorted(set(request.query_params.keys()) - _query_names(dependant))
    if unknown:
        shown = ", ".join(repr(u[:40]) for u in unknown[:5])
        raise ApiProblem(400, "invalid-request", f"unknown query parameter(s): {shown}")


def _upload_query(**params: Any) -> dict[str, Any]:
    from producer.api.limits import loads_bounded

    raw = params.pop("config", None)
    params["config"] = loads_bounded(raw, "config") if raw else None
    return params


def _upload_signature() -> inspect.Signature:
    """One query parameter per SubmitOptions `query` field, plus `config` as JSON text."""
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=value_type(f),
                          default=Query(default=f.default, description="Uploads: " + f.metadata["help"],
                                        max_length=f.metadata["max_length"], pattern=f.metadata["pattern"]))
        for f in query_fields()
    ]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
                                    default=Query(default=None, max_length=65536,
                                                  description="Uploads: config fields as JSON")))
    return inspect.Signature(params, return_annotation=dict[str, Any])


def upload_query(**params: Any) -> dict[str, Any]:
    """Route dependency: a JSONL upload's SubmitOptions from its query string (config parsed)."""
    return _upload_query(**params)


upload_query.__signature__ = _upload_signature()  # type: ignore[attr-defined]


__all__ = ["no_unknown_query", "upload_query"]
