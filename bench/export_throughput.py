"""Records/s of `scalecap results` from an S3 sink: record by record (before) against windowed
export (now), side by side in one run on the same redis-server and SeaweedFS.

The bench starts its own redis-server, `weed mini` and one `scalecap worker` on the scripted VLM,
captions a WebDataset shard of N small images into an S3 sink (so the records are real records,
written by the real worker, with meta.source), then times:
  before: FleetClient.results() written as JSONL, one boto3 GET after another (the path
          `scalecap results` took before producer/export.py);
  now:    producer/export.py to JSONL and to Parquet: windows of 500 records, up to
          --connections signed GETs in flight, the next window fetched while this one is written.
Each path runs --repeats times, alternated, after one unmeasured warm-up pass of each; the median
is reported. Both paths must return the same rows (checked).

    python -m bench.export_throughput --records 2000 --output-json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.queue_overhead import REPO, start_redis, start_worker, stop
from bench.report import print_table, write_json


def _shard(path: Path, n: int) -> None:
    from PIL import Image

    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (i % 256, (i // 256) % 256, 90)).save(buf, "PNG")
            for name, data in ((f"{i:06d}.png", buf.getvalue()),
                               (f"{i:06d}.txt", f"alt text {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_pid(pid: int) -> float:
    """CPU seconds of another process (the S3 server, redis-server) from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _before(client: Any, batch_id: str, out: Path) -> tuple[float, set[str]]:
    """The pre-export `scalecap results` loop, verbatim in effect."""
    seen: set[str] = set()
    t0 = time.perf_counter()
    with open(out, "w", encoding="utf-8") as f:
        for row in client.results(batch_id):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            seen.add(row["scalecap_record"]["meta"]["job_id"])
    return time.perf_counter() - t0, seen


def _now(client: Any, batch_id: str, out: Path, fmt: str, connections: int) -> tuple[float, set[str]]:
    from producer.export import export

    t0 = time.perf_counter()
    export(client, batch_id, fmt, str(out), connections=connections)
    elapsed = time.perf_counter() - t0
    if fmt == "jsonl":
        seen = {json.loads(x)["scalecap_record"]["meta"]["job_id"] for x in out.read_text().splitlines()}
    else:
        import pyarrow.parquet as pq

        seen = set(pq.read_table(out, columns=["job_id"]).column(0).to_pylist())
    return elapsed, seen


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=int, default=2000, help="images captioned, then exported")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per path (median reported)")
    p.add_argument("--connections", type=int, default=32, help="S3 GETs in flight (new path)")
    p.add_argument("--concurrency", type=int, default=8, help="worker threads while captioning")
    p.add_argument("--output-json", default=None)


def main(args: argparse.Namespace) -> dict[str, Any]:
    from producer.client import FleetClient
    from scalecap.settings import Settings
    from tests.fixtures_services import S3Server

    tmp = Path(tempfile.mkdtemp(prefix="scalecap-bench-export-"))
    redis_proc, url = start_redis(tmp)
    s3 = S3Server(tmp / "s3")
    procs = []
    try:
        s3.start()
        s3.client().create_bucket(Bucket="bench")
        shard = tmp / "shards" / "00000.tar"
        shard.parent.mkdir()
        _shard(shard, args.records)
        env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO), "SCALECAP_BROKER_URL": url,
               "SCALECAP_ALLOWED_ROOTS": str(tmp)}
        procs.append(start_worker(
            ["-m", "scalecap_command", "worker", "--backend", "tests.scripted_vlm:ScriptedVLM", "--model",
             "scripted", "--concurrency", str(args.concurrency), "--loglevel", "INFO", "--hostname",
             "bench-export@%h"], env, tmp / "worker.log"))
        client = FleetClient(Settings.from_env(env))
        t0 = time.perf_counter()
        sub = client.submit(str(shard), sink="s3://bench/runs", model="scripted")
        status = client.wait(sub.batch_id, poll=0.2, timeout=1800)
        caption_s = time.perf_counter() - t0
        stop(procs.pop())
        if status["done"] != args.records:
            raise SystemExit(f"expected {args.records} records, got {status}")

        _before(client, sub.batch_id, tmp / "warm.jsonl")  # warm-up: connections, page cache
        _now(client, sub.batch_id, tmp / "warm2.jsonl", "jsonl", args.connections)
        runs: dict[str, list[float]] = {"before": [], "jsonl": [], "parquet": []}
        cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        reference: set[str] | None = None
        servers = (s3.proc.pid, redis_proc.pid)  # type: ignore[union-attr]
        for _ in range(args.repeats):
            for name in runs:
                c0, s0 = _cpu_self(), sum(_cpu_pid(p) for p in servers)
                if name == "before":
                    s, seen = _before(client, sub.batch_id, tmp / "before.jsonl")
                else:
                    s, seen = _now(client, sub.batch_id, tmp / f"now.{name}", name, args.connections)
                cpu[name].append((_cpu_self() - c0, sum(_cpu_pid(p) for p in servers) - s0))
                reference = reference or seen
                if seen != reference or len(seen) != args.records:
                    raise SystemExit(f"{name}: rows differ from the other paths ({len(seen)} rows)")
                runs[name].append(args.records / s)
    finally:
        for p in procs:
            stop(p)
        s3.stop()
        redis_proc.terminate()
        redis_proc.wait(10)

    med = {k: round(statistics.median(v), 1) for k, v in runs.items()}

    def ms(name: str, i: int) -> float:
        return round(1000 * statistics.median(c[i] for c in cpu[name]) / args.records, 3)

    result = {
        "records": args.records,
        "repeats": args.repeats,
        "connections": args.connections,
        "caption_seconds": round(caption_s, 1),
        "before_records_per_s": med["before"],
        "export_jsonl_records_per_s": med["jsonl"],
        "export_parquet_records_per_s": med["parquet"],
        "runs_records_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "client_cpu_ms_per_record": {k: ms(k, 0) for k in runs},
        "server_cpu_ms_per_record": {k: ms(k, 1) for k in runs},
        "jsonl_vs_before_ratio": round(med["jsonl"] / med["before"], 2),
        "parquet_vs_before_ratio": round(med["parquet"] / med["before"], 2),
        "cpu_count": os.cpu_count(),
    }
    rows = [
        ("Records (S3 sink, one object each)", result["records"]),
        ("Before: record by record, JSONL (rec/s)", result["before_records_per_s"]),
        ("Now: windowed export, JSONL (rec/s)", result["export_jsonl_records_per_s"]),
        ("Now: windowed export, Parquet (rec/s)", result["export_parquet_records_per_s"]),
        ("Ratio JSONL now / before (x)", result["jsonl_vs_before_ratio"]),
        ("Ratio Parquet now / before (x)", result["parquet_vs_before_ratio"]),
        ("CPU before, client+S3+Redis (ms/rec)",
         f"{ms('before', 0)}+{ms('before', 1)}"),
        ("CPU now JSONL, client+S3+Redis (ms/rec)", f"{ms('jsonl', 0)}+{ms('jsonl', 1)}"),
    ]
    extra = [f"runs (rec/s): {json.dumps(result['runs_records_per_s'])}",
             f"{args.connections} GETs in flight; same redis-server and SeaweedFS for every path; "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end "
             "(other work on the machine slows both paths)"]
    print_table("ScaleCap export throughput (S3 sink)", rows, extra=extra)
    write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    main(parser.parse_args())
    sys.exit(0)
