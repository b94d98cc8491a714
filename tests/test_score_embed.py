"""Score and Embedding against values computed directly with mlx-lm in the test."""

import grpc
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import backend_pb2


@pytest.fixture(scope="module")
def reference(tiny_model):
    return mlx_lm.load(str(tiny_model))


@pytest.fixture
def loaded(server, tiny_model):
    server.load(tiny_model)
    return server


def reference_logprob(model, prompt_ids, cand_ids):
    ids = prompt_ids + cand_ids
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    positions = range(len(prompt_ids) - 1, len(ids) - 1)
    return [logprobs[p, ids[p + 1]].item() for p in positions]


def test_score_matches_direct_forward_pass(loaded, reference):
    model, tokenizer = reference
    prompt = "Paris is the capital of"
    candidates = [" France.", " Germany", " the lazy dog"]
    reply = loaded.stub.Score(backend_pb2.ScoreRequest(
        prompt=prompt, candidates=candidates, include_token_logprobs=True,
        length_normalize=True))
    assert len(reply.candidates) == 3
    p_ids = tokenizer.encode(prompt)
    for cand, got in zip(candidates, reply.candidates):
        c_ids = tokenizer.encode(prompt + cand)[len(p_ids):]
        expected = reference_logprob(model, p_ids, c_ids)
        assert got.num_tokens == len(c_ids)
        assert got.log_prob == pytest.approx(sum(expected), abs=1e-3)
        assert got.length_normalized_log_prob == pytest.approx(sum(expected) / len(c_ids),
                                                               abs=1e-3)
        assert [t.log_prob for t in got.tokens] == pytest.approx(expected, abs=1e-3)
    # The second call reuses the prompt's KV state and gives the same numbers.
    again = loaded.stub.Score(backend_pb2.ScoreRequest(prompt=prompt, candidates=candidates))
    assert [c.log_prob for c in again.candidates] == pytest.approx(
        [c.log_prob for c in reply.candidates], abs=1e-4)


def test_score_bad_input(loaded):
    for req in (backend_pb2.ScoreRequest(prompt="hi"),
                backend_pb2.ScoreRequest(prompt="hi", candidates=[""])):
        with pytest.raises(grpc.RpcError) as info:
            loaded.stub.Score(req)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_embedding_is_normalised_mean_of_hidden_states(loaded, reference):
    model, tokenizer = reference
    text = "The quick brown fox"
    reply = loaded.stub.Embedding(backend_pb2.PredictOptions(Embeddings=text))
    ids = tokenizer.encode(text)
    hidden = np.array(model.model(mx.array([ids]))[0].astype(mx.float32))
    expected = hidden.mean(axis=0)
    expected /= np.linalg.norm(expected)
    assert reply.dim == len(expected) and reply.prompt_tokens == len(ids)
    assert np.allclose(np.array(reply.embeddings), expected, atol=1e-4)
    assert reply.layout == backend_pb2.EmbeddingResult.EMBEDDING_LAYOUT_FINAL


def test_score_and_embedding_are_bounded(server, tiny_model):
    server.load(tiny_model, options=["max_kv_size:64"])
    too_many = backend_pb2.ScoreRequest(prompt="hi", candidates=["a"] * 300)
    too_long = backend_pb2.ScoreRequest(prompt="hi", candidates=["word " * 80])
    past_window = backend_pb2.PredictOptions(Embeddings="word " * 80)
    for call, request, words in ((server.stub.Score, too_many, "at most 256 candidates"),
                                 (server.stub.Score, too_long, "max_kv_size"),
                                 (server.stub.Embedding, past_window, "max_kv_size")):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in info.value.details()
    server.load(tiny_model)
    huge = backend_pb2.ScoreRequest(prompt="hi", candidates=["word " * 300] * 256)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Score(huge, timeout=30)
    assert "split the request" in info.value.details()


def test_a_cancelled_score_stops_occupying_the_engine(loaded):
    import time

    request = backend_pb2.ScoreRequest(prompt="word " * 200, candidates=["word " * 150] * 200)
    started = time.perf_counter()
    loaded.stub.Score(request, timeout=300)
    full = time.perf_counter() - started
    assert full > 1.0  # long enough to tell a stopped call from a finished one
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        loaded.stub.Score(request, timeout=full / 10)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    reply = loaded.stub.Predict(backend_pb2.PredictOptions(Prompt="Hello", Tokens=2),
                                timeout=60)
    assert reply.tokens >= 1
    assert time.perf_counter() - started < full / 2
