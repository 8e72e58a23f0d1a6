"""``jserve bench`` against the shared server, over HTTP and gRPC."""

import json
import math

import pytest

from server.bench import RequestResult, summarize
from server.cli import main


@pytest.mark.parametrize("backend", ["openai", "grpc"])
def test_bench_sweep_counts_exact_tokens(served, tmp_path, capsys, backend):
    out = tmp_path / "bench.json"
    code = main(["bench", "--backend", backend, "--base-url", served.url, "--grpc-target", served.grpc_target,
                 "--num-prompts", "4", "--input-len", "16", "--output-len", "8", "--concurrency", "1,2",
                 "--result-json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["concurrency"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert (run["completed"], run["failed"]) == (4, 0)
        assert run["output_tokens"] == 4 * 8 and run["input_tokens"] == 4 * 16
        assert run["output_throughput"] > 0 and run["request_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = run[key]
            assert all(math.isfinite(d[q]) for q in ("mean", "p50", "p95", "p99")), (key, d)
            assert d["p50"] <= d["p95"] <= d["p99"]
        assert run["ttft_ms"]["mean"] <= run["e2e_ms"]["mean"]
    table = capsys.readouterr().out
    assert "out tok/s" in table and "E2E mean" in table
    assert served.wait_idle() == (0, False)


def test_bench_dataset_text_prompts(served, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "output_len": 5})
                              for p in ("Hello there", "Why is the sky blue?")) + "\n")
    out = tmp_path / "r.json"
    assert main(["bench", "--base-url", served.url, "--dataset", str(data), "--num-prompts", "3",
                 "--concurrency", "0", "--request-rate", "50", "--result-json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["completed"] == 3 and run["output_tokens"] == 15 and run["concurrency"] == 0


def test_bench_reports_failures(served, tmp_path):
    out = tmp_path / "r.json"
    code = main(["bench", "--base-url", served.url, "--num-prompts", "2", "--input-len", "200",
                 "--output-len", "8", "--warmup", "0", "--result-json", str(out)])
    assert code == 1                                         # 200 + 8 tokens > max_model_len 128
    (run,) = json.loads(out.read_text())["runs"]
    assert run["failed"] == 2 and "HTTP 400" in run["errors"][0]


def test_summary_percentiles():
    results = [RequestResult(ok=True, prompt_len=4, output_tokens=5, ttft=0.01 * i, e2e=0.1 * i,
                             itl=[0.02] * 4) for i in range(1, 11)]
    s = summarize(results + [RequestResult(ok=False, error="boom")], duration=2.0, concurrency=2)
    assert (s["completed"], s["failed"], s["errors"]) == (10, 1, ["boom"])
    assert s["output_throughput"] == pytest.approx(50 / 2.0)
    assert s["e2e_ms"]["mean"] == pytest.approx(550.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(550.0)
    assert s["itl_ms"]["p99"] == pytest.approx(20.0)
    tpot_ms = [(0.1 * i - 0.01 * i) / 4 * 1e3 for i in range(1, 11)]     # (e2e - ttft) / (5 - 1)
    assert s["tpot_ms"]["mean"] == pytest.approx(sum(tpot_ms) / 10)
