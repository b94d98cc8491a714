"""One rank of tests/unit/test_sharding.py: joins the ring group named by
MLX_HOSTFILE/MLX_RANK, builds the same tiny random llama as its peer, splits
it with `shard_model(PARALLEL)` and prints one JSON line comparing it with the
unsplit model. Both ranks run the same calls in the same order (every call of
a split model is a collective)."""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.llama import Model, ModelArgs

from mlx_backend.distributed.sharding import shard_model

PROMPTS = [[5, 17, 42, 8, 99, 3, 250], [7, 7, 130, 64, 1, 200, 31]]
GENERATE = [PROMPTS[0], [11, 23, 5]]  # unequal lengths: padding and masks


def tiny_llama():
    """The same random float32 llama in every process (fixed seed)."""
    mx.random.seed(0)
    model = Model(ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        vocab_size=256, tie_word_embeddings=True))
    # At mlx's default init scale every layer barely changes the hidden state
    # and greedy decoding repeats one token; tripled, the tokens vary.
    model.update(tree_map(lambda w: w * 3 if w.ndim == 2 else w, model.parameters()))
    return model


def logits(model):
    """Prefill of a 2x7 batch with a fresh cache, then one decode step."""
    cache = make_prompt_cache(model)
    prefill = model(mx.array(PROMPTS), cache=cache)
    decode = model(mx.array([[9], [77]]), cache=cache)
    mx.eval(prefill, decode)
    return np.array(prefill), np.array(decode), len(cache)


def greedy(model):
    gen = BatchGenerator(model, max_tokens=8)
    uids = gen.insert(GENERATE)
    tokens = {uid: [] for uid in uids}
    done = set()
    while len(done) < len(uids):
        for r in gen.next()[1]:
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                done.add(r.uid)
    gen.close()
    return [tokens[uid] for uid in uids]


def main(parallel):
    group = mx.distributed.init(strict=True, backend="ring")
    reference = tiny_llama()
    mx.eval(reference.parameters())
    model = tiny_llama()
    shard_model(model, group, parallel)
    mx.eval(model.parameters())

    ref_prefill, ref_decode, _ = logits(reference)
    prefill, decode, n_caches = logits(model)
    print(json.dumps({
        "rank": group.rank(), "size": group.size(),
        "layers": len(model.layers), "caches": n_caches,
        "prefill_close": bool(np.allclose(prefill, ref_prefill, atol=1e-4)),
        "decode_close": bool(np.allclose(decode, ref_decode, atol=1e-4)),
        "max_diff": float(max(abs(prefill - ref_prefill).max(),
                              abs(decode - ref_decode).max())),
        "tokens": greedy(model), "reference_tokens": greedy(reference),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
