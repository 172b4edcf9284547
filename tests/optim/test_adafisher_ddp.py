"""AdaFisher under DistributedDataParallel: 2 gloo processes on CPU.

Checks: factors and parameters identical on both ranks; one coalesced all-reduce per statistics step and
none on other steps; layer names without the `module.` prefix; and, for a model whose statistics are
linear in the batch (conv/linear, no BN), the same factors and parameters as one process on the global batch
(raw statistics are averaged, so DDP computes the global batch's statistics), also for variant 'paper', whose
running average is of the raw statistics (divided by the summed call counters: the mean over ranks).
"""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fisherbench.optim import AdaFisher

WORLD, STEPS, T, GLOBAL_BATCH = 2, 3, 2, 8


def linear_in_batch_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.ReLU(), nn.Linear(5, 3))


def norm_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 6),
                         nn.LayerNorm(6), nn.Linear(6, 3))


def global_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=gen), torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen))
            for _ in range(STEPS)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        out = {}
        local = GLOBAL_BATCH // WORLD
        for key, build, variant in (("linear", linear_in_batch_model, "default"), ("norm", norm_model, "default"),
                                    ("paper", linear_in_batch_model, "paper")):
            torch.manual_seed(0)
            ddp = nn.parallel.DistributedDataParallel(build())
            opt = AdaFisher(ddp, lr=1e-2, update_interval=T, variant=variant)
            calls.clear()
            train(ddp, opt, [(x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local])
                             for x, y in global_batches()])
            out[key] = {
                "factors": opt.fisher_factors(),
                "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
                "layer_names": opt.layer_names,
                "all_reduce_calls": list(calls),
                "flat_size": opt._factors.pending.numel(),
            }
        # an unwrapped per-rank model (e.g. a timing copy) never communicates
        torch.manual_seed(rank)
        alone = linear_in_batch_model()
        calls.clear()
        train(alone, AdaFisher(alone, update_interval=1), global_batches()[:2])
        out["unwrapped_calls"] = len(calls)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]

    for key in ("linear", "norm", "paper"):
        r0, r1 = ranks[0][key], ranks[1][key]
        assert r0["layer_names"] == r1["layer_names"] and not any(n.startswith("module") for n in r0["layer_names"])
        for name in r0["factors"]:
            for a, b in zip(r0["factors"][name], r1["factors"][name]):
                assert torch.equal(a, b), name
        for name in r0["params"]:
            assert torch.equal(r0["params"][name], r1["params"][name]), name
        # statistics steps 0 and 2 of 3: one coalesced all-reduce of the whole flat buffer each
        assert r0["all_reduce_calls"] == [r0["flat_size"]] * 2

    assert ranks[0]["unwrapped_calls"] == ranks[1]["unwrapped_calls"] == 0
    for key, variant in (("linear", "default"), ("paper", "paper")):
        torch.manual_seed(0)
        single = linear_in_batch_model()
        opt = AdaFisher(single, lr=1e-2, update_interval=T, variant=variant)
        train(single, opt, global_batches())
        ddp = ranks[0][key]
        for name, (h, s) in opt.fisher_factors().items():
            torch.testing.assert_close(ddp["factors"][name][0], h, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(ddp["factors"][name][1], s, rtol=1e-5, atol=1e-7)
        for name, p in single.named_parameters():
            torch.testing.assert_close(ddp["params"][name], p.detach(), rtol=1e-4, atol=1e-6)
