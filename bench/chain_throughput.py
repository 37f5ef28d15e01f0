"""Chain throughput: one image at a time vs the concurrent chain vs the engine-only lower bound,
and the contrastive rating with two teacher-forced passes (before) vs one (after).

All run on the same real engine in one process, one after another:
1. serial: the chain with concurrency 1 (batching only inside one image's stage calls);
2. concurrent: the chain with every image in flight at once (the engine batches across images);
3. lower bound: the very requests the concurrent run made, replayed stage by stage with every
   image's requests of a stage sent together as one batch (no chain logic, no waiting between
   images). Its time is what the engine alone needs for this work; within each stage the
   generation and the scoring requests are timed apart, which gives scoring's share.
Phases 2 and 3 run for both scoring paths, alternated: two-pass (`one_pass_scoring=False`: the
caption and each rated answer teacher-forced with and without the image) and one-pass (the
generation's own token scores stand for the with-image pass). Serial uses one-pass.

Usage (CPU, tiny random-weight model built on the spot):
    python -m bench.chain_throughput --num-images 32
GPU:
    python -m bench.chain_throughput --model Qwen/Qwen2.5-VL-3B-Instruct --num-images 256 --full-lengths
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from bench.report import print_table, write_json
from scalecap.backends.base import GenerateRequest, ScoreRequest
from scalecap.stages.context import CURRENT_STAGE

# Token limits that keep a random-weight tiny model (which never stops early) inside its context.
TINY_LIMITS = dict(max_init_tokens=96, max_answer_tokens=32, max_questions=4, max_question_tokens=48,
                   max_object_summary_tokens=48, max_position_summary_tokens=48, max_final_tokens=96)
PATHS = ("two_pass", "one_pass")


class RecordingBackend:
    """Passes calls through and remembers each request, tagged with the chain stage that made it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.supports_scoring = inner.supports_scoring
        for name in ("supports_generation_logprobs", "score_values", "max_model_len"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))
        self.log: list[tuple[str, str, Any]] = []  # (stage, kind, request)

    async def generate(self, requests: Sequence[GenerateRequest]):
        self.log.extend((CURRENT_STAGE.get() or "other", "generate", r) for r in requests)
        return await self.inner.generate(requests)

    async def score(self, requests: Sequence[ScoreRequest]):
        self.log.extend((CURRENT_STAGE.get() or "other", "score", r) for r in requests)
        return await self.inner.score(requests)

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_images(n: int, size: int = 224) -> list[Any]:
    """n distinct photographs: crops of scikit-image's bundled pictures, else seeded noise."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data

        bases = [Image.fromarray(getattr(data, k)()).convert("RGB")
                 for k in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    except Exception:
        rng = np.random.default_rng(0)
        bases = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(4)]
    out = []
    for i in range(n):
        b = bases[i % len(bases)]
        k = i // len(bases)
        x, y = (k * 37) % max(1, b.width - size), (k * 53) % max(1, b.height - size)
        out.append(b.crop((x, y, x + size, y + size)))
    return out


async def run_chain(backend, config, images, concurrency: int) -> tuple[float, list[dict]]:
    from scalecap.chain import ChainItem, ScaleCapChain

    chain = ScaleCapChain(backend, config, concurrency=concurrency)
    items = [ChainItem(source=img, ref=f"bench-{i}") for i, img in enumerate(images)]
    t0 = time.perf_counter()
    records = await chain.caption_many(items)
    return time.perf_counter() - t0, records


async def replay(inner, log) -> tuple[float, dict[str, float], float]:
    """Every stage's requests for all images sent together, stages one after another; within a
    stage its generations, then its scoring requests. Returns total, per-stage and scoring seconds."""
    by_stage: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    order: list[str] = []
    for stage, kind, req in log:
        if stage not in by_stage:
            order.append(stage)
        by_stage[stage].append((kind, req))
    times: dict[str, float] = {}
    total = scoring = 0.0
    for stage in order:
        gens = [r for k, r in by_stage[stage] if k == "generate"]
        scores = [r for k, r in by_stage[stage] if k == "score"]
        t0 = time.perf_counter()
        if gens:
            await inner.generate(gens)
        t1 = time.perf_counter()
        if scores:
            await inner.score(scores)
        t2 = time.perf_counter()
        times[stage] = t2 - t0
        scoring += t2 - t1
        total += times[stage]
    return total, times, scoring


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model path/name (default: build the tiny model)")
    p.add_argument("--backend", default="vllm")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--serial-images", type=int, default=None,
                   help="images for the one-at-a-time run (default: all; its images/s is what counts)")
    p.add_argument("--concurrency", type=int, default=None, help="default: all images in flight")
    p.add_argument("--warmup-images", type=int, default=16,
                   help="images of an unmeasured concurrent run first (batch shapes, caches)")
    p.add_argument("--repeats", type=int, default=3,
                   help="concurrent and lower-bound runs, alternated; medians are reported")
    p.add_argument("--full-lengths", action="store_true",
                   help="use the config's default token limits (real models), not the tiny-model ones")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", help="'dummy' for weight-less timing runs")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--one-pass-only", action="store_true",
                   help="skip the two-pass scoring path (halves the concurrent and lower-bound runs)")
    p.add_argument("--output-json", default=None)


def main(args: argparse.Namespace) -> dict[str, Any]:
    from scalecap.backends import create_backend
    from scalecap.config import ImageScaleCaptionGenerateConfig

    tiny = args.model is None
    if tiny:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from scalecap.testing.tiny_model import build_tiny_qwen2vl

        args.model = str(build_tiny_qwen2vl(os.path.join(tempfile.gettempdir(), "scalecap-bench-tiny")))
        args.max_model_len = args.max_model_len or 2048
        args.enforce_eager = True
        args.dtype = "bfloat16"
    limits = {} if args.full_lengths else TINY_LIMITS
    configs = {
        "two_pass": ImageScaleCaptionGenerateConfig(**limits, second_filter=True, one_pass_scoring=False),
        "one_pass": ImageScaleCaptionGenerateConfig(**limits, second_filter=True, one_pass_scoring=True),
    }
    config = configs["one_pass"]
    n = args.num_images
    images = make_images(n + args.warmup_images)
    warm, images = images[:args.warmup_images], images[args.warmup_images:]
    n_serial = args.serial_images or n

    async def go() -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if args.backend == "vllm":
            opts = dict(max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
                        dtype=args.dtype, enforce_eager=args.enforce_eager, load_format=args.load_format,
                        limit_mm_per_prompt={"image": 1, "video": 0})
            if args.max_model_len:
                opts["max_model_len"] = args.max_model_len
        t0 = time.perf_counter()
        inner = await create_backend(args.backend, args.model, **opts)
        start_s = time.perf_counter() - t0

        async def fresh() -> None:
            # every phase starts with cold prefix/multimodal caches: no phase rides on another's
            if hasattr(inner, "reset_caches"):
                await inner.reset_caches()

        paths = ("one_pass",) if args.one_pass_only else PATHS
        runs: dict[str, dict[str, list[Any]]] = {
            p: {"conc": [], "lower": [], "scoring": [], "stages": [], "log": []} for p in paths
        }
        try:
            await run_chain(inner, config, warm, concurrency=len(warm))  # warmup, not measured
            await fresh()
            t_serial, rec_s = await run_chain(inner, config, images[:n_serial], concurrency=1)
            rec_c = []
            for _ in range(max(1, args.repeats)):
                for path in paths:
                    r = runs[path]
                    await fresh()
                    rec_backend = RecordingBackend(inner)
                    t, recs = await run_chain(rec_backend, configs[path], images,
                                              concurrency=args.concurrency or n)
                    r["conc"].append(t)
                    rec_c += recs
                    await fresh()
                    t, stage_times, t_scoring = await replay(inner, rec_backend.log)
                    r["lower"].append(t)
                    r["scoring"].append(t_scoring / t if t else 0.0)
                    r["stages"].append(stage_times)
                    r["log"] = rec_backend.log
        finally:
            await inner.aclose()
        one = runs["one_pass"]
        t_conc, t_lower = statistics.median(one["conc"]), statistics.median(one["lower"])
        conc_times, lower_times, stage_times = one["conc"], one["lower"], one["stages"][-1]
        rec_backend_log = one["log"]
        failed = sum("error" in r for r in rec_s + rec_c)
        serial_ips = n_serial / t_serial
        conc_ips = n / t_conc
        lower_ips = n / t_lower
        gen = [r for _, k, r in rec_backend_log if k == "generate"]
        scoring = {
            path: {
                "requests_per_image": round(len(runs[path]["log"]) / n, 2),
                "score_requests_per_image": round(sum(k == "score" for _, k, _ in runs[path]["log"]) / n, 2),
                "scoring_share_of_engine_time": round(statistics.median(runs[path]["scoring"]), 4),
                "lower_bound_s": round(statistics.median(runs[path]["lower"]), 3),
                "concurrent_images_per_s": round(n / statistics.median(runs[path]["conc"]), 3),
            }
            for path in paths
        }
        return {
            "model": args.model if not tiny else "tiny random-weight Qwen2-VL (CPU)",
            "backend": args.backend,
            "num_images": n,
            "serial_images": n_serial,
            "engine_start_s": round(start_s, 2),
            "failed_records": failed,
            "requests_per_image": round(len(rec_backend_log) / n, 1),
            "generate_requests": len(gen),
            "serial_s": round(t_serial, 3),
            "concurrent_s": round(t_conc, 3),
            "lower_bound_s": round(t_lower, 3),
            "repeats": max(1, args.repeats),
            "concurrent_runs_s": [round(t, 3) for t in conc_times],
            "lower_bound_runs_s": [round(t, 3) for t in lower_times],
            "serial_images_per_s": round(serial_ips, 3),
            "concurrent_images_per_s": round(conc_ips, 3),
            "lower_bound_images_per_s": round(lower_ips, 3),
            "speedup_vs_serial": round(conc_ips / serial_ips, 2),
            "fraction_of_lower_bound": round(conc_ips / lower_ips, 3),
            "lower_bound_stage_s": {k: round(v, 3) for k, v in stage_times.items()},
            "scoring_paths": scoring,
        }

    result = asyncio.run(go())
    print_result(result)
    write_json(args.output_json, result)
    return result


def print_result(r: dict[str, Any]) -> None:
    print_table("ScaleCap chain throughput", [
        ("Model", r["model"]),
        ("Backend", r["backend"]),
        ("Images (concurrent / serial)", f"{r['num_images']} / {r['serial_images']}"),
        ("Engine requests per image", r["requests_per_image"]),
        ("Failed records", r["failed_records"]),
        ("Engine start (s)", r["engine_start_s"]),
        ("Serial chain time (s)", r["serial_s"]),
        ("Repeats (concurrent and lower bound)", r["repeats"]),
        ("Concurrent chain time, median (s)", r["concurrent_s"]),
        ("Engine-only lower bound, median (s)", r["lower_bound_s"]),
        ("Serial throughput (img/s)", r["serial_images_per_s"]),
        ("Concurrent throughput (img/s)", r["concurrent_images_per_s"]),
        ("Lower-bound throughput (img/s)", r["lower_bound_images_per_s"]),
        ("Speedup vs serial (x, larger is better)", r["speedup_vs_serial"]),
        ("Fraction of lower bound (larger is better)", r["fraction_of_lower_bound"]),
    ])
    if "two_pass" not in r["scoring_paths"]:
        return
    two, one = r["scoring_paths"]["two_pass"], r["scoring_paths"]["one_pass"]
    pct = lambda x: round(100 * x, 1)  # noqa: E731
    print_table("Contrastive scoring: two passes (before) vs one (after)", [
        ("Engine requests per image, two-pass", two["requests_per_image"]),
        ("Engine requests per image, one-pass", one["requests_per_image"]),
        ("Scoring requests per image, two-pass", two["score_requests_per_image"]),
        ("Scoring requests per image, one-pass", one["score_requests_per_image"]),
        ("Scoring share of engine time, two-pass (%)", pct(two["scoring_share_of_engine_time"])),
        ("Scoring share of engine time, one-pass (%)", pct(one["scoring_share_of_engine_time"])),
        ("Lower-bound time, two-pass, median (s)", two["lower_bound_s"]),
        ("Lower-bound time, one-pass, median (s)", one["lower_bound_s"]),
        ("Concurrent throughput, two-pass (img/s)", two["concurrent_images_per_s"]),
        ("Concurrent throughput, one-pass (img/s)", one["concurrent_images_per_s"]),
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_cli_args(parser)
    main(parser.parse_args())
    sys.exit(0)
