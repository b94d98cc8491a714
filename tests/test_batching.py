"""Continuous batching: every stream in a batch gets exactly its solo tokens."""

import threading
import time

import backend_pb2
from conftest import predict

PROMPTS = ["Hello world", "The quick brown fox jumps over", "def main():", "Paris is",
           "Numbers: 0 1 2", "Berlin is the capital", '{"name": "value",', "How are you",
           "print('hello')", "Tabs and newlines"]
LENGTHS = [40, 12, 64, 20, 33, 8, 50, 27, 16, 45]


def stream_tokens(stub, prompt, n, seed=0, cancel_after=None):
    call = stub.PredictStream(backend_pb2.PredictOptions(
        Prompt=prompt, Tokens=n, IgnoreEOS=True, Temperature=0.9 if seed else 0.0, Seed=seed),
        timeout=120)
    text = b""
    for i, chunk in enumerate(call):
        text += chunk.message
        if cancel_after is not None and i >= cancel_after:
            call.cancel()
            return None
    return text


def test_streams_of_different_lengths_with_cancellations(server, tiny_model):
    server.load(tiny_model, options=["prompt_cache:false", "max_batch_size:16"])
    solo = [stream_tokens(server.stub, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    seeded_solo = stream_tokens(server.stub, "Hello world", 30, seed=77)
    results = {}
    cancelled = {1, 4, 7}

    def run(i):
        results[i] = stream_tokens(server.stub, PROMPTS[i], LENGTHS[i] + (300 if i in cancelled
                                                                          else 0),
                                   cancel_after=3 if i in cancelled else None)

    def run_seeded():
        results["seeded"] = stream_tokens(server.stub, "Hello world", 30, seed=77)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    threads.append(threading.Thread(target=run_seeded))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(PROMPTS)):
        if i not in cancelled:
            assert results[i] == solo[i], PROMPTS[i]
    assert results["seeded"] == seeded_solo
    # Cancelled slots are freed at once: the engine goes idle right after.
    deadline = time.time() + 5
    while server.stub.Status(backend_pb2.HealthMessage()).state == \
            backend_pb2.StatusResponse.BUSY:
        assert time.time() < deadline
        time.sleep(0.05)


def test_new_request_joins_a_running_batch(server, tiny_model):
    """A short request finishes while a long one is still decoding."""
    server.load(tiny_model)
    long_done = threading.Event()
    order = []

    def long_run():
        predict(server.stub, "Hello world", Tokens=1500, IgnoreEOS=True)
        order.append("long")
        long_done.set()

    worker = threading.Thread(target=long_run)
    worker.start()
    time.sleep(0.3)
    predict(server.stub, "The quick brown fox", Tokens=5, IgnoreEOS=True)
    order.append("short")
    worker.join()
    assert order == ["short", "long"]
