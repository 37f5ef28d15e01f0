"""The chain's configuration: one dataclass shared by kwargs, config files and CLI flags."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from scalecap.errors import ConfigError
from scalecap.rating import (
    DEFAULT_THRESHOLD,
    FILTER_UNITS,
    SCORE_MODES,
    TOKEN_FILTERS,
    FilterUnit,
    ScoreMode,
    TokenFilter,
)
from scalecap.templates import load_prompts, validate_prompts

SentenceFilter = Literal["contrastive", "yesno"]
AnswerFallback = Literal["keep_all", "drop"]
GoldenFallback = Literal["caption", "best", "error"]
Preset = Literal["authors"]

PRESETS: dict[str, dict[str, Any]] = {
    "authors": {
        "score_mode": "logit_diff",
        "tau_sentence": 0.0,
        "token_filter": "all",
        "filter_unit": "clause",
        "sentence_filter": "contrastive",
        "golden_fallback": "caption",
        "answer_fallback": "keep_all",
        "max_questions": None,
        "max_pixels": 40_000_000,
        "repetition_penalty": 1.05,
    },
}
"""What each preset sets. "authors": the ScaleCap authors' released code as it runs
(docs/chain.md, "Differences from the authors' code"); 40 Mpx is the decode cap, so images are
not downscaled below what the worker may decode at all."""

# Fields that change what the chain writes; their values make the config hash (and so job ids).
# Addresses and keys of a separate language model are left out on purpose: the same model behind a
# new address produces the same captions.
_NOT_HASHED = {"llm_base_url", "llm_api_key", "input_jsonl_path", "output_jsonl_path"}
LEGACY_FIELDS = ("input_jsonl_path", "output_jsonl_path")
"""Fields of DataFlow-MM's original operator config, accepted with a warning (docs/dataflow.md)."""


