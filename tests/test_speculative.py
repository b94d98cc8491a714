"""Speculative decoding with DraftModel: token-identical to decoding without a
draft, alone and batched, with NDraft honoured and neighbours untouched."""

import json
import threading

import grpc
import pytest

import backend_pb2
from conftest import predict
from tiny_model import build_tiny_model

H = backend_pb2.HealthMessage()
PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Paris is the capital"]


def greedy(stub, prompt, n=48, **fields):
    return predict(stub, prompt, Tokens=n, IgnoreEOS=True, **fields).message


def draft_counts(stub):
    metrics = json.loads(stub.GetMetrics(backend_pb2.MetricsRequest()).prompt_json_for_slot)
    return metrics["speculative"]["last_request"]


def first_alone_then_others(server, n):
    """The first prompt streams alone (so it speculates); the others arrive
    once it has started, and it joins their batch. Every text, by prompt."""
    results, started = {}, threading.Event()

    def first():
        text = b""
        for reply in server.stub.PredictStream(backend_pb2.PredictOptions(
                Prompt=PROMPTS[0], Tokens=n, IgnoreEOS=True), timeout=120):
            text += reply.message
            started.set()
        results[PROMPTS[0]] = text

    def other(prompt):
        results[prompt] = greedy(server.stub, prompt, n)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert started.wait(60)
    threads += [threading.Thread(target=other, args=(p,)) for p in PROMPTS[1:]]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def plain(server, tiny_model):
    server.load(tiny_model)
    return {p: greedy(server.stub, p) for p in PROMPTS}


@pytest.mark.parametrize("draft", ["same", "other"])
def test_greedy_output_equals_output_without_a_draft(server, tiny_model, tiny_model_b, plain,
                                                     draft):
    draft_model = tiny_model if draft == "same" else tiny_model_b
    server.load(tiny_model, DraftModel=str(draft_model), options=["prompt_cache:false"])
    for prompt in PROMPTS:
        assert greedy(server.stub, prompt) == plain[prompt]
        counts = draft_counts(server.stub)
        assert 0 < counts["drafted"] and counts["accepted"] <= counts["drafted"]
        if draft == "same":  # a draft equal to the model is always right
            assert counts["accepted"] >= counts["drafted"] - 3
    breakdown = server.stub.Status(H).memory.breakdown
    assert breakdown["draft_weights"] > 0


def test_with_the_prompt_cache_and_sampling_fallback(server, tiny_model, tiny_model_b, plain):
    server.load(tiny_model, DraftModel=str(tiny_model_b))
    for _ in range(2):  # the second run starts from cached KV state
        assert greedy(server.stub, PROMPTS[1]) == plain[PROMPTS[1]]
    sampled = predict(server.stub, PROMPTS[0], Tokens=16, Temperature=0.8, Seed=3)
    assert draft_counts(server.stub)["drafted"] == 0  # sampling decodes plainly
    server.load(tiny_model)
    assert predict(server.stub, PROMPTS[0], Tokens=16, Temperature=0.8,
                   Seed=3).message == sampled.message


def test_ndraft_per_request(server, tiny_model, plain):
    server.load(tiny_model, DraftModel=str(tiny_model), options=["num_draft_tokens:2"])
    assert greedy(server.stub, PROMPTS[2], NDraft=-1) == plain[PROMPTS[2]]
    assert draft_counts(server.stub)["drafted"] == 0
    assert greedy(server.stub, PROMPTS[2], NDraft=5) == plain[PROMPTS[2]]
    assert draft_counts(server.stub)["drafted"] % 5 == 0
    assert greedy(server.stub, PROMPTS[2]) == plain[PROMPTS[2]]
    assert draft_counts(server.stub)["drafted"] % 2 == 0


def test_batched_streams_join_the_batch_and_keep_their_tokens(server, tiny_model,
                                                              tiny_model_b, plain):
    """The first request speculates alone; the others arrive mid-way, it joins
    the batch, and everyone gets exactly the tokens of a plain run."""
    server.load(tiny_model, options=["prompt_cache:false"])
    long_plain = {p: greedy(server.stub, p, 300) for p in PROMPTS}
    server.load(tiny_model, DraftModel=str(tiny_model_b), options=["prompt_cache:false"])
    joins = server.log_text().count("joins the batch")
    assert first_alone_then_others(server, 300) == long_plain
    assert server.log_text().count("joins the batch") == joins + 1


def test_cancellation_mid_draft_leaves_neighbours_alone(server, tiny_model, plain):
    server.load(tiny_model, DraftModel=str(tiny_model), options=["prompt_cache:false"])
    call = server.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt=PROMPTS[3], Tokens=500, IgnoreEOS=True), timeout=60)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError):
        list(call)
    assert [greedy(server.stub, p) for p in PROMPTS] == [plain[p] for p in PROMPTS]
    assert server.stub.Health(H).message == b"OK"


def test_a_draft_with_another_vocabulary_fails_load(server, tiny_model, tmp_path):
    other = build_tiny_model(tmp_path / "markers", markers=True)
    server.load(tiny_model)
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(tiny_model), DraftModel=str(other)), timeout=120)
    assert not result.success and "vocabulary" in result.message


def test_prompt_lookup_drafts_are_exact_and_accepted_on_repeats(server, tiny_model, plain):
    server.load(tiny_model, options=["prompt_lookup:true", "prompt_cache:false"])
    for prompt in PROMPTS:
        assert greedy(server.stub, prompt) == plain[prompt]
    # The random model repeats itself: copies of earlier spans are drafted and kept.
    repeat = "red fox blue dog " * 12
    server.load(tiny_model, options=["prompt_cache:false"])
    expected = greedy(server.stub, repeat, 64)
    server.load(tiny_model, options=["prompt_lookup:true", "prompt_cache:false"])
    assert greedy(server.stub, repeat, 64) == expected
    counts = draft_counts(server.stub)
    assert 0 < counts["accepted"] <= counts["drafted"]
    assert server.stub.Status(H).memory.breakdown["draft_weights"] == 0


def test_prompt_lookup_and_a_draft_model_are_exclusive(server, tiny_model):
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(tiny_model), DraftModel=str(tiny_model), Options=["prompt_lookup:true"]),
        timeout=60)
    assert not result.success and "choose one" in result.message


def test_with_a_quantized_kv_cache(server, tmp_path):
    """Speculation, joining the batch and the prompt cache with 8-bit KV."""
    wide = build_tiny_model(tmp_path / "wide", hidden_size=256)  # head dim 64
    server.load(wide, options=["kv_bits:8"])
    plain = {p: greedy(server.stub, p, 200) for p in PROMPTS}
    server.load(wide, options=["kv_bits:8", "prompt_lookup:true"])
    joins = server.log_text().count("joins the batch")
    assert first_alone_then_others(server, 200) == plain
    assert server.log_text().count("joins the batch") == joins + 1
    assert [greedy(server.stub, p, 200) for p in PROMPTS] == [plain[p] for p in PROMPTS]
