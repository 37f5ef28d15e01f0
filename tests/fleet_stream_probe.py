"""Run in a fresh process by test_fleet_stream: submit a big manifest and report memory and timing.

A fresh process makes the peak RSS (ru_maxrss) a clean measure: the baseline is taken after a
warm-up submission, so what grows afterwards is what the big submission holds. While submitting
it watches the first job; once a worker has finished it, it stops that worker (SIGTERM) so the
rest of the submission does not compete with it for the machine's two cores.

Usage: python -m tests.fleet_stream_probe MANIFEST FIRST_REF WORKER_PID  (env: SCALECAP_*)
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> int:
    manifest, first_ref, worker_pid = argv[0], argv[1], int(argv[2])
    from producer.client import FleetClient
    from scalecap.config import ImageScaleCaptionGenerateConfig
    from scalecap.fleet.protocol import fleet_job_id

    client = FleetClient()
    warm = [f"/warmup/{i}.png" for i in range(2000)]
    client.submit(warm, sink="redis", model="scripted", queue="scalecap.gpu.nobody")
    baseline = _maxrss_bytes()

    config_hash = ImageScaleCaptionGenerateConfig().config_hash()
    batch_id = "stream-probe"
    first_job = fleet_job_id(first_ref, config_hash, "scripted")
    seen: dict[str, float] = {}

    def on_progress(rows: int) -> None:
        if "first_done_row" in seen:
            return
        if (client.store.job(batch_id, first_job) or {}).get("state") == "done":
            seen["first_done_row"] = rows
            seen["first_done_at"] = time.time()
            os.kill(worker_pid, signal.SIGTERM)

    t0 = time.perf_counter()
    sub = client.submit(manifest, sink="redis", model="scripted", batch_id=batch_id,
                        on_progress=on_progress)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "submitted": sub.submitted,
        "batch_id": sub.batch_id,
        "seconds": seconds,
        "baseline_rss": baseline,
        "peak_rss": _maxrss_bytes(),
        "first_done_row": seen.get("first_done_row"),
        "first_done_at": seen.get("first_done_at"),
        "ended_at": time.time(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
