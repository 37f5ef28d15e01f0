"""What the nemesis asks of the fleet while it attacks it: batches over the CLI and the HTTP API,
some resubmitted concurrently (two producers on one batch id), some cancelled mid-run, some with
an image poisoned on purpose, some reusing the images of an earlier batch.

A producer whose submit fails (Redis killed under it) does what an operator does: runs the same
submit again with the same batch id, until it goes through. Everything asked is recorded, so the
invariants know which images each batch must hold.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.chaos.fleet import MODEL, POISON_COLOUR, ChaosFleet, join_all

COLOURS = ("red", "green", "blue", "yellow", "white")
SUBMIT_TRIES = 12
AOF_LOSS_S = 2.5
"""Seconds of acknowledged writes a killed Redis may lose with appendfsync everysec (Redis docs:
up to 2 s in the worst case)."""


@dataclass
class BatchRun:
    """One batch as the producers asked for it."""

    batch_id: str
    via: str
    """cli | http"""
    action: str
    """plain | resubmit (two producers at once) | cancel"""
    images: list[str]
    poisoned: set[str] = field(default_factory=set)
    asked: set[str] = field(default_factory=set)
    """Every image some submit of this batch sent (even one that failed later)."""
    confirmed: set[str] = field(default_factory=set)
    """Images of a submit that went through."""
    acks: list[tuple[float, list[str]]] = field(default_factory=list)
    """(monotonic time, images) of each submit that went through."""
    submits_ok: int = 0
    submits_failed: int = 0
    cancelled: bool = False
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "via": self.via, "action": self.action,
                "images": len(self.images), "poisoned": len(self.poisoned),
                "submits_ok": self.submits_ok, "submits_failed": self.submits_failed,
                "cancelled": self.cancelled, "errors": self.errors[:5]}


def make_image(path: Path, colour: str, salt: int) -> str:
    from PIL import Image

    from tests.scripted_vlm import COLOURS as PALETTE

    img = Image.new("RGB", (48, 32), PALETTE[colour])
    img.putpixel((0, 0), (salt % 256, (salt // 256) % 256, 7))  # distinct bytes, same colour
    img.save(path)
    return str(path)


class Workload:
    """Launches batches on a seeded schedule; each batch's producers run on their own threads."""

    def __init__(self, fleet: ChaosFleet, rng: random.Random, seed: int, say: Any) -> None:
        self.fleet = fleet
        self.rng = rng
        self.seed = seed
        self.say = say
        self.batches: list[BatchRun] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._n = 0
        self.images_dir = fleet.tmp / "images"
        self.images_dir.mkdir(exist_ok=True)

    @property
    def poisoned(self) -> set[str]:
        return {p for b in self.batches for p in b.poisoned}

    # --- planning ------------------------------------------------------------------------

    def plan(self) -> BatchRun:
        rng, n = self.rng, self._n
        self._n += 1
        # The first batches cover both producers and every action; then the seed decides.
        via = ("cli", "http")[n] if n < 2 else rng.choice(("cli", "http"))
        if n < 3:
            action = ("resubmit", "cancel", "plain")[n]
        else:
            action = rng.choices(("plain", "resubmit", "cancel"), weights=(5, 3, 2))[0]
        earlier = [b for b in self.batches if not b.poisoned and b.action != "cancel"]
        if earlier and rng.random() < 0.15:  # the same work again: records are reused
            src = rng.choice(earlier)
            images = rng.sample(src.images, k=max(1, len(src.images) // 2))
            poisoned: set[str] = set()
        else:
            images = [make_image(self.images_dir / f"b{n:03d}-{i:02d}.png", rng.choice(COLOURS), n * 100 + i)
                      for i in range(rng.randint(4, 10))]
            poisoned = set()
            if rng.random() < 0.3:
                p = make_image(self.images_dir / f"b{n:03d}-poison.png", POISON_COLOUR, n * 100 + 99)
                images.insert(rng.randrange(len(images) + 1), p)
                poisoned.add(p)
        run = BatchRun(f"chaos-{self.seed}-{n:03d}", via, action, images, poisoned)
        with self._lock:
            self.batches.append(run)
        return run

    def launch(self) -> BatchRun:
        """Plan one batch and start its producers (and its canceller) in the background."""
        run = self.plan()
        delays = [0.0]
        parts = [run.images]
        if run.action == "resubmit":  # a second producer on the same batch, a moment later
            cut = self.rng.randint(1, len(run.images))
            parts = [run.images[:cut], run.images]
            delays.append(self.rng.uniform(0.0, 1.5))
        for images, delay in zip(parts, delays, strict=True):
            self._spawn(self._submit, run, images, delay)
        if run.action == "cancel":
            self._spawn(self._cancel, run, self.rng.uniform(0.5, 4.0))
        self.say(f"batch {run.batch_id}: {len(run.images)} images via {run.via}, {run.action}"
                 + (f", {len(run.poisoned)} poisoned" if run.poisoned else ""))
        return run

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def join(self, timeout: float) -> None:
        join_all(self.threads, timeout)

    # --- producers -----------------------------------------------------------------------

    def _submit(self, run: BatchRun, images: list[str], delay: float) -> None:
        time.sleep(delay)
        with self._lock:
            run.asked.update(images)
        for attempt in range(SUBMIT_TRIES):
            ok, why = self._submit_cli(run, images) if run.via == "cli" else self._submit_http(run, images)
            if ok:
                with self._lock:
                    run.submits_ok += 1
                    run.confirmed.update(images)
                    run.acks.append((time.monotonic(), list(images)))
                return
            with self._lock:
                run.submits_failed += 1
                run.errors.append(why[:300])
            if why.startswith("final:"):
                return
            time.sleep(min(5.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0))
        self.say(f"batch {run.batch_id}: a submit never went through ({SUBMIT_TRIES} tries)")

    def _submit_cli(self, run: BatchRun, images: list[str]) -> tuple[bool, str]:
        try:
            r = self.fleet.cli("submit", *images, "--sink", self.fleet.sink, "--model", MODEL,
                               "--webhook", self.fleet.receiver.url, "--webhook-jobs",  # type: ignore[union-attr]
                               "--batch-id", run.batch_id, timeout=120)
        except Exception as exc:  # a hung submit (Redis frozen): try again
            return False, f"{type(exc).__name__}: {exc}"
        if r.returncode == 0:
            return True, ""
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return False, ("final: " if r.returncode == 2 else "") + f"exit {r.returncode}: {why}"

    def _http(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        return httpx.request(method, self.fleet.api_url + path, json=body, timeout=60,
                             headers={"Authorization": f"Bearer {self.fleet.api_key}"})

    def _submit_http(self, run: BatchRun, images: list[str]) -> tuple[bool, str]:
        body = {"images": images, "model": MODEL, "sink": self.fleet.sink,
                "webhook": self.fleet.receiver.url, "webhook_jobs": True,  # type: ignore[union-attr]
                "batch_id": run.batch_id}
        try:
            r = self._http("POST", "/v1/batches", body)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        if r.status_code in (200, 202):
            return True, ""
        # 400 is retried too: an S3 outage answers 400 bad-sink ("cannot be reached").
        final = r.status_code in (401, 403, 409, 413, 415, 422)
        return False, ("final: " if final else "") + f"HTTP {r.status_code}: {r.text[:200]}"

    def _cancel(self, run: BatchRun, delay: float) -> None:
        time.sleep(delay)
        for attempt in range(SUBMIT_TRIES):
            try:
                if run.via == "cli":
                    r = self.fleet.cli("cancel", run.batch_id)
                    ok, why = r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]
                else:
                    resp = self._http("POST", f"/v1/batches/{run.batch_id}/cancel")
                    ok, why = resp.status_code == 200, f"HTTP {resp.status_code}: {resp.text[:200]}"
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            if ok:
                with self._lock:
                    run.cancelled = True
                return
            with self._lock:
                run.errors.append(f"cancel: {why}"[:300])
            time.sleep(min(5.0, 0.5 * 2 ** attempt))

    def durable(self, run: BatchRun, redis_kills: list[float]) -> set[str]:
        """Images of the submits that went through at least AOF_LOSS_S before any kill -9 of Redis.

        With `appendfsync everysec` Redis may lose up to about two seconds of acknowledged writes
        when killed: a submit acknowledged in that window may be gone, and that is the broker's
        contract, not the protocol's fault. Such images are reported, not counted as violations."""
        return {img for t, images in run.acks
                if not any(k - AOF_LOSS_S <= t <= k + 0.5 for k in redis_kills) for img in images}

    def summary(self) -> dict[str, Any]:
        return {"batches": len(self.batches),
                "images": sum(len(b.asked) for b in self.batches),
                "poisoned": len(self.poisoned),
                "submits_ok": sum(b.submits_ok for b in self.batches),
                "submits_failed": sum(b.submits_failed for b in self.batches),
                "cancelled": sum(b.cancelled for b in self.batches),
                "by_via": {v: sum(b.via == v for b in self.batches) for v in ("cli", "http")},
                "by_action": {a: sum(b.action == a for b in self.batches)
                              for a in ("plain", "resubmit", "cancel")},
                "runs": [b.to_dict() for b in self.batches]}

