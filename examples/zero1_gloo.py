"""ZeRO-1 with a generated optimizer: DDP + torch's ZeroRedundancyOptimizer, on CPU with gloo.

    torchrun --nproc_per_node 2 examples/zero1_gloo.py [--optimizer AdamW_adv] [--steps 50] [--check]

Each rank keeps the whole model (DDP averages the gradients) and the optimizer state of the
parameters it owns only (ZeRO partitions whole parameters across ranks); after each step every
parameter is broadcast from its owner. ``--check`` trains the unsharded optimizer alongside and
asserts the parameters are bit-identical. At the end rank 0 gathers the optimizer state
(``consolidate_state_dict``) and saves it with the model; it loads into the unsharded generated
optimizer in one process as well as back into ZeroRedundancyOptimizer. On GPUs, use
``--backend nccl`` (one rank per GPU, the model moved to ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import generated


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial parameters on every rank
    return nn.Sequential(nn.Embedding(32, 64), nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="AdamW_adv", help="a class of `generated` (not Prodigy or Adams_ZeRO)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--check", action="store_true", help="also train the unsharded optimizer and compare")
    ap.add_argument("--save", default="", help="save the consolidated checkpoint here (rank 0)")
    args = ap.parse_args()

    dist.init_process_group(args.backend)  # torchrun's env:// (127.0.0.1 by default)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"{world} ranks, {args.optimizer} under ZeroRedundancyOptimizer")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if args.backend == "nccl" else torch.device("cpu")
    cls = getattr(generated, args.optimizer)

    def build(sharded: bool):
        model = make_model().to(device)
        ddp = DDP(model)
        if sharded:
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=args.lr)
        else:
            opt = cls(model.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        return model, ddp, opt, sched

    runs = [build(True)] + ([build(False)] if args.check else [])
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(args.steps):
        tokens = torch.randint(0, 32, (16, 12), generator=g).to(device)
        for _, ddp, opt, sched in runs:
            opt.zero_grad()
            logits = ddp(tokens)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())  # learn to copy
            loss.backward()
            opt.step()
            sched.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {runs[0][3].get_last_lr()[0]:.2e}")

    zero = runs[0][2]
    mine = state_bytes(zero.optim)
    if args.check:
        full = state_bytes(runs[1][2])
        diff = max((a - b).abs().max().item() for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()))
        print(f"rank {rank}: optimizer state {mine} bytes (unsharded {full}, {mine / full:.2f}); "
              f"max |ZeRO - unsharded| = {diff}")
        assert diff == 0.0
    else:
        print(f"rank {rank}: optimizer state {mine} bytes")

    zero.consolidate_state_dict(to=0)  # every rank takes part
    if rank == 0:
        sd = zero.state_dict()
        if args.save:
            torch.save({"model": runs[0][0].state_dict(), "optimizer": sd}, args.save)
            print(f"saved {args.save}")
        # the consolidated state dict is the unsharded optimizer's: it loads in one process
        cls(make_model().parameters(), lr=args.lr).load_state_dict(sd)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
