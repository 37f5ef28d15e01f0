"""What the fleet's queue protocol costs over bare Celery, measured side by side in one run.

Both paths run on the same freshly started redis-server, with a worker of the same Celery
settings (thread pool, late acks, prefetch 1, JSON) and the same number of threads:
  fleet: `scalecap worker` on the scripted VLM with zero delay, so everything measured is queue
         protocol, batch bookkeeping (Lua), image loading, the chain's Python and the Redis sink;
  bare:  a Celery worker whose task does nothing but INCR one counter (the completion signal).
A third figure, the chain alone in one process on the same scripted VLM (no queue), shows how
much of the fleet's per-job cost is the chain's own Python rather than the queue.
Each run publishes all jobs with the same batched publishing and ends when the last one is done;
a warm-up batch runs first on each path and is not measured. Redis commands per job come from
the INFO commandstats delta over the measured window (scripts' inner commands included; the
benchmark's own completion polling is subtracted).

    python -m bench.queue_overhead --jobs 1000 --concurrency 8 --output-json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
BARE_QUEUE = "bench.noop"
BARE_TASK = "bench.noop"
BARE_COUNTER = "bench:noop:done"


# --- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def start_worker(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if " ready." in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"worker exited:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"worker not ready:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def serve_noop(broker_url: str, concurrency: int) -> int:
    """The bare Celery worker: the fleet's app settings, one task that only signals completion."""
    import redis

    from scalecap.queue_app import create_app
    from scalecap.settings import Settings

    app = create_app(Settings(broker_url=broker_url))
    counter = redis.Redis.from_url(broker_url)

    @app.task(name=BARE_TASK)
    def noop(job: dict[str, Any]) -> None:
        counter.incr(BARE_COUNTER)

    worker = app.Worker(queues=[BARE_QUEUE], pool="threads", concurrency=concurrency,
                        loglevel="WARNING", hostname=f"bench-noop@{socket.gethostname()}",
                        without_gossip=True, without_mingle=True, without_heartbeat=True,
                        optimization="fair")
    print(" ready.", flush=True)  # Celery logs at WARNING here, so say it ourselves
    worker.start()
    return int(worker.exitcode or 0)


# --- measurement -----------------------------------------------------------------------------


def commandstats(r: Any) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}


def run_bare(app: Any, r: Any, n: int, tag: str) -> tuple[float, dict[str, int], int]:
    r.delete(BARE_COUNTER)
    before = commandstats(r)
    polls = 0
    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer, producer.batch(501) as batch:
        for i in range(n):
            app.send_task(BARE_TASK, args=[{"batch_id": tag, "job_id": str(i), "ref": f"/x/{i}"}],
                          queue=BARE_QUEUE, producer=producer)
            if i % 500 == 499:
                batch.flush()
    while int(r.get(BARE_COUNTER) or 0) < n:
        polls += 1
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    d = _delta(before, commandstats(r))
    d["get"] = d.get("get", 0) - polls - 1
    d["info"] = 0
    return seconds, d, polls


Run = tuple[float, dict[str, int], int]
"""(seconds, Redis command deltas, completion polls) of one measured run."""


def run_fleet(client: Any, r: Any, refs: list[str], extra: dict[str, Any]) -> Run:
    from scalecap.queue_protocol import batch_key

    before = commandstats(r)
    polls = 0
    t0 = time.perf_counter()
    sub = client.submit(refs, sink="redis", model="scripted", config={"extra": extra})
    key = batch_key(sub.batch_id)
    while not r.hget(key, "finished_at"):
        polls += 1
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    st = client.status(sub.batch_id)
    if st["done"] != len(refs):
        raise SystemExit(f"fleet run incomplete: {st}")
    d = _delta(before, commandstats(r))
    d["hget"] = d.get("hget", 0) - polls - 1
    for k in ("info", "hgetall", "lrange"):  # our status() call
        d[k] = 0
    return seconds, d, polls


