"""One model across two ranks (mx.distributed ring on 127.0.0.1), as LocalAI
runs it: rank 0 is `run.sh --addr`, rank 1 is `run.sh --worker`. Every answer
is compared with a single-process server on the same weights."""

import json
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

import backend_pb2
from conftest import Server, default_model_path, free_port
from mlx_backend.server_process import RUN_SH, start_worker, write_hostfile
from tiny_model import build_tiny_model

H = backend_pb2.HealthMessage()
PROMPTS = ["The capital of France is", "Write a haiku about the sea.",
           "List three prime numbers:", "Once upon a time"]
SYSTEM = "You are a terse assistant."  # its KV state becomes a checkpoint on every rank


class Cluster:
    """A worker started first (as `local-ai worker mlx-distributed` would),
    then rank 0; `load` joins them."""

    def __init__(self, tmp, env, ranks=2):
        self.hostfile = write_hostfile(tmp / "hosts.json", ranks)
        self.worker_log = tmp / "worker.log"
        self.worker = start_worker(self.hostfile, 1, env, open(self.worker_log, "w"))
        self.rank0 = Server(tmp, env=env, name="rank0")
        self.stub = self.rank0.stub

    def load(self, model, *options):
        return self.rank0.load(model, [f"hostfile:{self.hostfile}", *options])

    def stop(self):
        """Stop rank 0; the worker's exit status (None if it had to be killed)."""
        self.rank0.stop()
        try:
            return self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it never joined, so rank 0 could not stop it
            self.worker.kill()
            self.worker.wait()
            return None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # One GGUF import for every process of the module.
    return {"MLX_BACKEND_GGUF_CACHE": str(tmp_path_factory.mktemp("gguf-cache"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Head counts (4 query, 2 KV) divide by 2: tensor parallel works."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", num_layers=4)


@pytest.fixture(scope="module")
def single(tmp_path_factory, env):
    server = Server(tmp_path_factory.mktemp("single"), env=env, name="single")
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path, env):
    started = Cluster(tmp_path, env)
    yield started
    started.stop()


def tokens_of(stub, prompt, **fields):
    """The streamed text and the final token count of one greedy request."""
    replies = list(stub.PredictStream(backend_pb2.PredictOptions(
        Prompt=prompt, Tokens=fields.pop("Tokens", 24), **fields), timeout=300))
    return b"".join(r.message for r in replies), replies[-1].tokens


def test_pipeline_on_the_default_gguf_matches_one_process(single, cluster):
    """SmolLM2 (9 query heads, 3 KV heads) can only be split by layers."""
    model = default_model_path()
    single.load(model)
    result = cluster.load(model, "parallel:pipeline")
    assert "loaded" in result.message
    for prompt in PROMPTS[:3]:
        messages = [backend_pb2.Message(role="system", content=SYSTEM),
                    backend_pb2.Message(role="user", content=prompt)]
        request = backend_pb2.PredictOptions(Messages=messages, UseTokenizerTemplate=True,
                                             Tokens=24)
        expected = single.stub.Predict(request, timeout=300)
        got = cluster.stub.Predict(request, timeout=300)
        assert got.message == expected.message and got.tokens == expected.tokens
    # The default picks pipeline for it, and tensor says why it cannot.
    refused = cluster.rank0.stub.LoadModel(backend_pb2.ModelOptions(
        Model=str(model), Options=[f"hostfile:{cluster.hostfile}", "parallel:tensor"]),
        timeout=300)
    assert not refused.success and "parallel:pipeline" in refused.message
    # A failed load leaves no model on any rank, and the group still serves.
    cluster.load(model)
    assert tokens_of(cluster.stub, PROMPTS[0]) == tokens_of(single.stub, PROMPTS[0])
    assert cluster.stop() == 0  # SIGTERM on rank 0 stops the worker too


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_tiny_model_matches_one_process_with_every_control(single, cluster, tiny, parallel):
    single.load(tiny)
    cluster.load(tiny, f"parallel:{parallel}")
    cases = [
        {},
        {"Temperature": 0.9, "TopK": 40, "TopP": 0.9, "Seed": 7},
        {"Temperature": 0.7, "MinP": 0.05, "Penalty": 1.3, "Seed": 11,
         "FrequencyPenalty": 0.5, "LogitBias": json.dumps({"5": 3.0})},
        {"Grammar": 'root ::= "yes" | "no" | "maybe"'},
        {"StopPrompts": ["L"], "Tokens": 40},
        {"Logprobs": 1, "TopLogprobs": 3},
    ]
    for fields in cases:
        for prompt in PROMPTS[:2]:
            request = backend_pb2.PredictOptions(Prompt=prompt, Tokens=24)
            for key, value in fields.items():
                if isinstance(value, list):
                    getattr(request, key).extend(value)
                else:
                    setattr(request, key, value)
            expected = single.stub.Predict(request, timeout=120)
            got = cluster.stub.Predict(request, timeout=120)
            assert (got.message, got.tokens) == (expected.message, expected.tokens), fields
            if fields.get("Logprobs"):  # tensor parallel sums in another order: close
                assert json.loads(got.logprobs) == _approx(json.loads(expected.logprobs))
    # Unseeded sampling still works (rank 0 picks the seed every rank uses).
    assert cluster.stub.Predict(backend_pb2.PredictOptions(
        Prompt="hi", Tokens=8, Temperature=1.0), timeout=120).tokens > 0
    score = backend_pb2.ScoreRequest(prompt="Paris is the capital of",
                                     candidates=[" France.", " Germany", " the lazy dog"])
    for _ in range(2):  # the second call starts from the cached prompt, on every rank
        assert [c.log_prob for c in cluster.stub.Score(score).candidates] == pytest.approx(
            [c.log_prob for c in single.stub.Score(score).candidates], abs=1e-3)
    text = "an embedding of this sentence"
    assert cluster.stub.Embedding(backend_pb2.PredictOptions(Embeddings=text)).embeddings == \
        pytest.approx(single.stub.Embedding(backend_pb2.PredictOptions(
            Embeddings=text)).embeddings, abs=1e-4)


def _approx(value):
    if isinstance(value, float):
        return pytest.approx(value, abs=1e-3)
    if isinstance(value, dict):
        return {key: _approx(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_approx(item) for item in value]
    return value


def test_eight_streams_some_cancelled_and_the_prompt_cache(single, cluster, tiny):
    single.load(tiny)
    cluster.load(tiny, "parallel:tensor")
    prompts = [f"stream {i}: " + "count the waves " * (i + 1) for i in range(8)]
    lengths = [8 + 6 * i for i in range(8)]
    expected = [tokens_of(single.stub, p, Tokens=n) for p, n in zip(prompts, lengths)]
    results, errors = {}, {}

    def run(i):
        call = cluster.stub.PredictStream(backend_pb2.PredictOptions(
            Prompt=prompts[i], Tokens=lengths[i]), timeout=300)
        text = b""
        try:
            for count, reply in enumerate(call):
                text += reply.message
                if i % 3 == 1 and count == 2:
                    call.cancel()
            results[i] = (text, reply.tokens)
        except grpc.RpcError as err:
            errors[i] = err.code()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    cancelled = {i for i in range(8) if i % 3 == 1}
    assert set(errors) == cancelled
    assert all(code == grpc.StatusCode.CANCELLED for code in errors.values())
    for i in set(range(8)) - cancelled:
        assert results[i] == expected[i], i
    # Cold then warm, as on one process: the same prefix lookups, the same
    # tokens saved, the same answers.
    for server in (single, cluster.rank0):
        server.saved = []
        for prompt in ("a new prompt for the cache", "a new prompt for the cache, again"):
            before = server.stub.Status(H).memory.breakdown["prompt_cache_tokens_saved"]
            server.answer = tokens_of(server.stub, prompt, Tokens=6)
            after = server.stub.Status(H).memory.breakdown
            server.saved.append(after["prompt_cache_tokens_saved"] - before)
    assert cluster.rank0.saved == single.saved and single.saved[0] == 0 < single.saved[1]
    assert cluster.rank0.answer == single.answer
    assert after["distributed_ranks"] == 2 and after["distributed_ticks"] > 0


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_an_idle_group_parks_instead_of_polling(cluster, tiny):
    """MLX's ring polls while a collective waits: idle workers must sleep."""
    cluster.load(tiny)
    assert tokens_of(cluster.stub, "hello", Tokens=4)[1] == 4
    time.sleep(1.5)
    before = _cpu_seconds(cluster.worker.pid), _cpu_seconds(cluster.rank0.proc.pid)
    time.sleep(3)
    after = _cpu_seconds(cluster.worker.pid), _cpu_seconds(cluster.rank0.proc.pid)
    assert after[0] - before[0] < 0.3 and after[1] - before[1] < 0.6, (before, after)
    # and wake up for the next request
    assert tokens_of(cluster.stub, "hello again", Tokens=4)[1] == 4


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_a_worker_killed_mid_stream_fails_the_stream_and_health(cluster, tiny, parallel):
    cluster.load(tiny, f"parallel:{parallel}")
    stream = cluster.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt="a long answer", Tokens=2000, IgnoreEOS=True), timeout=120)
    next(stream)
    cluster.worker.kill()
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in stream:
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "rank 1" in failed.value.details()
    assert time.monotonic() - killed < 30
    with pytest.raises(grpc.RpcError) as health:
        cluster.stub.Health(H, timeout=5)
    assert health.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_hung_worker_fails_the_stream_within_distributed_step_timeout(cluster, tiny):
    """A stopped (not dead) worker keeps its connections open: the step bound
    is what ends the wait."""
    cluster.load(tiny, "distributed_step_timeout:3")
    stream = cluster.stub.PredictStream(backend_pb2.PredictOptions(
        Prompt="a long answer", Tokens=2000, IgnoreEOS=True), timeout=120)
    next(stream)
    cluster.worker.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stream:
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "rank 1" in failed.value.details()
        assert "distributed_step_timeout=3s" in failed.value.details()
        assert time.monotonic() - stopped < 15
    finally:
        cluster.worker.kill()


