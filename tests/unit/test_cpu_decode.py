"""mlx_backend/cpu_decode.py: compiled decode steps give exactly mlx-lm's tokens."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator

from mlx_backend.cpu_decode import CompiledDecodeBlock, compile_decode
from mlx_backend.model_loader import load_model
from mlx_backend.options import parse_options
from mlx_backend.request import LoadRequest


def load(folder, *options):
    return load_model(LoadRequest(model=str(folder), options=list(options)),
                      parse_options(list(options)))


def greedy(model, prompts, tokens=24):
    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8,
                               stream=mx.new_stream(mx.default_device()))
    uids = generator.insert(prompts, max_tokens=[tokens] * len(prompts))
    out = {uid: [] for uid in uids}
    while any(len(t) < tokens for t in out.values()):
        for response in generator.next()[1]:
            out[response.uid].append(response.token)
    generator.close()
    return [out[uid] for uid in uids]


def test_compiled_blocks_decode_the_same_tokens(tiny_model):
    plain = load(tiny_model, "compile_decode:false")
    compiled = load(tiny_model)
    assert not any(isinstance(b, CompiledDecodeBlock) for b in plain.model.layers)
    if not all(isinstance(b, CompiledDecodeBlock) for b in compiled.model.layers):
        assert mx.default_device() != mx.cpu  # the fast path is for the CPU only
        return
    assert "compiled for decode" in compiled.weight_format
    # Rows of different lengths: left padding, so the decode mask is an array.
    prompts = [[1, 5, 9, 13, 2], [7, 3], [11, 4, 8, 19, 23, 5, 6, 30, 2]]
    assert greedy(compiled.model, prompts[:1]) == greedy(plain.model, prompts[:1])
    assert greedy(compiled.model, prompts) == greedy(plain.model, prompts)
    # Same parameters, same names: nothing else sees a difference.
    assert [k for k, _ in tree_flatten(compiled.model.parameters())] == \
        [k for k, _ in tree_flatten(plain.model.parameters())]


def test_only_plain_llama_blocks_are_switched(tiny_model):
    model = load(tiny_model, "compile_decode:false").model
    block = model.layers[0]
    block.self_attn.q_proj = nn.QuantizedLinear.from_linear(block.self_attn.q_proj)
    assert compile_decode(model) == len(model.layers) - 1
    assert not isinstance(model.layers[0], CompiledDecodeBlock)
    assert compile_decode(nn.Linear(4, 4)) == 0
