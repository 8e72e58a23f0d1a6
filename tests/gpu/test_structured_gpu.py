"""Structured outputs on a GPU (skipped without one): the in-jit mask / bias of the general
step variant on the device, constrained and free rows in one step, every output validating;
the schema and regex as token automata on the device (the default) and on the host path."""

from __future__ import annotations

import json
import re

import pytest
from engine_helpers import run_engine

from jserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"enum": ["x", "yy"]}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.mark.parametrize("device_states", [None, 0], ids=["device automata", "host path"])
def test_constrained_and_free_rows_on_gpu(make_engine, device_states):
    engine = make_engine("qwen2", dtype="bfloat16", grammar_device_states=device_states)
    assert next(iter(engine.runner.kv[0][0].devices())).platform == "gpu"
    assert (engine.device_grammars is None) == (device_states == 0)
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    items = []
    for i in range(4):
        items.append(("def f(x):", SamplingParams(temperature=0.8, seed=i, max_tokens=40,
                                                  structured_outputs={"json": SCHEMA})))
        items.append(("hello", free))
    items.append(("x", SamplingParams(temperature=0, max_tokens=20,
                                      structured_outputs={"regex": "[0-9]{4}"})))
    items.append(("x", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                      logit_bias={9: 100.0})))
    outs = run_engine(engine, items)
    for o in outs[:8:2]:
        value = json.loads(o.outputs[0].text)
        assert set(value) == {"a", "b"} and 0 <= value["a"] <= 99 and value["b"] in ("x", "yy")
    assert len({tuple(o.outputs[0].token_ids) for o in outs[1:8:2]}) == 1
    assert re.fullmatch("[0-9]{4}", outs[8].outputs[0].text)
    assert outs[9].outputs[0].token_ids == [9] * 4
