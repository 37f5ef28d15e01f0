"""Unknown query parameters are an error (400), not silently ignored: `?limt=10` is a typo the
caller should hear about, and a parameter the route does not declare cannot change what it does."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from producer.api.problems import ApiProblem


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


__all__ = ["no_unknown_query"]
