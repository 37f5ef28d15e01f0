"""How the fleet scales with workers: 1, 2, 4, 8 real worker processes on one real Redis.

Every worker is a real `scalecap worker` process consuming the model's queue with Celery, running
the real chain, writing records to the Redis sink. Its engine is a stand-in with a fixed capacity
(`bench/standin_engine.py`: `--slots` requests at once, `--latency` seconds each), so what limits
one worker is its "GPU", as on a real fleet, not the CPU of this machine. The work grows with the
fleet (`--images-per-worker` x N per run), so each run lasts about as long.

Printed for each fleet size: images/s, efficiency = images/s / (N x one worker's images/s), and
what Redis spent per image: commands (INFO commandstats) and server CPU (INFO cpu, user + sys).
From those: how many GPUs one Redis core serves at `--gpu-images-per-s` per GPU (3.6 images/s, the
team's GPU measurement of a 3B VLM with the full chain), bounded below by the process CPU (which
counts idle polling and housekeeping too) and above by command time alone (no networking).

    python -m bench.fleet_scaling --sizes 1,2,4,8 --output-json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.queue_overhead import REPO, commandstats, server_cpu_usec, start_redis, start_worker, stop
from bench.report import print_table, write_json

STANDIN = "bench.standin_engine:FixedCapacityVLM"


def _calls(stats: dict[str, dict[str, int]]) -> int:
    return sum(v["calls"] for v in stats.values())


def _usec(stats: dict[str, dict[str, int]]) -> float:
    """Microseconds Redis spent executing commands (INFO commandstats), scripts included."""
    return float(sum(v["usec"] for v in stats.values()))


def _poll_cost(client: Any, r: Any, batch_id: str) -> int:
    """Redis commands one status() poll costs, so the bench's own polling can be subtracted."""
    before = _calls(commandstats(r))
    client.status(batch_id)
    return _calls(commandstats(r)) - before - 1  # less the INFO itself


def run_batch(client: Any, r: Any, refs: list[str], tag: str, poll: float = 0.1) -> dict[str, Any]:
    """Submit `refs` as one batch and wait for it to finish; what it cost Redis, per image."""
    stats0, cpu0 = commandstats(r), server_cpu_usec(r)
    t0 = time.perf_counter()
    sub = client.submit(refs, sink="redis", model="standin", config={"extra": {"bench": tag}})
    polls = 0
    while True:
        st = client.status(sub.batch_id)
        polls += 1
        if st["finished_at"] is not None:
            break
        time.sleep(poll)
    seconds = time.perf_counter() - t0
    stats1, cpu1 = commandstats(r), server_cpu_usec(r)
    if st["done"] != len(refs):
        raise SystemExit(f"run {tag} incomplete: {st}")
    per_poll = _poll_cost(client, r, sub.batch_id)
    commands = _calls(stats1) - _calls(stats0) - polls * (per_poll + 1)
    return {
        "seconds": seconds,
        "images_per_s": len(refs) / seconds,
        "redis_commands_per_image": commands / len(refs),
        "redis_cpu_us_per_image": (cpu1 - cpu0) / len(refs),
        "redis_command_us_per_image": (_usec(stats1) - _usec(stats0)) / len(refs),
    }


