"""SamplingParams: the per-request sampling and stopping contract (vLLM's names).

Where it sits: built by the user (``LLM.generate``) or by the server from a JSON/gRPC body,
validated here once, then read by the scheduler (stop checks, ``max_tokens``) and packed by
the runner into the sampler's per-row arrays.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from jserve.structured.grammar import StructuredOutputsParams

__all__ = ["MAX_LOGPROBS", "MAX_N", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]

MAX_LOGPROBS = 20
MAX_N = 128
MAX_LOGIT_BIAS = 300        # logit_bias entries per request (the per-slot sparse bias width)
MAX_BAD_WORDS = 256
_GREEDY_EPS = 1e-5


def _token_id(name: str, t: object) -> int:
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise ValueError(f"SamplingParams.{name}: token ids must be integers >= 0, got {t!r}")
    return t


_FIELD = re.compile(r"SamplingParams\.(\w+)")


def rename_fields(message: str, names: Mapping[str, str]) -> tuple[str | None, str]:
    """A SamplingParams error message with its fields spelled as the caller names them (an API
    field, a CLI flag; any other field loses its ``SamplingParams.`` prefix) -> (the first field
    so spelled, or None; the message)."""
    m = _FIELD.search(message)
    first = names.get(m.group(1), m.group(1)) if m else None
    return first, _FIELD.sub(lambda x: names.get(x.group(1), x.group(1)), message)


def _as_tuple(name: str, v: object) -> tuple:
    """A list-valued field as a tuple: None -> (), one string -> (it,), an iterable -> tuple."""
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    try:
        return tuple(v)   # type: ignore[arg-type]
    except TypeError:
        kind = "a string or a list of strings" if name in ("stop", "bad_words") else "a list of token ids"
        raise TypeError(f"SamplingParams.{name} must be {kind}, got {type(v).__name__}") from None


FLOAT32_MAX = 3.4028234663852886e38


class RequestOutputKind(enum.Enum):
    """Which ``RequestOutput``s a request reports (vLLM's names and values). CUMULATIVE: one at
    every step that changed it, all tokens and text so far; FINAL_ONLY: only the finished one
    (``LLM.generate``'s: the engine then turns tokens into text once, at the end, unless stop
    strings need it at every step). vLLM's DELTA is not supported."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"SamplingParams.{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:   # the device samples in float32
        raise ValueError(f"SamplingParams.{name} must be finite as a float32 (|x| <= 3.4e38), "
                         f"got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample and when to stop. Immutable; validated on construction.

    temperature 0 means greedy. ``seed`` makes sampling reproducible per request
    (independent of what else is in the batch). ``logprobs`` = N returns the sampled token's
    logprob plus the top-N alternatives at each step; ``prompt_logprobs`` = N the same for every
    prompt token after the first (``RequestOutput.prompt_logprobs``). ``truncate_prompt_tokens``
    = k keeps only the prompt's last k tokens (-1: as many as the context leaves room for).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None          # per prompt token: its logprob + the top-N
    truncate_prompt_tokens: int | None = None   # keep the prompt's last k tokens (-1: max_model_len - 1)
    # Token masks and biases, applied inside the on-device sampler (jserve/structured/):
    # a grammar (StructuredOutputsParams or its dict form), {token id: bias in [-100, 100]},
    # the only ids that may be sampled, words that must not appear.
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: tuple[tuple[int, float], ...] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        # Accept lists / a single string the way vLLM does, store tuples (frozen + hashable).
        object.__setattr__(self, "stop", _as_tuple("stop", self.stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._normalize_masks()
        self._validate()

    def _normalize_masks(self) -> None:
        so = self.structured_outputs
        if isinstance(so, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams.from_dict(so))
        elif so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError("SamplingParams.structured_outputs must be a StructuredOutputsParams "
                             f"or a dict, got {type(so).__name__}")
        lb = self.logit_bias
        if lb is not None:
            items = lb.items() if isinstance(lb, dict) else lb
            try:   # JSON keys are strings: "5" is token 5
                raw = [(int(t) if isinstance(t, str) and t.strip().lstrip("-").isdigit() else t, float(v))
                       for t, v in items]
            except (TypeError, ValueError) as e:
                raise ValueError(f"SamplingParams.logit_bias: {e}") from None
            pairs = tuple(sorted((_token_id("logit_bias", t), v) for t, v in raw))
            if len(pairs) > MAX_LOGIT_BIAS:
                raise ValueError(f"SamplingParams.logit_bias: at most {MAX_LOGIT_BIAS} entries, "
                                 f"got {len(pairs)}")
            for t, v in pairs:
                if not (math.isfinite(v) and -100.0 <= v <= 100.0):
                    raise ValueError(f"SamplingParams.logit_bias[{t}] must be in [-100, 100], got {v}")
            object.__setattr__(self, "logit_bias", pairs or None)
        if self.allowed_token_ids is not None:
            ids = tuple(_token_id("allowed_token_ids", t)
                        for t in _as_tuple("allowed_token_ids", self.allowed_token_ids))
            if not ids:
                raise ValueError("SamplingParams.allowed_token_ids must not be empty")
            object.__setattr__(self, "allowed_token_ids", ids)
        bw = _as_tuple("bad_words", self.bad_words)
        if len(bw) > MAX_BAD_WORDS or not all(isinstance(w, str) and w for w in bw):
            raise ValueError(f"SamplingParams.bad_words must be at most {MAX_BAD_WORDS} non-empty "
                             "strings")
        object.__setattr__(self, "bad_words", bw)

    def _validate(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"SamplingParams.n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            _check_finite(name, getattr(self, name))
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (or -1), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"SamplingParams.seed must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (
                not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                or self.max_tokens < 1):
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop entries must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids entries must be token ids >= 0, got {t!r}")
        if self.logprobs is not None and (
                not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(
                f"SamplingParams.logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

        for name in ("prompt_logprobs",):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"SamplingParams.{name} must be an integer in [0, {MAX_LOGPROBS}], "
                                 f"got {v!r}")
        if self.output_kind not in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            raise ValueError("SamplingParams.output_kind must be RequestOutputKind.CUMULATIVE or "
                             f"FINAL_ONLY, got {self.output_kind!r} (DELTA is not supported)")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or (k < 1 and k != -1)):
            raise ValueError(f"SamplingParams.truncate_prompt_tokens must be an integer >= 1 or -1, "
                             f"got {k!r}")

    @property
    def uses_host_masks(self) -> bool:
        """A per-step mask the host computes from the tokens so far (a grammar, bad words)."""
        return self.structured_outputs is not None or bool(self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def burstable(self) -> bool:
        """Nothing the host adds per token: no logprobs, grammar masks or top-k / top-p / min-p
        (a burst of decode steps can run it: ``num_scheduler_steps``)."""
        return self.logprobs is None and not self.uses_host_masks and not self.uses_filters

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def replace(self, **changes: object) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Build from a plain mapping; unknown keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(unknown)}")
        return cls(**d)
