"""Command-line flags shared by `scalecap caption`, `scalecap worker` and the benchmarks.

Config flags are generated from ImageScaleCaptionGenerateConfig so the CLI can never drift from
the dataclass; a flag left unset keeps the value from --config FILE or the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from scalecap.config import PRESETS, ImageScaleCaptionGenerateConfig, load_config_file
from scalecap.templates import load_prompts

_SKIP = {"extra", "llm_api_key", "preset", "prompts"}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chain config (override --config FILE)")
    g.add_argument("--config", metavar="FILE", help="TOML or JSON file of config fields")
    add_method_args(g)
    hints = typing.get_type_hints(ImageScaleCaptionGenerateConfig)
    for f in dataclasses.fields(ImageScaleCaptionGenerateConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        default = f.default
        if typ is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default: {default})")
            continue
        args = typing.get_args(typ)
        if typing.get_origin(typ) is typing.Literal:
            g.add_argument(flag, choices=list(args), default=None, help=f"(default: {default})")
            continue
        base = next((a for a in args if a is not type(None)), typ) if args else typ
        if typing.get_origin(base) is typing.Literal:
            g.add_argument(flag, choices=list(typing.get_args(base)), default=None,
                           help=f"(default: {default})")
            continue
        conv = base if base in (int, float, str) else str
        if base is int and type(None) in args:
            conv = _int_or_none  # --max-questions none: no cap
        g.add_argument(flag, type=conv, default=None, help=f"(default: {default})")


def add_method_args(parser: Any) -> None:
    """--preset and --prompts (on caption, submit and worker)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="set every field not given to the preset's value; authors: the ScaleCap "
                        "authors' code as it runs (docs/chain.md), rating raw logits: `caption` starts "
                        "its engine with them, `submit` needs workers started with --raw-logits")
    parser.add_argument("--prompts", metavar="FILE", default=None,
                        help="TOML file replacing any of the chain's prompt templates (docs/chain.md)")


def method_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields --preset and --prompts set (the prompts file is read here)."""
    out: dict[str, Any] = {}
    if getattr(args, "preset", None):
        out["preset"] = args.preset
    if getattr(args, "prompts", None):
        out["prompts"] = load_prompts(args.prompts)
    return out


_NONE = object()
"""What `--max-questions none` parses to (argparse's None means "flag not given")."""


def _int_or_none(raw: str) -> Any:
    if raw.strip().lower() == "none":
        return _NONE
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got {raw!r}") from None


def config_from_args(args: argparse.Namespace) -> ImageScaleCaptionGenerateConfig:
    data: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for name in ImageScaleCaptionGenerateConfig.field_names():
        value = getattr(args, name, None)
        if value is not None and name not in _SKIP:
            data[name] = None if value is _NONE else value
    data.update(method_fields(args))
    return ImageScaleCaptionGenerateConfig.from_dict(data)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--backend", default=None, help="vllm | openai | transformers | module:Class "
                   "(env SCALECAP_BACKEND; default vllm)")
    g.add_argument("--model", default=None, help="model path or hub name (env SCALECAP_MODEL; "
                   "default Qwen/Qwen2.5-VL-3B-Instruct)")
    g.add_argument("--openai-base-url", default=None, help="server address for --backend openai")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--tensor-parallel-size", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="vLLM: no CUDA graphs / compilation (faster start)")
    g.add_argument("--raw-logits", action="store_true", default=None,
                   help="token scores are raw logits (vLLM logprobs_mode=raw_logits; transformers "
                   "raw_logits): needed by --score-mode logit_diff, refused by the other modes")


def engine_options(args: argparse.Namespace, settings: Any) -> tuple[str, str, dict[str, Any]]:
    """(backend, model, options) from flags, then SCALECAP_* settings."""
    backend = args.backend or settings.backend
    model = args.model or settings.model
    opts: dict[str, Any] = {}
    raw = wants_raw_logits(args)
    if raw and not getattr(args, "raw_logits", None) and backend not in ("vllm", "transformers"):
        raise SystemExit(
            f"--preset {args.preset} scores raw logits, which the {backend!r} backend cannot return: "
            "use --backend vllm or transformers, or add --score-mode log_ratio"
        )
    if backend == "vllm":
        opts["gpu_memory_utilization"] = args.gpu_memory_utilization or settings.gpu_memory_utilization
        opts["max_num_seqs"] = args.max_num_seqs or settings.max_num_seqs
        opts["dtype"] = args.dtype or settings.dtype
        if args.max_model_len or settings.max_model_len:
            opts["max_model_len"] = args.max_model_len or settings.max_model_len
        if args.tensor_parallel_size:
            opts["tensor_parallel_size"] = args.tensor_parallel_size
        if args.enforce_eager:
            opts["enforce_eager"] = True
        opts["limit_mm_per_prompt"] = {"image": 1, "video": 0}
        if raw:
            opts["logprobs_mode"] = "raw_logits"
    elif backend == "openai":
        base = args.openai_base_url or settings.openai_base_url
        if base:
            opts["base_url"] = base
        if settings.openai_api_key:
            opts["api_key"] = settings.openai_api_key
        opts["probe_scoring"] = True  # a non-vLLM server in contrastive mode fails at start
    elif backend == "transformers":
        if args.dtype:
            opts["dtype"] = args.dtype
        if raw:
            opts["raw_logits"] = True
    if getattr(args, "raw_logits", None) and backend not in ("vllm", "transformers"):
        raise SystemExit(f"--raw-logits needs the vllm or transformers backend, not {backend!r}")
    return backend, model, opts


def wants_raw_logits(args: argparse.Namespace) -> bool:
    """--raw-logits, or a preset that rates raw logits (unless --score-mode says otherwise)."""
    if getattr(args, "raw_logits", None):
        return True
    preset = getattr(args, "preset", None)
    mode = getattr(args, "score_mode", None) or (PRESETS[preset].get("score_mode") if preset else None)
    return mode == "logit_diff" and getattr(args, "sentence_filter", None) != "yesno"
