"""Request fields that become token masks: structured outputs and the sampler-side options.

Where it sits: server/protocol.py calls ``mask_fields`` on every completions / chat body after
``check_fields``; the result joins the request's sampling dict, so ``SamplingParams`` gets
``structured_outputs`` (jserve/structured/grammar.py), ``logit_bias``, ``allowed_token_ids``
and ``bad_words``. The sources of a constraint, at most one per request (two are a 400)::

    response_format {"type": "json_object"}                     -> {"json_object": true}
    response_format {"type": "json_schema", "json_schema": {"schema": S, ...}} -> {"json": S}
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": ...}  (vLLM)
    guided_json / guided_regex / guided_choice / guided_grammar                    (vLLM, older)
    tool_choice "required" / a named function                    (server/tool_calls.py)

A bad schema or grammar is found when the engine compiles it (cached per spec) and is a 400
naming what is wrong.
"""

from __future__ import annotations

from typing import Any

from jserve.sampling_params import StructuredOutputsParams
from server.errors import bad_request

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def _response_format(v: Any) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        raise bad_request("'response_format' must be an object", "response_format")
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema'",
                              "response_format.json_schema")
        schema = js.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema object",
                              "response_format.json_schema.schema")
        return {"json": schema if isinstance(schema, dict) else {}}
    raise bad_request(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', "
                      f"got {kind!r}", "response_format.type")


def structured_spec(d: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the ``structured_outputs`` dict for SamplingParams, the client's field) or (None, None)."""
    found: list[tuple[str, dict[str, Any]]] = []
    for name in (*_GUIDED, "response_format", "structured_outputs"):
        if d.get(name) is not None and not isinstance(d[name], (dict, list, str)):
            raise bad_request(f"'{name}' has the wrong type ({type(d[name]).__name__})", name)
    if d.get("response_format") is not None:
        spec = _response_format(d["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    so = d.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("'structured_outputs' must be an object", "structured_outputs")
        if so:
            found.append(("structured_outputs", dict(so)))
    for name, key in _GUIDED.items():
        v = d.get(name)
        if v is not None:
            found.append((name, {key: v}))
    if len(found) > 1:
        names = ", ".join(f"'{n}'" for n, _ in found)
        raise bad_request(f"at most one output constraint per request; got {names}", found[1][0])
    if not found:
        return None, None
    field, spec = found[0]
    try:
        StructuredOutputsParams.from_dict(spec, field)
    except (TypeError, ValueError) as e:
        raise bad_request(str(e), field) from None
    return spec, field


def mask_fields(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The mask / bias SamplingParams keywords of a body, and the client's name of each
    (so a SamplingParams error names the field the client sent)."""
    out: dict[str, Any] = {}
    names: dict[str, str] = {}
    spec, field = structured_spec(d)
    if spec is not None:
        out["structured_outputs"], names["structured_outputs"] = spec, field
    lb = d.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad_request("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        parsed = {}
        for k, v in lb.items():
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise bad_request(f"'logit_bias' keys must be token ids, got {k!r}", "logit_bias") from None
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise bad_request(f"'logit_bias[{k}]' must be a number", "logit_bias")
            parsed[tid] = float(v)
        if parsed:
            out["logit_bias"] = parsed
    ids = d.get("allowed_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in ids):
            raise bad_request("'allowed_token_ids' must be a list of token ids", "allowed_token_ids")
        out["allowed_token_ids"] = ids
    bw = d.get("bad_words")
    if bw is not None:
        if not isinstance(bw, list) or not all(isinstance(w, str) for w in bw):
            raise bad_request("'bad_words' must be a list of strings", "bad_words")
        if bw:
            out["bad_words"] = bw
    return out, names
