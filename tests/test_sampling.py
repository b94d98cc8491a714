"""Every sampling control is honoured exactly: the server's tokens are compared
with a reference decoder written here from the same weights and mlx-lm's own
processors and filters."""

import json
import threading

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

import backend_pb2
from conftest import predict

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def reference(tiny_model):
    return mlx_lm.load(str(tiny_model))


@pytest.fixture(scope="module")
def loaded(server, tiny_model):
    server.load(tiny_model)
    return server


def reference_generate(reference, prompt, n, processors=(), temperature=0.0, seed=None,
                       filters=()):
    """Greedy or seeded sampling, one full forward pass per token."""
    model, tokenizer = reference
    tokens = tokenizer.encode(prompt)
    out = []
    key = mx.random.key(seed) if seed is not None else None
    for _ in range(n):
        logits = model(mx.array([tokens + out]))[:, -1, :]
        for processor in processors:
            logits = processor(mx.array(tokens + out), logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if temperature == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            for f in filters:
                logprobs = f(logprobs)
            key, step = mx.random.split(key)
            token = mx.random.categorical(logprobs * (1 / temperature), key=step)
        out.append(token.item())
    return out


def server_tokens(stub, prompt=PROMPT, **fields):
    reply = predict(stub, prompt, IgnoreEOS=True, Logprobs=1, **fields)
    return [entry["id"] for entry in json.loads(reply.logprobs)["content"]], reply


def test_greedy_matches_reference(loaded, reference):
    got, reply = server_tokens(loaded.stub, Tokens=20)
    assert got == reference_generate(reference, PROMPT, 20)
    assert reply.message.decode() == reference[1].decode(got)


def test_repetition_penalty_window(loaded, reference):
    got, _ = server_tokens(loaded.stub, Tokens=24, Penalty=1.8, Repeat=16)
    expected = reference_generate(reference, PROMPT, 24, make_logits_processors(
        repetition_penalty=1.8, repetition_context_size=16))
    assert got == expected
    assert got != reference_generate(reference, PROMPT, 24)


def test_presence_and_frequency_penalties(loaded, reference):
    got, _ = server_tokens(loaded.stub, Tokens=24, PresencePenalty=1.5, FrequencyPenalty=0.7)
    expected = reference_generate(reference, PROMPT, 24, make_logits_processors(
        presence_penalty=1.5, presence_context_size=64,
        frequency_penalty=0.7, frequency_context_size=64))
    assert got == expected
    assert got != reference_generate(reference, PROMPT, 24)


def test_logit_bias_bans_and_forces(loaded, reference):
    greedy = reference_generate(reference, PROMPT, 8)
    banned, _ = server_tokens(loaded.stub, Tokens=8, LogitBias=json.dumps({greedy[0]: -100}))
    assert greedy[0] not in banned
    forced, _ = server_tokens(loaded.stub, Tokens=5, LogitBias=json.dumps({"42": 100}))
    assert forced == [42] * 5


def test_ignore_eos(loaded, reference):
    eos = next(iter(reference[1].eos_token_ids))
    bias = json.dumps({eos: 100})
    stopped = predict(loaded.stub, PROMPT, Tokens=10, LogitBias=bias)
    assert stopped.tokens == 0 and stopped.message == b""
    kept = predict(loaded.stub, PROMPT, Tokens=10, LogitBias=bias, IgnoreEOS=True)
    assert kept.tokens == 10


def test_seeded_sampling_matches_reference(loaded, reference):
    got, _ = server_tokens(loaded.stub, Tokens=16, Temperature=0.9, Seed=1234)
    assert got == reference_generate(reference, PROMPT, 16, temperature=0.9, seed=1234)
    again, _ = server_tokens(loaded.stub, Tokens=16, Temperature=0.9, Seed=1234)
    other, _ = server_tokens(loaded.stub, Tokens=16, Temperature=0.9, Seed=99)
    assert again == got and other != got


@pytest.mark.parametrize("fields,filters", [
    (dict(TopK=3), [lambda x: apply_top_k(x, 3)]),
    (dict(TopP=0.5), [lambda x: apply_top_p(x, 0.5)]),
    (dict(MinP=0.2), [lambda x: apply_min_p(x, 0.2)]),
], ids=["top_k", "top_p", "min_p"])
def test_filters_match_reference(loaded, reference, fields, filters):
    got, _ = server_tokens(loaded.stub, Tokens=16, Temperature=1.5, Seed=7, **fields)
    expected = reference_generate(reference, PROMPT, 16, temperature=1.5, seed=7,
                                  filters=filters)
    assert got == expected
    unfiltered = reference_generate(reference, PROMPT, 16, temperature=1.5, seed=7)
    assert got != unfiltered


def test_seeded_request_is_the_same_beside_others(loaded):
    alone, _ = server_tokens(loaded.stub, Tokens=24, Temperature=1.0, Seed=42)
    results = {}

    def run(i):
        results[i] = server_tokens(loaded.stub, prompt=f"Hello world {i}", Tokens=30,
                                   Temperature=1.0)[0]

    others = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in others:
        t.start()
    beside, _ = server_tokens(loaded.stub, Tokens=24, Temperature=1.0, Seed=42)
    for t in others:
        t.join()
    assert beside == alone


def test_logprobs_are_true_logprobs_of_greedy_tokens(loaded, reference):
    model, tokenizer = reference
    reply = predict(loaded.stub, PROMPT, Tokens=12, IgnoreEOS=True, Logprobs=1, TopLogprobs=5)
    content = json.loads(reply.logprobs)["content"]
    assert len(content) == reply.tokens == 12
    ids = tokenizer.encode(PROMPT)
    generated = [e["id"] for e in content]
    logits = model(mx.array([ids + generated]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i, entry in enumerate(content):
        row = logprobs[len(ids) - 1 + i]
        assert entry["logprob"] == pytest.approx(row[entry["id"]].item(), abs=1e-3)
        top = entry["top_logprobs"]
        assert len(top) == 5
        assert top[0]["id"] == entry["id"]  # greedy picks the maximum
        assert [t["logprob"] for t in top] == sorted([t["logprob"] for t in top], reverse=True)
        expected_top = sorted(row.tolist(), reverse=True)[:5]
        assert [t["logprob"] for t in top] == pytest.approx(expected_top, abs=1e-3)
        assert bytes(entry["bytes"]).decode() == entry["token"]
    assert "".join(e["token"] for e in content) == reply.message.decode()


def test_stream_final_chunk_carries_all_logprobs(loaded):
    chunks = list(loaded.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt=PROMPT, Tokens=10, IgnoreEOS=True, Logprobs=1)))
    final = json.loads(chunks[-1].logprobs)["content"]
    assert len(final) == 10
    assert all(not c.logprobs for c in chunks[:-1])


def test_model_option_defaults_and_request_override(server, tiny_model, reference):
    server.load(tiny_model, options=["repetition_penalty:1.8", "repeat_last_n:16"])
    got, _ = server_tokens(server.stub, Tokens=24)
    assert got == reference_generate(reference, PROMPT, 24, make_logits_processors(
        repetition_penalty=1.8, repetition_context_size=16))
    server.load(tiny_model, options=["temperature:1.0", "seed:5"])
    seeded, _ = server_tokens(server.stub, Tokens=12)
    assert seeded == reference_generate(reference, PROMPT, 12, temperature=1.0, seed=5)
    request_seed, _ = server_tokens(server.stub, Tokens=12, Seed=6)
    assert request_seed == reference_generate(reference, PROMPT, 12, temperature=1.0, seed=6)
    server.load(tiny_model)


def test_xtc_option_matches_reference(server, tiny_model, reference):
    from mlx_lm.sample_utils import apply_xtc

    special = list(reference[1].eos_token_ids)
    server.load(tiny_model, options=["xtc_probability:1.0", "xtc_threshold:0.02"])
    got, _ = server_tokens(server.stub, Tokens=16, Temperature=1.0, Seed=3)
    expected = reference_generate(reference, PROMPT, 16, temperature=1.0, seed=3,
                                  filters=[lambda x: apply_xtc(x, 1.0, 0.02, special)])
    assert got == expected
    assert got != reference_generate(reference, PROMPT, 16, temperature=1.0, seed=3)
    server.load(tiny_model)


def test_unsupported_fields_are_logged(loaded):
    predict(loaded.stub, PROMPT, Tokens=2, Mirostat=2, TypicalP=0.5,
            CorrelationId="req-mirostat")
    log = loaded.log_text()
    line = next(l for l in log.splitlines() if "req-mirostat" in l and "ignoring" in l)
    assert "Mirostat" in line and "TypicalP" in line
