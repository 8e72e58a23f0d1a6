"""Subprocess body of test_pipeline_parallel: greedy tokens at pp=1/tp=1 and under pipeline
(and tensor) parallelism, on forced host devices (``XLA_FLAGS`` is set by the caller before jax
imports).

Usage: python pp_worker.py CACHE_DIR MODEL_DIR[::int8+lm_head]... -> one JSON line (the suffix:
the model with int8 weights and lm_head, quantized on load)
{model: {"ref": tokens, "<name>": {"tokens": ..., "kv_shape": ..., "kv_shard": ...}, ...}}
for the engines named in ``ENGINES``.
"""

import json
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

import jserve.model.decoder as decoder  # noqa: E402

# The tiny buckets here (16 tokens) would run whole (M = 1); cut them into 4-token micro-batches
# so that the engines below run the split path end to end (chunks crossing cuts included).
decoder.MICROBATCH_MIN_TOKENS = 4

from jserve.builder import EngineArgs, build_engine  # noqa: E402
from jserve.sampling_params import SamplingParams  # noqa: E402

# Both burst (num_scheduler_steps): greedy decode rows circle through the stages in row groups
# (decoder.pipelined_burst) once all four requests decode with 4+ tokens left; the steps
# before and after run the one-step schedule.
ENGINES = {"pp2": dict(pipeline_parallel_size=2, num_scheduler_steps=4),
           "tp2_pp2": dict(pipeline_parallel_size=2, tensor_parallel_size=2, num_scheduler_steps=4)}


SAMPLED = SamplingParams(temperature=0.8, seed=11, max_tokens=8, ignore_eos=True,
                         repetition_penalty=1.3, frequency_penalty=0.4)


def _tokens(engine, prompts, prompt_logprobs=None, sp=None):
    sp = sp or SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    ids = [engine.add_request(None, p, sp) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    outs = [done[i] for i in ids]
    tokens = [o.outputs[0].token_ids for o in outs]
    if prompt_logprobs is None:
        return tokens
    return tokens, [[{str(t): round(lp.logprob, 4) for t, lp in e.items()} if e else None
                     for e in o.prompt_logprobs] for o in outs]


def _record_plans(engine) -> list:
    """Every plan the engine's scheduler makes from now on (until ``schedule`` is deleted)."""
    plans, schedule = [], engine.scheduler.schedule

    def recorded():
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = recorded
    return plans


def main() -> None:
    cache, models = sys.argv[1], sys.argv[2:]
    result = {}
    for k, name_arg in enumerate(models):
        model, _, variant = name_arg.partition("::")   # "::int8+lm_head": quantized weights + head
        quant = dict(quantization="int8", quantize_lm_head=True) if variant == "int8+lm_head" else {}
        args = dict(model=model, dtype="float32", max_model_len=64, max_num_seqs=4,
                    max_num_batched_tokens=16, num_pages=40, compilation_cache_dir=cache, **quant)
        ref_engine = build_engine(EngineArgs(**args))
        vocab = ref_engine.config.model.vocab_size
        rng = np.random.default_rng(5)
        prompts = [rng.integers(3, vocab, n).tolist() for n in (3, 17, 29, 6)]
        r = result[name_arg] = {"ref": _tokens(ref_engine, prompts),
                             "ref_sampled": _tokens(ref_engine, prompts, sp=SAMPLED)}
        if k == 0:
            r["ref_prompt_lps"] = _tokens(ref_engine, prompts[:1], prompt_logprobs=2)[1]
        del ref_engine
        for name, extra in ENGINES.items():
            engine = build_engine(EngineArgs(**args, **extra))
            plans = _record_plans(engine)
            tokens = _tokens(engine, prompts)
            sampled = _tokens(engine, prompts, sp=SAMPLED)   # seeded, penalized: the plain sampler
            del engine.scheduler.schedule
            k_pages = engine.runner.kv[0][0]   # (the pool is donated to each step: read it after)
            r[name] = {"tokens": tokens, "sampled": sampled, "kv_shape": list(k_pages.shape),
                       "kv_entries": len(engine.runner.kv),
                       "kv_shard": list(k_pages.addressable_shards[0].data.shape),
                       "kv_devices": len(k_pages.sharding.device_set),
                       "bursts": sum(out.burst > 1 for out in plans)}
            if k == 0 and name == "pp2":
                r[name]["prompt_lps"] = _tokens(engine, prompts[:1], prompt_logprobs=2)[1]
            del engine
    print(json.dumps(result))


if __name__ == "__main__":
    main()
