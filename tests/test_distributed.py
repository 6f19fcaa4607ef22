"""Joining torchrun's process group: the CUDA branch (nccl, one GPU per local rank) faked at the narrowest point."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from retrieval.distributed import Distributed, backend_for, join_process_group, rank_device
from retrieval.errors import ConfigError

TORCHRUN_ENV = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_backend_and_device_per_rank():
    assert backend_for("cuda") == backend_for("cuda:1") == "nccl"
    assert backend_for("cpu") == "gloo"
    assert rank_device("cuda", 1) == "cuda:1" and rank_device("cpu", 1) == "cpu"
    assert rank_device("cuda:1", 1) == "cuda:1"
    with pytest.raises(ConfigError, match="local rank") as error:
        rank_device("cuda:0", 1)
    assert "\n" not in str(error.value)


def test_without_torchrun_nothing_is_joined(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    place, device = join_process_group("cpu")
    assert place == Distributed() and device == "cpu" and not place.active and place.is_main


@pytest.mark.parametrize("device,backend,expected_device", [("cuda", "nccl", "cuda:1"), ("cpu", "gloo", "cpu")])
def test_under_torchrun_each_process_joins_with_its_backend_and_gpu(monkeypatch, device, backend, expected_device):
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    joined, chosen_gpu = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: joined.append((backend, options)))
    monkeypatch.setattr(torch.cuda, "set_device", chosen_gpu.append)  # the only CUDA call: faked
    place, got_device = join_process_group(device)
    assert place == Distributed(rank=3, world_size=4, local_rank=1) and place.active and not place.is_main
    assert got_device == expected_device
    assert [name for name, _ in joined] == [backend]
    if backend == "nccl":
        assert chosen_gpu == [torch.device("cuda:1")] and joined[0][1]["device_id"] == torch.device("cuda:1")
    else:
        assert chosen_gpu == [] and "device_id" not in joined[0][1]


def test_a_single_process_gathers_and_agrees_with_itself():
    place = Distributed()
    local = torch.randn(3, 2, requires_grad=True)
    assert place.gather(local) is local and place.gather_sizes(3, "cpu") == [3]
    assert place.gather_objects({"a": 1}) == [{"a": 1}]
    with place.main_first():
        pass

