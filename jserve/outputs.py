"""RequestOutput / CompletionOutput: what ``LLM.generate`` returns and the server streams.

Where it sits: the last hop of the data path; ``LLMEngine.step`` builds them from the
scheduler's updated requests after incremental detokenization and stop-string checks.
Names follow vLLM so user code ports unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = most likely
    decoded_token: str | None = None


# One entry per generated token: token id -> Logprob (the sampled token and the top-N).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None     # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # ``SamplingParams.prompt_logprobs``: per prompt token (None for the first) its logprob and
    # the top-N, as ``CompletionOutput.logprobs`` entries; None when not asked for.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