def test_a_worker_lost_while_idle_turns_health_unavailable(cluster, tiny):
    cluster.load(tiny)
    cluster.worker.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            cluster.stub.Health(H, timeout=5)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "rank 1" in err.details()
            break
        time.sleep(0.2)
    else:
        pytest.fail("Health kept answering OK after the worker died")
    with pytest.raises(grpc.RpcError) as refused:
        cluster.stub.Predict(backend_pb2.PredictOptions(Prompt="hi", Tokens=4), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_worker_that_never_comes_fails_load_model_in_bounded_time(tmp_path, env, tiny):
    hostfile = write_hostfile(tmp_path / "hosts.json")
    server = Server(tmp_path, env=env)
    try:
        started = time.monotonic()
        result = server.stub.LoadModel(backend_pb2.ModelOptions(
            Model=str(tiny), Options=[f"hostfile:{hostfile}", "join_timeout:3"]), timeout=60)
        assert not result.success
        assert "rank 1" in result.message and "run.sh --worker" in result.message
        assert time.monotonic() - started < 15
        server.stub.Health(H, timeout=5)  # still serving: a plain load works
        server.load(tiny)
        assert server.stub.Predict(backend_pb2.PredictOptions(Prompt="hi", Tokens=4)).tokens
    finally:
        server.stop()


def test_three_ranks_after_one_was_late(tmp_path, env, single, tiny):
    """Rank 2 missing: LoadModel names it, and rank 1 (which had answered)
    waits for the next try instead of joining half a group. Once rank 2 is
    up, three ranks serve (pipeline: 4 query heads do not divide by 3)."""
    hostfile = write_hostfile(tmp_path / "hosts.json", 3)
    workers = [start_worker(hostfile, 1, env, open(tmp_path / "worker1.log", "w"))]
    server = Server(tmp_path, env=env, name="rank0")
    try:
        failed = server.stub.LoadModel(backend_pb2.ModelOptions(
            Model=str(tiny), Options=[f"hostfile:{hostfile}", "join_timeout:3"]), timeout=60)
        assert not failed.success and "rank 2" in failed.message
        workers.append(start_worker(hostfile, 2, env, open(tmp_path / "worker2.log", "w")))
        loaded = server.load(tiny, [f"hostfile:{hostfile}"])
        assert "loaded" in loaded.message
        single.load(tiny)
        for prompt in PROMPTS[:2]:
            assert tokens_of(server.stub, prompt) == tokens_of(single.stub, prompt)
    finally:
        server.stop()
        codes = [worker.wait(timeout=30) for worker in workers]
    assert codes == [0, 0]
    assert "pipeline parallel" in (tmp_path / "worker2.log").read_text()


def test_a_worker_whose_rank0_is_gone_exits(cluster, tiny):
    cluster.load(tiny)
    cluster.rank0.proc.kill()
    assert cluster.worker.wait(timeout=30) == 1
    assert "rank 0 is gone" in cluster.worker_log.read_text()


def test_what_distributed_mode_refuses(cluster, tiny, tmp_path):
    for options, expected in (
            (["parallel:diagonal"], "parallel"),
            (["prompt_cache_path:" + str(tmp_path / "saved")], "prompt_cache_path"),
            (["prompt_lookup:true"], "speculative")):
        result = cluster.stub.LoadModel(backend_pb2.ModelOptions(
            Model=str(tiny), Options=[f"hostfile:{cluster.hostfile}", *options]), timeout=120)
        assert not result.success and expected in result.message, options
    cluster.load(tiny)
    with pytest.raises(grpc.RpcError) as refused:
        cluster.stub.Predict(backend_pb2.PredictOptions(
            Prompt="hi", Tokens=4, PromptCachePath=str(tmp_path / "saved")), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cluster.stub.Predict(backend_pb2.PredictOptions(Prompt="hi", Tokens=4)).tokens


def test_workers_answer_only_rank0s_host(tmp_path):
    """A knock from any host but rank 0's is refused (rank 0 is a TEST-NET
    address here, so our own knock from 127.0.0.1 must not be answered)."""
    from mlx_backend.distributed.group import GroupConfig, knock_on_workers

    port = free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps(["192.0.2.1:5000", f"127.0.0.1:{port}"]))
    worker = subprocess.Popen(
        [str(RUN_SH), "--worker", "--hostfile", str(hostfile), "--rank", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config = GroupConfig(hostfile=str(hostfile))
        with pytest.raises(Exception, match="did not answer"):
            knock_on_workers(config, timeout=3)
        assert worker.poll() is None  # still waiting for the real rank 0
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0]
    assert "refused a knock from 127.0.0.1" in output


def test_worker_flags_are_checked(tmp_path):
    bad = subprocess.run([str(RUN_SH), "--worker", "--hostfile", str(tmp_path / "none.json"),
                          "--rank", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot read hostfile" in bad.stderr
    missing_rank = subprocess.run([str(RUN_SH), "--worker", "--hostfile", "h.json"],
                                  capture_output=True, text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items() if k != "MLX_RANK"})
    assert missing_rank.returncode == 2 and "--rank" in missing_rank.stderr
