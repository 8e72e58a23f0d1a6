"""vLLM parity of the offline API: prompt_logprobs, truncate_prompt_tokens, prompt dicts,
a tqdm progress bar, and chat's continue_final_message / chat_template / chat_template_kwargs
(CPU, float32, the same tiny engine as test_llm_api: its compiles come from the cache)."""

import math

import pytest
from fixture_paths import GOLDEN

from jserve.llm import LLM
from jserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(xla_cache_dir):
    return LLM(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=128, max_num_seqs=8,
               max_num_batched_tokens=64, num_pages=80, compilation_cache_dir=xla_cache_dir)


def test_prompt_logprobs_agree_with_sampled_logprobs(llm):
    tok = llm.get_tokenizer()
    prompt = tok.encode("def fib(n):")
    first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, logprobs=2,
                                                  ignore_eos=True))[0]
    gen = first.outputs[0]
    assert first.prompt_logprobs is None              # not asked for
    scored = llm.generate([prompt + gen.token_ids[:2]],
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))[0]
    plp = scored.prompt_logprobs
    assert len(plp) == len(prompt) + 2 and plp[0] is None
    for k in range(2):        # prompt position len(prompt) + k holds generated token k
        entry, want = plp[len(prompt) + k], gen.logprobs[k]
        tid = gen.token_ids[k]
        assert entry[tid].logprob == pytest.approx(want[tid].logprob, abs=2e-4)
        assert entry[tid].rank == 1                   # greedy: the most likely token
        assert entry[tid].decoded_token == tok.decode([tid], skip_special_tokens=False)
        ranked = sorted((lp.rank, t) for t, lp in entry.items())
        assert [r for r, _ in ranked] == [1, 2]
        assert [t for _, t in ranked] == [t for t, lp in sorted(want.items(), key=lambda x: x[1].rank)]
    for i, entry in enumerate(plp[1:], start=1):      # every prompt token is scored
        t = (prompt + gen.token_ids[:2])[i]
        assert t in entry and entry[t].logprob <= 0 and entry[t].rank >= 1
        assert math.isfinite(entry[t].logprob)
    # the sampled token's logprob is the distribution after the whole prompt
    assert scored.outputs[0].token_ids == [gen.token_ids[2]]


def test_prompt_logprobs_zero_gives_only_the_prompt_token(llm):
    out = llm.generate(["x = 1 + 2"], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ids = out.prompt_token_ids
    assert [None if e is None else list(e) for e in out.prompt_logprobs] == \
        [None] + [[t] for t in ids[1:]]


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("import numpy as np\nimport jax\n")
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    cut = llm.generate([ids], sp.replace(truncate_prompt_tokens=5))[0]
    ref = llm.generate([ids[-5:]], sp)[0]
    assert cut.prompt_token_ids == ids[-5:]
    assert cut.outputs[0].token_ids == ref.outputs[0].token_ids
    long = list(range(3, 200))                       # longer than max_model_len (128)
    kept = llm.generate([long], sp.replace(truncate_prompt_tokens=-1))[0]
    assert kept.prompt_token_ids == long[-127:]
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_prompt_dicts(llm):
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    plain = llm.generate(["def fib(n):"], sp)[0]
    a, b = llm.generate([{"prompt": "def fib(n):"}, {"prompt_token_ids": tok.encode("def fib(n):")}], sp)
    one = llm.generate({"prompt": "def fib(n):"}, sp)
    assert a.prompt == "def fib(n):" and b.prompt is None
    for out in (a, b, one[0]):
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate([{"prompt": "x", "multi_modal_data": {}}], sp)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        llm.generate([{"prompt": "x", "prompt_token_ids": [1]}], sp)


def test_use_tqdm_draws_a_progress_bar(llm, capsys):
    llm.generate(["a", "b", "c"], SamplingParams(max_tokens=2), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "toks/s" in err
    made = []

    class Bar:                                        # a tqdm-like class, as vLLM accepts
        def __init__(self, **kw):
            made.append(kw)
            self.n = 0

        def update(self, k):
            self.n += k

        def set_postfix_str(self, *a, **kw):
            pass

        def close(self):
            made.append(self.n)

    llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=Bar)
    assert made[0]["total"] == 2 and made[-1] == 2


def test_chat_continue_final_message_and_template_kwargs(llm):
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": "write a function"},
            {"role": "assistant", "content": "def add(a, b):"}]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.chat(msgs, sp, add_generation_prompt=False, continue_final_message=True)[0]
    text = tok.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert text.endswith("def add(a, b):")
    closed = llm.chat(msgs, sp, add_generation_prompt=False)[0]
    assert len(closed.prompt_token_ids) > len(out.prompt_token_ids)  # the turn was closed there
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(msgs, sp, continue_final_message=True)               # add_generation_prompt too
    with pytest.raises(ValueError, match="assistant"):
        llm.chat(msgs[:1], sp, add_generation_prompt=False, continue_final_message=True)
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    greet = llm.chat(msgs[:1], sp, chat_template=template, chat_template_kwargs={"greeting": "Hey! "})[0]
    assert tok.decode(greet.prompt_token_ids, skip_special_tokens=False).endswith("Hey! write a function")
