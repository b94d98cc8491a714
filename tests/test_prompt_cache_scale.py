"""The prompt cache at scale, through the server: checkpoints that last, and
saved prompts found again after a restart (PromptCachePath, PromptCacheRO,
PromptCacheAll), with corrupt, truncated and foreign files skipped."""

import json
import shutil

import backend_pb2
from conftest import predict

H = backend_pb2.HealthMessage()
M = backend_pb2.Message
SYSTEM = ("You are a careful assistant for the quick brown fox company. Answer briefly, "
          "cite the lazy dog handbook, and never invent numbers. ") * 4


def chat(stub, user, **fields):
    return stub.Predict(backend_pb2.PredictOptions(
        Messages=[M(role="system", content=SYSTEM), M(role="user", content=user)],
        UseTokenizerTemplate=True, Tokens=8, IgnoreEOS=True, **fields), timeout=120)


def processed(stub):
    return stub.GetMetrics(backend_pb2.MetricsRequest()).prompt_tokens_processed


def cache_stats(stub):
    return json.loads(stub.GetMetrics(backend_pb2.MetricsRequest()).prompt_json_for_slot)[
        "prompt_cache"]


def prompt_length(stub, user):
    return stub.TokenizeString(backend_pb2.PredictOptions(
        Messages=[M(role="system", content=SYSTEM), M(role="user", content=user)],
        UseTokenizerTemplate=True)).length


def from_cache(stub, user):
    """Prompt tokens the last request took from the cache."""
    return prompt_length(stub, user) - processed(stub)


def test_checkpoint_survives_new_conversations(server, tiny_model):
    server.load(tiny_model)
    users = ["Paris?", "Berlin please", "How are you today", "Numbers", "def main", "Fine"]
    chat(server.stub, users[0])
    assert from_cache(server.stub, users[0]) == 0
    before = cache_stats(server.stub)
    cached = []
    for user in users[1:]:
        chat(server.stub, user)
        cached.append(from_cache(server.stub, user))
    # Every new conversation starts from the same checkpoint (the system
    # prompt), and computes only its own turn.
    assert len(set(cached)) == 1 and cached[0] > 0.9 * prompt_length(server.stub, users[0])
    after = cache_stats(server.stub)
    assert after["hits_shorter"] - before["hits_shorter"] == 5  # each from the checkpoint
    assert after["hits_longer"] == before["hits_longer"]  # no copying of old conversations
    status = server.stub.Status(H).memory.breakdown
    assert status["prompt_cache_tokens_saved"] == after["tokens_saved"] > 0


def saved_files(folder):
    return sorted(p for p in folder.glob("*.safetensors"))


def test_warm_after_restart(server_factory, tiny_model, tmp_path):
    folder = tmp_path / "prompts"
    first = server_factory()
    first.load(tiny_model, options=[f"prompt_cache_path:{folder}"])
    cold = chat(first.stub, "Tell me about Paris").message
    cold_processed = processed(first.stub)
    assert len(saved_files(folder)) == 1  # the system-prompt checkpoint
    first.stop()

    second = server_factory()
    second.load(tiny_model, options=[f"prompt_cache_path:{folder}"])
    warm = chat(second.stub, "Tell me about Paris")
    assert warm.message == cold
    assert from_cache(second.stub, "Tell me about Paris") > 0.9 * cold_processed
    assert "1 saved prompts loaded" in second.log_text()


def test_bad_files_are_skipped_and_never_served(server_factory, tiny_model, tiny_model_b,
                                               tmp_path):
    folder = tmp_path / "prompts"
    writer = server_factory()
    writer.load(tiny_model_b, options=[f"prompt_cache_path:{folder}"])
    chat(writer.stub, "hello")  # a file for another model
    writer.stop()
    (foreign,) = saved_files(folder)
    shutil.copy(foreign, folder / "truncated.safetensors")
    with open(folder / "truncated.safetensors", "r+b") as f:
        f.truncate(foreign.stat().st_size // 2)
    (folder / "garbage.safetensors").write_bytes(b"not a cache at all" * 100)

    reader = server_factory()
    reader.load(tiny_model, options=["prompt_cache:false"])
    reference = chat(reader.stub, "hello").message
    reader.load(tiny_model, options=[f"prompt_cache_path:{folder}"])
    assert chat(reader.stub, "hello").message == reference
    log = reader.log_text()
    assert "is for another model; skipped" in log
    assert "truncated.safetensors is unreadable" in log
    assert "garbage.safetensors is unreadable" in log
    assert reader.stub.Health(H).message == b"OK"


def test_read_only_and_save_all(server, tiny_model, tmp_path):
    server.load(tiny_model)
    every_turn, read_only = tmp_path / "all", tmp_path / "ro"
    for n, user in enumerate(["one", "two", "three"], start=1):
        chat(server.stub, user, PromptCachePath=str(every_turn), PromptCacheAll=True)
        # the checkpoint once, plus every finished turn
        assert len(saved_files(every_turn)) == 1 + n
    for folder in (every_turn, read_only):
        chat(server.stub, "four", PromptCachePath=str(folder), PromptCacheRO=True,
             PromptCacheAll=True)
    assert len(saved_files(every_turn)) == 4
    assert not read_only.exists() or not saved_files(read_only)


def test_disk_budget_holds(server, tiny_model, tmp_path):
    folder = tmp_path / "small"
    server.load(tiny_model, options=[f"prompt_cache_path:{folder}",
                                     "prompt_cache_disk_bytes:1MB"])
    for n in range(6):
        chat(server.stub, f"question number {n}", PromptCacheAll=True)
    total = sum(p.stat().st_size for p in saved_files(folder))
    assert 0 < total <= 2**20
    assert not [p for p in folder.iterdir() if "partial" in p.name]


def test_cache_bytes_bounds_what_mlx_holds(server, tiny_model):
    """Not just the number the cache reports: MLX's active memory beyond the
    weights stays within the budget once the engine is idle."""
    budget = 64 * 2**10
    server.load(tiny_model, options=[f"cache_bytes:{budget}"])
    for n in range(40):
        predict(server.stub, f"prompt number {n} " + "about foxes " * (n % 7), Tokens=6,
                IgnoreEOS=True)
    memory = server.stub.Status(H).memory.breakdown
    assert 0 < memory["prompt_cache"] <= budget
    assert memory["prompt_cache_evictions"] > 0
    assert memory["mlx_active"] - memory["weights"] <= budget + 256 * 2**10
