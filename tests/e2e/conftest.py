"""e2e fixtures: one tiny engine for the package (golden llama, float32, max_model_len 128)
shared by the modules that need the standard limits, a server over it, and the offline LLM
built the same way as the token-parity reference.
"""

from __future__ import annotations

import pytest
from e2e_server import ENGINE_ARGS, ServerThread

from jserve.async_engine import AsyncEngine
from server.metrics import PrometheusStats


@pytest.fixture(scope="package")
def e2e_engine(make_engine):
    return make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})


@pytest.fixture(scope="package")
def served(e2e_engine):
    """The shared server: metrics on, no API key."""
    stats = PrometheusStats.for_engine("llama", e2e_engine)
    srv = ServerThread(AsyncEngine(e2e_engine, stats), stats)
    yield srv
    srv.close()


@pytest.fixture(scope="package")
def llm_ref(xla_cache_dir):
    """The offline API over an identical engine: the reference for token parity."""
    from jserve.llm import LLM

    return LLM(compilation_cache_dir=xla_cache_dir, **ENGINE_ARGS)


@pytest.fixture
def oai(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)
