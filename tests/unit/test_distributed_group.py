"""mlx_backend/distributed/group.py and lockstep.py: hostfiles, LocalAI's worker
flags and environment names, who may knock, and the tick's wire format."""

import json
import pickle

import pytest

from mlx_backend.distributed import group
from mlx_backend.distributed.group import GroupConfig
from mlx_backend.errors import InvalidArgument


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(["10.0.0.1:5000", ["10.0.0.2:5000", "10.0.1.2:5000"]]))
    return str(path)


def test_worker_flags_win_over_the_environment(hostfile, monkeypatch):
    monkeypatch.setenv("MLX_DISTRIBUTED_HOSTFILE", "/elsewhere.json")
    monkeypatch.setenv("MLX_RANK", "7")
    config = GroupConfig.for_worker(hostfile, "ring", 1)
    assert (config.hostfile, config.backend, config.rank) == (hostfile, "ring", 1)


def test_worker_settings_from_localais_environment_names(hostfile, monkeypatch):
    monkeypatch.setenv("MLX_DISTRIBUTED_HOSTFILE", hostfile)
    monkeypatch.setenv("MLX_DISTRIBUTED_BACKEND", "ring")
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setenv("MLX_JACCL_COORDINATOR", "10.0.0.1:7000")
    config = GroupConfig.for_worker()
    assert (config.hostfile, config.rank, config.coordinator) == (hostfile, 1, "10.0.0.1:7000")


def test_ring_entries_are_one_address_or_a_list(hostfile):
    config = GroupConfig(hostfile)
    assert config.ring_address(0) == "10.0.0.1:5000"
    assert config.ring_address(1) == "10.0.0.2:5000"
    assert config.describe(1) == "rank 1 (10.0.0.2:5000)"
    env = GroupConfig(hostfile, rank=1).environment()
    assert env["MLX_RANK"] == "1" and env["MLX_HOSTFILE"] == hostfile


def test_jaccl_gets_the_device_matrix_and_the_coordinator(hostfile):
    env = GroupConfig(hostfile, backend="jaccl", rank=1, coordinator="10.0.0.1:7000").environment()
    assert env["MLX_IBV_DEVICES"] == hostfile and env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:7000"


def test_rank0_is_one_process_without_a_hostfile(monkeypatch):
    monkeypatch.delenv("MLX_DISTRIBUTED_HOSTFILE", raising=False)
    assert GroupConfig.for_rank0(None, None) is None


@pytest.mark.parametrize("content, message", [
    (None, "cannot read hostfile"),
    ("not json", "is not JSON"),
    ('{"a": 1}', "must be a JSON array"),
    ('["127.0.0.1:5000"]', "at least 2"),
])
def test_bad_hostfiles_are_explained(tmp_path, content, message):
    path = tmp_path / "hosts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument, match=message):
        GroupConfig.for_rank0(str(path), None)


def test_bad_worker_settings_are_explained(hostfile, monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_DISTRIBUTED_HOSTFILE", raising=False)
    with pytest.raises(InvalidArgument, match="--hostfile"):
        GroupConfig.for_worker()
    with pytest.raises(InvalidArgument, match="--rank"):
        GroupConfig.for_worker(hostfile)
    with pytest.raises(InvalidArgument, match="not in hostfile"):
        GroupConfig.for_worker(hostfile, rank=5)
    with pytest.raises(InvalidArgument, match="not one of"):
        GroupConfig.for_worker(hostfile, "mpi", 1)
    bad = GroupConfig(hostfile)
    bad.hosts = lambda: ["10.0.0.1:5000", 5]
    with pytest.raises(InvalidArgument, match='"ip:port"'):
        bad.ring_address(1)


def test_only_rank0s_host_may_knock():
    assert group._same_host("127.0.0.1", "127.0.0.1")
    assert group._same_host("127.0.0.1", "localhost")
    assert not group._same_host("127.0.0.1", "192.0.2.1")
    assert not group._same_host("10.0.0.9", "10.0.0.1")


def test_loss_names_the_worker_or_the_candidates(hostfile):
    config = GroupConfig(hostfile)
    assert group.describe_loss(config, 2) == "worker rank 1 (10.0.0.2:5000) stopped answering"
    assert "one of" in group.describe_loss(config, 3)


def test_a_tick_carries_what_workers_need():
    """Ops travel pickled: a request is plain data (its grammar as text)."""
    from mlx_backend.request import GenerationRequest
    from mlx_backend.sampling import SamplingParams

    sampling = SamplingParams(temperature=0.7, top_p=1, top_k=0, min_p=0,
                              repetition_penalty=1, repeat_last_n=64, presence_penalty=0,
                              frequency_penalty=0, logit_bias={3: 1.0}, xtc_probability=0,
                              xtc_threshold=0.1, seed=5)
    request = GenerationRequest(prompt_tokens=[1, 2, 3], max_tokens=8, sampling=sampling,
                                stop_strings=["\n"])
    ops = [("generate", (request, ("gbnf", "root ::= x")), 2), ("cancel", [4])]
    assert pickle.loads(pickle.dumps(ops)) == ops
