"""Property-based tests of the live API from its own OpenAPI schema (schemathesis).

Hypothesis generates requests for every operation of /openapi.json, as served by the real API
process; each response must not be a 5xx and must match the schema (status code, content type,
headers, body). Requests carry a live key, so the routes behind it are explored, not just their
401s. /readyz is left out of the no-5xx check only: its 503 is the documented answer for a model
without workers (test_api.py checks both answers). The schema is loaded from the running process
and each operation's Hypothesis strategy is driven here (schemathesis' own pytest fixture loader
does not run under pytest 9).
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.api_support import ApiStack

pytestmark = [pytest.mark.services, pytest.mark.slow]

EXAMPLES = int(os.environ.get("SCALECAP_SCHEMATHESIS_EXAMPLES", "20"))
"""Examples per operation (raise it for a deeper run; CI keeps it cheap)."""
TRIED: collections.Counter[str] = collections.Counter()
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _run_operation(op, mode, stack: ApiStack, label: str, path_parameters: dict | None = None) -> None:
    from hypothesis import given
    from schemathesis.checks import not_a_server_error, positive_data_acceptance

    # References, buckets, sinks and the config's cross-field rules are checked beyond the schema:
    # a schema-valid request may rightly get a 400 (it names the problem), so that check is off.
    excluded = [positive_data_acceptance]
    if op.path == "/readyz":
        excluded.append(not_a_server_error)

    @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        if op.path == "/v1/captions":
            case.query = {**(case.query or {}), "wait": 0}  # never hold a request open for the timeout
        TRIED[label] += 1
        headers = {**(case.headers or {}), **stack.tenant_a.headers}
        case.call_and_validate(base_url=stack.url, headers=headers, excluded_checks=excluded)

    run()


def test_live_api_matches_its_schema(api_stack: ApiStack):
    """Every operation of the live schema, valid (positive) and invalid (negative) requests; the
    batch routes also with valid requests on a real batch of the caller (`owned`), so their
    answers past the 404 are explored too."""
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    live = schemathesis.openapi.from_url(api_stack.url + "/openapi.json")
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    ops = [result.ok() for result in live.get_all_operations()]
    assert len(ops) >= 12
    only = os.environ.get("SCALECAP_SCHEMATHESIS_ONLY", "")  # e.g. "negative POST /v1/batches"
    owned = api_stack.submit(api_stack.tenant_a, images=[str(api_stack.images[2])])
    api_stack.wait(owned, api_stack.tenant_a)
    job = api_stack.get(f"/v1/batches/{owned}/jobs", api_stack.tenant_a).json()["items"][0]["job_id"]
    runs = [(op, mode, f"{mode.value} {op.label}", None)
            for op in ops for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    runs += [(op, GenerationMode.POSITIVE, f"owned {op.label}",
              {k: v for k, v in {"batch_id": owned, "job_id": job}.items() if "{" + k + "}" in op.path})
             for op in ops if "{batch_id}" in op.path]
    for op, mode, label, params in runs:
        if only and only not in label:
            continue
        started = time.monotonic()
        try:
            _run_operation(op, mode, api_stack, label, params)
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE, op.label
        except (Exception, BaseExceptionGroup) as exc:  # collect all; fail once, naming each
            text = "\n".join(ln[:300] for ln in str(exc).splitlines())
            failures[label] = f"{type(exc).__name__}: {text[:3000]}"
        seconds[label] = round(time.monotonic() - started, 2)
    out = ARTIFACTS / "schemathesis.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"examples": dict(TRIED), "seconds": seconds, "failures": failures}
    out.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(f"schemathesis: {sum(TRIED.values())} examples over {len(ops)} operations, "
          f"{len(failures)} failing -> {out}")
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
