"""`scalecap worker`: one Celery worker process, pinned to its GPUs, holding one engine.

It pins GPUs first (before anything imports torch or vLLM), creates the engine once in this
process, then consumes with Celery's thread pool: each thread holds one task message (a chunk of
up to SCALECAP_CHUNK_SIZE images), `--concurrency` images in flight in all, all feeding one engine,
which batches across them. It also consumes its queue's quarantine lane (jobs whose run was lost
run there alone). No fork happens after the engine exists. SIGTERM
is Celery's warm shutdown: stop taking jobs, finish the ones in flight, then exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
from typing import Any

log = logging.getLogger("scalecap.worker")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from scalecap.cli.options import add_engine_args
    from scalecap.config import PRESETS

    parser.add_argument("--gpus", default=None,
                        help="CUDA_VISIBLE_DEVICES for this worker, e.g. 0 or 0,1; several GPUs mean "
                        "one vLLM engine across them (tensor parallel) (env SCALECAP_GPUS)")
    parser.add_argument("--queue", default=None,
                        help="queue(s) to consume, comma separated (default: scalecap.gpu.<model>)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="images in flight in this worker (env SCALECAP_CONCURRENCY); each job thread "
                        "holds one message of SCALECAP_CHUNK_SIZE images")
    parser.add_argument("--io", action="store_true",
                        help="an I/O worker: webhook lanes (scalecap.io, scalecap.io.jobs), outbox drain, "
                        "reconcile passes; no engine, no GPU")
    parser.add_argument("--broker-url", default=None, help="Redis URL (env SCALECAP_BROKER_URL)")
    parser.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra backend option (VALUE parsed as JSON when it can be); repeatable")
    parser.add_argument("--hostname", default=None, help="Celery node name (default scalecap-<queue>@host)")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--no-warmup", action="store_true",
                        help="create the engine on the first job instead of before consuming")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics and /healthz, /readyz probes on this port "
                        "(env SCALECAP_METRICS_PORT; address SCALECAP_METRICS_HOST)")
    add_engine_args(parser)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="serve this preset's batches: authors starts the engine with --raw-logits "
                        "(it then serves logit_diff and yesno)")


def _backend_options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--backend-option wants KEY=VALUE, got {pair!r}")
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except ValueError:
            out[key.replace("-", "_")] = raw
    return out


def check_timeouts(settings: Any) -> None:
    """Refuse to start when a job could outlive its message's visibility timeout.

    Celery's task_reject_on_worker_lost does nothing with the thread pool; what replaces it is
    the visibility timeout (Redis hands a dead worker's messages to another), the job timeout
    (an image's coroutine is cancelled, so a hung engine cannot hold its message that long) and
    the reconciler (it takes back leases that ran out). That only holds if the visibility
    timeout is at least twice the job timeout."""
    if settings.job_timeout <= 0:
        raise SystemExit("SCALECAP_JOB_TIMEOUT must be > 0 seconds")
    if settings.visibility_timeout < 2 * settings.job_timeout:
        raise SystemExit(
            f"SCALECAP_VISIBILITY_TIMEOUT ({settings.visibility_timeout} s) must be at least twice "
            f"SCALECAP_JOB_TIMEOUT ({settings.job_timeout:g} s), or a slow job runs twice"
        )


def start_maintenance(app: Any, settings: Any, stop: threading.Event) -> threading.Thread:
    from scalecap.fleet.protocol import BatchStore
    from scalecap.fleet.reconcile import run_forever
    from scalecap.fleet.redis import redis_client

    store = BatchStore(redis_client(settings.broker_url, settings), retention=settings.retention)
    t = threading.Thread(target=run_forever, args=(app, store, settings, stop), name="scalecap-maintenance",
                         daemon=True)
    t.start()
    return t


def start_presence(settings: Any, hostname: str, queues: list[str], stop: threading.Event,
                   interval: float = 10.0, runtime: Any = None) -> threading.Thread:
    """Beat `scalecap:workers:{queue}` (scalecap/fleet/presence.py) while this worker is healthy.

    The API's /readyz reads it when Celery's remote control is off (the default). A worker whose
    engine loop is stuck or whose images stall stops beating, so it drops out of readiness. Once
    the engine exists, each beat also says which rating rules it serves (`scalecap submit` warns
    when none of a queue's live workers serves a batch's rule)."""
    from scalecap.fleet.presence import beat
    from scalecap.fleet.redis import redis_client
    from workers import metrics

    client = redis_client(settings.broker_url, settings)

    def loop() -> None:
        while not stop.is_set():
            try:
                if not metrics.health().problems():
                    rules = runtime.rules() if runtime is not None else None
                    beat(client, hostname, queues, rules=rules)
            except Exception as exc:  # Redis away for a moment: try again next round
                log.debug("presence beat failed: %s", exc)
            stop.wait(interval)

    t = threading.Thread(target=loop, name="scalecap-presence", daemon=True)
    t.start()
    return t


def main(args: argparse.Namespace) -> int:
    from scalecap.settings import Settings

    settings = Settings.from_env().with_overrides(
        broker_url=args.broker_url, gpus=args.gpus, concurrency=args.concurrency, queue=args.queue,
        metrics_port=args.metrics_port,
    )
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from scalecap.fleet.redact import protect_process

    protect_process(settings)  # no password, key or webhook token in this worker's logs

    pinned = None
    if not args.io:
        # First, before any engine import: the GPUs this process may see.
        from workers.gpu import pin_gpus

        pinned = pin_gpus(settings.gpus)
        if pinned is not None:
            log.info("pinned to GPU(s) %s", pinned)

    from workers import metrics

    if settings.metrics_port is not None:  # up before the engine: probes answer while it starts
        metrics.serve(settings.metrics_host, settings.metrics_port)

    from scalecap.fleet.app import create_app
    from scalecap.fleet.protocol import IO_JOBS_QUEUE, IO_QUEUE, gpu_queue, quarantine_queue
    from workers.tasks import register_tasks

    if not args.io:
        check_timeouts(settings)
    runtime = None
    if args.io:
        queues = [IO_QUEUE, IO_JOBS_QUEUE]  # two lanes: batch events never wait behind job events
        concurrency = args.concurrency or 8
    else:
        from scalecap.cli.options import engine_options
        from workers import engine

        backend, model, options = engine_options(args, settings)
        options.update(_backend_options(args.backend_option))
        if backend == "vllm" and pinned and len(pinned) > 1:
            # --gpus 0,1 means one engine across both: tensor parallel unless said otherwise
            options.setdefault("tensor_parallel_size", len(pinned))
        settings = settings.with_overrides(backend=backend, model=model)
        queues = [q.strip() for q in (settings.queue or gpu_queue(model)).split(",") if q.strip()]
        queues += [quarantine_queue(q) for q in queues if quarantine_queue(q) not in queues]
        # Images in flight = --concurrency: each job thread holds one chunk of up to
        # SCALECAP_CHUNK_SIZE images, and the engine's chains admit --concurrency at once.
        concurrency = max(1, -(-settings.concurrency // max(1, settings.chunk_size)))
        runtime = engine.EngineRuntime(
            backend, model, options, settings=settings, concurrency=settings.concurrency
        )
        engine.configure(runtime)
        if not args.no_warmup:
            runtime.vlm()  # fail now, clearly, if the engine cannot start
        metrics.start_heartbeat(runtime.loop)
        log.info("engine ready: %s %s; consuming %s with %d job threads",
                 backend, model, ",".join(queues), concurrency)

    app = register_tasks(create_app(settings))
    from celery.utils.nodenames import host_format

    hostname = host_format(args.hostname or f"scalecap-{queues[0]}@{socket.gethostname()}")
    metrics.configure(settings, io=args.io, queues=queues, hostname=hostname)
    metrics.install_signals()
    worker = app.Worker(
        queues=queues,
        pool="threads",
        concurrency=concurrency,
        loglevel=args.loglevel.upper(),
        hostname=hostname,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=not settings.task_events,  # worker heartbeats tell Flower who is online
        optimization="fair",
    )
    stop = threading.Event()
    if args.io:  # outbox drain, webhook retries, reconcile: one daemon thread beside the pool
        start_maintenance(app, settings, stop)
    start_presence(settings, hostname, queues, stop, runtime=runtime)
    try:
        worker.start()
    finally:
        stop.set()
        metrics.stop_heartbeat()
        if runtime is not None:
            runtime.close()
    return int(worker.exitcode or 0)
