"""Where the engine loop's host time goes: cProfile over a batch-1 greedy decode.

Builds the engine (random weights), decodes ``--tokens`` tokens of one request once untimed,
then again under cProfile, and prints ms per step and the functions with the most own time
(per step). On a GPU whose step is shorter than the host's work (code-small on an H200), the
whole step is host time; the blocking read-back shows as ``numpy.asarray`` (time waiting for the
device, not host work).

    PYTHONPATH=. python3 benchmarks/host_profile.py code-small [--tokens 256] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    a = ap.parse_args()
    eng = build_engine(EngineArgs(model=a.model, random_weights=True, dtype="bfloat16", max_num_seqs=16,
                                  max_num_batched_tokens=16, max_model_len=1024,
                                  gpu_memory_utilization=a.gpu_memory_utilization))
    sp = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)

    def run() -> int:
        eng.add_request(None, list(range(10, 42)), sp)
        n = 0
        while eng.has_unfinished_requests():
            eng.step()
            n += 1
        return n

    run()
    t = time.perf_counter()
    n = run()
    plain = (time.perf_counter() - t) / n * 1e3
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    n = run()
    prof.disable()
    profiled = (time.perf_counter() - t) / n * 1e3
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:a.top]
    print(f"## host profile, {a.model}, batch-1 greedy decode: {plain:.3f} ms/step "
          f"({profiled:.3f} under cProfile), {n} steps")
    print("| function | calls per step | own ms per step | cumulative ms per step |")
    print("|---|---|---|---|")
    for (file, line, fn), (_, calls, tottime, cumtime, _) in rows:
        where = f"{file.rsplit('/', 2)[-2:][-1] if '/' in file else file}:{line} {fn}"
        print(f"| {where} | {calls / n:.1f} | {tottime / n * 1e3:.4f} | {cumtime / n * 1e3:.4f} |")


if __name__ == "__main__":
    main()
