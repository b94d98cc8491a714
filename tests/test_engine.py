"""The engine in-process: a fault inside one request's logits processor fails
that request alone while its batch neighbours finish with their solo tokens."""

import pytest

from mlx_backend.engine import Engine
from mlx_backend.events import Done
from mlx_backend.errors import BackendError
from mlx_backend.request import GenerationRequest, LoadRequest
from mlx_backend.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                        repetition_penalty=1.0, repeat_last_n=64, presence_penalty=0.0,
                        frequency_penalty=0.0, logit_bias={}, xtc_probability=0.0,
                        xtc_threshold=0.1, seed=None)


class ExplodingGrammar:
    """Stands in for a compiled grammar whose matcher breaks after a few steps."""

    def __init__(self, after: int):
        self.after = after

    def processor(self):
        calls = {"n": 0}

        def process(tokens, logits):
            calls["n"] += 1
            if calls["n"] > self.after:
                raise RuntimeError("matcher exploded")
            return logits
        return process


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = Engine()
    engine.load(LoadRequest(str(tiny_model), options=["prompt_cache:false"]))
    yield engine
    engine.shutdown()


def run(engine, prompt, n, grammar=None):
    loaded = engine.loaded
    tokens = loaded.tokenizer.encode(prompt)
    handle = engine.submit(GenerationRequest(prompt_tokens=tokens, max_tokens=n,
                                             sampling=GREEDY, ignore_eos=True,
                                             grammar=grammar), loaded)
    return handle


def final(handle):
    return [e for e in handle if isinstance(e, Done)][0]


def test_processor_fault_fails_only_its_request(engine):
    solo = [final(run(engine, p, 30)).text for p in ("Hello world", "The quick brown fox")]
    neighbours = [run(engine, "Hello world", 30), run(engine, "The quick brown fox", 30)]
    faulty = run(engine, "Paris is", 30, grammar=ExplodingGrammar(after=5))
    with pytest.raises(BackendError) as info:
        list(faulty)
    assert "matcher exploded" in str(info.value)
    assert [final(h).text for h in neighbours] == solo
    assert not engine.busy


def test_a_caller_gone_before_admission_costs_no_generation(engine):
    import threading
    import time

    from mlx_backend.errors import Cancelled

    busy = threading.Thread(target=engine.call, args=(time.sleep, 0.5))
    busy.start()  # the engine is occupied: the next request waits in the inbox
    time.sleep(0.1)
    handle = run(engine, "Hello world", 30)
    handle.cancel()
    busy.join()
    with pytest.raises(Cancelled, match="before it started"):
        list(handle)
    assert handle.uid is None  # never entered the batch
