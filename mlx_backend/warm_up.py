"""Part of the CPU fast path: MLX's fused CPU kernels built at LoadModel rather
than in the first requests.

MLX compiles each fused kernel with g++ the first time it runs, and keeps it
on disk (native_kernels.py). On a machine that has not built them yet (a
fresh one, or a new CPU, compiler or MLX), the first requests wait for that:
on the reference 2-core machine the first greedy request took 7 s longer,
the first batch of several 3.5 s and the first sampled request 2 s. A few
tokens of each kind at load build them (11 s there); once they are on disk
this costs about half a second. Rarer paths (a quantized KV cache, penalties,
grammars, speculative decoding) still build theirs at first use.
"""

import logging
import time
from typing import Optional

from mlx_lm.generate import BatchGenerator

from .sampling import SamplingParams, make_sampler

log = logging.getLogger(__name__)

# A sampled row with top-p, top-k and min-p on (their kernels are built too); seeded.
SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05,
                         repetition_penalty=1.0, repeat_last_n=0, presence_penalty=0.0,
                         frequency_penalty=0.0, logit_bias={}, xtc_probability=0.0,
                         xtc_threshold=0.1, seed=0)


def warm_up(model, vocab_size: int) -> Optional[float]:
    """Generate a few greedy tokens alone, then two rows of different lengths
    together (one greedy, one sampled); returns the seconds it took, or None
    if it failed. A failure is logged, not raised: a model that cannot
    generate says so to the first request."""
    started = time.perf_counter()

    def ids(n, first):
        return [(first + i) % vocab_size for i in range(n)]

    try:
        _generate(model, [ids(5, 1)], [3], [None])
        _generate(model, [ids(3, 7), ids(6, 11)], [2, 4],
                  [None, make_sampler(SAMPLED, vocab_size)])
    except Exception as err:
        log.warning("warming up the CPU kernels failed (%s: %s); the first requests "
                    "build them instead", type(err).__name__, err)
        return None
    return time.perf_counter() - started


def _generate(model, prompts, max_tokens, samplers):
    generator = BatchGenerator(model, completion_batch_size=len(prompts),
                               prefill_batch_size=len(prompts))
    try:
        generator.insert(prompts, max_tokens=max_tokens, samplers=samplers)
        finished = 0
        for _ in range(4 * (max(max_tokens) + 2)):  # each call prefills or decodes
            _, responses = generator.next()
            finished += sum(r.finish_reason is not None for r in responses)
            if finished == len(prompts):
                return
        raise RuntimeError("the warm-up generation did not finish")
    finally:
        generator.close()
