"""The JSON schema, prompts and checks the structured-output engine tests share
(test_structured_outputs.py, test_structured_device.py, test_spec_structured.py)."""

import json

import jsonschema

SCHEMA = {"type": "object",
          "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                         "b": {"enum": ["x", "yy"]},
                         "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["a", "b", "c"], "additionalProperties": False}
PROMPTS = ["def f(x):", "import os\n", "class A:", "hello world"]


def check_prefix_cache_hit(run) -> None:
    """``run(items)`` -> outputs: a schema request whose prompt hits the prefix cache gives the
    first run's tokens, valid (the constraint starts afresh with the new slot)."""
    from jserve.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMA})
    prompt = "def long_prompt_for_the_cache(a, b, c):\n    return a + b + c\n" * 2
    first = run([(prompt, sp)])[0]
    again = run([(prompt, sp)])[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    jsonschema.validate(json.loads(again.outputs[0].text), SCHEMA)
