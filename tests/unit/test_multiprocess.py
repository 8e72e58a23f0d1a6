"""Multi-process serving on CPU: 2 processes (one forced host device each, JAX's gloo
collectives) give the tokens of 1 process; bad launches and dead peers end with clear errors
within the timeout instead of hanging."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixture_paths import GOLDEN

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("multiprocess_worker.py")
MODEL = str(GOLDEN / "llama")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JSERVE_")}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)
    return env


def _generate_argv(cache: str) -> list[str]:
    return [sys.executable, "-m", "jserve", "generate", "--model", MODEL, "--dtype", "float32",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--num-pages", "40",
            "--max-tokens", "8", "--prompt", "def hello", "--prompt", "world peace",
            "--compilation-cache-dir", cache]


def _text_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("[Gloo]")]


@pytest.fixture(scope="module")
def one_process_text(xla_cache_dir) -> list[str]:
    one = subprocess.run(_generate_argv(xla_cache_dir), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    lines = _text_lines(one.stdout)
    assert len(lines) >= 2
    return lines


@pytest.mark.parametrize("source", ["safetensors", "orbax", "ngram"])
def test_two_process_generate_equals_one_process(one_process_text, xla_cache_dir, tmp_path, source):
    """scripts/launch_multihost starts the job (launch values as JSERVE_* variables); the orbax
    variant restores a `jserve convert` directory across the two processes; the n-gram one
    speculates (greedy: the same text; process 0 reads the speculative steps' handles, which
    it wrapped as plain ones before)."""
    argv = _generate_argv(xla_cache_dir) + ["--tp", "2"]
    if source == "ngram":
        argv += ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 2,
                                                     "prompt_lookup_min": 1, "prompt_lookup_max": 2,
                                                     "disable_by_batch_size": None})]
    if source == "orbax":
        from jserve.convert import convert

        convert(MODEL, str(tmp_path / "orbax"), dtype="float32")
        argv[argv.index(MODEL)] = str(tmp_path / "orbax")
    launch = [str(ROOT / "scripts" / "launch_multihost"), "-n", "2", "--cpu", "--port", str(_free_port()),
              "--log-dir", str(tmp_path), "--"]
    two = subprocess.run(launch + argv, env=_env(), capture_output=True, text=True, timeout=600)
    follower_log = (tmp_path / "process-1.log").read_text()
    assert two.returncode == 0, two.stderr[-3000:] + follower_log[-3000:]
    assert _text_lines(two.stdout) == one_process_text
    assert "process 0 stopped after" in follower_log and "def hello" not in follower_log


@pytest.mark.parametrize("flags,env,match", [
    (["--num-processes", "2", "--process-id", "1"], {}, "coordinator_address"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator-address", "127.0.0.1:9"], {},
     r"process_id must be an integer in \[0, 2\)"),
    ([], {"JSERVE_NUM_PROCESSES": "2", "JSERVE_PROCESS_ID": "5", "JSERVE_COORDINATOR_ADDRESS": "h:1"},
     r"process_id must be an integer in \[0, 2\)"),
    ([], {"JSERVE_NUM_PROCESSES": "two"}, "JSERVE_NUM_PROCESSES must be an integer"),
    (["--num-processes", "2", "--process-id", "0", "--coordinator-address", "localhost"], {}, "host:port"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator-address", "127.0.0.1:{port}",
      "--distributed-timeout-s", "2"], {}, r"coordinator 127\.0\.0\.1:\d+ is not reachable after 2 s"),
])
def test_bad_launch_arguments_fail_fast_and_by_name(flags, env, match, xla_cache_dir):
    flags = [f.format(port=_free_port()) for f in flags]
    t0 = time.monotonic()
    proc = subprocess.run(_generate_argv(xla_cache_dir) + flags, env=_env(**env), capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert re.search(match, proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 30, elapsed          # seconds, not JAX's 5-minute join timeout


def _start_job(cache: str) -> list[subprocess.Popen]:
    port = _free_port()
    env = _env(JSERVE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JSERVE_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, str(WORKER), MODEL, cache],
                              env=dict(env, JSERVE_PROCESS_ID=str(i)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    line = ""
    while line.strip() != "READY":           # both engines built (warm-up runs in lockstep)
        line = procs[0].stdout.readline()
        if not line:
            for p in procs:
                p.kill()
            pytest.fail("process 0 died before READY: " + procs[0].stderr.read()[-3000:])
    return procs


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dead_follower_stops_process0_within_the_timeout(xla_cache_dir):
    """The worker's distributed_timeout_s is 10 s."""
    leader, follower = _start_job(xla_cache_dir)
    follower.kill()
    follower.wait()
    t0 = time.monotonic()
    leader.stdin.write("go\n")
    leader.stdin.flush()
    out, err = _wait(leader, 60)
    assert leader.returncode != 0
    assert time.monotonic() - t0 < 40
    assert re.search(r"another (process of the job|task) (probably )?died", err), err[-3000:]


def test_dead_process0_stops_the_follower_within_the_timeout(xla_cache_dir):
    leader, follower = _start_job(xla_cache_dir)
    leader.kill()
    leader.wait()
    t0 = time.monotonic()
    out, err = _wait(follower, 60)
    assert follower.returncode != 0
    assert time.monotonic() - t0 < 40
    assert re.search(r"lost process 0|another task died", err), err[-3000:]
    assert json.dumps([]) not in out


def test_a_mesh_that_leaves_out_a_process_is_refused_by_both(xla_cache_dir):
    port = _free_port()
    argv = _generate_argv(xla_cache_dir) + ["--num-processes", "2", "--coordinator-address",
                                            f"127.0.0.1:{port}", "--distributed-timeout-s", "10"]
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [_wait(p, 60)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    for err in errs:
        assert "every process must hold part of the mesh (e.g. --tensor-parallel-size 2)" in err, err[-2000:]


_CHANNEL = """
import sys
from jserve.multiprocess import STOP, StepChannel, _key
from jserve.scheduler_output import ScheduledChunk, SchedulerOutput
from sharding import initialize_multihost
import jax
initialize_multihost(sys.argv[1], 2, int(sys.argv[2]), timeout_s=20)
ch = StepChannel(20)
n = 600
if ch.is_leader:
    for i in range(n):
        ch.publish(SchedulerOutput(chunks=[ScheduledChunk("r", i, 1, (i,))]))
    ch.publish(STOP)
    from jax._src import distributed
    c = distributed.global_state.client
    try:
        c.key_value_try_get_bytes(_key(5))
        print("KEPT-OLD")
    except Exception:
        print("DELETED-OLD")
    print("KEPT-NEW" if c.key_value_try_get_bytes(_key(n - 1)) else "")
else:
    starts = []
    while True:
        m = ch.receive()
        if m == STOP:
            break
        starts.append(m.chunks[0].start)
    print("OK" if starts == list(range(n)) else f"BAD {starts[:5]}")
print("agreed", ch.agree_min("x", 10 + jax.process_index()), flush=True)
"""


def test_step_channel_orders_plans_and_drops_old_blocks():
    """600 plans (over two blocks of keys) arrive in order; the oldest block is deleted."""
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _CHANNEL, addr, str(i)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [_wait(p, 120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "DELETED-OLD" in outs[0][0] and "KEPT-NEW" in outs[0][0]
    assert "OK" in outs[1][0]
    assert all("agreed 10" in o for o, _ in outs)
