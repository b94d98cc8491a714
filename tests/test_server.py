"""Mechanics of the gRPC server on the tiny random-weight model."""

import threading
import time

import grpc
import pytest

import backend_pb2
from conftest import predict, stream

H = backend_pb2.HealthMessage()


def code_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value.code(), info.value.details()


def metrics(stub):
    return stub.GetMetrics(backend_pb2.MetricsRequest())


def test_before_load(server):
    assert server.stub.Health(H).message == b"OK"
    assert server.stub.Status(H).state == backend_pb2.StatusResponse.UNINITIALIZED
    code, details = code_of(server.stub.Predict, backend_pb2.PredictOptions(Prompt="hi"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "LoadModel" in details


def test_load_failures_are_reported(server, tmp_path):
    missing = tmp_path / "nope"
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(missing)))
    assert not result.success and str(missing) in result.message
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(corrupt)))
    assert not result.success and str(corrupt) in result.message
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"hello world")
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(not_gguf)))
    assert not result.success and "not a GGUF" in result.message
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    result = server.stub.LoadModel(backend_pb2.ModelOptions(Model=str(empty_dir)))
    assert not result.success and "config.json" in result.message
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(empty_dir), Options=["max_batch_size:lots"]))
    assert not result.success and "max_batch_size" in result.message
    assert server.stub.Health(H).message == b"OK"
    assert server.stub.Status(H).state == backend_pb2.StatusResponse.ERROR


def test_load_resolves_relative_to_model_path(server, tiny_model):
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=tiny_model.name, ModelPath=str(tiny_model.parent)))
    assert result.success, result.message
    assert str(tiny_model) in result.message
    # ModelFile wins when it exists.
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model="whatever-name", ModelFile=str(tiny_model)))
    assert result.success, result.message
    assert server.stub.Status(H).state == backend_pb2.StatusResponse.READY


@pytest.fixture
def loaded(server, tiny_model):
    server.load(tiny_model)
    return server


def test_predict_usage_and_stream_agree(loaded):
    whole = predict(loaded.stub, "The quick brown fox", Tokens=24, IgnoreEOS=True)
    assert whole.tokens == 24
    assert whole.prompt_tokens > 0
    assert whole.timing_prompt_processing > 0 and whole.timing_token_generation > 0
    chunks = stream(loaded.stub, "The quick brown fox", Tokens=24, IgnoreEOS=True)
    final = chunks[-1]
    assert final.message == b""
    assert final.tokens == 24 and final.prompt_tokens == whole.prompt_tokens
    assert final.timing_prompt_processing > 0
    assert b"".join(c.message for c in chunks) == whole.message
    assert len(chunks) > 2


def test_same_request_twice_is_served_from_cache(loaded):
    prompt = "Paris is the capital of France. Berlin is"
    first = predict(loaded.stub, prompt, Tokens=16)
    assert metrics(loaded.stub).prompt_tokens_processed == first.prompt_tokens
    second = predict(loaded.stub, prompt, Tokens=16)
    assert second.message == first.message
    assert metrics(loaded.stub).prompt_tokens_processed == 1  # only the last token re-fed


def test_second_chat_turn_reuses_first(loaded):
    turn1 = [("system", "You are terse."), ("user", "Hello world! How are you today?")]
    answer = predict(loaded.stub, messages=turn1, Tokens=12, IgnoreEOS=True)
    turn2 = turn1 + [("assistant", answer.message.decode()), ("user", "And tomorrow?")]
    warm = predict(loaded.stub, messages=turn2, Tokens=12, IgnoreEOS=True)
    processed = metrics(loaded.stub).prompt_tokens_processed
    assert processed < warm.prompt_tokens / 2, (processed, warm.prompt_tokens)


def test_chat_template_and_tokenize(loaded):
    msgs = [backend_pb2.Message(role="user", content="Hello")]
    tokens = loaded.stub.TokenizeString(backend_pb2.PredictOptions(
        Messages=msgs, UseTokenizerTemplate=True))
    text = loaded.stub.Detokenize(backend_pb2.DetokenizeRequest(tokens=tokens.tokens)).content
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tokens.length == len(tokens.tokens)
    raw = loaded.stub.TokenizeString(backend_pb2.PredictOptions(Prompt="Hello world"))
    assert loaded.stub.Detokenize(
        backend_pb2.DetokenizeRequest(tokens=raw.tokens)).content == "Hello world"


def test_stop_string_cuts_text_and_never_leaks(loaded):
    prompt = "Numbers: 0 1 2 3"
    free_run = predict(loaded.stub, prompt, Tokens=40, IgnoreEOS=True).message.decode()
    assert len(free_run) > 12
    stop = free_run[6:10]
    cut = free_run[:free_run.find(stop)]
    whole = predict(loaded.stub, prompt, Tokens=40, IgnoreEOS=True, StopPrompts=[stop])
    assert whole.message.decode() == cut
    chunks = stream(loaded.stub, prompt, Tokens=40, IgnoreEOS=True, StopPrompts=[stop])
    assert b"".join(c.message for c in chunks).decode() == cut
    assert whole.tokens < 40


