"""`scalecap caption INPUT.jsonl -o OUTPUT.jsonl`: the chain in process, no queue.

Rows stream in, up to --concurrency images are in flight on one engine, and each finished row is
appended to OUTPUT at once (so output order is completion order). Rerunning with the same OUTPUT
resumes: rows already there are skipped. Per-image failures become error records; the exit
status is non-zero only when nothing could run (unreadable input, an engine that cannot start).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scalecap.cli.options import add_config_args, add_engine_args, config_from_args, engine_options
from scalecap.errors import ScaleCapError

HELP = "caption a JSONL manifest in process (no queue)"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="JSONL file, one object per line with an image reference")
    parser.add_argument("-o", "--output", required=True, help="JSONL file the rows are appended to")
    parser.add_argument("--image-key", default="image", help="field holding the image (default: image)")
    parser.add_argument("--output-key", default="scalecap_record",
                        help="field the record is written under (default: scalecap_record)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="images in flight (env SCALECAP_CONCURRENCY; default 64)")
    parser.add_argument("--allow-private-urls", action="store_true", default=None,
                        help="allow http(s) images on private/loopback addresses")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(parser)
    add_config_args(parser)


def _row_key(row: dict[str, Any], image_key: str, output_key: str) -> str:
    """What identifies an input row in the output: its image, else its raw text or fields."""
    ref = row.get(image_key)
    if isinstance(ref, str) and ref:
        return "image:" + ref
    if "_raw" in row:
        return "raw:" + str(row["_raw"])
    fields = {k: v for k, v in row.items() if k not in (output_key, "_error")}
    return "row:" + json.dumps(fields, sort_keys=True)


def _done_keys(output: Path, image_key: str, output_key: str) -> Counter[str]:
    done: Counter[str] = Counter()
    if not output.exists():
        return done
    with output.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that row runs again
            if isinstance(row, dict):
                done[_row_key(row, image_key, output_key)] += 1
    return done


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    from scalecap.dataflow.storage import parse_jsonl_line

    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield parse_jsonl_line(line.rstrip("\n"), n)


def _truncate_partial_line(path: Path) -> None:
    """Drop a half-written last line left by a killed run, so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)


def main(args: argparse.Namespace) -> int:
    from scalecap.settings import Settings

    settings = Settings.from_env()
    inp, out = Path(args.input), Path(args.output)
    try:
        config = config_from_args(args)
    except ScaleCapError as exc:
        print(f"scalecap caption: {exc}", file=sys.stderr)
        return 2
    if not inp.is_file():
        print(f"scalecap caption: cannot read input {inp}", file=sys.stderr)
        return 2
    total = sum(1 for line in inp.open(encoding="utf-8", errors="replace") if line.strip())
    done = _done_keys(out, args.image_key, args.output_key)
    skipped = 0

    def pending() -> Iterator[dict[str, Any]]:
        nonlocal skipped
        for row in _rows(inp):
            key = _row_key(row, args.image_key, args.output_key)
            if done[key] > 0:
                done[key] -= 1
                skipped += 1
                continue
            yield row

    backend, model, opts = engine_options(args, settings)
    concurrency = args.concurrency or settings.concurrency
    from scalecap.images import ImageLimits
    from scalecap.runtime import default_loop

    limits = ImageLimits.from_settings(
        settings,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        allow_private_urls=bool(args.allow_private_urls or settings.allow_private_urls),
        allowed_roots=None,  # local manifests name local files: any path, as before
    )
    if config.llm_base_url and not config.llm_api_key and settings.llm_api_key:
        config = config.replace(llm_api_key=settings.llm_api_key)
    loop = default_loop()
    try:
        from scalecap.backends.setup import build_chain

        chain = loop.run(build_chain(backend, model, config, concurrency=concurrency,
                                     image_limits=limits, **opts))
    except Exception as exc:  # the engine cannot start: nothing can run
        print(f"scalecap caption: cannot start backend {backend!r} with model {model!r}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    _truncate_partial_line(out)
    counts = Counter()
    bar = tqdm(total=total, initial=0, unit="img", desc="caption", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        with out.open("a", encoding="utf-8") as f:
            loop.run(_caption_into(chain, pending(), args, f, bar, counts))
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        bar.close()
        try:
            loop.run(chain.vlm.aclose(), timeout=60)
        except Exception:
            pass
    print(
        json.dumps({"input_rows": total, "skipped_already_done": skipped, "captioned": counts["ok"],
                    "failed": counts["failed"], "output": str(out)}),
        file=sys.stderr,
    )
    return 0


async def _caption_into(chain, rows, args, f, bar, counts) -> None:
    """Run the chain over `rows`; append each finished row to `f` as it ends."""
    from scalecap.chain import ChainItem
    from scalecap.record import base_meta, error_record

    meta = base_meta(job=None, model=chain.vlm.model_name,
                     llm_model=getattr(chain.llm, "model_name", None), config_hash=chain.config_hash)
    row_of: dict[int, dict[str, Any]] = {}  # chain item number -> its input row
    numbers = itertools.count()

    def emit(row: dict[str, Any], record: dict[str, Any]) -> None:
        row[args.output_key] = record
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        counts["failed" if "error" in record else "ok"] += 1
        bar.update(1)
        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)

    def items() -> Iterator[ChainItem]:
        for row in rows:
            ref = row.get(args.image_key)
            if row.get("_error"):
                err = {"stage": "input", "type": "InvalidRow", "message": row.pop("_error")}
            elif not isinstance(ref, str) or not ref:
                err = {"stage": "input", "type": "MissingImageKey",
                       "message": f"row has no {args.image_key!r} string"}
            else:
                row_of[next(numbers)] = row
                yield ChainItem(source=ref, ref=ref, job_id=chain.job_id_for(ref))
                continue
            emit(row, error_record(err, dict(meta)))

    async for k, record in chain.stream(items()):
        emit(row_of.pop(k), record)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalecap caption", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
