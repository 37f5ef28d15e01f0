"""What must hold once the fleet is quiet again, read from Redis, S3 and the receiver's log.

Each check returns its violations as one line each (never a traceback); a check that could not
read what it needs reports that as a violation too. Nothing here trusts the fleet's own
summaries where the raw state can be read: counters are compared with the job states, records
with the objects in the bucket, events with what the receiver accepted.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from scalecap.fleet.protocol import (
    DEAD_LETTER_KEY,
    FINAL_STATES,
    LEASES_KEY,
    OUTBOX_KEY,
    UNPUBLISHED_KEY,
    WEBHOOK_RETRIES_KEY,
    batch_jobs_key,
    batch_key,
    job_states_key,
    queue_queued_key,
    webhook_attempts_key,
)

NAMES = {  # each fits the report's 43-character label column
    "one_final_state": "every image has exactly one final state",
    "credited_record": "each location has the credited run's record",
    "reachable": "no job is unreachable",
    "events": "one event id per completion, delivered",
    "dead_letters": "no dead letter but the poisoned images",
    "ttl": "every batch finished, its keys with a TTL",
    "counters": "the counters equal the job states",
}
AOF_NOTE = "2.5 s"
TOKEN_FIELDS = ("attempt", "attempt_token", "token", "run_token")
"""Where a record's meta may name the run that wrote it (and a job state the credited run)."""
SLACK_S = 1.5
"""S3 LastModified has whole seconds: a write this close to the finish is not called late."""


@dataclass
class Check:
    key: str
    violations: list[str] = field(default_factory=list)
    checked: int = 0
    notes: list[str] = field(default_factory=list)
    """What the check saw and allowed, with the reason (not violations)."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": NAMES[self.key], "ok": self.ok, "checked": self.checked,
                "violations": len(self.violations), "details": self.violations[:50],
                "notes": self.notes[:50]}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def job_states(r: Any, batch_id: str) -> dict[str, dict[str, Any]]:
    return {_s(k): json.loads(v) for k, v in r.hgetall(job_states_key(batch_id)).items()}


def _message(raw: Any) -> tuple[str, list[str], str | None]:
    """(batch id, job ids, ETA header) of one kombu message: a lane's list entry, or an unacked
    entry ([message, exchange, routing key]). Unreadable: ("", [], None)."""
    try:
        msg = json.loads(raw)
        if isinstance(msg, list):
            msg = msg[0]
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        job = json.loads(body)[0][0]
        return str(job["batch_id"]), [str(j) for j, _ in job["jobs"]], (msg.get("headers") or {}).get("eta")
    except (ValueError, KeyError, IndexError, TypeError):
        return "", [], None


def locate_jobs(r: Any) -> dict[tuple[str, str], list[str]]:
    """Where each job is that something will bring to a worker: a message in a lane, an unacked
    message (with how far ahead its ETA is), a live lease or an unpublished note."""
    from datetime import datetime

    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    sec, usec = r.time()
    now = sec + usec / 1e6
    for key in r.scan_iter(match="scalecap.gpu.*", count=1000):
        if r.type(key) == b"list":
            for raw in r.lrange(key, 0, -1):
                b, jobs, _ = _message(raw)
                for j in jobs:
                    out[(b, j)].append(f"message in {_s(key)}")
    for raw in r.hvals("unacked"):
        b, jobs, eta = _message(raw)
        where = "unacked message"
        if eta:
            with contextlib.suppress(ValueError):
                ahead = datetime.fromisoformat(eta).timestamp() - now
                where += f" (ETA {ahead:+.0f} s)"
        for j in jobs:
            out[(b, j)].append(where)
    for member in r.zrangebyscore(LEASES_KEY, now, "+inf", withscores=True):
        d = json.loads(member[0])
        for j in d.get("jobs") or []:
            out[(d["b"], j if isinstance(j, str) else j[0])].append(f"lease (+{member[1] - now:.0f} s)")
    for member in r.zrange(UNPUBLISHED_KEY, 0, -1):
        d = json.loads(member)
        for j in d.get("jobs") or []:
            out[(d["b"], j[0] if isinstance(j, list) else j)].append("unpublished note")
    return out


def in_flight(r: Any, batch_ids: list[str]) -> int:
    """Jobs not final yet, over these batches."""
    return sum(1 for b in batch_ids for j in job_states(r, b).values() if j.get("s") not in FINAL_STATES)


def quiet(r: Any, batch_ids: list[str]) -> tuple[bool, str]:
    """No job in flight, every batch finished, no event waiting anywhere."""
    waiting = in_flight(r, batch_ids)
    pipe = r.pipeline(transaction=False)
    for b in batch_ids:
        pipe.hmget(batch_key(b), "created_at", "finished_at")
    unfinished = sum(1 for created, finished in pipe.execute() if created and not finished)
    events = (r.llen(OUTBOX_KEY) + r.zcard(WEBHOOK_RETRIES_KEY) + r.llen("scalecap.io")
              + r.llen("scalecap.io.jobs"))
    # Webhook tasks being delivered; a caption message of a final job left unacked is harmless.
    unacked = sum(1 for raw in r.hvals("unacked") if _routing_key(raw).startswith("scalecap.io"))
    ok = waiting == 0 and unfinished == 0 and events == 0 and unacked == 0
    return ok, (f"{waiting} jobs in flight, {unfinished} batches unfinished, {events} events waiting, "
                f"{unacked} webhook tasks unacked")


def held_locks(r: Any) -> list[str]:
    """The fleet's maintenance locks now held, with the seconds they still hold (why no pass runs)."""
    return [f"{_s(k)} ({r.pttl(k) / 1000:.0f} s left)" for k in r.scan_iter(match="scalecap:lock:*")]