def test_health_answers_during_long_generation(loaded):
    done = threading.Event()

    def long_run():  # long enough to be seen busy however fast decoding gets
        predict(loaded.stub, "Hello", Tokens=1500, IgnoreEOS=True)
        done.set()

    worker = threading.Thread(target=long_run)
    worker.start()
    time.sleep(0.05)
    latencies = []
    saw_busy = False
    while not done.is_set():
        t0 = time.perf_counter()
        loaded.stub.Health(H, timeout=5)
        latencies.append(time.perf_counter() - t0)
        saw_busy |= loaded.stub.Status(H).state == backend_pb2.StatusResponse.BUSY
        time.sleep(0.02)
    worker.join()
    assert saw_busy
    assert max(latencies) < 1.0


def test_concurrent_requests_match_solo(loaded, tiny_model):
    prompts = ["Hello world", "The quick brown fox jumps", "def main():", "Paris is",
               "Numbers: 0 1 2", "Unicode: caf\u00e9", '{"name":', "Berlin"]
    lengths = [8, 20, 12, 16, 24, 10, 14, 18]
    solo = [predict(loaded.stub, p, Tokens=n, IgnoreEOS=True).message
            for p, n in zip(prompts, lengths)]
    loaded.load(tiny_model)  # fresh cache: the batch runs cold
    results = [None] * len(prompts)

    def run(i):
        results[i] = predict(loaded.stub, prompts[i], Tokens=lengths[i], IgnoreEOS=True).message

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_cancelled_stream_frees_its_slot(loaded):
    baseline = predict(loaded.stub, "The quick brown fox", Tokens=30, IgnoreEOS=True).message
    call = loaded.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt="Hello world! How are you", Tokens=2000, IgnoreEOS=True))
    got = 0
    for _ in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    deadline = time.time() + 10
    while loaded.stub.Status(H).state == backend_pb2.StatusResponse.BUSY:
        assert time.time() < deadline, "engine still busy after cancel"
        time.sleep(0.05)
    again = predict(loaded.stub, "The quick brown fox", Tokens=30, IgnoreEOS=True).message
    assert again == baseline


def test_free_unloads(loaded):
    result = loaded.stub.Free(H)
    assert result.success
    assert loaded.stub.Status(H).state == backend_pb2.StatusResponse.UNINITIALIZED
    code, _ = code_of(loaded.stub.Predict, backend_pb2.PredictOptions(Prompt="hi"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(loaded.stub.TokenizeString, backend_pb2.PredictOptions(Prompt="hi"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


BAD_REQUESTS = [
    ("empty prompt", dict(), "empty request"),
    ("negative tokens", dict(Prompt="hi", Tokens=-1), "Tokens"),
    ("top_p above 1", dict(Prompt="hi", TopP=1.5), "TopP"),
    ("negative temperature", dict(Prompt="hi", Temperature=-0.5), "Temperature"),
    ("nan temperature", dict(Prompt="hi", Temperature=float("nan")), "Temperature"),
    ("bad tools json", dict(Prompt="hi", Tools="[{not json"), "Tools"),
    ("bad logit bias", dict(Prompt="hi", LogitBias="{\"x\": 1}"), "LogitBias"),
    ("logit bias out of vocab", dict(Prompt="hi", LogitBias="{\"99999999\": 1}"), "LogitBias"),
    ("too many top logprobs", dict(Prompt="hi", TopLogprobs=50), "TopLogprobs"),
]


@pytest.mark.parametrize("name,fields,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument(loaded, name, fields, needle):
    for rpc in (loaded.stub.Predict, loaded.stub.PredictStream):
        code, details = code_of(rpc, backend_pb2.PredictOptions(**fields), timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
        assert needle in details
    assert predict(loaded.stub, "hi", Tokens=2).tokens >= 1


def test_prompt_longer_than_context(server, tiny_model):
    server.load(tiny_model, options=["context_size:32"])
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    code, details = code_of(server.stub.Predict, backend_pb2.PredictOptions(Prompt=long_prompt))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "32" in details and "prompt is" in details
    code, details = code_of(server.stub.Predict,
                            backend_pb2.PredictOptions(Prompt="Hello", Tokens=500))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in details


def test_model_identity_mismatch(loaded, tiny_model):
    code, details = code_of(loaded.stub.Predict, backend_pb2.PredictOptions(
        Prompt="hi", ModelIdentity="some-other-model"))
    assert code == grpc.StatusCode.NOT_FOUND and "model identity mismatch" in details
    ok = predict(loaded.stub, "hi", Tokens=2, ModelIdentity=str(tiny_model))
    assert ok.tokens >= 1


def test_context_overflow_truncates_oldest_turns(server, tiny_model):
    server.load(tiny_model, options=["context_size:96", "context_overflow:truncate"])
    turns = [("system", "Be brief.")]
    for i in range(12):
        turns += [("user", f"Question number {i} about the quick brown fox?"),
                  ("assistant", f"Answer {i}: the lazy dog.")]
    turns.append(("user", "Last question?"))
    reply = predict(server.stub, messages=turns, Tokens=16, IgnoreEOS=True)
    assert reply.tokens == 16
    assert reply.prompt_tokens <= 96 - 16
    raw = predict(server.stub, "The quick brown fox jumps over the lazy dog. " * 20,
                  Tokens=8, IgnoreEOS=True)
    assert raw.prompt_tokens == 96 - 8 and raw.tokens == 8


def test_bad_option_keeps_the_loaded_model(server, tiny_model):
    server.load(tiny_model)
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(tiny_model), Options=["top_p:2"]))
    assert not result.success and "top_p" in result.message
    assert server.stub.Status(H).state == backend_pb2.StatusResponse.READY
    assert predict(server.stub, "Hello", Tokens=2, IgnoreEOS=True).tokens == 2
