"""Quality on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""

import json

import pytest

import backend_pb2
from conftest import default_model_path, predict


@pytest.fixture(scope="module")
def loaded(server):
    server.load(default_model_path())
    return server


def test_answers_paris_and_stops_at_end_of_turn(loaded):
    reply = predict(loaded.stub, messages=[("user", "What is the capital of France?")],
                    Tokens=64)
    text = reply.message.decode()
    assert "Paris" in text
    assert reply.tokens < 64  # ended at <|im_end|>, not at the token budget
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_stream_never_leaks_a_stop_word(loaded):
    question = "Tell me about the Eiffel Tower in two sentences."
    whole = predict(loaded.stub, messages=[("user", question)], Tokens=48).message.decode()
    assert len(whole) > 40
    stop = whole[len(whole) // 2:len(whole) // 2 + 5]  # likely spans token boundaries
    expected = whole[:whole.find(stop)]
    chunks = list(loaded.stub.PredictStream(backend_pb2.PredictOptions(
        Messages=[backend_pb2.Message(role="user", content=question)],
        UseTokenizerTemplate=True, Tokens=48, StopPrompts=[stop])))
    # The concatenation ends exactly before the stop string: any chunk that had
    # carried part of it would show up here.
    assert b"".join(c.message for c in chunks).decode() == expected
    assert chunks[-1].tokens < 48


def test_json_schema_grammar_gives_valid_json(loaded):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 30},
                             "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = predict(loaded.stub, messages=[("user", "Name a city and its country as JSON.")],
                    Tokens=80, Grammar=json.dumps(schema))
    value = json.loads(reply.message)
    jsonschema.validate(value, schema)


def test_greedy_logprobs_are_the_maxima(loaded):
    reply = predict(loaded.stub, messages=[("user", "Say hello.")], Tokens=12,
                    Logprobs=1, TopLogprobs=3)
    content = json.loads(reply.logprobs)["content"]
    assert len(content) == reply.tokens
    for entry in content:
        assert entry["id"] == entry["top_logprobs"][0]["id"]
        assert entry["logprob"] == pytest.approx(max(t["logprob"] for t in entry["top_logprobs"]))


def test_score_prefers_paris(loaded):
    reply = loaded.stub.Score(backend_pb2.ScoreRequest(
        prompt="The capital of France is", candidates=[" Paris", " London"]))
    paris, london = reply.candidates
    assert paris.log_prob > london.log_prob


def test_speculative_decoding_is_token_identical(server):
    """The default model as its own draft: every draft is right, and the
    answer is exactly the one decoded without a draft."""
    questions = ["What is the capital of France?", "Name three colours."]
    server.load(default_model_path(), options=["prompt_cache:false"])
    plain = [predict(server.stub, messages=[("user", q)], Tokens=24).message
             for q in questions]
    server.load(default_model_path(), options=["prompt_cache:false"],
                DraftModel=str(default_model_path()))
    assert [predict(server.stub, messages=[("user", q)], Tokens=24).message
            for q in questions] == plain
    counts = json.loads(server.stub.GetMetrics(backend_pb2.MetricsRequest())
                        .prompt_json_for_slot)["speculative"]["total"]
    assert counts["drafted"] > 0 and counts["accepted"] >= counts["drafted"] - 6
    server.load(default_model_path())
