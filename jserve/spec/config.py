"""SpeculativeConfig: the ``speculative_config`` engine option (vLLM's names), validated.

Where it sits: before start-up. ``LLM(speculative_config={...})`` and
``jserve serve|generate --speculative-config '<json>'`` give a mapping or a JSON object; the
option (jserve/options.py) stores its canonical JSON text (``canonical_json``), and
``make_engine_config`` turns it into this frozen dataclass on ``EngineConfig.speculative``::

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
     "prompt_lookup_max": 5}
    {"method": "draft_model", "model": "code-draft", "num_speculative_tokens": 4}
    optional for both: "disable_by_batch_size": N   (no drafts in a step once more than N
                                                      requests run: speculation must not cost
                                                      throughput at high load; default
                                                      ``DISABLE_BY_BATCH_SIZE``, null: never;
                                                      with a draft model, as in vLLM, a request
                                                      admitted while more than N are queued or
                                                      running never drafts: the draft skips its
                                                      tokens, and its pages are prefix-cached
                                                      apart from those with the draft's K/V)

Errors name the field: ``speculative_config.num_speculative_tokens must be an integer >= 1``.
Imports nothing heavy (the option table reads it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
# Measured (benchmarks/RESULTS.md, session 15: bundled code-small + code-draft, H200, median of
# 3 runs): with drafts at 1 and 4 running requests both proposers gain (n-gram 1.75x / 1.34x,
# draft model 1.38x / 1.22x); at 16 always-on n-gram fell to 0.69x (session 14) and the
# benchmark's rule (the largest concurrency still >= 1x) gave 4. vLLM's default is never.
DISABLE_BY_BATCH_SIZE = 4
MAX_SPECULATIVE_TOKENS = 16
_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
           "disable_by_batch_size")


def _int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"speculative_config.{name} must be an integer {bound}, got {v!r}")
    return v


@dataclass(frozen=True)
class SpeculativeConfig:
    """One proposer and its draft width (k). ``model``: the draft model (HF directory or a
    bundled name) of ``draft_model``; ``prompt_lookup_min/max``: n-gram sizes of ``ngram``."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = DISABLE_BY_BATCH_SIZE   # None: speculate at any load

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        _int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        if self.disable_by_batch_size is not None:
            _int("disable_by_batch_size", self.disable_by_batch_size, 1)
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config.model is only used by method 'draft_model'")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            for name, given in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if given is not None:   # checked as given, before either defaults from the other
                    _int(name, given, 1)
            # vLLM: one given -> the other defaults to it; none -> 2..5 here
            lo = lo if lo is not None else (min(hi, 2) if hi is not None else 2)
            hi = hi if hi is not None else max(lo, 5)
            if lo > hi:
                raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) must be <= "
                                 f"prompt_lookup_max ({hi})")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model: method 'draft_model' needs the draft "
                                 f"model (an HF directory or 'code-draft'), got {self.model!r}")
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config.{name} is only used by method 'ngram'")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> SpeculativeConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"speculative_config must be a JSON object / dict, got {d!r}")
        for key in d:
            if key not in _FIELDS:
                raise ValueError(f"speculative_config.{key}: unknown field (known: {', '.join(_FIELDS)})")
        if "method" not in d:
            raise ValueError(f"speculative_config.method is required (one of {METHODS})")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config: not valid JSON ({e.msg} at character {e.pos})") from None
        return cls.from_mapping(d)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items()
                           if v is not None or k == "disable_by_batch_size"}, sort_keys=True)


def canonical_json(value: Any) -> str:
    """The option's normalizer: a mapping or JSON text -> canonical JSON text (ValueError naming
    the field otherwise)."""
    cfg = (SpeculativeConfig.from_json(value) if isinstance(value, str)
           else SpeculativeConfig.from_mapping(value))
    return cfg.to_json()


def spec_state_bytes(spec: SpeculativeConfig | None, max_num_seqs: int, vocab_size: int,
                     max_model_len: int) -> int:
    """Device bytes speculative decoding keeps beside the pools (per device): the draft
    model's q of each slot's drafts, f32[max_num_seqs + 1, K, V] (``SpecSteps.draft_probs``),
    or n-gram's token history, int32[max_num_seqs + 1, max_model_len] (``token_history``),
    and the token-mask rows of the K verify positions past the first (``LogitState``, int32
    [max_num_seqs * K, ceil(V / 32) + 2 * MAX_LOGIT_BIAS])."""
    if spec is None:
        return 0
    from jserve.sampling_params import MAX_LOGIT_BIAS

    k = spec.num_speculative_tokens
    masks = max_num_seqs * k * (-(-vocab_size // 32) + 2 * MAX_LOGIT_BIAS) * 4
    if spec.method == "draft_model":
        return masks + (max_num_seqs + 1) * k * vocab_size * 4
    return masks + (max_num_seqs + 1) * max_model_len * 4

