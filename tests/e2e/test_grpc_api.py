"""The gRPC API (jserve.v1.Generation + health + reflection) with a client from the proto stubs."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jserve.sampling_params import SamplingParams
from server.proto import jserve_pb2 as pb
from server.proto import jserve_pb2_grpc as pb_grpc

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GenerationStub(channel)


def _generate(stub, **kw):
    sp = kw.pop("sampling_params", pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    return list(stub.Generate(pb.GenerateRequest(sampling_params=sp, **kw), timeout=60))


def _tokens(msgs, index=0):
    return [t for m in msgs for c in m.choices if c.index == index for t in c.token_ids]


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.9, 1234)])
def test_generate_matches_llm_generate(stub, llm_ref, temperature, seed):
    want = llm_ref.generate(PROMPT, SamplingParams(temperature=temperature, seed=seed, max_tokens=12,
                                                   ignore_eos=True))[0]
    sp = pb.SamplingParams(temperature=temperature, max_tokens=12, ignore_eos=True)
    if seed is not None:
        sp.seed = seed
    msgs = _generate(stub, text=PROMPT, sampling_params=sp, request_id="mine")
    assert _tokens(msgs) == want.outputs[0].token_ids
    assert "".join(c.text for m in msgs for c in m.choices) == want.outputs[0].text
    assert list(msgs[0].prompt_token_ids) == want.prompt_token_ids
    assert all(m.request_id == "mine" for m in msgs)
    last = msgs[-1]
    assert last.choices[-1].finish_reason == "length"
    assert all(not m.HasField("usage") for m in msgs[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12


def test_token_ids_prompt_n2_and_logprobs(stub, llm_ref):
    ids = llm_ref.get_tokenizer().encode(PROMPT)
    want = llm_ref.generate([ids], SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=6, logprobs=2,
                                                  ignore_eos=True))[0]
    sp = pb.SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=6, logprobs=2, ignore_eos=True)
    msgs = _generate(stub, token_ids=pb.TokenIds(ids=ids), sampling_params=sp)
    for i, out in enumerate(want.outputs):
        assert _tokens(msgs, i) == out.token_ids
        lps = [lp for m in msgs for c in m.choices if c.index == i for lp in c.logprobs]
        assert [lp.token_id for lp in lps] == out.token_ids
        for lp, entry, tid in zip(lps, out.logprobs, out.token_ids, strict=True):
            assert lp.logprob == pytest.approx(entry[tid].logprob, abs=1e-6)
            assert len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob


def test_cached_tokens_and_cache_salt(stub):
    ids = pb.TokenIds(ids=list(range(200, 240)))  # 2 full pages + a partial one
    cached = lambda msgs: msgs[-1].usage.cached_tokens  # noqa: E731
    assert cached(_generate(stub, token_ids=ids, cache_salt="grpc-a")) == 0
    assert cached(_generate(stub, token_ids=ids, cache_salt="grpc-b")) == 0
    assert cached(_generate(stub, token_ids=ids, cache_salt="grpc-a")) == 32


def test_stop_string_reason(stub):
    text = "".join(c.text for m in _generate(stub, text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=30, temperature=0.0, ignore_eos=True)) for c in m.choices)
    stop = text[6:9]
    msgs = _generate(stub, text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert "".join(c.text for m in msgs for c in m.choices) == text[:text.index(stop)]
    final = msgs[-1].choices[-1]
    assert final.finish_reason == "stop" and final.WhichOneof("stop_reason") == "stop_string"
    assert final.stop_string == stop


def test_tokenize_detokenize_list_models(stub, llm_ref, served):
    tok = llm_ref.get_tokenizer()
    r = stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=10)
    assert list(r.token_ids) == tok.encode(PROMPT) and r.count == len(r.token_ids)
    assert r.max_model_len == 128
    d = stub.Detokenize(pb.DetokenizeRequest(token_ids=r.token_ids), timeout=10)
    assert d.text == tok.decode(list(r.token_ids))
    (m,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert (m.id, m.max_model_len, m.vocab_size) == (served.server.serving.card.name, 128, 512)


@pytest.mark.parametrize("request_kw, code", [
    (dict(model="no-such-model", text=PROMPT), grpc.StatusCode.NOT_FOUND),
    (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT),                                   # no prompt
    (dict(token_ids=pb.TokenIds(ids=[1] * 200)), grpc.StatusCode.INVALID_ARGUMENT),  # over context
    (dict(token_ids=pb.TokenIds(ids=[1, 2, 100000])), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=1000)), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(text=PROMPT, sampling_params=pb.SamplingParams(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_status_codes(stub, request_kw, code):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(**request_kw), timeout=30))
    assert e.value.code() == code and e.value.details()
    assert _tokens(_generate(stub, text=PROMPT))          # still serving


def test_cancel_mid_stream_frees_pages(stub, served):
    call = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=110, temperature=0.0, ignore_eos=True)), timeout=60)
    first = next(call)
    assert first.choices and served.engine_state()[0] > 0
    call.cancel()
    assert served.wait_idle() == (0, False)


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jserve.v1.Generation"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        timeout=10)
    names = {s.name for s in resp.list_services_response.service}
    assert {"jserve.v1.Generation", "grpc.health.v1.Health"} <= names
    (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="jserve.v1.Generation")]), timeout=10)
    assert resp.file_descriptor_response.file_descriptor_proto


def test_committed_stubs_match_the_proto(tmp_path):
    """The generated stubs describe exactly what jserve.proto says (regenerate on drift)."""
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2

    from server.proto.generate import protoc

    out = tmp_path / "set.pb"
    protoc([f"--descriptor_set_out={out}"])
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    messages = list(fresh.message_type)
    while messages:                             # protoc adds json names the embedded copy leaves out
        message = messages.pop()
        messages.extend(message.nested_type)    # map fields are nested entry messages
        for f in message.field:
            f.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "server/proto stubs are stale: run python -m server.proto.generate"



def test_grpc_health_follows_a_crashed_engine_loop(make_engine):
    """When the engine loop dies, gRPC health turns NOT_SERVING like /health turns 503."""
    import time

    import httpx
    from e2e_server import ENGINE_ARGS, ServerThread

    from jserve.async_engine import AsyncEngine

    engine = make_engine("llama", **{k: v for k, v in ENGINE_ARGS.items() if k != "model"})
    srv = ServerThread(AsyncEngine(engine))
    try:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            check = lambda: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert check() == health_pb2.HealthCheckResponse.SERVING
            srv.aengine._send("not a command")      # a bug in the loop: it stops
            deadline = time.monotonic() + 10
            while check() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 503
    finally:
        srv.close(drain_engine=False)
