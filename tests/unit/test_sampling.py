"""mlx_backend/sampling.py: per-request samplers (greedy, seeded, filtered) and
logits processors (bias, penalties over a window)."""

import dataclasses

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.sampling import MIN_TEMPERATURE, SamplingParams, make_processors, make_sampler

VOCAB = 50


def params(**overrides) -> SamplingParams:
    base = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                          repetition_penalty=1.0, repeat_last_n=64, presence_penalty=0.0,
                          frequency_penalty=0.0, logit_bias={}, xtc_probability=0.0,
                          xtc_threshold=0.1, seed=None)
    return dataclasses.replace(base, **overrides)


def logprobs_of(weights) -> mx.array:
    """A (1, vocab) row of log-probabilities proportional to `weights`."""
    row = mx.array([weights], dtype=mx.float32)
    return mx.log(row / row.sum())


FLAT = logprobs_of([1.0] * VOCAB)
# Token 0 most likely, then 1, 2, ... (probabilities 50:49:...:1).
RANKED = logprobs_of([float(VOCAB - i) for i in range(VOCAB)])


def draws(sampler, logprobs=FLAT, n=40):
    return [sampler(logprobs).item() for _ in range(n)]


# ---- make_sampler ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, MIN_TEMPERATURE / 2, MIN_TEMPERATURE * 0.999])
def test_temperatures_below_the_minimum_are_greedy(temperature):
    p = params(temperature=temperature, seed=3, top_k=5)
    assert p.greedy
    assert make_sampler(p, VOCAB) is greedy_sampler
    assert draws(make_sampler(p, VOCAB), RANKED, 3) == [0, 0, 0]


def test_the_minimum_temperature_itself_samples():
    p = params(temperature=MIN_TEMPERATURE)
    assert not p.greedy
    assert make_sampler(p, VOCAB) is not greedy_sampler


def test_same_seed_same_draws_different_seed_different_draws():
    first = draws(make_sampler(params(seed=1234), VOCAB))
    mx.random.seed(99)  # the global random state plays no part
    mx.random.uniform(shape=(10,))
    assert draws(make_sampler(params(seed=1234), VOCAB)) == first
    assert draws(make_sampler(params(seed=4321), VOCAB)) != first
    assert len(set(first)) > 10  # really sampling from the flat distribution


def test_interleaved_seeded_samplers_do_not_disturb_each_other():
    alone = draws(make_sampler(params(seed=5), VOCAB), n=20)
    a, b = make_sampler(params(seed=5), VOCAB), make_sampler(params(seed=6), VOCAB)
    together = []
    for _ in range(20):
        together.append(a(FLAT).item())
        b(FLAT)
    assert together == alone


def test_unseeded_samplers_differ():
    assert draws(make_sampler(params(), VOCAB)) != draws(make_sampler(params(), VOCAB))


def test_sampled_rows_keep_the_batch_shape():
    assert make_sampler(params(seed=1), VOCAB)(FLAT).shape == (1,)


# RANKED: p(i) = (50 - i) / 1275, so p(0) = 3.9%, p(1) = 3.8%, p(2) = 3.8%, ...
@pytest.mark.parametrize("filters, allowed", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_k=1), {0}),
    (dict(top_p=0.05), {0, 1}),       # token 0 alone holds < 5%: token 1 is needed too
    (dict(top_p=0.03), {0}),
    (dict(min_p=0.95), {0, 1, 2}),    # p(2) / p(0) = 0.96, p(3) / p(0) = 0.94
    (dict(min_p=1.0), {0}),
])
def test_filters_limit_the_draws(filters, allowed):
    got = set(draws(make_sampler(params(seed=11, **filters), VOCAB), RANKED, 100))
    assert got == allowed


def test_without_filters_the_tail_is_drawn():
    got = set(draws(make_sampler(params(seed=11), VOCAB), RANKED, 100))
    assert max(got) > 10


def test_top_k_at_or_beyond_the_vocabulary_is_no_filter():
    for top_k in (VOCAB, VOCAB + 5):
        got = set(draws(make_sampler(params(seed=11, top_k=top_k), VOCAB), RANKED, 100))
        assert max(got) > 10


