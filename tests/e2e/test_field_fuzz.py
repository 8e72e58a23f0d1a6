"""Every request field with values of every wrong type: a 4xx naming the problem or a normal
answer, never a 5xx, an engine error or a lost request (DESIGN: no client input causes a 500).

For each endpoint, each field it honours (server/request_fields.py), accepts without effect or
refuses by name is sent alone on top of a minimal valid body with each of a few hostile values
(null, a bool, negative and huge numbers, a string, nested lists and objects). Valid-looking
ones generate one token. The table-driven cases of test_bad_input.py check the exact statuses
and messages of known mistakes; this sweeps the rest. One server over the tiny golden llama.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from e2e_server import ENGINE_ARGS, ServerThread

from jserve.async_engine import AsyncEngine
from server.request_fields import (
    CHAT,
    COMPLETIONS,
    DETOKENIZE,
    HONOURED,
    NO_SEMANTICS,
    NOT_SUPPORTED,
    TOKENIZE,
)

HOSTILE = (None, True, -2**63, 1e308, "x", [None, {"a": [1, {"b": None}]}])
BASE = {
    COMPLETIONS: ("/v1/completions", {"prompt": "hello", "max_tokens": 1, "temperature": 0.0}),
    CHAT: ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    TOKENIZE: ("/tokenize", {"prompt": "hello"}),
    DETOKENIZE: ("/detokenize", {"tokens": [5, 6]}),
}


@pytest.fixture(scope="module")
def server(make_engine):
    engine = make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})
    srv = ServerThread(AsyncEngine(engine))
    yield srv
    srv.close()


@pytest.mark.parametrize("endpoint", list(BASE))
def test_hostile_values_of_every_field_never_cause_a_5xx(server, endpoint, caplog):
    path, base = BASE[endpoint]
    fields = sorted(HONOURED[endpoint] | NO_SEMANTICS | set(NOT_SUPPORTED))
    seen: dict[int, int] = {}
    with caplog.at_level(logging.INFO), httpx.Client(base_url=server.url, timeout=60) as client:
        for field in fields:
            for value in HOSTILE:
                body = {**base, field: value}
                r = client.post(path, json=body)
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code < 500, (field, value, r.text)
                if r.status_code >= 400:
                    err = r.json()["error"]
                    assert err["code"] == r.status_code and err["message"], (field, value, err)
                    assert "Traceback" not in err["message"], (field, value, err)
        r = client.post(path, json=base)   # still serving
        assert r.status_code == 200, r.text
    assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen   # both outcomes exercised
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
