"""Dispersive loss: the formula on hand-made tensors, the released code's form, ordering,
gradients, and the global-batch gather across two processes."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfalign.objectives import FlowObjective
from selfalign.errors import ConfigError
from selfalign.regularizers import REGISTRY, StepContext
from selfalign.regularizers.dispersive import (Dispersive, DispersiveConfig, dispersive_loss,
                                              gather_with_local_grad)
from selfalign.training.step import TrainingStep


def test_l2_formula_on_hand_made_rows():
    # two rows, dim 2: ||z0 - z1||^2 / dim = 2 / 2 = 1; the 2x2 matrix [[0, 1], [1, 0]]
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert dispersive_loss(z).item() == pytest.approx(math.log((2 + 2 * math.exp(-1)) / 4), abs=1e-6)
    # temperature divides the distance
    assert dispersive_loss(z, temperature=0.5).item() == pytest.approx(
        math.log((2 + 2 * math.exp(-2)) / 4), abs=1e-6)


def test_cosine_formula_on_hand_made_rows():
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]])     # cos = [[1, 0], [0, 1]], D = -cos
    assert dispersive_loss(z, distance="cosine").item() == pytest.approx(
        math.log((2 * math.e + 2) / 4), abs=1e-6)


def test_matches_the_released_code_and_a_double_loop():
    torch.manual_seed(0)
    z = torch.randn(6, 5, 3, dtype=torch.float64)
    flat = z.reshape(6, -1)
    # the authors' PyTorch form: pdist, both triangles and the zero diagonal, then log-mean-exp
    diff = torch.nn.functional.pdist(flat).pow(2) / flat.shape[1]
    official = torch.log(torch.exp(-torch.cat([diff, diff, torch.zeros(6, dtype=flat.dtype)])).mean())
    loop = torch.tensor([[((a - b) ** 2).sum() / flat.shape[1] for b in flat] for a in flat])
    by_loop = torch.log(torch.exp(-loop).mean())
    ours = dispersive_loss(flat.float())
    assert ours.item() == pytest.approx(official.item(), abs=1e-5)
    assert ours.item() == pytest.approx(by_loop.item(), abs=1e-5)


def test_identical_features_lose_more_than_spread_ones():
    same = torch.ones(8, 16)
    spread = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 3
    for distance in ("l2", "cosine"):
        assert dispersive_loss(same, distance=distance) > dispersive_loss(spread, distance=distance)
    assert dispersive_loss(same).item() == pytest.approx(0.0, abs=1e-6)   # log mean exp(0)


def _ctx(model, feats):
    x0 = torch.zeros(feats[next(iter(feats))].shape[0], 1, 8, 8)
    return StepContext(model=model, objective=FlowObjective(), x0=x0, noise=x0, t=torch.zeros(len(x0)),
                       x_t=x0, y=torch.zeros(len(x0), dtype=torch.long), features=feats)


def test_pooling_flatten_or_token_mean(tiny_model):
    model = tiny_model(in_channels=1)
    feats = torch.randn(4, 16, 128, generator=torch.Generator().manual_seed(1))
    flat = Dispersive(DispersiveConfig(layer=2), model.config)
    mean = Dispersive(DispersiveConfig(layer=2, pooling="mean"), model.config)
    ctx = _ctx(model, {2: feats})
    assert flat(ctx).item() == pytest.approx(dispersive_loss(feats.reshape(4, -1)).item(), abs=1e-6)
    assert mean(ctx).item() == pytest.approx(dispersive_loss(feats.mean(1)).item(), abs=1e-6)


def test_defaults_and_registry(tiny_model):
    model = tiny_model(in_channels=1)
    reg = REGISTRY["dispersive"].regularizer(DispersiveConfig(), model.config)
    assert reg.student_layers() == (model.depth,)        # released code: the last block
    assert reg.weight(None) == 0.25 and reg.config.temperature == 1.0
    assert not reg.needs_teacher() and not reg.needs_images() and not list(reg.parameters())
    with pytest.raises(ConfigError, match=r"^dispersive.temperature must be > 0, got 0$"):
        DispersiveConfig(temperature=0).validate(depth=6)
    with pytest.raises(ConfigError, match=r"^dispersive.layer=7 must be a block in 1..6$"):
        DispersiveConfig(layer=7).validate(depth=6)
    with pytest.raises(ConfigError, match=r"^dispersive.pooling: expected one of 'flatten', 'mean', got 'max'$"):
        DispersiveConfig(pooling="max").validate(depth=6)


def test_gradients_reach_only_blocks_up_to_the_tapped_one(tiny_model):
    model = tiny_model(in_channels=1)
    step = TrainingStep(model, FlowObjective(), {"dispersive": Dispersive(DispersiveConfig(layer=2), model.config)})
    _, terms = step(torch.randn(4, 1, 8, 8), torch.arange(4), generator=torch.Generator().manual_seed(0))
    terms["dispersive"].backward()
    for name, p in model.named_parameters():
        upstream = name.startswith(("x_embedder", "t_embedder", "y_embedder", "blocks.0.", "blocks.1."))
        reached = p.grad is not None and p.grad.abs().sum() > 0
        assert reached == upstream, name


def _ddp_worker(rank, world, init_file, x, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(x.shape[1], 6))
    local = x.chunk(world)[rank]
    z = gather_with_local_grad(local @ weight)
    loss = dispersive_loss(z)
    loss.backward()
    dist.all_reduce(weight.grad)          # what DDP does: average the gradients
    weight.grad /= world
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": weight.grad, "rows": z.detach()}, out_path)
    dist.destroy_process_group()


def test_global_batch_across_two_processes_equals_one_big_batch(tmp_path):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    out = tmp_path / "rank0.pt"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 6))
    loss = dispersive_loss(x @ weight)
    loss.backward()
    assert torch.allclose(got["rows"], (x @ weight).detach(), atol=1e-6)
    assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(got["grad"], weight.grad, atol=1e-5)
