"""Two processes on CPU (gloo): the global batch is split, ranks stay identical, runs end cleanly."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from selfalign.data import DataOrder, FashionMNIST

BATCH, STEPS, SEED = 8, 3, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_dict() -> dict:
    return {
        "model": {"preset": "SiT-T/8"},
        "regularizers": {"sra": {}},
        "data": {"kind": "fashion_mnist"},
        "train": {"batch_size": BATCH, "micro_batch": 2, "total_kimg": STEPS * BATCH / 1000,
                  "log_every_kimg": BATCH / 1000, "ckpt_every_kimg": 100.0, "ema_decay": 0.9,
                  "device": "cpu", "seed": SEED, "lr": 1e-3},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from selfalign.config.experiment import load_config
    from selfalign.training.trainer import train

    seen, holder = [], {}

    def record(trainer, step, x, y):
        holder["trainer"] = trainer
        seen.append((step, x.clone(), y.clone()))
        return x, y

    result = train(load_config(config_dict(), world_size=world_size), os.path.join(out_dir, "run"),
                   batch_hook=record, log=lambda _m: None)
    torch.save({"seen": seen, "step": result.step,
                "model": {k: v.clone() for k, v in holder["trainer"].model.state_dict().items()},
                "ema": {k: v.clone() for k, v in holder["trainer"].ema.model.state_dict().items()},
                "initialized": torch.distributed.is_initialized()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_split_the_global_batch_and_agree(tmp_path):
    port = free_port()
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["step"] == STEPS and not r["initialized"] for r in ranks)   # group destroyed at the end

    dataset = FashionMNIST("train")
    order = DataOrder(len(dataset), SEED)
    for rank, result in enumerate(ranks):
        assert [s for s, _, _ in result["seen"]] == list(range(STEPS))
        for step, x, y in result["seen"]:
            assert x.shape[0] == BATCH // 2                       # per-rank share of the global batch
            expected_x, expected_y = dataset.__getitems__(order.rank_indices(step, BATCH, rank, 2))
            assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    # Together the ranks cover exactly the global batch of each step.
    for step in range(STEPS):
        both = torch.cat([order.rank_indices(step, BATCH, r, 2) for r in range(2)])
        assert torch.equal(both, order.take(step * BATCH, BATCH))

    # Identical weights and EMA in both processes, trained away from the start; the checkpoint
    # holds the RNG states of both ranks.
    for group in ("model", "ema"):
        for key, value in ranks[0][group].items():
            assert torch.equal(value, ranks[1][group][key]), f"{group}.{key}"
    from safetensors.torch import load_file
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert torch.equal(load_file(str(ckpt / "model.safetensors"))["final_layer.linear.weight"],
                       ranks[0]["model"]["final_layer.linear.weight"])
    assert ranks[0]["model"]["final_layer.linear.weight"].abs().sum() > 0     # zero-initialised
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["step_generator"] != state["rng"][1]["step_generator"]
