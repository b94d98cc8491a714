"""A quantized KV cache (kv_bits, or llama.cpp's CacheTypeKey/Value) that keeps
continuous batching and the prompt cache."""

import threading

import grpc
import pytest

import backend_pb2
from conftest import predict
from tiny_model import build_tiny_model

H = backend_pb2.HealthMessage()
PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Paris is the capital"]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Head dimension 64, as real models have (the default tiny model's is 16)."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "tiny-wide", hidden_size=256)


def greedy(stub, prompt, n=40):
    return predict(stub, prompt, Tokens=n, IgnoreEOS=True).message


def processed(stub):
    return stub.GetMetrics(backend_pb2.MetricsRequest()).prompt_tokens_processed


@pytest.mark.parametrize("options,fields", [
    (["kv_bits:8"], {}), (["kv_bits:4", "kv_group_size:32"], {}),
    ([], {"CacheTypeKey": "q8_0", "CacheTypeValue": "q8_0"})])
def test_batched_streams_equal_their_solo_runs(server, wide_model, options, fields):
    server.load(wide_model, options=options, **fields)
    solo = [greedy(server.stub, p) for p in PROMPTS]
    together = {}

    def run(prompt):
        together[prompt] = greedy(server.stub, prompt)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[p] for p in PROMPTS] == solo
    # The prompt cache holds quantized entries and serves them.
    assert greedy(server.stub, PROMPTS[1]) == solo[1] and processed(server.stub) == 1
    assert "not caching" not in server.log_text()


def mlx_lm_quantized_greedy(folder, prompt, n, bits, group_size):
    """Greedy tokens with mlx-lm's own single-sequence QuantizedKVCache."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import QuantizedKVCache

    model, tokenizer = mlx_lm.load(str(folder))
    cache = [QuantizedKVCache(group_size=group_size, bits=bits) for _ in model.layers]
    logits = model(mx.array([tokenizer.encode(prompt)]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return tokenizer.decode(out).encode()


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
def test_same_tokens_as_mlx_lm_quantized_cache(server, wide_model, bits, group_size):
    server.load(wide_model, options=[f"kv_bits:{bits}", f"kv_group_size:{group_size}"])
    for prompt in PROMPTS[:2]:
        assert greedy(server.stub, prompt, 64) == mlx_lm_quantized_greedy(
            wide_model, prompt, 64, bits, group_size)


def kv_bytes_while_streaming(server):
    call = server.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt="Hello world " * 40, Tokens=600, IgnoreEOS=True), timeout=120)
    for i, _ in enumerate(call):
        if i == 5:
            size = server.stub.Status(H).memory.breakdown["kv_cache"]
            call.cancel()
            return size


def test_status_reports_the_smaller_cache(server, wide_model):
    server.load(wide_model)
    full = kv_bytes_while_streaming(server)
    server.load(wide_model, options=["kv_bits:4", "kv_group_size:32"])
    four_bit = kv_bytes_while_streaming(server)
    assert 0 < four_bit < full * 0.4, (four_bit, full)


@pytest.mark.parametrize("options,fields,words", [
    (["kv_bits:7"], {}, "kv_bits"),
    (["kv_bits:8", "quantized_kv_start:5000"], {}, "quantized_kv_start"),
    ([], {"CacheTypeKey": "q8_0", "CacheTypeValue": "f16"}, "the same"),
    ([], {"CacheTypeKey": "q3_k"}, "CacheTypeKey"),
    (["kv_bits:8", "max_kv_size:64"], {}, "max_kv_size"),
])
def test_unsupported_combinations_keep_the_current_model(server, wide_model, options, fields,
                                                         words):
    server.load(wide_model)
    before = greedy(server.stub, PROMPTS[0], 8)
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(wide_model), Options=options, **fields), timeout=60)
    assert not result.success and words in result.message
    assert greedy(server.stub, PROMPTS[0], 8) == before


def test_head_dim_that_the_group_does_not_divide(server, tiny_model):
    result = server.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(tiny_model), Options=["kv_bits:8"]), timeout=60)
    assert not result.success and "kv_group_size" in result.message
