"""Bad input is a ValueError naming the field; the engine keeps serving the others."""

import pytest

from jserve.sampling_params import SamplingParams

OK = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("llama")


def _finish(engine):
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


@pytest.mark.parametrize("prompt, params, field", [
    ("", OK, "prompt"),
    ([], OK, "prompt"),
    ([1] * 128, OK, "prompt"),                       # == max_model_len: no room to generate
    ([1, 2, 10**9], OK, "prompt"),                   # token id out of vocab
    ([1, "x"], OK, "prompt"),
])
def test_bad_prompt(engine, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        engine.add_request(None, prompt, params)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e308}, "temperature"),         # finite in Python, inf as the device's float32
    ({"repetition_penalty": 1e39}, "repetition_penalty"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 1000}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_sampling_field():
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({"temperature": 0.0, "bogus": 1})


def test_engine_keeps_serving_after_bad_input(engine):
    good = engine.add_request(None, [5, 6, 7, 8], OK)
    with pytest.raises(ValueError):
        engine.add_request(None, [1] * 500, OK)
    with pytest.raises(ValueError):
        engine.add_request(None, [5, 6], SamplingParams(stop_token_ids=[10**7]))
    outs = _finish(engine)
    assert list(outs) == [good]
    assert len(outs[good].outputs[0].token_ids) == 6
    assert engine.pool.num_free == engine.pool.num_total


def test_llm_generate_rejects_bad_dict_field(make_engine):
    from jserve.llm import _as_params_list
    with pytest.raises(ValueError, match="bogus"):
        _as_params_list({"bogus": 3}, 1)