def make_images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        p = folder / f"{i:06d}.png"
        Image.new("RGB", (32, 32), (200, (i * 7) % 256, (i // 256) % 256)).save(p)
        refs.append(str(p))
    return refs


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1,2,4,8", help="fleet sizes (worker processes), comma separated")
    p.add_argument("--images-per-worker", type=int, default=60, help="images per worker per measured run")
    p.add_argument("--warmup-images", type=int, default=8, help="images per worker before measuring")
    p.add_argument("--concurrency", type=int, default=16, help="images in flight per worker")
    p.add_argument("--slots", type=int, default=8, help="stand-in engine: requests served at once")
    p.add_argument("--latency", type=float, default=0.2, help="stand-in engine: seconds per request")
    p.add_argument("--gpu-images-per-s", type=float, default=3.6,
                   help="one GPU's images/s on the full chain, to turn Redis CPU into fleet size")
    p.add_argument("--output-json", default=None)


def main(args: argparse.Namespace) -> dict[str, Any]:
    from producer.client import FleetClient
    from scalecap.settings import Settings

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--sizes wants positive integers")
    tmp = Path(tempfile.mkdtemp(prefix="scalecap-bench-scaling-"))
    redis_proc, url = start_redis(tmp)
    rows: list[dict[str, Any]] = []
    try:
        import redis

        r = redis.Redis.from_url(url)
        n_max = max(sizes)
        refs = make_images(tmp / "imgs", (args.images_per_worker + args.warmup_images) * n_max)
        env = {**os.environ, "PYTHONPATH": str(REPO), "SCALECAP_BROKER_URL": url,
               "SCALECAP_ALLOWED_ROOTS": str(tmp)}
        client = FleetClient(Settings(broker_url=url, allowed_roots=[str(tmp)]))
        for n in sizes:
            procs: list[subprocess.Popen[bytes]] = []
            try:
                for i in range(n):
                    procs.append(start_worker(
                        ["-m", "scalecap_command", "worker", "--backend", STANDIN, "--model", "standin",
                         "--concurrency", str(args.concurrency), "--loglevel", "INFO",
                         "--backend-option", f"slots={args.slots}",
                         "--backend-option", f"latency={args.latency}",
                         "--hostname", f"scale{n}-{i}@%h"],
                        env, tmp / f"worker-{n}-{i}.log"))
                warm = refs[: args.warmup_images * n]
                run_batch(client, r, warm, f"warm{n}")
                measured = refs[len(warm): len(warm) + args.images_per_worker * n]
                res = run_batch(client, r, measured, f"n{n}")
                rows.append({"workers": n, "images": len(measured), **res})
            finally:
                for p in procs:
                    stop(p)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    base = next((x["images_per_s"] for x in rows if x["workers"] == 1), None)
    for x in rows:
        x["efficiency"] = round(x["images_per_s"] / (x["workers"] * base), 3) if base else None
    cpu_us = statistics.median(x["redis_cpu_us_per_image"] for x in rows)
    cmd_us = statistics.median(x["redis_command_us_per_image"] for x in rows)
    # Bounds on one Redis core: the process CPU (includes the idle workers' polling and the
    # server's housekeeping, so it overstates the per-image cost at these low rates) and the
    # command time alone (leaves out networking: an upper bound).
    one_core_images = 1e6 / cpu_us if cpu_us > 0 else float("inf")
    one_core_images_cmd = 1e6 / cmd_us if cmd_us > 0 else float("inf")
    result = {
        "sizes": sizes,
        "images_per_worker": args.images_per_worker,
        "concurrency": args.concurrency,
        "standin_slots": args.slots,
        "standin_latency_s": args.latency,
        "standin_capacity_requests_per_s": round(args.slots / args.latency, 1) if args.latency else None,
        "runs": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in rows],
        "redis_cpu_us_per_image_median": round(cpu_us, 1),
        "redis_command_us_per_image_median": round(cmd_us, 1),
        "images_per_s_one_redis_core": round(one_core_images, 1),
        "images_per_s_one_redis_core_commands_only": round(one_core_images_cmd, 1),
        "gpu_images_per_s": args.gpu_images_per_s,
        "gpus_per_redis_core": round(one_core_images / args.gpu_images_per_s, 0),
        "gpus_per_redis_core_commands_only": round(one_core_images_cmd / args.gpu_images_per_s, 0),
    }
    print_result(result)
    write_json(args.output_json, result)
    return result


def print_result(res: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [
        ("Stand-in engine: slots x latency (s)", f"{res['standin_slots']} x {res['standin_latency_s']}"),
        ("Stand-in capacity per worker (req/s)", res["standin_capacity_requests_per_s"]),
        ("Images in flight per worker", res["concurrency"]),
    ]
    for x in res["runs"]:
        n = x["workers"]
        rows += [
            (f"{n} worker(s): throughput (img/s)", x["images_per_s"]),
            (f"{n} worker(s): efficiency (larger is better)", x["efficiency"]),
            (f"{n} worker(s): Redis commands per image (cmds)", x["redis_commands_per_image"]),
            (f"{n} worker(s): Redis CPU per image (us)", x["redis_cpu_us_per_image"]),
            (f"{n} worker(s): Redis command time/image (us)", x["redis_command_us_per_image"]),
        ]
    rows += [
        ("Redis process CPU per image, median (us)", res["redis_cpu_us_per_image_median"]),
        ("Redis command time per image, median (us)", res["redis_command_us_per_image_median"]),
        ("One Redis core, by process CPU (img/s)", res["images_per_s_one_redis_core"]),
        ("One Redis core, by command time (img/s)", res["images_per_s_one_redis_core_commands_only"]),
        (f"GPUs at {res['gpu_images_per_s']} img/s, by process CPU (GPUs)", res["gpus_per_redis_core"]),
        (f"GPUs at {res['gpu_images_per_s']} img/s, by cmd time (GPUs)",
         res["gpus_per_redis_core_commands_only"]),
    ]
    print_table("ScaleCap fleet scaling (real workers, stand-in engines)", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(parser.parse_args())
