"""What ``prompt_logprobs`` costs: a request's latency with and without prompt scoring.

``PromptScorer`` (jserve/prompt_logprobs.py) runs one extra prefill of the prompt beside the
step loop; this prints, per prompt length, the median end-to-end time of a 1-token request
plain and with ``prompt_logprobs=5`` (after one warm-up run of each, so compiles are excluded),
and the scorer's own time. Run on the GPU (from the repository root, PYTHONPATH=.):

    python3 benchmarks/prompt_logprobs.py --model qwen2.5-0.5b --random-weights
    python3 benchmarks/prompt_logprobs.py --lens 16,64 --reps 2        # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

from jserve.llm import LLM
from jserve.sampling_params import SamplingParams


def _median_s(fn, reps: int) -> float:
    fn()                                             # warm-up (compiles)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory or named shape (default: bundled)")
    p.add_argument("--random-weights", action="store_true", help="named shape with random weights")
    p.add_argument("--lens", default="128,512,2048,8192", help="prompt lengths (comma list)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per cell (default: 5)")
    ns = p.parse_args()
    lens = [int(x) for x in ns.lens.split(",")]
    llm = LLM(model=ns.model, random_weights=ns.random_weights, max_model_len=max(lens) + 16)
    engine = llm.engine
    vocab = engine.config.model.vocab_size
    plain = SamplingParams(temperature=0.0, max_tokens=1)
    scored = plain.replace(prompt_logprobs=5)
    print(f"{'prompt':>8} {'plain ms':>10} {'prompt_logprobs ms':>19} {'scorer ms':>10} {'x':>6}")
    for n in lens:
        prompt = [(7 * i + 3) % vocab for i in range(n)]
        a = _median_s(lambda p=prompt: llm.generate([p], plain), ns.reps)
        b = _median_s(lambda p=prompt: llm.generate([p], scored), ns.reps)
        s = _median_s(lambda p=prompt: engine._prompt_scorer().score(p, 5), ns.reps)
        print(f"{n:>8} {a * 1e3:>10.1f} {b * 1e3:>19.1f} {s * 1e3:>10.1f} {b / a:>6.2f}")


if __name__ == "__main__":
    main()