@dataclass
class ImageScaleCaptionGenerateConfig:
    """Every knob of the ScaleCap chain (DESIGN.md "The chain").

    Token limits count model tokens. Thresholds are in the unit of `score_mode` (docs/chain.md):
    nats for log_ratio, logits for logit_diff, probability for prob_diff.
    """

    preset: Preset | None = None
    """Fills every field not given explicitly with the preset's value (PRESETS); None: the
    defaults below. Fields given explicitly win, so each piece stays its own option."""
    tau_sentence: float | None = None
    """A unit is kept when its largest content-token difference exceeds this; None: the mode's
    default (0 for log_ratio and logit_diff, 0.15 for prob_diff)."""
    score_mode: ScoreMode = "log_ratio"
    """log_ratio (log p(img) - log p(no img)), logit_diff (raw logits; the engine must return
    logits) or prob_diff (p(img) - p(no img))."""
    token_filter: TokenFilter = "content"
    """content: only content words decide a unit's score (function words and punctuation are
    habit); all: every token but clause and sentence punctuation, as the authors' code runs."""
    filter_unit: FilterUnit = "clause"
    """clause: comma clauses are rated and pruned inside a sentence (the authors' rule);
    sentence: whole sentences are kept or dropped."""
    golden_fallback: GoldenFallback = "caption"
    """When no sentence passes: keep the whole caption as the one golden sentence (the authors'
    rule), keep the best-scoring sentence, or fail the image."""
    max_questions: int | None = 20
    """Cap on object questions (each also gets a position twin); None: no cap."""
    max_init_tokens: int = 1024
    max_answer_tokens: int = 512
    second_filter: bool = False
    """Rate each answer's sentences, conditioned on its question, and keep the passing ones."""
    tau_answer: float | None = None
    """Threshold of the second filter; None means the sentence threshold."""
    answer_fallback: AnswerFallback = "keep_all"
    """When none of an answer's sentences passes: keep the whole answer (the authors' rule) or
    drop it."""
    sentence_filter: SentenceFilter = "contrastive"
    one_pass_scoring: bool = True
    """Take the with-image scores from the generation itself (greedy decoding, a backend with
    generation logprobs) and teacher-force only without the image; otherwise score twice."""
    max_question_tokens: int = 512
    """Limit of each call that turns a golden sentence into object instructions."""
    max_object_summary_tokens: int = 4096
    max_position_summary_tokens: int = 4096
    max_final_tokens: int = 4096
    """Fusion budgets; each is lowered to what the model's context leaves after the prompt."""
    temperature: float = 0.0
    """0 means greedy decoding (the default)."""
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    """Of the text-only calls (instructions, fusion); 1.0 is none. The authors' code uses 1.05."""
    seed: int | None = None
    min_pixels: int = 3136
    """Images smaller than this (width*height) are upscaled."""
    max_pixels: int = 1003520
    """Images larger than this are downscaled before they reach the model (1280 * 28 * 28)."""
    system_prompt: str | None = None
    """Replaces the default system prompt of every call with the image (and of scoring)."""
    text_system_prompt: str | None = None
    """Replaces the default system prompt of the text-only calls (questions, fusion)."""
    prompts: dict[str, str] | None = None
    """Templates replacing ours, by name (scalecap/templates.py, docs/chain.md); validated and
    hashed. A config file or --prompts may name a TOML file instead, read where it is loaded."""
    llm_base_url: str | None = None
    """OpenAI-compatible address of a separate language model for questions and fusion."""
    llm_model: str | None = None
    llm_api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form, hashed: lets a caller version its own variants."""
    input_jsonl_path: str | None = None
    """Legacy (DataFlow-MM's operator): JSONL read when the storage has no image column."""
    output_jsonl_path: str | None = None
    """Legacy (DataFlow-MM's operator): the records are also written to this JSONL file."""

    def __post_init__(self) -> None:
        self.validate()
        for name in LEGACY_FIELDS:
            if getattr(self, name) is not None:
                import warnings

                warnings.warn(
                    f"{name} is a legacy field of DataFlow-MM's ScaleCap operator; the DataFlow operator "
                    "still honours it, but prefer a FileStorage (docs/dataflow.md)",
                    FutureWarning,
                    stacklevel=3,
                )

    def validate(self) -> None:
        check_field_types(self)
        if self.sentence_filter not in ("contrastive", "yesno"):
            raise ConfigError(
                f"sentence_filter must be 'contrastive' or 'yesno', not {self.sentence_filter!r}"
            )
        for name, allowed in (
            ("score_mode", SCORE_MODES),
            ("filter_unit", FILTER_UNITS),
            ("token_filter", TOKEN_FILTERS),
            ("answer_fallback", ("keep_all", "drop")),
            ("golden_fallback", ("caption", "best", "error")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("tau_sentence", "tau_answer"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value}")
            if self.score_mode == "prob_diff" and not -1.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [-1, 1] with score_mode prob_diff, got {value}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.max_questions is not None:
            _non_negative_int("max_questions", self.max_questions)
        for name in (
            "max_init_tokens",
            "max_answer_tokens",
            "max_question_tokens",
            "max_object_summary_tokens",
            "max_position_summary_tokens",
            "max_final_tokens",
            "min_pixels",
            "max_pixels",
        ):
            _non_negative_int(name, getattr(self, name))
        if self.max_pixels < self.min_pixels:
            raise ConfigError("max_pixels must be >= min_pixels")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must lie in (0, 1]")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0 < rp <= 10:
            raise ConfigError(f"repetition_penalty must be a number in (0, 10], got {rp!r}")
        if self.prompts is not None:
            if isinstance(self.prompts, str):
                raise ConfigError(
                    "prompts must be a table of templates here; a file path is read only from a config "
                    "file or --prompts (scalecap.templates.load_prompts from Python)"
                )
            self.prompts = validate_prompts(self.prompts)

    @property
    def rule_name(self) -> str:
        """What an engine must compute for this config: its score_mode, or yesno (a worker
        advertises the names it serves, scalecap.chain.rules_served)."""
        return "yesno" if self.sentence_filter == "yesno" else self.score_mode

    @property
    def rule(self) -> dict[str, Any]:
        """How units are rated and kept, for the record's meta."""
        if self.sentence_filter == "yesno":
            return {"sentence_filter": "yesno", "threshold": self.thresholds()[0]}
        return {
            "sentence_filter": "contrastive",
            "score_mode": self.score_mode,
            "token_filter": self.token_filter,
            "filter_unit": self.filter_unit,
            "threshold": self.thresholds()[0],
        }

    @property
    def sentence_threshold(self) -> float:
        """tau_sentence, or the score mode's default when it is unset."""
        return DEFAULT_THRESHOLD[self.score_mode] if self.tau_sentence is None else float(self.tau_sentence)

    @property
    def answer_threshold(self) -> float:
        return self.sentence_threshold if self.tau_answer is None else float(self.tau_answer)

    def thresholds(self) -> tuple[float, float]:
        """(sentence, answer) thresholds as the chain applies them: the one rule, used by the
        golden and second-filter stages and written to the record. Yes/no compares
        P(yes) - P(no) with 0; contrastive uses tau_sentence (or its score mode's default) and
        tau_answer (or the sentence threshold)."""
        if self.sentence_filter == "yesno":
            return 0.0, 0.0
        return self.sentence_threshold, self.answer_threshold

    # --- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_public_dict(self) -> dict[str, Any]:
        """to_dict without secrets, for records, logs and queue messages."""
        d = self.to_dict()
        if d.get("llm_api_key"):
            d["llm_api_key"] = None
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageScaleCaptionGenerateConfig:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - guarded by the check above
            raise ConfigError(str(exc)) from exc

    @classmethod
    def from_file(cls, path: str | Path) -> ImageScaleCaptionGenerateConfig:
        """Load a TOML or JSON file (by suffix; JSON is tried for any other suffix)."""
        return cls.from_dict(load_config_file(path))

    def replace(self, **changes: Any) -> ImageScaleCaptionGenerateConfig:
        return dataclasses.replace(self, **changes)

    def config_hash(self) -> str:
        """A short stable hash of everything that changes the chain's output."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _non_negative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


_dataclass_init = ImageScaleCaptionGenerateConfig.__init__


@functools.wraps(_dataclass_init)  # help() and inspect.signature still show every field
def _init_with_preset(self: ImageScaleCaptionGenerateConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass __init__, with the preset's values for every field not passed explicitly.

    A serialised config passes every field, so a round trip never re-applies its preset."""
    names = ImageScaleCaptionGenerateConfig.field_names()
    kwargs.update(zip(names, args, strict=False))
    preset = kwargs.get("preset")
    if isinstance(preset, str) and preset in PRESETS:
        kwargs = {**PRESETS[preset], **kwargs}
    _dataclass_init(self, **kwargs)


ImageScaleCaptionGenerateConfig.__init__ = _init_with_preset  # type: ignore[method-assign]


class ConfigFieldError(ConfigError):
    """One named config field is invalid or over an operator limit (the API answers 422)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


_INT_FIELDS = ("max_questions", "max_init_tokens", "max_answer_tokens", "max_question_tokens",
               "max_object_summary_tokens", "max_position_summary_tokens", "max_final_tokens",
               "min_pixels", "max_pixels")
TOKEN_FIELDS = _INT_FIELDS[1:7]
"""Fields that are token budgets of one model call."""
_FLOAT_FIELDS = ("tau_sentence", "tau_answer", "temperature", "top_p", "repetition_penalty")
_TEXT_FIELDS = ("system_prompt", "text_system_prompt", "llm_base_url", "llm_model", "llm_api_key")
MAX_PROMPT_CHARS = 32 * 1024
"""Longest system prompt (or other text field): it is sent with every call of every image."""


def check_field_types(cfg: ImageScaleCaptionGenerateConfig) -> None:
    """Types every field must have whoever builds the config: integers, finite numbers, an integer
    seed, bounded text. Raises ConfigFieldError naming the first bad field."""
    for name in _INT_FIELDS:
        v = getattr(cfg, name)
        if v is None and name == "max_questions":  # no cap (the authors' preset)
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigFieldError(name, f"must be a non-negative integer, got {_shown(v)}")
    for name in _FLOAT_FIELDS:
        v = getattr(cfg, name)
        if v is None and name.startswith("tau_"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigFieldError(name, f"must be a finite number, got {_shown(v)}")
    if cfg.seed is not None and (not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool)
                                 or not 0 <= cfg.seed < 2**63):
        raise ConfigFieldError("seed", f"must be an integer in [0, 2**63), got {_shown(cfg.seed)}")
    for name in _TEXT_FIELDS:
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, str) or len(v) > MAX_PROMPT_CHARS):
            raise ConfigFieldError(name, f"must be a string of at most {MAX_PROMPT_CHARS} characters")
    if not isinstance(cfg.extra, dict):
        raise ConfigFieldError("extra", "must be an object")
    if isinstance(cfg.prompts, dict) and any(isinstance(v, str) and len(v) > MAX_PROMPT_CHARS
                                             for v in cfg.prompts.values()):
        raise ConfigFieldError("prompts", f"each prompt must be at most {MAX_PROMPT_CHARS} characters")
    if cfg.max_pixels < cfg.min_pixels:
        raise ConfigFieldError("max_pixels", f"must be >= min_pixels ({cfg.min_pixels})")


@dataclass(frozen=True)
class CostLimits:
    """The operator's bounds on what one image may cost (Settings: max_decode_pixels,
    max_questions_limit, max_model_len)."""

    max_pixels: int = 40_000_000
    max_questions: int = 64
    max_tokens: int = 131_072

    @classmethod
    def from_settings(cls, settings: Any) -> CostLimits:
        return cls(max_pixels=int(settings.max_decode_pixels),
                   max_questions=int(settings.max_questions_limit),
                   max_tokens=int(settings.max_model_len or cls.max_tokens))


def check_cost_limits(cfg: ImageScaleCaptionGenerateConfig, limits: CostLimits) -> None:
    """Refuse a config whose cost is over the operator's limits (ConfigFieldError names the field).

    Pixels: min_pixels <= max_pixels <= the decode cap, so no image is ever scaled (up or down)
    beyond what a worker may decode. Questions: at most the operator's limit. Token budgets:
    each within the model's context. A field left at its default passes (the worker clamps
    pixels to the decode cap anyway), so lowering a cap never breaks the default config."""
    defaults = ImageScaleCaptionGenerateConfig.__dataclass_fields__

    def over(name: str, limit: int) -> bool:
        v = getattr(cfg, name)
        if v is None:  # no cap at all (max_questions of the authors' preset)
            return True
        return v > limit and v != defaults[name].default

    for name in ("min_pixels", "max_pixels"):
        if over(name, limits.max_pixels):
            raise ConfigFieldError(name, f"{getattr(cfg, name)} is over the decode cap of "
                                   f"{limits.max_pixels} pixels (SCALECAP_MAX_DECODE_PIXELS)")
    if over("max_questions", limits.max_questions):
        asked = "no limit" if cfg.max_questions is None else cfg.max_questions
        raise ConfigFieldError("max_questions", f"{asked} is over the limit of "
                               f"{limits.max_questions} (SCALECAP_MAX_QUESTIONS_LIMIT)")
    for name in TOKEN_FIELDS:
        if over(name, limits.max_tokens):
            raise ConfigFieldError(name, f"{getattr(cfg, name)} tokens is over the model's context of "
                                   f"{limits.max_tokens}")


def _shown(v: Any) -> str:
    return repr(v)[:60]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict; a `[scalecap]` table in TOML is used when present.

    A `prompts` path in it is read now, relative to the file, and replaced by its templates."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
        data = data.get("scalecap", data)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the config must be a table/object")
    if isinstance(data.get("prompts"), str):
        data = {**data, "prompts": load_prompts(p.parent / data["prompts"])}
    return data