def run_chain_alone(refs: list[str], roots: list[str], concurrency: int) -> float:
    """Images/s of the chain itself, in this process, on the same scripted VLM: no queue."""
    import asyncio

    from scalecap.chain import ChainItem, ScaleCapChain
    from scalecap.config import ImageScaleCaptionGenerateConfig
    from scalecap.images import ImageLimits
    from tests.scripted_vlm import ScriptedVLM

    config = ImageScaleCaptionGenerateConfig()
    limits = ImageLimits(min_pixels=config.min_pixels, max_pixels=config.max_pixels, allowed_roots=roots)

    async def go(items: list[ChainItem]) -> float:
        chain = ScaleCapChain(ScriptedVLM(), config, concurrency=concurrency, image_limits=limits)
        t0 = time.perf_counter()
        records = await chain.caption_many(items)
        if any("error" in rec for rec in records):
            raise SystemExit("chain-alone run produced error records")
        return time.perf_counter() - t0

    items = [ChainItem(source=r, ref=r) for r in refs]
    asyncio.run(go(items[: min(50, len(items))]))  # warmup
    return len(items) / asyncio.run(go(items))


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1000, help="jobs per measured run")
    p.add_argument("--repeats", type=int, default=2, help="measured runs per path (median reported)")
    p.add_argument("--warmup-jobs", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (both paths)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--serve-noop", default=None, metavar="BROKER_URL", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.serve_noop:
        raise SystemExit(serve_noop(args.serve_noop, args.concurrency))
    from PIL import Image

    from producer.client import FleetClient
    from scalecap.queue_app import create_app
    from scalecap.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="scalecap-bench-queue-"))
    redis_proc, url = start_redis(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        import redis

        r = redis.Redis.from_url(url)
        imgs = tmp / "imgs"
        imgs.mkdir()
        refs = []
        for i in range(args.jobs):
            p = imgs / f"{i:06d}.png"
            Image.new("RGB", (32, 32), (i % 256, (i // 256) % 256, 90)).save(p)
            refs.append(str(p))
        env = {**os.environ, "PYTHONPATH": str(REPO), "SCALECAP_BROKER_URL": url,
               "SCALECAP_ALLOWED_ROOTS": str(tmp)}
        settings = Settings(broker_url=url, allowed_roots=[str(tmp)])

        # Bare Celery first, then the fleet; each path alone on the machine.
        bare_proc = start_worker(["-m", "bench.queue_overhead", "--serve-noop", url,
                                  "--concurrency", str(args.concurrency)], env, tmp / "bare.log")
        procs.append(bare_proc)
        app = create_app(settings)
        run_bare(app, r, args.warmup_jobs, "warmup")
        bare = [run_bare(app, r, args.jobs, f"run{i}") for i in range(args.repeats)]
        stop(bare_proc)

        fleet_proc = start_worker(
            ["-m", "producer.cli", "worker", "--backend", "tests.scripted_vlm:ScriptedVLM",
             "--model", "scripted", "--concurrency", str(args.concurrency), "--loglevel", "INFO",
             "--hostname", "bench-fleet@%h"], env, tmp / "fleet.log")
        procs.append(fleet_proc)
        client = FleetClient(settings)
        run_fleet(client, r, refs[: args.warmup_jobs], {"bench": "warmup"})
        fleet = [run_fleet(client, r, refs, {"bench": i}) for i in range(args.repeats)]
        stop(fleet_proc)
        chain_alone = [run_chain_alone(refs, [str(tmp)], args.concurrency) for _ in range(args.repeats)]
    finally:
        for p in procs:
            stop(p)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    def rate(runs: list[tuple[float, dict[str, int], int]]) -> list[float]:
        return [args.jobs / s for s, _, _ in runs]

    def per_job(runs: list[tuple[float, dict[str, int], int]]) -> float:
        return statistics.median(sum(d.values()) / args.jobs for _, d, _ in runs)

    fleet_rates, bare_rates = rate(fleet), rate(bare)
    top = sorted(fleet[-1][1].items(), key=lambda kv: -kv[1])[:10]
    result = {
        "jobs_per_run": args.jobs,
        "repeats": args.repeats,
        "warmup_jobs": args.warmup_jobs,
        "worker_threads": args.concurrency,
        "fleet_jobs_per_s": round(statistics.median(fleet_rates), 1),
        "bare_celery_jobs_per_s": round(statistics.median(bare_rates), 1),
        "fleet_runs_jobs_per_s": [round(x, 1) for x in fleet_rates],
        "bare_runs_jobs_per_s": [round(x, 1) for x in bare_rates],
        "fleet_vs_bare_ratio": round(statistics.median(fleet_rates) / statistics.median(bare_rates), 3),
        "chain_alone_images_per_s": round(statistics.median(chain_alone), 1),
        "fleet_vs_chain_alone_ratio": round(
            statistics.median(fleet_rates) / statistics.median(chain_alone), 3
        ),
        "redis_commands_per_job_fleet": round(per_job(fleet), 1),
        "redis_commands_per_job_bare": round(per_job(bare), 1),
        "fleet_commands_per_job_top": {k: round(v / args.jobs, 2) for k, v in top},
    }
    print_result(result)
    write_json(args.output_json, result)
    return result


def print_result(r: dict[str, Any]) -> None:
    rows = [
        ("Jobs per run / repeats / warmup jobs",
         f"{r['jobs_per_run']} / {r['repeats']} / {r['warmup_jobs']}"),
        ("Worker threads (both paths)", r["worker_threads"]),
        ("Fleet path, scripted VLM (jobs/s)", r["fleet_jobs_per_s"]),
        ("Bare Celery no-op (jobs/s)", r["bare_celery_jobs_per_s"]),
        ("Fleet / bare throughput (ratio)", r["fleet_vs_bare_ratio"]),
        ("Chain alone in process, no queue (img/s)", r["chain_alone_images_per_s"]),
        ("Fleet / chain alone throughput (ratio)", r["fleet_vs_chain_alone_ratio"]),
        ("Redis commands per job, fleet (cmds)", r["redis_commands_per_job_fleet"]),
        ("Redis commands per job, bare (cmds)", r["redis_commands_per_job_bare"]),
    ]
    top = ["Fleet Redis commands per job, by command (cmds)"] + [
        f"  {name:<42}{v:>20}" for name, v in r["fleet_commands_per_job_top"].items()
    ]
    print_table("ScaleCap queue overhead (fleet vs bare Celery)", rows, extra=top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
