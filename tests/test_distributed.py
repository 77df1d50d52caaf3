import socket

import pytest
import torch

from captions.distributed import barrier, join, leave
from captions.errors import CaptionsError


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def test_single_process(no_torchrun):
    d = join("cpu")
    assert (d.rank, d.world, d.local_rank, d.device, d.owns_group, d.is_main) == (0, 1, 0, torch.device("cpu"),
                                                                                 False, True)
    barrier(d)  # no group: must not need one
    leave(d)
    assert not torch.distributed.is_initialized()
    assert join(torch.device("cpu")).device == torch.device("cpu")
    with pytest.raises(CaptionsError, match="unknown device"):
        join("tpu")


def test_a_group_made_by_the_caller_is_used_and_kept(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")
        d = join("cpu")
        assert (d.rank, d.world, d.local_rank, d.owns_group, d.is_main) == (1, 2, 1, False, False)
        assert d.device == torch.device("cpu")  # cuda:LOCAL_RANK only on CUDA
        leave(d)
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()