def _routing_key(raw: Any) -> str:
    try:
        return str(json.loads(raw)[2])
    except (ValueError, IndexError, TypeError):
        return ""


# --- the checks ---------------------------------------------------------------------------------


def check_all(r: Any, s3: Any, runs: list[Any], durable: dict[str, set[str]], deliveries: list[Any],
              poisoned: set[str], queue: str, second_look: Any) -> list[Check]:
    """Every invariant; `durable`: batch id -> images whose submit Redis had surely persisted;
    `second_look()` pauses between two reads of reachability."""
    # One snapshot (MULTI): counters, job states and dead letters read at the same instant.
    pipe = r.pipeline(transaction=True)
    for run in runs:
        pipe.hgetall(batch_key(run.batch_id))
        pipe.hgetall(job_states_key(run.batch_id))
    pipe.lrange(DEAD_LETTER_KEY, 0, -1)
    pipe.get(queue_queued_key(queue))
    *got, dead, queued = pipe.execute()
    batches = {run.batch_id: {_s(k): _s(v) for k, v in h.items()}
               for run, h in zip(runs, got[::2], strict=True)}
    states = {run.batch_id: {_s(k): json.loads(v) for k, v in h.items()}
              for run, h in zip(runs, got[1::2], strict=True)}
    dead_list = [json.loads(x) for x in dead]
    return [
        one_final_state(runs, durable, states, batches, locate_jobs(r)),
        credited_record(s3, states),
        reachable(r, states, second_look),
        events(states, batches, deliveries),
        dead_letters(dead_list, poisoned),
        ttl(r, batches, states),
        counters(dead_list, int(queued or 0), states, batches, queue),
    ]


