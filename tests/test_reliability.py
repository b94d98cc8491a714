"""Hostile input, overload, faults and shutdown: the server keeps serving."""

import os
import random
import signal
import string
import subprocess
import sys
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backend_pb2
import backend_pb2_grpc
from conftest import ROOT, free_port, predict

H = backend_pb2.HealthMessage()
SERVED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def loaded(server, tiny_model):
    server.load(tiny_model, options=["max_cache_entries:16"])
    return server


def status_code(fn):
    try:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details()


def still_serving(server, expected=None):
    assert server.stub.Health(H, timeout=10).message == b"OK"
    reply = predict(server.stub, "The quick brown fox", Tokens=8, IgnoreEOS=True)
    if expected is not None:
        assert reply.message == expected


def wait_idle(stub, timeout=15):
    deadline = time.time() + timeout
    while stub.Status(H).state == backend_pb2.StatusResponse.BUSY:
        assert time.time() < deadline, "engine still busy"
        time.sleep(0.05)


P = backend_pb2.PredictOptions
M = backend_pb2.Message
BAD = [
    ("Predict", P(), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="x" * 20000), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Tokens=-5), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Tokens=10**9), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Temperature=float("inf")), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", TopP=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", MinP=-1), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", TopK=-3), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Penalty=-2), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", PresencePenalty=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", LogitBias="[1,2]"), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", LogitBias='{"1": "big"}'), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Tools='{"not": "a list"}'), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", StopPrompts=["x"] * 5000), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Grammar="root ::= ("), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Prompt="hi", Grammar='{"type": 5}'), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Messages=[M(role="wizard", content="hi")], UseTokenizerTemplate=True),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Messages=[M(role="assistant", content="", tool_calls="{bad")],
                  UseTokenizerTemplate=True), grpc.StatusCode.INVALID_ARGUMENT),
    ("Predict", P(Messages=[M(role="user", content="hi")], UseTokenizerTemplate=True,
                  Metadata={"chat_template_kwargs": "[not an object]"}),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("PredictStream", P(Prompt="hi", TopP=2), grpc.StatusCode.INVALID_ARGUMENT),
    ("PredictStream", P(Prompt="hi", ModelIdentity="other"), grpc.StatusCode.NOT_FOUND),
    ("TokenizeString", P(), grpc.StatusCode.INVALID_ARGUMENT),
    ("Detokenize", backend_pb2.DetokenizeRequest(tokens=[-1, 10**8]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Score", backend_pb2.ScoreRequest(prompt="", candidates=["a"]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Score", backend_pb2.ScoreRequest(prompt="hi", candidates=["x" * 20000]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("Embedding", P(), grpc.StatusCode.INVALID_ARGUMENT),
    ("Embedding", P(EmbeddingTokens=[999999]), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("rpc,request_,code", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_table(loaded, rpc, request_, code):
    got, details = status_code(lambda: getattr(loaded.stub, rpc)(request_, timeout=60))
    assert got == code, details
    assert details  # a message a person can act on
    still_serving(loaded)


def test_invalid_utf8_in_a_string_field(loaded):
    good = backend_pb2.PredictOptions(Prompt="hi", StopPrompts=["ab"]).SerializeToString()
    raw = good.replace(b"ab", b"\xff\xfe")
    call = loaded.channel.unary_unary("/backend.Backend/Predict")
    with pytest.raises(grpc.RpcError) as info:
        call(raw, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    still_serving(loaded)


TEXT = st.text(alphabet=string.printable + "\u00e9\u4e2d\U0001f600", max_size=40)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 0.5, 1.0, 2.0]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prompt=TEXT, tokens=st.integers(-3, 24), temperature=FLOATS, top_p=FLOATS,
       top_k=st.integers(-2, 500), min_p=FLOATS, penalty=FLOATS, repeat=st.integers(-2, 100),
       presence=FLOATS, frequency=FLOATS, stops=st.lists(TEXT, max_size=4),
       bias=st.one_of(st.just(""), TEXT, st.dictionaries(
           st.integers(-5, 500).map(str), st.floats(-100, 100), max_size=3).map(str)),
       seed=st.integers(-5, 2**31 - 1), ignore_eos=st.booleans(),
       roles=st.lists(st.sampled_from(["user", "assistant", "system", "tool", "bogus"]),
                      max_size=3), top_logprobs=st.integers(-1, 25))
def test_random_predict_options_never_break_the_server(
        loaded, prompt, tokens, temperature, top_p, top_k, min_p, penalty, repeat, presence,
        frequency, stops, bias, seed, ignore_eos, roles, top_logprobs):
    request = backend_pb2.PredictOptions(
        Prompt=prompt, Tokens=tokens, Temperature=temperature, TopP=top_p, TopK=top_k,
        MinP=min_p, Penalty=penalty, Repeat=repeat, PresencePenalty=presence,
        FrequencyPenalty=frequency, StopPrompts=stops, LogitBias=bias, Seed=seed,
        IgnoreEOS=ignore_eos, Messages=[M(role=r, content=prompt) for r in roles],
        UseTokenizerTemplate=bool(roles), TopLogprobs=top_logprobs, Logprobs=top_logprobs)
    code, details = status_code(lambda: loaded.stub.Predict(request, timeout=60))
    assert code in SERVED, details
    assert loaded.stub.Health(H, timeout=10).message == b"OK"


def test_cancellation_storm(loaded):
    prompts = ["Hello world", "The quick brown fox", "def main():", "Paris is the capital"]
    solo = [predict(loaded.stub, p, Tokens=12, IgnoreEOS=True).message for p in prompts]
    baseline = loaded.stub.Status(H).memory.breakdown
    rng = random.Random(0)

    def storm(worker):
        local = random.Random(worker)
        for _ in range(25):
            call = loaded.stub.PredictStream(backend_pb2.PredictOptions(
                Prompt=local.choice(prompts) + " " + str(local.randint(0, 10**6)),
                Tokens=local.randint(1, 300), IgnoreEOS=local.random() < 0.8,
                Temperature=local.choice([0.0, 0.8])), timeout=60)
            stop_after = local.randint(0, 6)
            try:
                for i, _ in enumerate(call):
                    if i >= stop_after:
                        break
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED), err
            call.cancel()

    workers = [threading.Thread(target=storm, args=(rng.randint(0, 10**6),)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wait_idle(loaded.stub)
    assert [predict(loaded.stub, p, Tokens=12, IgnoreEOS=True).message
            for p in prompts] == solo
    after = loaded.stub.Status(H).memory.breakdown
    assert after["prompt_cache_entries"] <= 16
    # Whatever MLX holds beyond the weights and the cache is transient, not leaked.
    slack = 64 * 2**20
    assert after["mlx_active"] - after["prompt_cache"] <= \
        baseline["mlx_active"] - baseline["prompt_cache"] + slack


def test_queue_cap_answers_resource_exhausted(server, tiny_model):
    server.load(tiny_model, options=["max_queue:2"])
    calls = [server.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt="Hello", Tokens=2000, IgnoreEOS=True), timeout=60) for _ in range(2)]
    for call in calls:
        next(call)  # both are running
    code, details = status_code(lambda: server.stub.Predict(
        backend_pb2.PredictOptions(Prompt="hi", Tokens=2), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 requests" in details
    for call in calls:
        call.cancel()
    wait_idle(server.stub)
    assert predict(server.stub, "hi", Tokens=2).tokens >= 1


def test_deadline_stops_generation(loaded):
    code, _ = status_code(lambda: loaded.stub.Predict(backend_pb2.PredictOptions(
        Prompt="Hello", Tokens=1500, IgnoreEOS=True), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(loaded.stub, timeout=5)
    still_serving(loaded)


@pytest.mark.parametrize("action", ["LoadModel", "Free"])
def test_model_change_during_generation_fails_cleanly(server, tiny_model, tiny_model_b, action):
    server.load(tiny_model)
    expected_b = None
    errors = []

    def long_stream():
        try:
            list(server.stub.PredictStream(backend_pb2.PredictOptions(
                Prompt="Hello", Tokens=2000, IgnoreEOS=True), timeout=60))
        except grpc.RpcError as err:
            errors.append(err)

    worker = threading.Thread(target=long_stream)
    worker.start()
    time.sleep(0.5)
    if action == "LoadModel":
        server.load(tiny_model_b)
    else:
        assert server.stub.Free(H).success
    worker.join(timeout=30)
    assert len(errors) == 1
    assert errors[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    if action == "Free":
        server.load(tiny_model_b)
    expected_b = predict(server.stub, "The quick brown fox", Tokens=8, IgnoreEOS=True).message
    server.load(tiny_model_b, options=["prompt_cache:false"])
    assert predict(server.stub, "The quick brown fox", Tokens=8,
                   IgnoreEOS=True).message == expected_b


def test_grammar_beside_normal_requests(loaded):
    """A constrained request in the batch leaves its neighbours' text alone,
    and IgnoreEOS past the grammar's end neither crashes nor breaks it."""
    alone = predict(loaded.stub, "Hello world", Tokens=40, IgnoreEOS=True).message
    beside = []

    def normal():
        beside.append(predict(loaded.stub, "Hello world", Tokens=40, IgnoreEOS=True).message)

    worker = threading.Thread(target=normal)
    worker.start()
    reply = loaded.stub.Predict(backend_pb2.PredictOptions(
        Prompt="Answer:", Grammar='root ::= "yes" | "no"', Tokens=20, IgnoreEOS=True),
        timeout=60)
    worker.join()
    assert beside == [alone]
    assert reply.message.decode().startswith(("yes", "no"))
    still_serving(loaded)


def test_auth_token_required(server_factory, tiny_model):
    server = server_factory(env={"LOCALAI_GRPC_AUTH_TOKEN": "s3cret"})
    code, _ = status_code(lambda: server.stub.Health(H, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = status_code(lambda: server.stub.Predict(
        backend_pb2.PredictOptions(Prompt="hi"), timeout=5,
        metadata=[("authorization", "Bearer wrong")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    good = [("authorization", "Bearer s3cret")]
    assert server.stub.Health(H, timeout=5, metadata=good).message == b"OK"
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(tiny_model)),
                                   metadata=good)
    assert result.success
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(server.channel)
    code, _ = status_code(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5,
                        metadata=good).status == health_pb2.HealthCheckResponse.SERVING
    server.stop()


def test_sigterm_lets_a_running_stream_finish(server_factory, tiny_model):
    server = server_factory()
    server.load(tiny_model)
    call = server.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt="Hello", Tokens=200, IgnoreEOS=True), timeout=60)
    next(call)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(call)
    assert rest[-1].tokens == 200
    assert server.proc.wait(timeout=30) == 0
    code, _ = status_code(lambda: server.stub.Health(H, timeout=2))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_exits_when_parent_dies(tmp_path):
    """LocalAI starts run.sh; if LocalAI dies, the backend must not linger."""
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time;"
         f"p = subprocess.Popen([{str(ROOT / 'run.sh')!r}, '--addr', '127.0.0.1:{port}']);"
         "print(p.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    stub = backend_pb2_grpc.BackendStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.time() + 60
    while status_code(lambda: stub.Health(H, timeout=1))[0] != grpc.StatusCode.OK:
        assert time.time() < deadline
        time.sleep(0.2)
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while True:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        # A zombie is reaped by init; check its state.
        try:
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        assert time.time() < deadline, "backend outlived its parent"
        time.sleep(0.2)


def test_message_size_limit(server_factory):
    server = server_factory(args=("--max-message-mb", "1"))
    code, details = status_code(lambda: server.stub.Predict(
        backend_pb2.PredictOptions(Prompt="x" * (2 * 2**20)), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert server.stub.Health(H, timeout=5).message == b"OK"
    server.stop()
