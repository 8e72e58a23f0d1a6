"""Subprocess body of test_tp_replicated_kv: greedy tokens at tp=1 and at a tp larger than the
KV-head count, on forced host devices (``XLA_FLAGS`` is set by the caller before jax imports).

Usage: python tp_replicated_worker.py TP CACHE_DIR MODEL_DIR... -> one JSON line
{model: {"tp1": tokens, "tpN": tokens, "kv_devices": n, "wqkv_devices": n}}.
"""

import json
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from jserve.builder import EngineArgs, build_engine  # noqa: E402
from jserve.sampling_params import SamplingParams  # noqa: E402


def _tokens(engine, prompts):
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = [engine.add_request(None, p, sp) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def main() -> None:
    tp, cache, models = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    result = {}
    for model in models:
        args = dict(model=model, dtype="float32", max_model_len=64, max_num_seqs=4,
                    max_num_batched_tokens=16, num_pages=40, compilation_cache_dir=cache)
        ref_engine = build_engine(EngineArgs(**args))
        vocab = ref_engine.config.model.vocab_size
        rng = np.random.default_rng(5)
        prompts = [rng.integers(3, vocab, n).tolist() for n in (3, 17, 29)]
        ref = _tokens(ref_engine, prompts)
        del ref_engine
        engine = build_engine(EngineArgs(**args, tensor_parallel_size=tp))
        result[model] = {
            "tp1": ref, "tpN": _tokens(engine, prompts),
            "kv_heads": engine.config.model.num_kv_heads,
            "kv_devices": len(engine.runner.kv[0][0].sharding.device_set),
            "kv_replicated": engine.runner.kv[0][0].sharding.is_fully_replicated,
            "wqkv_replicated": engine.runner.params["wqkv"].sharding.is_fully_replicated,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