def one_final_state(runs: list[Any], durable: dict[str, set[str]], states: dict[str, dict[str, Any]],
                    batches: dict[str, dict[str, str]], where: dict[tuple[str, str], list[str]]) -> Check:
    c = Check("one_final_state")
    for run in runs:
        b, jobs = run.batch_id, states[run.batch_id]
        sure = durable.get(b, set())
        refs = Counter(j.get("r") for j in jobs.values())
        lost = sorted(ref for ref in run.confirmed - sure if refs[ref] == 0)
        if lost:
            c.notes.append(f"{b}: {len(lost)} image(s) acknowledged within {AOF_NOTE} of a kill -9 "
                           "of Redis have no job (appendfsync everysec lost them)")
        if not batches[b] and sure:
            c.violations.append(f"{b}: batch missing ({len(sure)} images submitted)")
            continue
        for ref in sorted(sure):
            c.checked += 1
            if refs[ref] == 0:
                c.violations.append(f"{b}: image {ref} submitted but has no job")
            elif refs[ref] > 1:
                c.violations.append(f"{b}: image {ref} has {refs[ref]} jobs")
        for j, job in jobs.items():
            if job.get("s") not in FINAL_STATES:
                at = ", ".join(where.get((b, j), [])) or "nowhere"
                c.violations.append(f"{b}/{j}: still {job.get('s')} (image {job.get('r')}, "
                                    f"runs {job.get('n')}; {at})")
            if job.get("r") not in run.asked:
                c.violations.append(f"{b}/{j}: image {job.get('r')} was never submitted to this batch")
    return c


def _token(d: dict[str, Any]) -> str | None:
    for k in TOKEN_FIELDS:
        v = d.get(k)
        if isinstance(v, dict):
            v = v.get("token")
        if v:
            return str(v)
    return None


def credited_record(s3: Any, states: dict[str, dict[str, Any]]) -> Check:
    """The object at the job's location is this job's record, written by the credited run (its
    meta names the run, once runs are named), and nothing wrote it after the job was final."""
    from scalecap.fleet.sinks import parse_s3_url

    c = Check("credited_record")
    for b, jobs in states.items():
        for j, job in jobs.items():
            loc = job.get("l")
            if job.get("s") not in ("done", "failed") or not loc:
                continue
            c.checked += 1
            try:
                bucket, key = parse_s3_url(loc)
                obj = s3.get_object(Bucket=bucket, Key=key)
                row = json.loads(obj["Body"].read())
            except Exception as exc:
                c.violations.append(f"{b}/{j}: record at {loc} unreadable: {type(exc).__name__}: {exc}"[:300])
                continue
            meta = (row.get("scalecap_record") or {}).get("meta") or {}
            if row.get("image") != job.get("r"):
                c.violations.append(f"{b}/{j}: record at {loc} is of image {row.get('image')}, "
                                    f"not {job.get('r')}")
            if meta.get("job_id") not in (None, j):
                c.violations.append(f"{b}/{j}: record at {loc} names job {meta.get('job_id')}")
            # The job's `w` (the token whose finish applied), else the token in the record's name.
            credited, wrote = job.get("w") or _token(job) or _location_token(key, j), _token(meta)
            if credited and wrote and credited != wrote:
                c.violations.append(f"{b}/{j}: record at {loc} was written by run {wrote}, the batch "
                                    f"credits run {credited}")
            final_at = float(job.get("u") or 0)
            written = obj["LastModified"].timestamp()
            if final_at and written > final_at + SLACK_S:
                c.violations.append(f"{b}/{j}: record at {loc} rewritten {written - final_at:.1f} s after "
                                    "the job was final (a stale run's write)")
    return c


def _location_token(key: str, job_id: str) -> str | None:
    """The attempt token in a fenced record's name (`{job}.{token}.json`), if it has one."""
    name = key.rsplit("/", 1)[-1].removesuffix(".json")
    return (name[len(job_id) + 1:] or None) if name.startswith(job_id + ".") else None


def reachable(r: Any, states: dict[str, dict[str, Any]], second_look: Any) -> Check:
    c = Check("reachable")
    open_jobs = {(b, j) for b, jobs in states.items() for j, job in jobs.items()
                 if job.get("s") not in FINAL_STATES}
    c.checked = len(open_jobs)
    if not open_jobs:
        return c
    lost = open_jobs - set(locate_jobs(r))
    if lost:
        second_look()  # a message between a pop and its unacked entry is not lost: look again
        lost &= {(b, j) for b, j in lost
                 if (job_states(r, b).get(j) or {}).get("s") not in FINAL_STATES} - set(locate_jobs(r))
    for b, j in sorted(lost):
        job = states[b][j]
        c.violations.append(f"{b}/{j}: {job.get('s')} (quarantined {bool(job.get('q'))}) with no message, "
                            "unacked entry, live lease or unpublished note")
    return c


