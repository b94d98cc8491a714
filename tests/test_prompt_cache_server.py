"""The prompt cache seen through the server: cached runs give the uncached tokens."""

import random
import time

import backend_pb2
from conftest import predict

H = backend_pb2.HealthMessage()
WORDS = ("the quick brown fox jumps over lazy dog Paris is capital of France Berlin "
         "Germany hello world how are you today fine thank numbers def main print").split()


def processed(stub):
    return stub.GetMetrics(backend_pb2.MetricsRequest()).prompt_tokens_processed


def cache_entries(stub):
    return stub.Status(H).memory.breakdown["prompt_cache_entries"]


def random_prompts(seed, n):
    """Prompts that share prefixes with each other, so every match kind occurs."""
    rng = random.Random(seed)
    bases = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(4)]
    prompts = []
    for _ in range(n):
        base = rng.choice(bases + prompts[-3:]) if prompts else rng.choice(bases)
        cut = rng.randint(1, len(base))
        prompts.append(base[:cut] + " " + " ".join(rng.choices(WORDS, k=rng.randint(0, 5))))
    return prompts


def run_all(stub, prompts, tokens=10):
    return [predict(stub, p, Tokens=tokens, IgnoreEOS=True).message for p in prompts]


def test_warm_cache_matches_cache_off(server, tiny_model):
    prompts = random_prompts(1, 40)
    server.load(tiny_model, options=["prompt_cache:false"])
    cold = run_all(server.stub, prompts)
    assert cache_entries(server.stub) == 0
    server.load(tiny_model, options=["max_cache_entries:8"])
    warm = run_all(server.stub, prompts)
    assert warm == cold
    assert 0 < cache_entries(server.stub) <= 8
    assert "not caching" not in server.log_text()  # key length always equals KV length


def test_exact_repeat_and_longer_match(server, tiny_model):
    server.load(tiny_model)
    prompt = "The quick brown fox jumps over the lazy dog"
    first = predict(server.stub, prompt, Tokens=12, IgnoreEOS=True)
    again = predict(server.stub, prompt, Tokens=12, IgnoreEOS=True)
    assert again.message == first.message and processed(server.stub) == 1
    # A shorter request served from the longer entry, trimmed back.
    short = "The quick brown fox jumps"
    warm = predict(server.stub, short, Tokens=12, IgnoreEOS=True).message
    assert processed(server.stub) < 3
    server.load(tiny_model, options=["prompt_cache:false"])
    assert predict(server.stub, short, Tokens=12, IgnoreEOS=True).message == warm


def test_system_prompt_checkpoint_serves_new_conversations(server, tiny_model):
    server.load(tiny_model)
    system = ("system", "You are a helpful assistant. " * 8)
    predict(server.stub, messages=[system, ("user", "Hello world!")], Tokens=4)
    assert cache_entries(server.stub) == 2  # the system prompt and the conversation
    other = predict(server.stub, messages=[system, ("user", "def main(): print")], Tokens=4,
                    IgnoreEOS=True)
    fresh = processed(server.stub)
    assert fresh < other.prompt_tokens / 3, (fresh, other.prompt_tokens)
    server.load(tiny_model, options=["prompt_cache:false"])
    cold = predict(server.stub, messages=[system, ("user", "def main(): print")], Tokens=4,
                   IgnoreEOS=True)
    assert cold.message == other.message


def test_models_never_see_each_others_entries(server, tiny_model, tiny_model_b):
    prompts = random_prompts(2, 6)
    server.load(tiny_model_b, options=["prompt_cache:false"])
    b_cold = run_all(server.stub, prompts)
    server.load(tiny_model)
    a_out = run_all(server.stub, prompts)
    assert a_out != b_cold  # different weights, different text
    server.load(tiny_model_b)
    assert processed_after_first(server, prompts[0])
    assert run_all(server.stub, prompts) == b_cold


def processed_after_first(server, prompt):
    """The first request after a load is computed from scratch."""
    reply = predict(server.stub, prompt, Tokens=2)
    return processed(server.stub) == reply.prompt_tokens


def test_cancelled_stream_leaves_a_usable_cache(server, tiny_model):
    prompt = "Hello world! How are you today? I am fine"
    server.load(tiny_model, options=["prompt_cache:false"])
    cold = predict(server.stub, prompt, Tokens=20, IgnoreEOS=True).message
    server.load(tiny_model)
    call = server.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt=prompt, Tokens=500, IgnoreEOS=True))
    for i, _ in enumerate(call):
        if i == 5:
            call.cancel()
            break
    deadline = time.time() + 10
    while cache_entries(server.stub) == 0:
        assert time.time() < deadline, "cancelled stream left no cache entry"
        time.sleep(0.05)
    warm = predict(server.stub, prompt, Tokens=20, IgnoreEOS=True)
    assert processed(server.stub) <= 2  # served from the cancelled stream's state
    assert warm.message == cold


def test_cache_bytes_bound_holds(server, tiny_model):
    budget = 200_000
    server.load(tiny_model, options=[f"cache_bytes:{budget}", "max_cache_entries:1000"])
    for prompt in random_prompts(3, 30):
        predict(server.stub, prompt, Tokens=4)
        breakdown = server.stub.Status(H).memory.breakdown
        assert breakdown["prompt_cache"] <= budget
    assert breakdown["prompt_cache_entries"] > 0


def test_cached_bytes_are_all_the_memory_entries_hold(server, tiny_model):
    """Entries hold only their own positions, not views of batch buffers."""
    server.load(tiny_model, options=["max_cache_entries:100"])
    for prompt in random_prompts(4, 12):
        predict(server.stub, prompt, Tokens=6, IgnoreEOS=True)
    server.stub.Score(backend_pb2.ScoreRequest(prompt="Hello world", candidates=[" fox"]))
    breakdown = server.stub.Status(H).memory.breakdown
    unaccounted = breakdown["mlx_active"] - breakdown["weights"] - breakdown["prompt_cache"]
    assert breakdown["prompt_cache_entries"] >= 5
    assert unaccounted < 64 * 1024, breakdown


def test_tool_list_checkpoint(server, tmp_path):
    """With tools and no system message, the tool preamble is checkpointed."""
    from tiny_model import build_tiny_model
    import json

    folder = build_tiny_model(tmp_path / "tools-model", markers=True)
    server.load(folder)
    tools = json.dumps([{"type": "function", "function": {
        "name": f"tool_{i}", "description": "does a thing " * 4}} for i in range(4)])

    def ask(question):
        return server.stub.Predict(backend_pb2.PredictOptions(
            Messages=[backend_pb2.Message(role="user", content=question)],
            UseTokenizerTemplate=True, Tools=tools, Tokens=4, IgnoreEOS=True))

    ask("Hello world!")
    assert cache_entries(server.stub) == 2  # the tool preamble and the conversation
    second = ask("def main(): print")
    assert processed(server.stub) < second.prompt_tokens / 3


def test_rotating_kv_window(server, tiny_model):
    """max_kv_size bounds each sequence's KV; cached runs still equal uncached."""
    prompt = "The quick brown fox jumps over the lazy dog"
    server.load(tiny_model, options=["max_kv_size:64", "prompt_cache:false"])
    cold = predict(server.stub, prompt, Tokens=150, IgnoreEOS=True).message
    server.load(tiny_model, options=["max_kv_size:64"])
    first = predict(server.stub, prompt, Tokens=150, IgnoreEOS=True)
    again = predict(server.stub, prompt, Tokens=150, IgnoreEOS=True)
    assert first.tokens == again.tokens == 150
    assert first.message == again.message == cold
    assert "not caching" not in server.log_text()
