"""DistributedDataParallel with sparse layers: two CPU processes (gloo) train on halves of a batch and end with
the weights one process reaches on the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pysparse


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    masks = {n: torch.rand_like(p) > 0.5 for n, p in model.named_parameters() if p.dim() > 1}
    return pysparse.sparsify(model, masks, min_sparsity=0.0)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, x, y, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _worker(rank, world, out_dir):
    # a file store in the test's own folder: no port to pick (a free port found first can be taken by another
    # process before the group binds it)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=rank,
                            world_size=world)
    try:
        x, y = _data()
        shard = slice(rank * 4, rank * 4 + 4)
        ddp = nn.parallel.DistributedDataParallel(_model())
        _train(ddp, x[shard], y[shard])
        torch.save({k: v.clone() for k, v in ddp.module.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # done: leave without the interpreter's teardown, where gloo's worker thread can abort the process (see
    # pysparse/__main__.py)
    os._exit(0)


def test_ddp_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    x, y = _data()
    single = _train(_model(), x, y).state_dict()
    for key in single:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
        torch.testing.assert_close(states[0][key], single[key], rtol=1e-5, atol=1e-6)
