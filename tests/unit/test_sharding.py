"""mlx_backend/distributed/sharding.py: choosing tensor or pipeline
parallelism, and split models computing what the whole model computes.

The split-model tests run two real processes (tests/unit/shard_rank.py) joined
by MLX's ring backend on 127.0.0.1, so the collectives are real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama, qwen2

from mlx_backend.distributed.sharding import PipelineStage, choose_parallel, shard_model
from mlx_backend.errors import InvalidArgument
from mlx_backend.server_process import ROOT, free_ports

RANK_SCRIPT = Path(__file__).with_name("shard_rank.py")
TIMEOUT_S = 60


def tiny(module=llama, heads=4, kv_heads=2, layers=4, **extra):
    """A small random model, never evaluated (choose_parallel reads shapes only)."""
    return module.Model(module.ModelArgs(
        model_type=module.__name__.rsplit(".", 1)[1], hidden_size=8 * heads,
        num_hidden_layers=layers, intermediate_size=64, num_attention_heads=heads,
        num_key_value_heads=kv_heads, rms_norm_eps=1e-5, vocab_size=64,
        tie_word_embeddings=True, **extra))


def refused(model, size, requested) -> str:
    with pytest.raises(InvalidArgument) as info:
        choose_parallel(model, size, requested)
    return str(info.value)


# ---- choose_parallel ------------------------------------------------------------------------

def test_heads_that_do_not_divide_mean_pipeline():
    model = tiny(heads=9, kv_heads=3)  # SmolLM2-135M's head counts
    assert choose_parallel(model, 2, None) == "pipeline"
    assert choose_parallel(model, 2, "pipeline") == "pipeline"
    message = refused(model, 2, "tensor")
    assert "head counts (9 query, 3 KV)" in message and "2 ranks" in message
    assert "use parallel:pipeline" in message


def test_heads_that_divide_mean_tensor():
    model = tiny(heads=4, kv_heads=2)
    assert choose_parallel(model, 2, None) == "tensor"
    assert choose_parallel(model, 2, "pipeline") == "pipeline"
    assert choose_parallel(model, 3, None) == "pipeline"  # 4 heads, 3 ranks


def test_mlx_lm_pipeline_models_use_mlx_lm_pipeline():
    model = tiny(qwen2, heads=9, kv_heads=3)
    assert choose_parallel(model, 2, None) == "pipeline"
    shard_model(model, mx.distributed.init(), "pipeline")
    # mlx-lm's own pipeline() ran: it sets the layer range (None until then).
    assert not isinstance(model.model, PipelineStage) and model.model.end_idx == 4


def test_a_model_that_cannot_be_split_is_refused():
    class Unsplittable(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(4, 4)]

    model = Unsplittable()
    for requested in (None, "tensor", "pipeline"):
        assert "parallel:" in refused(model, 2, requested)
    assert "cannot split this model across 2 ranks" in refused(model, 2, None)


def test_sliding_window_layers_are_not_pipelined_by_hand():
    model = tiny(heads=9, kv_heads=3, sliding_window=16,
                 layer_types=["sliding_attention", "full_attention"] * 2)
    message = refused(model, 2, None)
    assert "sliding-window" in message and "9 query, 3 KV" in message


def test_each_rank_needs_a_layer_and_the_request_must_be_known():
    assert "2 layers, 3 ranks" in refused(tiny(heads=9, kv_heads=3, layers=2), 3, "pipeline")
    assert "parallel:data" in refused(tiny(), 2, "data")


def test_one_rank_pipeline_stage_is_the_plain_model():
    """The hand-made stage, without any peer: the same logits, and the parts
    the outer model and the KV cache sizing rely on."""
    reference, model = tiny(), tiny()
    model.update(reference.parameters())
    shard_model(model, mx.distributed.init(), "pipeline")
    assert isinstance(model.model, PipelineStage) and len(model.layers) == 4
    inputs = mx.array([[1, 2, 3, 4]])
    assert np.allclose(np.array(model(inputs)), np.array(reference(inputs)), atol=1e-5)


# ---- split models across 2 real processes -----------------------------------------------------

def run_ranks(tmp_path, parallel, size=2):
    """Run shard_rank.py as `size` ring-connected ranks; their JSON reports."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(size)]))
    logs = [tmp_path / f"rank{i}.log" for i in range(size)]
    procs = []
    try:
        for i, log in enumerate(logs):
            env = dict(os.environ, MLX_HOSTFILE=str(hostfile), MLX_RANK=str(i),
                       PYTHONPATH=str(ROOT))
            with open(log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, str(RANK_SCRIPT), parallel], cwd=ROOT, env=env,
                    stdout=out, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ranks still running after {TIMEOUT_S}s:\n" + tails(logs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(p.returncode == 0 for p in procs), tails(logs)
    return [json.loads([line for line in log.read_text().splitlines()
                        if line.startswith("{")][-1]) for log in logs]


def tails(logs):
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


@pytest.mark.parametrize("parallel, layers", [("pipeline", 2), ("tensor", 4)])
def test_split_model_computes_what_the_whole_model_does(tmp_path, parallel, layers):
    reports = run_ranks(tmp_path, parallel)
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["layers"] == report["caches"] == layers, report
        assert report["prefill_close"] and report["decode_close"], report
        assert report["tokens"] == report["reference_tokens"], report
    assert len({json.dumps(r["tokens"]) for r in reports}) == 1
