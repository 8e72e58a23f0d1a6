"""Scale-out on 2 GPUs (skipped with fewer): tp=2, pp=2, dp=2 and a 2-process job (one GPU each,
scripts/launch_multihost) give the greedy tokens of one GPU (float32, bundled model)."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from child_env import child_env
from engine_helpers import run_tokens
from gpu_count import gpu_count

from jserve.builder import default_model_path
from jserve.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(default_model_path())
SMALL = dict(model=MODEL, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_pages=160)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")]


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(5, 8000, n).tolist() for n in (5, 40, 77, 130)]


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(data_parallel_size=2),
                                    dict(pipeline_parallel_size=2)],
                         ids=["tensor", "data", "pipeline"])
def test_two_gpus_match_one(make_engine, layout):
    ref = run_tokens(make_engine(**SMALL), _prompts(), GREEDY)
    assert run_tokens(make_engine(**SMALL, **layout), _prompts(), GREEDY) == ref


def test_two_process_job_matches_one_process(tmp_path):
    base = [sys.executable, "-m", "jserve", "generate", "--model", MODEL, "--dtype", "float32",
            "--num-pages", "128", "--max-tokens", "24", "--prompt", "def fibonacci(n):",
            "--prompt", "class Stack:", "--tp", "2"]
    env = child_env(drop=("JSERVE_", "XLA_FLAGS"), XLA_PYTHON_CLIENT_MEM_FRACTION="0.05")
    one = subprocess.run(base, env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [str(ROOT / "scripts" / "launch_multihost"), "-n", "2", "--port", str(port),
              "--log-dir", str(tmp_path), "--"]
    two = subprocess.run(launch + base, env=env, capture_output=True, text=True, timeout=900)
    log = (tmp_path / "process-1.log").read_text()
    assert two.returncode == 0, two.stderr[-3000:] + log[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    assert "process 0 stopped after" in log
