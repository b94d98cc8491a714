"""Property tests: no LoadModel option value and no PredictOptions content
hangs the server, kills the engine or answers INTERNAL/UNKNOWN; after each,
a greedy request still returns its known answer."""

import dataclasses
import json
import string

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backend_pb2
from conftest import predict
from mlx_backend.options import ModelSettings

H = backend_pb2.HealthMessage()
SERVED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
KEYS = [f.name for f in dataclasses.fields(ModelSettings)] + [
    "cache_size", "batch_size", "Seed", "top-p", "no_such_option"]
NUMBERS = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["-1", "0", "1", "2", "0.5", "-0.5", "1e-300", "1e300", "1e400",
                     "nan", "inf", "-inf", "4294967295", "18446744073709551616"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
VALUES = st.one_of(NUMBERS, st.sampled_from(["true", "false", "", "512MB", "2GiB", "1.5g",
                                              "tensor", "truncate", "error", "x:y"]),
                   st.text(alphabet=string.printable, max_size=12))
OPTION = st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}:{kv[1]}")
QUICK = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])


@pytest.fixture(scope="module")
def known(server, tiny_model):
    server.load(tiny_model)
    return predict(server.stub, "The quick brown fox", Tokens=8, IgnoreEOS=True).message


def status_of(fn):
    try:
        return grpc.StatusCode.OK, fn()
    except grpc.RpcError as err:
        return err.code(), err.details()


def assert_known_answer(server, tiny_model, known):
    assert server.stub.Health(H, timeout=10).message == b"OK"
    server.load(tiny_model)
    assert predict(server.stub, "The quick brown fox", Tokens=8, IgnoreEOS=True).message == known


@settings(max_examples=40, **QUICK)
@given(options=st.lists(OPTION, min_size=1, max_size=3))
def test_any_load_options(server, tiny_model, known, options):
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(tiny_model), Options=options), timeout=120)
    if not result.success:
        assert result.message and "internal" not in result.message.lower(), result.message
    else:
        code, details = status_of(lambda: predict(
            server.stub, "The quick brown fox", Tokens=8, IgnoreEOS=True))
        assert code in SERVED, details
    assert_known_answer(server, tiny_model, known)


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12).map(json.dumps)
DEEP = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
JSON_TEXT = st.one_of(JSON, DEEP, st.text(max_size=20))
GRAMMARS = st.sampled_from(["", 'root ::= "yes" | "no"', "root ::= [a-z]+", "root ::= (",
                            '{"type": "object"}', '{"type": "string", "maxLength": 3}',
                            '{"type": 5}', "%llguidance {}\nstart: /[0-9]+/"])


@settings(max_examples=40, **QUICK)
@given(tools=JSON_TEXT, bias=JSON_TEXT, kwargs=JSON_TEXT, tool_calls=JSON_TEXT,
       grammar=GRAMMARS, tool_choice=JSON_TEXT, n_draft=st.integers(-5, 5),
       seed=st.integers(-2**31, 2**31 - 1), temperature=st.floats(0, 1e-30) | st.just(0.7),
       top_logprobs=st.integers(0, 20))
def test_any_json_fields(server, tiny_model, known, tools, bias, kwargs, tool_calls, grammar,
                         tool_choice, n_draft, seed, temperature, top_logprobs):
    messages = [backend_pb2.Message(role="user", content="hi"),
                backend_pb2.Message(role="assistant", content="", tool_calls=tool_calls)]
    request = backend_pb2.PredictOptions(
        Messages=messages, UseTokenizerTemplate=True, Tools=tools, LogitBias=bias,
        Metadata={"chat_template_kwargs": kwargs}, Grammar=grammar, ToolChoice=tool_choice,
        NDraft=n_draft, Seed=seed, Temperature=temperature, Tokens=6,
        Logprobs=top_logprobs, TopLogprobs=top_logprobs)
    code, reply = status_of(lambda: server.stub.Predict(request, timeout=60))
    assert code in SERVED, reply
    if code == grpc.StatusCode.OK:
        if reply.logprobs:
            json.loads(reply.logprobs, parse_constant=pytest.fail)  # strict JSON only
    assert predict(server.stub, "The quick brown fox", Tokens=8, IgnoreEOS=True).message == known
