"""jserve: LLM inference serving in JAX/XLA. Public API follows vLLM's names."""

from jserve.outputs import CompletionOutput, Logprob, RequestOutput
from jserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"   # the package version (pyproject.toml reads it from here)

__all__ = ["LLM", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # LLM pulls in jax and the model; import it lazily so `import jserve` stays light.
    if name == "LLM":
        from jserve.llm import LLM
        return LLM
    raise AttributeError(name)
