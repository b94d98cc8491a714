"""Fault injection against the real server: a fault at any stage of one
request fails that request alone, its batch neighbours get their solo tokens,
and the server then serves a normal request. A dead or wedged engine thread
makes Health say so, and SIGTERM still ends the process.

The hook is test-only: `MLX_BACKEND_FAULT_INJECTION=1` makes a request whose
CorrelationId is `fault:STAGE` raise at that stage (mlx_backend/faults.py).
"""

import signal
import threading
import time

import grpc
import pytest

import backend_pb2
from conftest import predict
from mlx_backend.faults import REQUEST_STAGES

H = backend_pb2.HealthMessage()
INJECT = {"MLX_BACKEND_FAULT_INJECTION": "1"}
NEIGHBOURS = ["Hello world", "The quick brown fox", "def main():"]
NEIGHBOUR_TOKENS = 300


def stream_text(stub, prompt, started: threading.Event, out: dict, tokens: int):
    """Run one stream to its end; record its text or its status code."""
    text = b""
    try:
        for reply in stub.PredictStream(backend_pb2.PredictOptions(
                Prompt=prompt, Tokens=tokens, IgnoreEOS=True), timeout=120):
            text += reply.message
            started.set()
        out[prompt] = text
    except grpc.RpcError as err:
        out[prompt] = err.code()
    finally:
        started.set()


def start_neighbours(stub, tokens=NEIGHBOUR_TOKENS):
    results, threads = {}, []
    for prompt in NEIGHBOURS:
        started = threading.Event()
        thread = threading.Thread(target=stream_text,
                                  args=(stub, prompt, started, results, tokens))
        thread.start()
        assert started.wait(60)
        threads.append(thread)
    return results, threads


@pytest.fixture(scope="module")
def faulty(server_factory, tiny_model):
    server = server_factory(env=INJECT)
    server.load(tiny_model)
    solo = {p: predict(server.stub, p, Tokens=NEIGHBOUR_TOKENS, IgnoreEOS=True).message
            for p in NEIGHBOURS}
    known = predict(server.stub, "Paris is", Tokens=8, IgnoreEOS=True).message
    return server, solo, known


@pytest.mark.parametrize("stage", REQUEST_STAGES)
def test_a_fault_fails_only_its_request(faulty, stage):
    server, solo, known = faulty
    results, threads = start_neighbours(server.stub)
    request = backend_pb2.PredictOptions(
        Prompt="Paris is", Tokens=12, IgnoreEOS=True, CorrelationId=f"fault:{stage}",
        Logprobs=1, TopLogprobs=2)
    if stage == "cancel":
        call = server.stub.PredictStream(request, timeout=60)
        next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    else:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Predict(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert f"injected fault at stage '{stage}'" in info.value.details()
    for thread in threads:
        thread.join(120)
    assert results == solo  # every neighbour got exactly its solo text
    deadline = time.time() + 10
    while f"injected fault at stage '{stage}'" not in server.log_text():
        assert time.time() < deadline, "the fault never fired"
        time.sleep(0.1)
    assert server.stub.Health(H, timeout=5).message == b"OK"
    assert predict(server.stub, "Paris is", Tokens=8, IgnoreEOS=True).message == known


def health_code(server):
    try:
        server.stub.Health(H, timeout=2)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def grpc_health(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status


def assert_unhealthy_within(server, seconds):
    from grpc_health.v1 import health_pb2

    deadline = time.time() + seconds
    while health_code(server) == grpc.StatusCode.OK:
        assert time.time() < deadline, "Health still says OK"
        time.sleep(0.1)
    assert health_code(server) == grpc.StatusCode.UNAVAILABLE
    assert grpc_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.stub.Status(H, timeout=2).state == backend_pb2.StatusResponse.ERROR


def assert_sigterm_ends(server, seconds=20):
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=seconds)


@pytest.mark.parametrize("stage,options", [("engine_thread", []), ("hang", ["step_timeout:2"])])
def test_a_dead_or_wedged_engine_is_reported(server_factory, tiny_model, stage, options):
    server = server_factory(env=INJECT)
    server.load(tiny_model, options=options)
    results, threads = start_neighbours(server.stub, tokens=2000)
    started = time.time()
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(backend_pb2.PredictOptions(
            Prompt="Paris is", Tokens=12, CorrelationId=f"fault:{stage}"), timeout=60)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.time() - started < 10
    assert_unhealthy_within(server, 5)
    for thread in threads:
        thread.join(30)
    assert set(results.values()) == {grpc.StatusCode.UNAVAILABLE}
    # New work is refused at once, not queued behind a dead engine.
    with pytest.raises(grpc.RpcError) as info:
        predict(server.stub, "Hello", Tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(tiny_model)), timeout=10)
    assert not result.success and "engine failed" in result.message
    assert_sigterm_ends(server)


def load_in_background(server, options):
    def load():
        try:
            server.stub.LoadModel(backend_pb2.ModelOptions(Model="unused", Options=options),
                                  timeout=120)
        except grpc.RpcError:
            pass  # the server goes away under it: that is the point
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while "fault" not in server.log_text() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return thread


def test_a_second_sigterm_ends_a_stuck_load(server_factory):
    server = server_factory(env=INJECT, args=("--grace", "60"))
    load_in_background(server, ["fault:hang"])
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert server.proc.poll() is None  # still waiting for the load, within its grace
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=5)


def test_the_grace_bounds_exit_during_a_stuck_load(server_factory):
    server = server_factory(env=INJECT, args=("--grace", "1"))
    load_in_background(server, ["fault:hang"])
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    assert time.time() - started < 8


def test_a_failing_load_keeps_the_engine_serving(server_factory, tiny_model):
    server = server_factory(env=INJECT)
    server.load(tiny_model)
    known = predict(server.stub, "Paris is", Tokens=8, IgnoreEOS=True).message
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(tiny_model), Options=["fault:load"]), timeout=60)
    assert not result.success and "injected fault" in result.message
    assert server.stub.Health(H, timeout=5).message == b"OK"
    server.load(tiny_model)
    assert predict(server.stub, "Paris is", Tokens=8, IgnoreEOS=True).message == known
