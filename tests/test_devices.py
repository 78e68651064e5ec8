"""One device picker for every command, the trainer, prepare and the benchmarks."""
from __future__ import annotations

import pytest
import torch

from selfalign.devices import pick_device
from selfalign.errors import ConfigError, UsageError


def test_cpu_and_auto():
    assert pick_device("cpu", local_rank=3) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert pick_device("auto") == expected


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda:", "gpu", ""])
def test_a_name_that_is_no_device_names_the_flag_or_the_key(name):
    with pytest.raises(UsageError, match=f"--device {name} is not a device: use auto, cpu, cuda or cuda:N"):
        pick_device(name)
    with pytest.raises(ConfigError, match=f"train.device={name} is not a device"):
        pick_device(name, setting="train.device")


def test_a_gpu_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", local_rank=1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda asks for a GPU but torch sees no CUDA device; "
                                          "use train.device=cpu"):
        pick_device("cuda", setting="train.device")
    with pytest.raises(UsageError, match="use --device cpu"):
        pick_device("cuda:1")


def test_each_process_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda", 1)     # more processes than GPUs
    assert pick_device("cuda:0", local_rank=1) == torch.device("cuda", 0)   # named: every process
