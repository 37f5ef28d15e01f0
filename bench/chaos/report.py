"""The printed result of a nemesis run: faults by kind, each invariant, and one closing line that
scripts read: `F faults of K kinds injected, V invariant violations`."""

from __future__ import annotations

from typing import Any

from bench.report import print_table

DETAILS_SHOWN = 8
"""Violations printed per invariant (all of them go to --output-json, up to 50 each)."""


def closing_line(result: dict[str, Any]) -> str:
    return (f"{result['faults_injected']} faults of {result['fault_kinds']} kinds injected, "
            f"{result['violations']} invariant violations")


def print_report(result: dict[str, Any]) -> None:
    via = result["workload"]["by_via"]
    rows: list[tuple[str, Any]] = [
        ("Seed", result["seed"]),
        ("Fault phase (s)", result["fault_seconds"]),
        ("Batches (CLI / HTTP)", f"{via['cli']} / {via['http']}"),
        ("Images submitted (poisoned on purpose)",
         f"{result['workload']['images']} ({result['workload']['poisoned']})"),
        ("Submits ok / failed and retried",
         f"{result['workload']['submits_ok']} / {result['workload']['submits_failed']}"),
        ("Stale results discarded (runs that lost)", result["stale_results"]),
        ("Redis replies dropped / connections cut",
         f"{result['proxy']['dropped_replies']} / {result['proxy']['dropped_connections']}"),
        ("Quiet after the faults (s)", result["settle_seconds"]),
    ]
    print_table(f"ScaleCap nemesis, seed {result['seed']}", rows)
    fault_rows = [(f"fault {kind} (injected)", f"{n}" + (f" ({result['faults_skipped'][kind]} skipped)"
                                                         if result["faults_skipped"].get(kind) else ""))
                  for kind, n in sorted(result["faults"].items())]
    never = [k for k in result["kinds_available"] if k not in result["faults"]]
    print_table("Faults by kind", fault_rows,
                extra=[f"not injected this run: {', '.join(never)}"] if never else [])
    inv_rows = [(c["invariant"][:43], "ok" if c["ok"] else f"{c['violations']} VIOLATED")
                for c in result["invariants"]]
    extra = []
    for c in result["invariants"]:
        for line in c["details"][:DETAILS_SHOWN]:
            extra.append(f"  {c['invariant'][:30]}: {line}"[:300])
        if c["violations"] > DETAILS_SHOWN:
            extra.append(f"  ... {c['violations'] - DETAILS_SHOWN} more ({c['invariant']})")
        for line in c.get("notes", [])[:DETAILS_SHOWN]:
            extra.append(f"  note: {line}"[:300])
    if not result["quiet"]:
        extra.append(f"not quiet after {result['settle_seconds']} s: {result['quiet_state']}")
    print_table("Invariants at quiescence", inv_rows, extra=extra)
    print(closing_line(result), flush=True)
