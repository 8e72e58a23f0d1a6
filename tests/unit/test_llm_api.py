"""The LLM API end to end on a tiny checkpoint: text/token prompts, chat, n, seeds, stops,
logprobs, min_tokens (CPU, float32)."""

import math

import pytest
from fixture_paths import GOLDEN

from jserve.llm import LLM
from jserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(xla_cache_dir):
    return LLM(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=64, num_pages=80, compilation_cache_dir=xla_cache_dir)


def test_text_and_token_prompts(llm):
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    a, b = llm.generate(["def fib(n):", tok.encode("def fib(n):")], sp)
    assert a.prompt == "def fib(n):" and b.prompt is None
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 8
    assert a.outputs[0].text == tok.decode(a.outputs[0].token_ids)
    assert a.outputs[0].finish_reason == "length" and a.finished


def test_seeded_sampling_is_reproducible_alone_and_batched(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["x = 1"], sp)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.7, top_k=20, seed=9, max_tokens=15, ignore_eos=True)
    batched = llm.generate(["import os", "x = 1", "for i in"], [other, sp, other])
    assert batched[1].outputs[0].token_ids == alone
    different = llm.generate(["x = 1"], sp.replace(seed=4321))[0].outputs[0].token_ids
    assert different != alone


def test_n_samples_distinct_and_reproducible(llm):
    sp = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=10, ignore_eos=True)
    out = llm.generate(["class A:"], sp)[0]
    seqs = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(s) for s in seqs}) == 3
    assert [c.token_ids for c in llm.generate(["class A:"], sp)[0].outputs] == seqs


def test_stop_string_truncates_text(llm):
    base = llm.generate(["def "], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    text = base[0].outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate(["def "], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    kept = llm.generate(["def "], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                 stop=[stop], include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == text[:text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ids = llm.generate(["while True:"], sp)[0].outputs[0].token_ids
    stop_id = ids[3]
    first = ids.index(stop_id)
    out = llm.generate(["while True:"], sp.replace(stop_token_ids=(stop_id,)))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == ids[:first + 1]
    # min_tokens bans the stop id until enough tokens exist: generation differs and goes on.
    late = llm.generate(["while True:"], sp.replace(stop_token_ids=(stop_id,),
                                                    min_tokens=first + 2))[0].outputs[0]
    assert len(late.token_ids) >= first + 2
    assert stop_id not in late.token_ids[:first + 2]


def test_logprobs(llm):
    out = llm.generate(["print("], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3,
                                                  ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for tid, step in zip(out.token_ids, out.logprobs, strict=True):
        assert tid in step
        assert step[tid].rank == 1          # greedy picks the top token
        tops = sorted((lp for t, lp in step.items() if lp.rank is not None), key=lambda x: x.rank)
        assert len(tops) == 3
        assert all(a.logprob >= b.logprob for a, b in zip(tops, tops[1:], strict=False))
        assert step[tid].logprob <= 0.0
        total += step[tid].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-5)


def test_chat(llm):
    out = llm.chat([{"role": "user", "content": "hi"}],
                   SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out[0].prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_prompt_in_list_rejects_all_and_keeps_engine(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["ok", ""], SamplingParams(max_tokens=3))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.num_free == llm.engine.pool.num_total
    assert len(llm.generate("ok", SamplingParams(max_tokens=3))[0].outputs[0].token_ids) <= 3
