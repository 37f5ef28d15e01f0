"""What the fleet's queue protocol costs over bare Celery, measured side by side in one run.

Both paths run on the same freshly started redis-server, with a worker of the same Celery
settings (thread pool, late acks, prefetch 1, JSON) and the same number of threads:
  fleet: `scalecap worker` on the scripted VLM with zero delay, so everything measured is queue
         protocol, batch bookkeeping (Lua), image loading, the chain's Python and the Redis sink;
         each task message carries K images (chunked messages); measured at the default K and
         at K = 1;
  bare:  a Celery worker whose task does nothing but INCR one counter (the completion signal).
Two further figures: the chain alone in one process on the same scripted VLM (no queue) shows how
much of the fleet's per-image cost is the chain's own Python rather than the queue; the
protocol alone (the same worker code, workers.tasks and workers.jobs, on a runtime that answers
at once with a small record, no chain) is the queue protocol's own throughput.
Each run publishes all jobs with the same batched publishing and ends when the last one is done;
a warm-up batch runs first on each path and is not measured. Redis commands per image come from
the INFO commandstats delta over the measured window (scripts' inner commands included; the
benchmark's own polling subtracted). Redis server CPU per image is the INFO commandstats `usec`
summed over every command in the window (an upper bound: a script's inner commands are counted
inside its EVALSHA and again on their own), and, for comparison, the server process's whole CPU
time (user + sys, network included) from INFO cpu.
Targets (issue 6): <= 14 commands and <= 100 us of Redis CPU per image, fleet >= 0.9x bare.

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
from dataclasses import dataclass
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

    from scalecap.fleet.app import create_app
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


class NullRuntime:
    """An engine runtime that returns a small fixed record at once: the fleet's queue protocol,
    bookkeeping and Redis sink without the chain's Python (the `protocol only` path)."""

    def caption_chunk(self, config: Any, items: list[tuple[str, str]], timeout: Any,
                      watch: Any = None) -> list[Any]:
        return [{"final_caption": "", "meta": {"job_id": j}} for j, _ in items]


def serve_fleet_noop(broker_url: str, concurrency: int) -> int:
    """A fleet worker (workers.tasks, workers.jobs: the real protocol) on NullRuntime."""
    from scalecap.fleet.app import create_app
    from scalecap.fleet.protocol import gpu_queue, quarantine_queue
    from scalecap.settings import Settings
    from workers import engine
    from workers.tasks import register_tasks

    settings = Settings.from_env(broker_url=broker_url)
    engine.configure(NullRuntime())  # type: ignore[arg-type]
    app = register_tasks(create_app(settings))
    q = gpu_queue("scripted")
    worker = app.Worker(queues=[q, quarantine_queue(q)], pool="threads", concurrency=concurrency,
                        loglevel="WARNING", hostname=f"bench-protocol@{socket.gethostname()}",
                        without_gossip=True, without_mingle=True, without_heartbeat=True,
                        optimization="fair")
    print(" ready.", flush=True)
    worker.start()
    return int(worker.exitcode or 0)


# --- measurement -----------------------------------------------------------------------------


def commandstats(r: Any) -> dict[str, dict[str, int]]:
    return {k.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
            for k, v in r.info("commandstats").items()}


def server_cpu_usec(r: Any) -> float:
    cpu = r.info("cpu")
    return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6


def _delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, int]:
    out = {}
    for k, v in after.items():
        d = v["calls"] - before.get(k, {}).get("calls", 0)
        if d > 0:
            out[k] = d
    return out