def test_temperature_sharpens_and_flattens():
    steep = mx.array([[-float(i) for i in range(VOCAB)]])  # each token e times the next
    cold = draws(make_sampler(params(seed=2, temperature=0.1), VOCAB), steep, 100)
    plain = draws(make_sampler(params(seed=2, temperature=1.0), VOCAB), steep, 100)
    hot = draws(make_sampler(params(seed=2, temperature=20.0), VOCAB), steep, 100)
    assert set(cold) == {0}
    assert 0 in plain and 3 < len(set(plain)) < 15
    assert len(set(hot)) > 25


def test_xtc_removes_the_top_choices():
    # Tokens 0 and 1 are above the threshold: XTC (always, probability 1)
    # drops every such token but the least likely of them.
    row = logprobs_of([0.5, 0.4] + [0.1 / (VOCAB - 2)] * (VOCAB - 2))
    sampler = make_sampler(params(seed=8, xtc_probability=1.0, xtc_threshold=0.2), VOCAB)
    got = draws(sampler, row, 60)
    assert 0 not in got and got.count(1) > 40


def test_xtc_never_removes_special_tokens():
    row = logprobs_of([0.5, 0.4] + [0.1 / (VOCAB - 2)] * (VOCAB - 2))
    sampler = make_sampler(params(seed=8, xtc_probability=1.0, xtc_threshold=0.2), VOCAB,
                           special_tokens=[0])
    assert 0 in draws(sampler, row, 60)


def test_seeded_xtc_request_is_reproducible():
    row = logprobs_of([0.5, 0.4] + [0.1 / (VOCAB - 2)] * (VOCAB - 2))
    runs = []
    for global_seed in (1, 2):
        mx.random.seed(global_seed)
        sampler = make_sampler(params(seed=8, xtc_probability=0.5, xtc_threshold=0.2), VOCAB)
        runs.append(draws(sampler, row, 60))
    assert runs[0] == runs[1]


# ---- make_processors ------------------------------------------------------------------------

def apply(processors, tokens, logits):
    for processor in processors:
        logits = processor(mx.array(tokens), logits)
    return logits


def test_no_processors_by_default():
    assert make_processors(params()) == []
    assert make_processors(params(repetition_penalty=1.0, logit_bias={})) == []


def test_logit_bias_is_added():
    (processor,) = make_processors(params(logit_bias={3: 2.5, 7: -100.0}))
    out = processor(mx.array([1, 2]), mx.zeros((1, 10)))
    expected = [0.0] * 10
    expected[3], expected[7] = 2.5, -100.0
    assert out.tolist() == [expected]


def test_repetition_penalty_covers_only_the_window():
    processors = make_processors(params(repetition_penalty=2.0, repeat_last_n=2))
    assert len(processors) == 1
    logits = mx.full((1, 6), 4.0)
    out = apply(processors, [1, 2, 3], logits).tolist()[0]
    # Tokens 2 and 3 are in the last two; token 1 is outside the window.
    assert out == [4.0, 4.0, 2.0, 2.0, 4.0, 4.0]


def test_repetition_penalty_is_sign_aware():
    (processor,) = make_processors(params(repetition_penalty=2.0, repeat_last_n=4))
    out = processor(mx.array([0, 1]), mx.array([[-4.0, 4.0, 1.0]])).tolist()[0]
    assert out == [-8.0, 2.0, 1.0]


def test_presence_and_frequency_penalties_over_the_window():
    processors = make_processors(params(presence_penalty=1.0, frequency_penalty=0.5,
                                        repeat_last_n=3))
    assert len(processors) == 2
    out = apply(processors, [4, 1, 1, 2], mx.zeros((1, 5))).tolist()[0]
    # Window [1, 1, 2]: token 1 twice (1 + 2 * 0.5), token 2 once (1 + 0.5), token 4 out.
    assert out == [0.0, -2.0, -1.5, 0.0, 0.0]


def test_window_zero_turns_the_penalties_off():
    """As llama.cpp's repeat_last_n 0 (a request's Repeat 0 means "unset" and
    takes the option's window instead)."""
    assert make_processors(params(repetition_penalty=2.0, presence_penalty=1.0,
                                  frequency_penalty=1.0, repeat_last_n=0)) == []
    (bias,) = make_processors(params(repeat_last_n=0, logit_bias={1: 5.0}))
    assert bias(mx.array([1]), mx.zeros((1, 3))).tolist()[0] == [0.0, 5.0, 0.0]