def events(states: dict[str, dict[str, Any]], batches: dict[str, dict[str, str]], deliveries: list[Any]
           ) -> Check:
    c = Check("events")
    ids: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    accepted: set[str] = set()
    bad = [d for d in deliveries if not d.verified]
    if bad:
        c.violations.append(f"{len(bad)} deliveries failed signature verification "
                            f"(first: {bad[0].event_id} {bad[0].type} {bad[0].batch_id})")
    for d in deliveries:
        if d.verified:
            ids[(d.type, d.batch_id, d.job_id or "")].add(d.event_id)
            if d.accepted:
                accepted.add(d.event_id)
    for b, jobs in states.items():
        h = batches.get(b) or {}
        if not h.get("webhook"):
            continue
        if h.get("webhook_jobs") == "1":
            for j, job in jobs.items():
                if job.get("s") not in FINAL_STATES:
                    continue
                c.checked += 1
                got = ids.get(("job.completed", b, j), set())
                if not got:
                    c.violations.append(f"{b}/{j}: {job.get('s')}, no job.completed event received")
                elif len(got) > 1:
                    c.violations.append(f"{b}/{j}: {len(got)} different job.completed event ids")
                elif not got & accepted:
                    c.violations.append(f"{b}/{j}: job.completed {next(iter(got))} never accepted")
        completions = int(h.get("completions") or 0)
        if h.get("finished_at"):
            c.checked += 1
            got = ids.get(("batch.completed", b, ""), set())
            if len(got) != completions:
                c.violations.append(f"{b}: completed {completions} time(s), {len(got)} batch.completed ids")
            missing = got - accepted
            if missing:
                c.violations.append(f"{b}: batch.completed {sorted(missing)[0]} never accepted")
    return c


def dead_letters(dead: list[dict[str, Any]], poisoned: set[str]) -> Check:
    c = Check("dead_letters")
    for d in dead:
        c.checked += 1
        if d.get("ref") not in poisoned:
            err = d.get("error") or {}
            c.violations.append(f"{d.get('batch_id')}/{d.get('job_id')}: {d.get('ref')} dead-lettered "
                                f"after {d.get('attempts')} attempts ({err.get('type')}: "
                                f"{str(err.get('message'))[:120]})")
    return c


def ttl(r: Any, batches: dict[str, dict[str, str]], states: dict[str, dict[str, Any]]) -> Check:
    c = Check("ttl")
    for b, h in batches.items():
        if not h:
            continue
        c.checked += 1
        if not h.get("finished_at"):
            open_jobs = sum(1 for j in states[b].values() if j.get("s") not in FINAL_STATES)
            state = "submitting" if h.get("closed") != "1" else "open"
            c.violations.append(f"{b}: never finished ({state}, {open_jobs} jobs not final): no TTL")
            continue
        for key in (batch_key(b), batch_jobs_key(b), job_states_key(b), webhook_attempts_key(b)):
            t = r.ttl(key)
            if t == -1:
                c.violations.append(f"{b}: {key} has no TTL")
    return c


def counters(dead_list: list[dict[str, Any]], queued: int, states: dict[str, dict[str, Any]],
             batches: dict[str, dict[str, str]], queue: str) -> Check:
    c = Check("counters")
    dead = Counter(d.get("batch_id") for d in dead_list)
    queued_total = 0
    for b, h in batches.items():
        if not h:
            continue
        c.checked += 1
        jobs = states[b]
        actual = Counter(j.get("s") for j in jobs.values())
        actual["total"] = len(jobs)
        actual["dead_lettered"] = dead[b]
        queued_total += actual["queued"]
        for name in ("total", "queued", "running", "done", "failed", "cancelled", "dead_lettered"):
            have = int(h.get(name) or 0)
            if have != actual[name]:
                c.violations.append(f"{b}: counter {name} = {have}, job states say {actual[name]}")
    if queued != queued_total:
        c.violations.append(f"{queue_queued_key(queue)} = {queued}, job states say {queued_total} queued")
    return c