def usec_total(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> int:
    """Microseconds of command time over the window, from INFO commandstats: every command's
    usec delta summed. A script's EVALSHA usec already covers the commands it calls, which are
    listed again on their own, so this counts script work twice: an upper bound."""
    return sum(v["usec"] - before.get(k, {}).get("usec", 0) for k, v in after.items())


@dataclass
class Run:
    """One measured run: wall seconds, Redis command calls by name, command usec, server CPU usec."""

    seconds: float
    calls: dict[str, int]
    usec: float
    cpu_usec: float


def _measure(r: Any, start: Any, done: Any, poll_cmd: str) -> Run:
    before, cpu0 = commandstats(r), server_cpu_usec(r)
    t0 = time.perf_counter()
    start()
    polls = 0
    while not done():
        polls += 1
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    after, cpu1 = commandstats(r), server_cpu_usec(r)
    calls = _delta(before, after)
    calls[poll_cmd] = calls.get(poll_cmd, 0) - polls - 1  # the benchmark's own polling
    calls.pop("info", None)
    a, b = after.get(poll_cmd, {}), before.get(poll_cmd, {})
    poll_calls = a.get("calls", 0) - b.get("calls", 0)
    poll_usec = (a.get("usec", 0) - b.get("usec", 0)) * min(1.0, (polls + 1) / max(1, poll_calls))
    info_usec = after.get("info", {}).get("usec", 0) - before.get("info", {}).get("usec", 0)
    usec = usec_total(before, after) - poll_usec - info_usec
    return Run(seconds, {k: v for k, v in calls.items() if v > 0}, usec, cpu1 - cpu0)


def run_bare(app: Any, r: Any, n: int, tag: str) -> Run:
    r.delete(BARE_COUNTER)

    def start() -> None:
        with app.producer_or_acquire() as producer, producer.batch(501) as batch:
            for i in range(n):
                app.send_task(BARE_TASK, args=[{"batch_id": tag, "job_id": str(i), "ref": f"/x/{i}"}],
                              queue=BARE_QUEUE, producer=producer)
                if i % 500 == 499:
                    batch.flush()

    return _measure(r, start, lambda: int(r.get(BARE_COUNTER) or 0) >= n, "get")


def run_fleet(client: Any, r: Any, refs: list[str], extra: dict[str, Any], k: int) -> Run:
    from scalecap.fleet.protocol import batch_key

    box: dict[str, str] = {}

    def start() -> None:
        sub = client.submit(refs, sink="redis", model="scripted", config={"extra": extra}, chunk_size=k)
        box["key"] = batch_key(sub.batch_id)
        box["id"] = sub.batch_id

    run = _measure(r, start, lambda: r.hget(box["key"], "finished_at"), "hget")
    st = client.status(box["id"])
    if st["done"] != len(refs):
        raise SystemExit(f"fleet run incomplete: {st}")
    return run


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
    p.add_argument("--concurrency", type=int, default=8, help="worker threads (every path)")
    p.add_argument("--chunk-size", type=int, default=16,
                   help="images per task message of the fleet path (K = 1 is measured too)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--serve-noop", default=None, metavar="BROKER_URL", help=argparse.SUPPRESS)
    p.add_argument("--serve-fleet-noop", default=None, metavar="BROKER_URL", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.serve_noop:
        raise SystemExit(serve_noop(args.serve_noop, args.concurrency))
    if args.serve_fleet_noop:
        raise SystemExit(serve_fleet_noop(args.serve_fleet_noop, args.concurrency))
    from PIL import Image

    from producer.client import FleetClient
    from scalecap.fleet.app import create_app
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

        client = FleetClient(settings)
        fleet: dict[int, list[Run]] = {}
        for k in sorted({args.chunk_size, 1}, reverse=True):
            # Same job threads as the bare worker: each holds one message of k images.
            fleet_proc = start_worker(
                ["-m", "scalecap_command", "worker", "--backend", "tests.scripted_vlm:ScriptedVLM",
                 "--model", "scripted", "--concurrency", str(args.concurrency * k), "--loglevel", "INFO",
                 "--hostname", f"bench-fleet-k{k}@%h"],
                {**env, "SCALECAP_CHUNK_SIZE": str(k)}, tmp / f"fleet-k{k}.log")
            procs.append(fleet_proc)
            run_fleet(client, r, refs[: args.warmup_jobs], {"bench": f"warmup-{k}"}, k)
            fleet[k] = [run_fleet(client, r, refs, {"bench": f"{k}-{i}"}, k) for i in range(args.repeats)]
            stop(fleet_proc)
        # The protocol alone (no chain): the same worker code on a runtime that answers at once.
        k = args.chunk_size
        proto_proc = start_worker(["-m", "bench.queue_overhead", "--serve-fleet-noop", url,
                                   "--concurrency", str(args.concurrency)],
                                  {**env, "SCALECAP_CHUNK_SIZE": str(k)}, tmp / "protocol.log")
        procs.append(proto_proc)
        run_fleet(client, r, refs[: args.warmup_jobs], {"bench": "warmup-protocol"}, k)
        protocol = [run_fleet(client, r, refs, {"bench": f"protocol-{i}"}, k) for i in range(args.repeats)]
        stop(proto_proc)
        chain_alone = [run_chain_alone(refs, [str(tmp)], args.concurrency) for _ in range(args.repeats)]
    finally:
        for p in procs:
            stop(p)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.jobs

    def med(runs: list[Run], f: Any) -> float:
        return statistics.median(f(x) for x in runs)

    def path(runs: list[Run]) -> dict[str, Any]:
        return {
            "images_per_s": round(med(runs, lambda x: n / x.seconds), 1),
            "runs_images_per_s": [round(n / x.seconds, 1) for x in runs],
            "redis_commands_per_image": round(med(runs, lambda x: sum(x.calls.values()) / n), 2),
            "redis_commandstats_usec_per_image": round(med(runs, lambda x: x.usec / n), 1),
            "redis_server_cpu_usec_per_image": round(med(runs, lambda x: x.cpu_usec / n), 1),
            "commands_per_image_top": {
                c: round(v / n, 2) for c, v in sorted(runs[-1].calls.items(), key=lambda kv: -kv[1])[:10]
            },
        }

    bare_p = path(bare)
    result: dict[str, Any] = {
        "jobs_per_run": n,
        "repeats": args.repeats,
        "warmup_jobs": args.warmup_jobs,
        "worker_threads": args.concurrency,
        "chunk_size": args.chunk_size,
        "bare": bare_p,
        "fleet": {str(k): path(runs) for k, runs in fleet.items()},
        "protocol_only": path(protocol),
        "chain_alone_images_per_s": round(statistics.median(chain_alone), 1),
    }
    for p in result["fleet"].values():
        p["vs_bare_ratio"] = round(p["images_per_s"] / bare_p["images_per_s"], 3)
        p["vs_chain_alone_ratio"] = round(p["images_per_s"] / result["chain_alone_images_per_s"], 3)
    proto = result["protocol_only"]
    proto["vs_bare_ratio"] = round(proto["images_per_s"] / bare_p["images_per_s"], 3)
    main_p = result["fleet"][str(args.chunk_size)]
    result["targets_met"] = {
        "commands_per_image_le_14": main_p["redis_commands_per_image"] <= 14,
        "redis_usec_per_image_le_100": main_p["redis_commandstats_usec_per_image"] <= 100,
        "fleet_ge_0_9_bare": main_p["vs_bare_ratio"] >= 0.9,
        "protocol_only_ge_0_9_bare": proto["vs_bare_ratio"] >= 0.9,
    }
    print_result(result)
    write_json(args.output_json, result)
    return result


def print_result(r: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [
        ("Jobs per run / repeats / warmup jobs",
         f"{r['jobs_per_run']} / {r['repeats']} / {r['warmup_jobs']}"),
        ("Worker threads (all paths)", r["worker_threads"]),
        ("Bare Celery no-op (tasks/s)", r["bare"]["images_per_s"]),
        ("Redis commands per task, bare (cmds)", r["bare"]["redis_commands_per_image"]),
        ("Redis usec per task, bare (us)", r["bare"]["redis_commandstats_usec_per_image"]),
        ("Chain alone in process, no queue (img/s)", r["chain_alone_images_per_s"]),
    ]
    extra: list[str] = []
    for k, p in sorted(r["fleet"].items(), key=lambda kv: -int(kv[0])):
        rows += [
            (f"Fleet K={k}, scripted VLM (img/s)", p["images_per_s"]),
            (f"Fleet K={k} / bare throughput (ratio)", p["vs_bare_ratio"]),
            (f"Fleet K={k} / chain alone (ratio)", p["vs_chain_alone_ratio"]),
            (f"Redis commands per image, K={k} (cmds)", p["redis_commands_per_image"]),
            (f"Redis usec per image, K={k} (us)", p["redis_commandstats_usec_per_image"]),
            (f"Redis process CPU per image, K={k} (us)", p["redis_server_cpu_usec_per_image"]),
        ]
        extra.append(f"Fleet K={k} Redis commands per image, by command (cmds)")
        extra += [f"  {name:<42}{v:>20}" for name, v in p["commands_per_image_top"].items()]
    p = r["protocol_only"]
    k = r["chunk_size"]
    rows += [
        (f"Protocol only K={k}, no chain (img/s)", p["images_per_s"]),
        (f"Protocol only K={k} / bare (ratio)", p["vs_bare_ratio"]),
        ("Redis commands per image, protocol (cmds)", p["redis_commands_per_image"]),
        ("Redis usec per image, protocol (us)", p["redis_commandstats_usec_per_image"]),
    ]
    rows += [(f"Target met: {name}", "yes" if ok else "NO") for name, ok in r["targets_met"].items()]
    print_table("ScaleCap queue overhead (fleet vs bare Celery)", rows, extra=extra)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
