"""The JSON schema and prompts the structured-output engine tests share
(test_structured_outputs.py, test_spec_structured.py)."""

SCHEMA = {"type": "object",
          "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                         "b": {"enum": ["x", "yy"]},
                         "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["a", "b", "c"], "additionalProperties": False}
PROMPTS = ["def f(x):", "import os\n", "class A:", "hello world"]
