"""The GPU path end to end in one run, one table: the in-process chain, then the fleet, same model.

1. `bench.chain_throughput` on the model (a subprocess, so its engine's GPU memory is freed when
   it ends): serial, concurrent and stage-batched (engine-only lower bound) images/s, and the
   chain's engine and scoring requests per image (one-pass scoring, the default).
2. The fleet: redis-server, one `scalecap worker` holding the engine and the I/O worker, as real
   processes; a warm-up batch, then one batch of `--fleet-images` captioned through the queue to
   the Redis sink. Its images/s run from submit to the batch's finish; every record is read back.
GPU memory is sampled with nvidia-smi once a second (peak over each part).

GPU (scripts/gpu_check.sh): the Qwen2.5-VL-3B shape with dummy weights, full token lengths.
CPU (`--cpu`): the tiny random-weight model, the tiny-model token limits, a few images.
The goal on an H200 (issue 16): stage-batched 3.02 img/s at 64 images, 3.64 at 256, and the
fleet at least that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.chain_throughput import TINY_LIMITS, make_images
from bench.queue_overhead import REPO, start_redis, stop
from bench.report import print_table, write_json

TABLE = "ScaleCap GPU check"
CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
           "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
GPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


class GpuMemory:
    """Peak `memory.used` (MiB) over all GPUs, sampled by nvidia-smi in a thread."""

    def __init__(self) -> None:
        self.binary = shutil.which("nvidia-smi")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            out = subprocess.run([self.binary, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
            used = [int(x) for x in out.stdout.split() if x.strip().isdigit()]
            self.peak = max([self.peak, *used])

    def __enter__(self) -> GpuMemory:
        if self.binary:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def start(argv: list[str], env: dict[str, str], log: Path, ready: str, timeout: float) -> subprocess.Popen:
    """A process whose log must show `ready` within `timeout` s (engine start included)."""
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"{argv[2:4]} exited:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)
    stop(proc)
    tail = log.read_text(errors="replace")[-4000:]
    raise SystemExit(f"{argv[2:4]} not ready after {timeout:.0f} s:\n{tail}")


def chain_bench(args: argparse.Namespace, model: str | None, env: dict[str, str], out: Path
                ) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.chain_throughput", "--num-images", str(args.num_images),
            "--serial-images", str(args.serial_images), "--warmup-images", str(args.warmup_images),
            "--repeats", "1", "--one-pass-only", "--output-json", str(out)]
    if model:  # GPU: the 3B shape; without --model the bench builds and uses the tiny model
        argv += ["--model", model, "--full-lengths", "--load-format", "dummy", "--dtype", "bfloat16",
                 "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
    subprocess.run(argv, env=env, cwd=REPO, check=True, timeout=args.part_timeout)
    return json.loads(out.read_text())


def fleet_bench(args: argparse.Namespace, model: str, env: dict[str, str], work: Path) -> dict[str, Any]:
    from producer.client import FleetClient
    from scalecap.settings import Settings

    redis_proc, url = start_redis(work)
    env = {**env, "SCALECAP_BROKER_URL": url, "SCALECAP_ALLOWED_ROOTS": str(work)}
    engine = ["--backend", "vllm", "--model", model, "--concurrency", str(args.fleet_images),
              "--max-num-seqs", str(args.max_num_seqs), "--dtype", "bfloat16"]
    engine += (["--max-model-len", "2048", "--enforce-eager"] if args.cpu
               else ["--max-model-len", str(args.max_model_len), "--backend-option", "load_format=dummy"])
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start(["-m", "scalecap_command", "worker", "--io", "--hostname", "io@%h"], env,
                           work / "worker-io.log", " ready.", 120))
        procs.append(start(["-m", "scalecap_command", "worker", *engine, "--hostname", "gpu@%h"], env,
                           work / "worker-gpu.log", " ready.", args.part_timeout))
        images = make_images(args.warmup_images + args.fleet_images)
        (work / "imgs").mkdir()
        refs = []
        for i, img in enumerate(images):
            refs.append(str(work / "imgs" / f"{i:05d}.png"))
            img.save(refs[-1])
        client = FleetClient(Settings(broker_url=url, allowed_roots=[str(work)]))
        config = {**(TINY_LIMITS if args.cpu else {}), "second_filter": True, "one_pass_scoring": True}
        warm = client.submit(refs[: args.warmup_images], model=model, config=config)
        client.wait(warm.batch_id, poll=0.2, timeout=args.part_timeout)
        t0 = time.perf_counter()
        sub = client.submit(refs[args.warmup_images:], model=model, config=config)
        status = client.wait(sub.batch_id, poll=0.2, timeout=args.part_timeout)
        seconds = time.perf_counter() - t0
        records = list(client.results(sub.batch_id))
    finally:
        for p in reversed(procs):
            stop(p)
        redis_proc.terminate()
        redis_proc.wait(10)
    good = sum(1 for r in records if "error" not in r)
    return {"images": args.fleet_images, "seconds": round(seconds, 3),
            "images_per_s": round(args.fleet_images / seconds, 3), "done": status["done"],
            "failed": status.get("failed", 0), "records": len(records), "records_without_error": good}


def main(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="scalecap-gpu-check-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), **(CPU_ENV if args.cpu else GPU_ENV)}
    if args.cpu:
        from scalecap.testing.tiny_model import build_tiny_qwen2vl

        # the folder chain_throughput builds and uses when given no --model
        model = str(build_tiny_qwen2vl(os.path.join(tempfile.gettempdir(), "scalecap-bench-tiny")))
        chain_model = None
    else:
        from bench.qwen25vl_shape import build

        model = args.model or str(build(work / "qwen25vl3b"))
        chain_model = model
    try:
        with GpuMemory() as chain_mem:
            chain = chain_bench(args, chain_model, env, work / "chain.json")
        with GpuMemory() as fleet_mem:
            fleet = fleet_bench(args, model, env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    conc = chain["concurrent_images_per_s"]
    result = {
        "mode": "cpu (tiny model)" if args.cpu else "gpu (Qwen2.5-VL-3B shape, dummy weights)",
        "vllm": vllm_version(), "chain": chain, "fleet": fleet,
        "fleet_vs_chain": round(fleet["images_per_s"] / conc, 3) if conc else None,
        "gpu_memory_mib": max(chain_mem.peak, fleet_mem.peak) if chain_mem.binary else None,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print_result(result)
    write_json(args.output_json, result)
    return result


def print_result(r: dict[str, Any]) -> None:
    chain, fleet = r["chain"], r["fleet"]
    conc = chain["concurrent_images_per_s"]
    score = chain["scoring_paths"]["one_pass"]["score_requests_per_image"]
    print_table(TABLE, [
        ("Mode", r["mode"]),
        ("vLLM", r["vllm"]),
        ("Images: chain / serial / fleet",
         f"{chain['num_images']} / {chain['serial_images']} / {fleet['images']}"),
        ("Serial chain (img/s)", chain["serial_images_per_s"]),
        ("Concurrent chain (img/s)", conc),
        ("Stage-batched, engine only (img/s)", chain["lower_bound_images_per_s"]),
        ("Fleet, 1 worker through the queue (img/s)", fleet["images_per_s"]),
        ("Fleet vs in-process chain (x)", r["fleet_vs_chain"] if conc else "n/a"),
        ("Fleet images captioned", f"{fleet['records_without_error']}/{fleet['images']}"),
        ("Engine requests per image", chain["requests_per_image"]),
        ("Scoring requests per image", score),
        ("GPU memory used, peak (MiB)", r["gpu_memory_mib"] if r["gpu_memory_mib"] is not None else "n/a"),
        ("Check wall time (s)", r["wall_s"]),
    ], extra=["Goal (H200, 3B shape): stage-batched 3.02 img/s at 64 images, 3.64 at 256;",
              "the fleet at least that."])


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="tiny model on this CPU machine, small N")
    p.add_argument("--model", default=None, help="a model folder (default: build the 3B shape)")
    p.add_argument("--num-images", type=int, default=None, help="chain images (GPU 256, CPU 6)")
    p.add_argument("--serial-images", type=int, default=None, help="one-at-a-time images (GPU 4, CPU 2)")
    p.add_argument("--fleet-images", type=int, default=None, help="fleet batch (default: --num-images)")
    p.add_argument("--warmup-images", type=int, default=None, help="unmeasured images first (GPU 8, CPU 2)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--part-timeout", type=float, default=600.0, help="seconds for each part")
    p.add_argument("--output-json", default=None)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    small = args.cpu
    args.num_images = args.num_images or (6 if small else 256)
    args.serial_images = args.serial_images or (2 if small else 4)
    args.warmup_images = args.warmup_images or (2 if small else 8)
    args.fleet_images = args.fleet_images or args.num_images
    if small:
        args.max_num_seqs = min(args.max_num_seqs, 16)
    return args


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    main(resolve(parser.parse_args()))
