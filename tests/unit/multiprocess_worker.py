"""Subprocess body of test_multiprocess: one process of a 2-process CPU job over the golden llama
fixture (float32, tp=2: one forced host device per process). The launch values come from the
JSERVE_* environment variables, as a cluster launcher would set them.

Process 0 prints READY once the engine is built, waits for a line on stdin, generates and
prints the tokens as JSON; other processes never return from LLM(...) (they follow process 0).
Usage: python multiprocess_worker.py MODEL_DIR CACHE_DIR
"""

import json
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

from jserve import LLM, SamplingParams  # noqa: E402


def main() -> None:
    model, cache = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, dtype="float32", tensor_parallel_size=2, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=16, num_pages=40, compilation_cache_dir=cache,
              distributed_timeout_s=10)
    print("READY", flush=True)
    sys.stdin.readline()
    sp = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    outs = llm.generate([[5, 6, 7, 8], list(range(20, 50))] * 2, sp)
    print(json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)


if __name__ == "__main__":
    main()
